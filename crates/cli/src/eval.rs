//! `cocomix eval`: perplexity, zero-shot tasks, and the Table 1 comparison of runs.
use std::path::PathBuf;

use anyhow::{Context, Result};
use cocomix_eval::tasks::{evaluate, load_task, require_task_file, ModelScorer, TASKS};
use cocomix_eval::{build_table1, model_scores, render_markdown, RunInfo};
use cocomix_model::AnyModel;
use cocomix_trainer::{default_device, TrainOutcome};

use crate::common::{model_tokenizer, print_json, read_text};

#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Perplexity, word perplexity and bits per byte of a text file (lm-eval's rolling
    /// windows: every token predicted once, the first from the end-of-text token).
    Ppl {
        /// Model folder (config.json + model.safetensors) or hub id.
        #[arg(long)]
        model: String,
        /// Text file to score.
        #[arg(long, required_unless_present = "data", conflicts_with = "data")]
        text: Option<PathBuf>,
        /// Or a prepared data folder: its validation shard (val.bin) is scored.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Window length (default: the model's context).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Windows per forward.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long)]
        json: bool,
    },
    /// Zero-shot tasks as lm-evaluation-harness scores them.
    Tasks {
        /// Model folder or hub id.
        #[arg(long)]
        model: String,
        /// Tasks, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            value_parser = clap::builder::PossibleValuesParser::new(TASKS),
            default_value = "lambada,hellaswag,piqa,siqa,arc_easy,winogrande"
        )]
        tasks: Vec<String>,
        /// Folder with the task data (scripts/fetch-eval-data.sh writes data/eval).
        #[arg(long, default_value = "data/eval")]
        data_dir: PathBuf,
        /// At most this many documents per task.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Compare finished runs in the layout of the paper's Table 1: validation PPL (from the
    /// run), LAMBADA and WikiText PPL, HellaSwag, PIQA, SIQA, ARC-E, WinoGrande, averages.
    /// Tasks whose data is absent show as "-".
    Runs {
        /// Run folders: a main-job folder (runs/NAME) or one student's folder.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Folder with task data (scripts/fetch-eval-data.sh).
        #[arg(long, default_value = "data/eval")]
        tasks_dir: PathBuf,
        /// Text file for the WikiText column (word perplexity).
        #[arg(long)]
        wikitext: Option<PathBuf>,
        /// At most this many documents per task.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Ppl {
            model,
            text,
            data,
            seq_len,
            batch,
            json,
        } => {
            let m = AnyModel::load(&model, &default_device()?)?;
            let tok = model_tokenizer(&model)?;
            let seq_len = seq_len.unwrap_or(m.context());
            let (what, score) = match (&text, &data) {
                (Some(t), _) => (
                    t.display().to_string(),
                    cocomix_eval::score_text_file(&m, &tok, t, seq_len, batch)?,
                ),
                (None, Some(d)) => {
                    let ds = cocomix_data::Dataset::open(d)?;
                    ds.check_tokenizer(&tok)?;
                    let what = ds.val.path().display().to_string();
                    let ids = ds.val.window(0, ds.val.len());
                    let raw = tok.decode(&ids)?;
                    let score = cocomix_eval::score_ids(&m, &ids, &raw, seq_len, batch)
                        .with_context(|| what.clone())?;
                    (what, score)
                }
                (None, None) => anyhow::bail!("pass --text FILE or --data DIR"),
            };
            if json {
                print_json(&score, true)?;
            } else {
                println!(
                    "{what}: {} predictions, nll {:.4}, ppl {:.3}, word ppl {:.3}, bits/byte {:.4} (windows of {})",
                    score.tokens,
                    score.nll,
                    score.ppl,
                    score.word_perplexity,
                    score.bits_per_byte,
                    score.seq_len
                );
            }
        }
        EvalCommand::Tasks {
            model,
            tasks,
            data_dir,
            limit,
            json,
        } => {
            // Every task's data is found before any scoring starts.
            let files = tasks
                .iter()
                .map(|t| require_task_file(&data_dir, t))
                .collect::<cocomix_eval::Result<Vec<_>>>()?;
            let m = AnyModel::load(&model, &default_device()?)?;
            let tok = model_tokenizer(&model)?;
            let scorer = ModelScorer {
                model: &m,
                max_len: m.context(),
            };
            let mut results = Vec::new();
            for (task, file) in tasks.iter().zip(&files) {
                let t = load_task(task, file)?;
                tracing::info!("{task}: {} documents from {}", t.docs.len(), file.display());
                results.push(
                    evaluate(&t, &tok, &scorer, limit)
                        .with_context(|| file.display().to_string())?,
                );
            }
            if json {
                print_json(&results, true)?;
            } else {
                println!("| task | samples | metric | value | stderr |\n|---|---|---|---|---|");
                for r in &results {
                    for (name, m) in &r.metrics {
                        println!(
                            "| {} | {} | {name} | {:.4} | {:.4} |",
                            r.task, r.samples, m.value, m.stderr
                        );
                    }
                }
            }
        }
        EvalCommand::Runs {
            runs,
            tasks_dir,
            wikitext,
            limit,
            json,
        } => {
            // Read every report before evaluating anything.
            let mut outcomes: Vec<(String, TrainOutcome)> = Vec::new();
            for dir in &runs {
                // A job folder (compare.json: every run of every seed) or one run's folder.
                let p = [dir.join("compare.json"), dir.join("report.json")]
                    .into_iter()
                    .find(|p| p.is_file())
                    .unwrap_or_else(|| dir.join("report.json"));
                let v: serde_json::Value = serde_json::from_str(&read_text(&p)?)
                    .with_context(|| format!("{}: not JSON", p.display()))?;
                let list: Vec<(String, serde_json::Value)> = match v.get("runs") {
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .map(|r| {
                            let name = format!(
                                "{}/{}/seed-{}",
                                dir.display(),
                                r["arm"].as_str().unwrap_or_default(),
                                r["seed"]
                            );
                            (name, r["outcome"].clone())
                        })
                        .collect(),
                    _ => vec![(dir.display().to_string(), v)],
                };
                for (name, o) in list {
                    let o: TrainOutcome = serde_json::from_value(o)
                        .with_context(|| format!("{}: not a run report", p.display()))?;
                    outcomes.push((name, o));
                }
            }
            if let Some(w) = &wikitext {
                anyhow::ensure!(w.is_file(), "{}: no such file (--wikitext)", w.display());
            }
            let dev = default_device()?;
            let mut scored = Vec::new();
            for (dir, o) in outcomes {
                let spec = o.final_dir.to_string_lossy().to_string();
                let m = AnyModel::load(&spec, &dev)
                    .with_context(|| format!("loading the final model of {dir} ({spec})"))?;
                let tok = model_tokenizer(&spec)?;
                let scores = model_scores(&m, &tok, &tasks_dir, wikitext.as_deref(), limit)
                    .with_context(|| format!("evaluating {dir} ({spec})"))?;
                let info = RunInfo {
                    run: dir,
                    method: o.objective.to_string(),
                    params: o.params,
                    val_ppl: Some(o.val_ppl),
                };
                scored.push((info, scores));
            }
            let table = build_table1(&scored);
            if json {
                print_json(&table, true)?;
            } else {
                print!("{}", render_markdown(&table));
            }
        }
    }
    Ok(())
}
