//! The comparison of runs in the layout of the paper's Table 1: perplexities (validation,
//! LAMBADA, WikiText), the five zero-shot accuracies, and their averages.
use std::path::Path;

use cocomix_data::Tokenizer;
use cocomix_model::AnyModel;
use serde::Serialize;

use crate::tasks::{evaluate, find_task_file, load_task, ModelScorer, TaskResult};
use crate::{score_text_file, Error, Result, TextScore};

/// The accuracy columns of Table 1 and the metric each reports (HellaSwag length-normalised,
/// as lm-eval's `acc_norm`; the others plain `acc`).
pub const ACCURACY_COLUMNS: [(&str, &str); 5] = [
    ("hellaswag", "acc_norm"),
    ("piqa", "acc"),
    ("siqa", "acc"),
    ("arc_easy", "acc"),
    ("winogrande", "acc"),
];

/// What the caller knows about a run (the CLI reads it from the run's report).
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    /// The run's folder or name.
    pub run: String,
    /// Training objective (ntp, kd, cocomix).
    pub method: String,
    /// Parameter count.
    pub params: usize,
    /// Validation perplexity of the run (the paper's OpenWebText column).
    pub val_ppl: Option<f64>,
}

/// A model's downstream scores: the tasks whose data was found, and the WikiText text.
#[derive(Clone, Debug, Serialize)]
pub struct ModelScores {
    /// One result per task whose data was found.
    pub tasks: Vec<TaskResult>,
    /// Scores of the WikiText file, if one was given.
    pub wikitext: Option<TextScore>,
}

/// Evaluates `model` on every task of [`crate::tasks::TASKS`] whose data is in `tasks_dir`
/// (absent ones are skipped) and, if given, on the WikiText file (windows of the model's
/// context).
pub fn model_scores(
    model: &AnyModel,
    tok: &Tokenizer,
    tasks_dir: &Path,
    wikitext: Option<&Path>,
    limit: Option<usize>,
) -> Result<ModelScores> {
    let scorer = ModelScorer {
        model,
        max_len: model.context(),
    };
    let mut tasks = Vec::new();
    for task in crate::tasks::TASKS {
        if let Some(file) = find_task_file(tasks_dir, task) {
            let t = load_task(task, &file)?;
            tasks.push(evaluate(&t, tok, &scorer, limit).map_err(|e| Error::file(&file, e))?);
        }
    }
    let wikitext = wikitext
        .map(|w| score_text_file(model, tok, w, model.context(), 4))
        .transpose()?;
    Ok(ModelScores { tasks, wikitext })
}

/// One row of Table 1. Accuracies are in percent; a column is `None` when its data was
/// absent, and an average is `None` unless all of its columns are present.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Table1Row {
    /// [`RunInfo::run`].
    pub run: String,
    /// [`RunInfo::method`].
    pub method: String,
    /// [`RunInfo::params`].
    pub params: usize,
    /// Validation (OpenWebText in the paper) perplexity.
    pub val_ppl: Option<f64>,
    /// LAMBADA perplexity of the gold continuation.
    pub lambada_ppl: Option<f64>,
    /// WikiText word perplexity.
    pub wikitext_ppl: Option<f64>,
    /// HellaSwag acc_norm (%).
    pub hellaswag: Option<f64>,
    /// PIQA acc (%).
    pub piqa: Option<f64>,
    /// Social IQa acc (%).
    pub siqa: Option<f64>,
    /// ARC-Easy acc (%).
    pub arc_easy: Option<f64>,
    /// WinoGrande acc (%).
    pub winogrande: Option<f64>,
    /// Mean of the three perplexities (validation, LAMBADA, WikiText).
    pub avg_ppl: Option<f64>,
    /// Mean of the five accuracies.
    pub avg_acc: Option<f64>,
}

/// Table 1: one row per run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Table1 {
    /// In the order the runs were given.
    pub rows: Vec<Table1Row>,
}

/// The mean of all values, `None` if any is missing.
fn mean_of_all(xs: &[Option<f64>]) -> Option<f64> {
    let v: Option<Vec<f64>> = xs.iter().copied().collect();
    v.map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// Builds Table 1 from each run's info and scores.
pub fn build_table1(runs: &[(RunInfo, ModelScores)]) -> Table1 {
    let rows = runs
        .iter()
        .map(|(info, scores)| {
            let metric = |task: &str, name: &str| {
                scores
                    .tasks
                    .iter()
                    .find(|r| r.task == task)
                    .and_then(|r| r.metrics.get(name))
                    .map(|m| m.value)
            };
            let acc = ACCURACY_COLUMNS.map(|(task, name)| metric(task, name).map(|v| 100.0 * v));
            let lambada_ppl = metric("lambada", "perplexity");
            let wikitext_ppl = scores.wikitext.as_ref().map(|w| w.word_perplexity);
            Table1Row {
                run: info.run.clone(),
                method: info.method.clone(),
                params: info.params,
                val_ppl: info.val_ppl,
                lambada_ppl,
                wikitext_ppl,
                hellaswag: acc[0],
                piqa: acc[1],
                siqa: acc[2],
                arc_easy: acc[3],
                winogrande: acc[4],
                avg_ppl: mean_of_all(&[info.val_ppl, lambada_ppl, wikitext_ppl]),
                avg_acc: mean_of_all(&acc),
            }
        })
        .collect();
    Table1 { rows }
}

/// Table 1 as a markdown table (one decimal, "-" for absent values).
pub fn render_markdown(table: &Table1) -> String {
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
    let mut out = String::from(
        "| run | method | params | val PPL | LAMB PPL | Wiki PPL | HellaS | PIQA | SIQA | ARC-E | WinoG | Avg PPL | Avg Acc |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &table.rows {
        let cells = [
            r.val_ppl,
            r.lambada_ppl,
            r.wikitext_ppl,
            r.hellaswag,
            r.piqa,
            r.siqa,
            r.arc_easy,
            r.winogrande,
            r.avg_ppl,
            r.avg_acc,
        ]
        .map(cell);
        out.push_str(&format!(
            "| {} | {} | {:.2}M | {} |\n",
            r.run,
            r.method,
            r.params as f64 / 1e6,
            cells.join(" | ")
        ));
    }
    out
}
