//! The model-facing subcommands: eval, generate, sae, attribute, labels.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelChoice, LabelMode};
use cocomix_data::Tokenizer;
use cocomix_model::{AnyModel, Gpt2, Hook, ResidualHook, Sampling, Steer, SteerMode};
use cocomix_sae::Sae;
use cocomix_trainer::default_device;

/// The tokenizer of a model: a GGUF file's own, a folder's, a hub repo's, else the bundled
/// GPT-2 one.
fn model_tokenizer(spec: &str) -> Result<Tokenizer> {
    let dir = Path::new(spec);
    if dir.is_file() && cocomix_model::gguf::is_gguf_path(dir) {
        return Ok(Tokenizer::from_gguf(dir)?);
    }
    if !dir.exists() && spec.split('/').count() == 2 && !spec.starts_with('.') {
        return Ok(Tokenizer::load(spec)?);
    }
    if dir.is_dir() {
        if let Some(t) = Tokenizer::from_dir(dir)? {
            return Ok(t);
        }
        tracing::info!("{spec} has no tokenizer.json: using the bundled GPT-2 tokenizer");
    }
    Ok(Tokenizer::gpt2()?)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Token ids of a text file for a model of context `context` and vocabulary `vocab`
/// (truncated to the context with a warning).
fn text_ids(tok: &Tokenizer, path: &Path, context: usize, vocab: usize) -> Result<Vec<u32>> {
    let mut ids = tok.encode(&read_text(path)?)?;
    if ids.len() < 2 {
        bail!("{}: fewer than two tokens", path.display());
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab}: the tokenizer does not match the model (put its tokenizer.json in the model folder)");
    }
    if ids.len() > context {
        tracing::warn!(
            "{}: {} tokens, keeping the first {context} (the model's context)",
            path.display(),
            ids.len()
        );
        ids.truncate(context);
    }
    Ok(ids)
}

#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Perplexity of a model on a text file, over non-overlapping windows.
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
    /// Zero-shot tasks (lambada, hellaswag, piqa, siqa, arc_easy, winogrande) as
    /// lm-evaluation-harness scores them.
    Tasks {
        /// Model folder or hub id.
        #[arg(long)]
        model: String,
        /// Comma-separated tasks.
        #[arg(
            long,
            default_value = "lambada,hellaswag,piqa,siqa,arc_easy,winogrande"
        )]
        tasks: String,
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

pub fn eval(cmd: EvalCommand) -> Result<()> {
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
            let (ids, raw, what) = match (&text, &data) {
                (Some(t), _) => {
                    let raw = read_text(t)?;
                    (tok.encode(&raw)?, raw, t.display().to_string())
                }
                (None, Some(d)) => {
                    let ds = cocomix_data::Dataset::open(d)?;
                    ds.check_tokenizer(&tok)?;
                    let ids = ds.val.window(0, ds.val.len());
                    let raw = tok.decode(&ids)?;
                    (ids, raw, ds.val.path().display().to_string())
                }
                (None, None) => bail!("pass --text FILE or --data DIR"),
            };
            let r =
                cocomix_trainer::eval::perplexity(&m, &ids, seq_len.unwrap_or(m.context()), batch)?;
            // WikiText-style: total NLL over the words and bytes of the text.
            let total = r.nll * r.tokens as f64;
            let words = raw.split_whitespace().count().max(1);
            let v = serde_json::json!({
                "tokens": r.tokens, "nll": r.nll, "ppl": r.ppl, "seq_len": r.seq_len,
                "words": words, "word_perplexity": (total / words as f64).exp(),
                "bytes": raw.len(), "bits_per_byte": total / raw.len().max(1) as f64 / std::f64::consts::LN_2,
            });
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{what}: {} predictions, nll {:.4}, ppl {:.3}, word ppl {:.3} (windows of {})",
                    r.tokens, r.nll, r.ppl, v["word_perplexity"], r.seq_len
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
            let m = AnyModel::load(&model, &default_device()?)?;
            let tok = model_tokenizer(&model)?;
            let scorer = cocomix_trainer::tasks::ModelScorer {
                model: &m,
                max_len: m.context(),
            };
            let mut results = Vec::new();
            for task in tasks.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let file = cocomix_trainer::tasks::find_task_file(&data_dir, task).with_context(|| {
                    format!("no data for task {task} in {}: run scripts/fetch-eval-data.sh (or pass --data-dir)", data_dir.display())
                })?;
                let t = cocomix_trainer::tasks::load_task(task, &file)?;
                tracing::info!("{task}: {} documents", t.docs.len());
                results.push(cocomix_trainer::tasks::evaluate(&t, &tok, &scorer, limit)?);
            }
            if json {
                println!("{}", serde_json::to_string(&results)?);
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
            let mut rows: Vec<(String, cocomix_trainer::TrainOutcome)> = Vec::new();
            for dir in &runs {
                let p = dir.join("report.json");
                let v: serde_json::Value = serde_json::from_str(&read_text(&p)?)
                    .with_context(|| format!("parsing {}", p.display()))?;
                let outs: Vec<serde_json::Value> = match v.get("runs") {
                    Some(serde_json::Value::Array(a)) => a.clone(),
                    _ => vec![v],
                };
                for o in outs {
                    let o: cocomix_trainer::TrainOutcome = serde_json::from_value(o)
                        .with_context(|| format!("{}: not a run report", p.display()))?;
                    rows.push((dir.display().to_string(), o));
                }
            }
            let dev = default_device()?;
            let mut table = Vec::new();
            for (dir, o) in &rows {
                let spec = o.final_dir.to_string_lossy().to_string();
                let m = AnyModel::load(&spec, &dev)
                    .with_context(|| format!("loading the final model of {dir}"))?;
                let tok = model_tokenizer(&spec)?;
                let scorer = cocomix_trainer::tasks::ModelScorer {
                    model: &m,
                    max_len: m.context(),
                };
                let mut row = serde_json::json!({ "run": dir, "objective": o.objective, "params": o.params, "val_ppl": o.val_ppl });
                for task in cocomix_trainer::tasks::TASKS {
                    if let Some(file) = cocomix_trainer::tasks::find_task_file(&tasks_dir, task) {
                        let r = cocomix_trainer::tasks::evaluate(
                            &cocomix_trainer::tasks::load_task(task, &file)?,
                            &tok,
                            &scorer,
                            limit,
                        )?;
                        let (metric, scale) = match task {
                            "lambada" => ("perplexity", 1.0),
                            "hellaswag" => ("acc_norm", 100.0),
                            _ => ("acc", 100.0),
                        };
                        row[task] = (r.metrics[metric].value * scale).into();
                    }
                }
                if let Some(w) = &wikitext {
                    let raw = read_text(w)?;
                    let r =
                        cocomix_trainer::eval::perplexity(&m, &tok.encode(&raw)?, m.context(), 4)?;
                    row["wikitext"] = ((r.nll * r.tokens as f64)
                        / raw.split_whitespace().count().max(1) as f64)
                        .exp()
                        .into();
                }
                table.push(row);
            }
            if json {
                println!("{}", serde_json::to_string(&table)?);
            } else {
                print_table1(&table);
            }
        }
    }
    Ok(())
}

/// The comparison table in the layout of the paper's Table 1.
fn print_table1(rows: &[serde_json::Value]) {
    let cell = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    let mean = |vals: Vec<Option<f64>>| {
        let v: Vec<f64> = vals.into_iter().flatten().collect();
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    println!("| run | method | params | val PPL | LAMB PPL | Wiki PPL | HellaS | PIQA | SIQA | ARC-E | WinoG | Avg PPL | Avg Acc |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let ppls = ["val_ppl", "lambada", "wikitext"].map(|k| r[k].as_f64());
        let accs = ["hellaswag", "piqa", "siqa", "arc_easy", "winogrande"].map(|k| r[k].as_f64());
        println!(
            "| {} | {} | {:.2}M | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["run"].as_str().unwrap_or_default(),
            r["objective"].as_str().unwrap_or_default(),
            r["params"].as_f64().unwrap_or(0.0) / 1e6,
            cell(&r["val_ppl"]),
            cell(&r["lambada"]),
            cell(&r["wikitext"]),
            cell(&r["hellaswag"]),
            cell(&r["piqa"]),
            cell(&r["siqa"]),
            cell(&r["arc_easy"]),
            cell(&r["winogrande"]),
            mean(ppls.to_vec()),
            mean(accs.to_vec()),
        );
    }
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model folder or hub id (GPT-2 or a CoCoMix student).
    #[arg(long)]
    model: String,
    #[arg(long)]
    prompt: String,
    /// Steer concept IDX by VALUE (repeatable). CoCoMix: the predicted concept logit; GPT-2
    /// with --sae: the SAE latent at --layer.
    #[arg(long = "steer", value_name = "IDX=VALUE")]
    steer: Vec<String>,
    /// `add` VALUE to the concept, or `set` it to VALUE.
    #[arg(long, default_value = "add")]
    steer_mode: String,
    /// Keep steered concepts in the TopK whatever their value (CoCoMix).
    #[arg(long)]
    force_topk: bool,
    /// SAE file, for steering a GPT-2 through its latents.
    #[arg(long, requires = "layer")]
    sae: Option<String>,
    /// The layer the SAE reads (output of block LAYER).
    #[arg(long)]
    layer: Option<usize>,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Steering a GPT-2 through an SAE: encode the residual, edit latents, decode, and keep the
/// SAE's reconstruction error (so an empty edit leaves the residual unchanged).
struct SaeSteer<'a> {
    sae: &'a Sae,
    steer: &'a [Steer],
}

impl ResidualHook for SaeSteer<'_> {
    fn apply(&self, x: &Tensor) -> cocomix_model::Result<Tensor> {
        let run = || -> cocomix_sae::Result<Tensor> {
            let shape = x.shape().clone();
            let codes = self.sae.encode(x)?;
            let z = self.sae.dense(&codes)?;
            let c = self.sae.n_latents();
            let (mut add, mut keep, mut set) = (vec![0f32; c], vec![1f32; c], vec![0f32; c]);
            for s in self.steer {
                match s.mode {
                    SteerMode::Add => add[s.index] += s.value,
                    SteerMode::Set => {
                        keep[s.index] = 0.0;
                        set[s.index] = s.value;
                    }
                }
            }
            let t = |v: Vec<f32>| Tensor::from_vec(v, c, x.device());
            let z2 = z
                .broadcast_mul(&t(keep)?)?
                .broadcast_add(&t(set)?)?
                .broadcast_add(&t(add)?)?;
            let before = self.sae.decode_dense(&z, &codes.mean, &codes.std)?;
            let after = self.sae.decode_dense(&z2, &codes.mean, &codes.std)?;
            Ok((x.reshape(before.shape())? + (after - before)?)?.reshape(shape)?)
        };
        run().map_err(|e| cocomix_model::Error::Other(format!("SAE steering: {e}")))
    }
}

fn parse_steer(items: &[String], mode: &str, force: bool, n_concepts: usize) -> Result<Vec<Steer>> {
    let mode = match mode {
        "add" => SteerMode::Add,
        "set" => SteerMode::Set,
        other => bail!("--steer-mode {other:?}: expected add or set"),
    };
    items
        .iter()
        .map(|s| {
            let (i, v) = s
                .split_once('=')
                .with_context(|| format!("--steer {s:?}: expected IDX=VALUE"))?;
            let index: usize = i
                .trim()
                .parse()
                .with_context(|| format!("--steer {s:?}: bad index"))?;
            let value: f32 = v
                .trim()
                .parse()
                .with_context(|| format!("--steer {s:?}: bad value"))?;
            if index >= n_concepts {
                bail!("--steer {s:?}: index {index} is out of range ({n_concepts} concepts)");
            }
            Ok(Steer {
                index,
                value,
                mode,
                force,
            })
        })
        .collect()
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let dev = default_device()?;
    let model = AnyModel::load(&a.model, &dev)?;
    let tok = model_tokenizer(&a.model)?;
    let prompt = tok.encode(&a.prompt)?;
    let sae = match &a.sae {
        Some(s) => {
            if matches!(model, AnyModel::Student(_)) {
                bail!(
                    "--sae steers a GPT-2; a CoCoMix student is steered through its own concepts"
                );
            }
            let sae = Sae::load(s, &dev)?;
            sae.check_input_width(model.d_model(), &a.model)?;
            Some(sae)
        }
        None => None,
    };
    let n_concepts = match (&model, &sae) {
        (AnyModel::Student(s), _) => s.cfg.concept.as_ref().map_or(0, |c| c.concept_dim),
        (_, Some(sae)) => sae.n_latents(),
        _ => 0,
    };
    if !a.steer.is_empty() && n_concepts == 0 {
        bail!("--steer needs a CoCoMix student, or a GPT-2 with --sae and --layer");
    }
    let steer = parse_steer(&a.steer, &a.steer_mode, a.force_topk, n_concepts)?;
    let hook_impl = sae.as_ref().map(|s| SaeSteer {
        sae: s,
        steer: &steer,
    });
    let hook = hook_impl.as_ref().map(|h| Hook {
        layer: a.layer.expect("clap requires --layer"),
        hook: h as &dyn ResidualHook,
    });
    let sampling = Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop: Some(tok.eot_id()),
    };
    let mut cache = model.new_cache();
    let student_steer: &[Steer] = if matches!(model, AnyModel::Student(_)) {
        &steer
    } else {
        &[]
    };
    let out = cocomix_model::generate(
        &prompt,
        model.context(),
        &dev,
        &mut cache,
        &sampling,
        |ids, c| model.step(ids, c, student_steer, hook.as_ref()),
    )?;
    println!("{}{}", a.prompt, tok.decode(&out)?);
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum SaeCommand {
    /// Train a TopK SAE on a teacher's residual stream at LAYER, streaming a prepared corpus.
    Train {
        #[arg(long)]
        teacher: String,
        #[arg(long)]
        layer: usize,
        /// Prepared data folder (cocomix prepare), tokenized like the teacher.
        #[arg(long)]
        data: PathBuf,
        /// Output .safetensors file (metrics go beside it as .jsonl).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 32768)]
        latents: usize,
        #[arg(long, default_value_t = 32)]
        k: usize,
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
        /// Adam learning rate (default: Gao et al.'s scaling rule).
        #[arg(long)]
        lr: Option<f64>,
        /// Window length the activations are taken from (default: the teacher's context).
        #[arg(long)]
        context: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Sparse SAE codes of a text: JSON with tokens, indices and values ([T][k]).
    Encode {
        #[arg(long)]
        sae: String,
        /// The model whose residual the SAE reads.
        #[arg(long)]
        model: String,
        #[arg(long)]
        layer: usize,
        #[arg(long)]
        text: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn sae(cmd: SaeCommand) -> Result<()> {
    let dev = default_device()?;
    match cmd {
        SaeCommand::Train {
            teacher,
            layer,
            data,
            out,
            latents,
            k,
            steps,
            batch_tokens,
            lr,
            context,
            seed,
        } => {
            let t = Gpt2::load(&teacher, &dev)?;
            let ds = cocomix_data::Dataset::open(&data)?;
            ds.check_tokenizer(&model_tokenizer(&teacher)?)?;
            if layer >= t.cfg.n_layer {
                bail!("--layer {layer}: the teacher has {} blocks", t.cfg.n_layer);
            }
            let mut cfg = cocomix_sae::SaeTrainConfig::new(t.cfg.n_embd, latents, k);
            if let Some(lr) = lr {
                cfg.lr = lr;
            }
            cfg.seed = seed;
            let ctx = context.unwrap_or(t.cfg.n_positions).min(t.cfg.n_positions);
            let weights = cocomix_model::gpt2::resolve_model_files(&teacher)?.1;
            let meta = [
                ("teacher", teacher.clone()),
                ("teacher_sha256", cocomix_data::file_sha256(&weights)?),
            ];
            cocomix_trainer::pipeline::train_sae(
                &t,
                &ds,
                cocomix_trainer::pipeline::SaeJob {
                    sae: cfg,
                    layer,
                    steps,
                    batch_tokens,
                    context: ctx,
                },
                &out,
                &meta,
            )?;
            eprintln!(
                "saved {} (metrics: {})",
                out.display(),
                out.with_extension("jsonl").display()
            );
        }
        SaeCommand::Encode {
            sae,
            model,
            layer,
            text,
            json,
        } => {
            let m = Gpt2::load(&model, &dev)?;
            let s = Sae::load(&sae, &dev)?;
            s.check_input_width(m.cfg.n_embd, &format!("{model} at layer {layer}"))?;
            let tok = model_tokenizer(&model)?;
            let ids = text_ids(&tok, &text, m.cfg.n_positions, m.cfg.vocab_size)?;
            let x = m.hidden_state(&Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?, layer)?;
            let codes = s.encode(&x)?;
            let v = serde_json::json!({
                "tokens": ids,
                "indices": codes.indices.to_vec2::<u32>()?,
                "values": codes.values.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            });
            print_json(&v, json)?;
        }
    }
    Ok(())
}

fn print_json(v: &serde_json::Value, compact: bool) -> Result<()> {
    println!(
        "{}",
        if compact {
            serde_json::to_string(v)?
        } else {
            serde_json::to_string_pretty(v)?
        }
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct AttributeArgs {
    #[arg(long)]
    teacher: String,
    #[arg(long)]
    sae: String,
    #[arg(long)]
    layer: usize,
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value_t = 4)]
    k_attr: usize,
    /// faithful (the reference release) or active-only.
    #[arg(long, default_value = "faithful")]
    mode: String,
    #[arg(long)]
    json: bool,
}

pub fn attribute(a: AttributeArgs) -> Result<()> {
    let dev = default_device()?;
    let t = Gpt2::load(&a.teacher, &dev)?;
    let s = Sae::load(&a.sae, &dev)?;
    let mode: LabelMode = a.mode.parse()?;
    let tok = model_tokenizer(&a.teacher)?;
    let ids = text_ids(&tok, &a.text, t.cfg.n_positions, t.cfg.vocab_size)?;
    let att = cocomix_attribution::attribute(
        &t,
        &s,
        &Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?,
        a.layer,
    )?;
    let (lab, sc) = cocomix_attribution::labels(&att, s.n_latents(), a.k_attr, mode)?;
    let v = serde_json::json!({
        "tokens": ids,
        "labels": lab.to_vec2::<u32>()?,
        "scores": sc.to_vec2::<f32>()?,
        "teacher_loss": att.teacher_loss,
        "mode": mode,
    });
    print_json(&v, a.json)
}

#[derive(clap::Subcommand)]
pub enum LabelsCommand {
    /// Label the aligned windows of a prepared training shard with the teacher (resumable).
    Build {
        #[arg(long)]
        teacher: String,
        #[arg(long)]
        sae: String,
        #[arg(long)]
        layer: usize,
        /// Prepared data folder; the cache is written inside it.
        #[arg(long)]
        data: PathBuf,
        /// Window length = the training context (default: the teacher's context).
        #[arg(long)]
        window: Option<usize>,
        #[arg(long, default_value_t = 4)]
        k_attr: usize,
        #[arg(long, default_value = "faithful")]
        mode: String,
        /// Windows per teacher call.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Label only the first N windows (0: all).
        #[arg(long, default_value_t = 0)]
        max_windows: usize,
    },
}

pub fn labels(cmd: LabelsCommand) -> Result<()> {
    let LabelsCommand::Build {
        teacher,
        sae,
        layer,
        data,
        window,
        k_attr,
        mode,
        batch,
        max_windows,
    } = cmd;
    let dev = default_device()?;
    let t = Gpt2::load(&teacher, &dev)?;
    let s = Sae::load(&sae, &dev)?;
    let ds = cocomix_data::Dataset::open(&data)?;
    ds.check_tokenizer(&model_tokenizer(&teacher)?)?;
    let window = window.unwrap_or(t.cfg.n_positions);
    if window > t.cfg.n_positions {
        bail!(
            "--window {window} exceeds the teacher's context {}",
            t.cfg.n_positions
        );
    }
    let sae_path = cocomix_sae_path(&sae)?;
    let spec = LabelCacheSpec::new(
        &teacher,
        &cocomix_model::gpt2::resolve_model_files(&teacher)?.1,
        &sae_path,
        s.n_latents(),
        ds.meta(),
        LabelChoice {
            layer,
            k_attr,
            window,
            mode: mode.parse()?,
            max_windows,
        },
    )?;
    let dir = LabelCache::path_for(&data, &spec);
    let cache = LabelCache::build(&t, &s, &spec, &ds.train, &dir, batch)?;
    eprintln!(
        "{}: {} windows of {window} tokens",
        dir.display(),
        cache.n_windows()
    );
    Ok(())
}

fn cocomix_sae_path(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_file() {
        Ok(p)
    } else {
        bail!("{spec}: labels build needs a local SAE file (its hash identifies the cache)")
    }
}
