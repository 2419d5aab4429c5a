//! Zero-shot downstream tasks scored as lm-evaluation-harness scores them (the paper's
//! Table 1): LAMBADA (last-word accuracy, perplexity), HellaSwag / PIQA / Social IQa /
//! ARC-Easy (acc, acc_norm), WinoGrande (partial scoring, acc).
//!
//! Data: lm-eval-style request files (`requests.jsonl[.gz]`, one loglikelihood request per
//! line with `doc_id`, `idx`, `label`, `request.context`, `request.continuation` and the
//! document as `doc`), or the Hugging Face JSON/JSONL exports of each data set.
//!
//! acc_norm is lm-eval's: each choice's log-likelihood divided by the number of Unicode
//! characters of the choice text as the task defines it (`len(choice)` over
//! `doc_to_choice(doc)`, without the target delimiter), see [`Choice::text`].
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, D};
use cocomix_data::Tokenizer;
use cocomix_model::AnyModel;
use serde::Serialize;

use crate::{Error, Result};

/// The tasks of the paper, by the names the CLI takes.
pub const TASKS: [&str; 6] = [
    "lambada",
    "hellaswag",
    "piqa",
    "siqa",
    "arc_easy",
    "winogrande",
];

/// One scored alternative of a document.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The prompt the continuation is scored after.
    pub context: String,
    /// What is scored, with its leading target delimiter (a space) when the task has one.
    pub continuation: String,
    /// The choice as the task defines it (lm-eval's `doc_to_choice` entry, without the
    /// delimiter): acc_norm divides by its length in characters.
    pub text: String,
}

impl Choice {
    /// A choice whose text is the continuation without its single leading space.
    pub fn new(context: impl Into<String>, continuation: impl Into<String>) -> Self {
        let continuation = continuation.into();
        Self {
            context: context.into(),
            text: continuation
                .strip_prefix(' ')
                .unwrap_or(&continuation)
                .to_string(),
            continuation,
        }
    }
}

/// One document: its alternatives and the index of the right one.
#[derive(Clone, Debug, PartialEq)]
pub struct Doc {
    /// The alternatives, in the task's order.
    pub choices: Vec<Choice>,
    /// Index of the right alternative.
    pub gold: usize,
}

/// A task's documents.
#[derive(Clone, Debug)]
pub struct Task {
    /// One of [`TASKS`] (it decides the metrics).
    pub name: String,
    /// The documents, in file order (grouped by `doc_id` for request files).
    pub docs: Vec<Doc>,
}

/// A metric's value and standard error.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    /// Mean over documents (or exp of the mean NLL for perplexity).
    pub value: f64,
    /// Standard error of the mean (bootstrap for perplexity).
    pub stderr: f64,
}

/// The result of one task.
#[derive(Clone, Debug, Serialize)]
pub struct TaskResult {
    /// The task's name.
    pub task: String,
    /// Documents scored.
    pub samples: usize,
    /// `acc`, `acc_norm` (multiple choice) or `perplexity` (LAMBADA), by name.
    pub metrics: BTreeMap<String, Metric>,
}

/// The log-likelihood of each continuation and whether it is the greedy one.
pub trait Scorer {
    /// For each `(context ids, continuation ids)`: (Σ log p(continuation), all-greedy).
    fn score(&self, group: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<(f64, bool)>>;
}

/// Scores with a model: left-truncates each `context + continuation` to the context window
/// as the harness does, and runs a group (one document's alternatives) in one forward, right-
/// padded (padding after a sequence does not change a causal model's earlier outputs).
pub struct ModelScorer<'a> {
    /// The model scored.
    pub model: &'a AnyModel,
    /// Window (defaults to the model's context).
    pub max_len: usize,
}

impl Scorer for ModelScorer<'_> {
    fn score(&self, group: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<(f64, bool)>> {
        // inp = (ctx + cont)[-(max_len + 1):][:-1]; the continuation is the tail of the targets.
        let rows: Vec<(Vec<u32>, Vec<u32>, usize)> = group
            .iter()
            .map(|(c, k)| {
                let whole: Vec<u32> = c.iter().chain(k).copied().collect();
                let tail = &whole[whole.len().saturating_sub(self.max_len + 1)..];
                (tail[..tail.len() - 1].to_vec(), tail[1..].to_vec(), k.len())
            })
            .collect();
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(rows.len() * width);
        for (inp, _, _) in &rows {
            ids.extend(inp);
            ids.extend(std::iter::repeat_n(0u32, width - inp.len()));
        }
        let x = Tensor::from_vec(ids, (rows.len(), width), self.model.device())?;
        let logits = self.model.logits(&x)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?; // [G, W, V]
        let mut out = Vec::with_capacity(rows.len());
        for (r, (inp, tgt, k)) in rows.iter().enumerate() {
            // A continuation longer than the window is scored on the tokens the window holds.
            let k = &(*k).min(inp.len());
            let row = logp.get(r)?.narrow(0, inp.len() - k, *k)?; // [k, V]
            let targets = Tensor::from_vec(tgt[tgt.len() - k..].to_vec(), (*k, 1), row.device())?;
            let picked: Vec<f32> = row.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
            let greedy: Vec<u32> = row.argmax(D::Minus1)?.to_vec1()?;
            let is_greedy = greedy
                .iter()
                .zip(&tgt[tgt.len() - k..])
                .all(|(a, b)| a == b);
            out.push((picked.iter().map(|&v| v as f64).sum(), is_greedy));
        }
        Ok(out)
    }
}

/// Token ids of a request as the harness makes them: a trailing space of the context moves
/// to the continuation; the continuation's ids are those of `context + continuation` after
/// the context's; an empty context becomes the EOT token.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let (mut ctx, mut cont) = (context.to_string(), continuation.to_string());
    let n_spaces = ctx.len() - ctx.trim_end_matches(' ').len();
    if n_spaces > 0 {
        cont = format!("{}{cont}", &ctx[ctx.len() - n_spaces..]);
        ctx.truncate(ctx.len() - n_spaces);
    }
    if ctx.is_empty() {
        return Ok((vec![tok.eot_id()], tok.encode_ordinary(&cont)?));
    }
    let whole = tok.encode_ordinary(&format!("{ctx}{cont}"))?;
    let c = tok.encode_ordinary(&ctx)?;
    let split = c.len().min(whole.len());
    Ok((whole[..split].to_vec(), whole[split..].to_vec()))
}

fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Perplexity exp(−mean log-likelihood) with a seeded bootstrap standard error (100
/// resamples, as the harness bootstraps non-mean aggregations).
fn ppl_with_bootstrap(lls: &[f64]) -> Metric {
    use rand::{Rng, SeedableRng};
    let ppl = |xs: &mut dyn Iterator<Item = f64>, n: usize| (-(xs.sum::<f64>() / n as f64)).exp();
    let value = ppl(&mut lls.iter().copied(), lls.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let samples: Vec<f64> = (0..100)
        .map(|_| {
            ppl(
                &mut (0..lls.len()).map(|_| lls[rng.random_range(0..lls.len())]),
                lls.len(),
            )
        })
        .collect();
    Metric {
        value,
        stderr: mean_stderr(&samples).1 * (samples.len() as f64).sqrt(),
    }
}

/// `np.argmax`: the first maximum, a NaN counting as the maximum.
fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, x) in xs.enumerate() {
        match best {
            Some((_, b)) if b.is_nan() || !(x > b || x.is_nan()) => {}
            _ => best = Some((i, x)),
        }
    }
    best.map_or(0, |b| b.0)
}

/// Evaluates `task` with `scorer` on at most `limit` documents.
pub fn evaluate(
    task: &Task,
    tok: &Tokenizer,
    scorer: &dyn Scorer,
    limit: Option<usize>,
) -> Result<TaskResult> {
    let docs = &task.docs[..limit.unwrap_or(usize::MAX).min(task.docs.len())];
    if docs.is_empty() {
        return Err(Error::Invalid(format!("{}: no documents", task.name)));
    }
    let (mut acc, mut acc_norm, mut lls, mut greedy) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for doc in docs {
        let group: Vec<(Vec<u32>, Vec<u32>)> = doc
            .choices
            .iter()
            .map(|c| encode_pair(tok, &c.context, &c.continuation))
            .collect::<Result<_>>()?;
        let scores = scorer.score(&group)?;
        let best = argmax(scores.iter().map(|s| s.0));
        // lm-eval: lls / [len(choice) for choice in doc_to_choice(doc)], in characters.
        let best_norm = argmax(
            scores
                .iter()
                .zip(&doc.choices)
                .map(|(s, c)| s.0 / c.text.chars().count() as f64),
        );
        acc.push((best == doc.gold) as u8 as f64);
        acc_norm.push((best_norm == doc.gold) as u8 as f64);
        lls.push(scores[doc.gold].0);
        greedy.push(scores[doc.gold].1 as u8 as f64);
    }
    let m = |xs: &[f64]| {
        let (value, stderr) = mean_stderr(xs);
        Metric { value, stderr }
    };
    let mut metrics = BTreeMap::new();
    match task.name.as_str() {
        "lambada" => {
            metrics.insert("acc".into(), m(&greedy));
            metrics.insert("perplexity".into(), ppl_with_bootstrap(&lls));
        }
        "winogrande" => {
            metrics.insert("acc".into(), m(&acc));
        }
        _ => {
            metrics.insert("acc".into(), m(&acc));
            metrics.insert("acc_norm".into(), m(&acc_norm));
        }
    }
    Ok(TaskResult {
        task: task.name.clone(),
        samples: docs.len(),
        metrics,
    })
}

fn read_maybe_gz(path: &Path) -> Result<String> {
    let raw = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        gunzip(&raw, &mut s).map_err(|e| Error::file(path, format!("corrupt gzip: {e}")))?;
        Ok(s)
    } else {
        String::from_utf8(raw).map_err(|e| Error::file(path, e))
    }
}

fn gunzip(raw: &[u8], out: &mut String) -> std::io::Result<usize> {
    flate2::read::MultiGzDecoder::new(raw).read_to_string(out)
}

/// The files a task's data may live in under `data_dir`, in the order they are tried:
/// `<task>/requests.jsonl.gz` (as `scripts/fetch-eval-data.sh` writes it),
/// `<task>/requests.jsonl`, or `<task>.jsonl` / `<task>.json` (HF export).
pub fn task_file_candidates(data_dir: &Path, task: &str) -> [PathBuf; 4] {
    [
        data_dir.join(task).join("requests.jsonl.gz"),
        data_dir.join(task).join("requests.jsonl"),
        data_dir.join(format!("{task}.jsonl")),
        data_dir.join(format!("{task}.json")),
    ]
}

/// The first of [`task_file_candidates`] that exists.
pub fn find_task_file(data_dir: &Path, task: &str) -> Option<PathBuf> {
    task_file_candidates(data_dir, task)
        .into_iter()
        .find(|p| p.is_file())
}

/// [`find_task_file`], or an error naming the folder and the files looked for.
pub fn require_task_file(data_dir: &Path, task: &str) -> Result<PathBuf> {
    find_task_file(data_dir, task).ok_or_else(|| {
        let tried: Vec<String> = task_file_candidates(data_dir, task)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        Error::file(
            data_dir,
            format!(
                "no data for task {task} (looked for {}); run scripts/fetch-eval-data.sh",
                tried.join(", ")
            ),
        )
    })
}

/// Loads a task from a request file or an HF export.
pub fn load_task(task: &str, path: &Path) -> Result<Task> {
    if !TASKS.contains(&task) {
        return Err(Error::Invalid(format!(
            "unknown task {task:?}; known: {}",
            TASKS.join(", ")
        )));
    }
    let text = read_maybe_gz(path)?;
    let rows: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| Error::file(path, e))?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))
            })
            .collect::<Result<_>>()?
    };
    let docs = if rows.first().is_some_and(|r| r.get("request").is_some()) {
        from_requests(&rows, path)?
    } else {
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                from_hf(task, r).ok_or_else(|| {
                    Error::file(path, format!("row {}: not a {task} example", i + 1))
                })
            })
            .collect::<Result<_>>()?
    };
    if docs.is_empty() {
        return Err(Error::file(path, "no documents"));
    }
    Ok(Task {
        name: task.to_string(),
        docs,
    })
}

/// Request files: group lines by `doc_id` (skipping the unconditional requests, whose ids
/// are offset by 1,000,000), alternatives in `idx` order, gold from `label`. A choice's
/// text is `doc.choices[idx]` where the document lists its choices (ARC-Easy, HellaSwag,
/// PIQA, Social IQa), else the continuation without its leading space (WinoGrande,
/// whose acc_norm is not reported, and LAMBADA).
fn from_requests(rows: &[serde_json::Value], path: &Path) -> Result<Vec<Doc>> {
    let mut by_doc: BTreeMap<u64, Vec<(u64, Choice, serde_json::Value)>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let bad = || {
            Error::file(
                path,
                format!(
                    "request {}: missing doc_id / idx / request.context / request.continuation",
                    i + 1
                ),
            )
        };
        let doc_id = r.get("doc_id").and_then(|v| v.as_u64()).ok_or_else(bad)?;
        if doc_id >= 1_000_000 {
            continue;
        }
        let idx = r.get("idx").and_then(|v| v.as_u64()).ok_or_else(bad)?;
        let req = r.get("request").ok_or_else(bad)?;
        let field = |k: &str| req.get(k).and_then(|v| v.as_str()).ok_or_else(bad);
        let mut choice = Choice::new(field("context")?, field("continuation")?);
        if let Some(list) = r.pointer("/doc/choices").and_then(|v| v.as_array()) {
            choice.text = list
                .get(idx as usize)
                .and_then(|v| v.as_str())
                .ok_or_else(|| {
                    Error::file(
                        path,
                        format!(
                            "request {}: idx {idx} has no string in doc.choices ({} entries)",
                            i + 1,
                            list.len()
                        ),
                    )
                })?
                .to_string();
        }
        by_doc.entry(doc_id).or_default().push((
            idx,
            choice,
            r.get("label").cloned().unwrap_or_default(),
        ));
    }
    by_doc
        .into_values()
        .map(|mut alts| {
            alts.sort_by_key(|a| a.0);
            let gold = match &alts[0].2 {
                serde_json::Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
                _ => 0, // LAMBADA: one alternative, the gold continuation
            };
            if gold >= alts.len() {
                return Err(Error::file(
                    path,
                    format!("label {gold} out of range for {} alternatives", alts.len()),
                ));
            }
            Ok(Doc {
                choices: alts.into_iter().map(|a| a.1).collect(),
                gold,
            })
        })
        .collect()
}

fn s<'a>(r: &'a serde_json::Value, k: &str) -> Option<&'a str> {
    r.get(k)?.as_str()
}

/// Hugging Face exports, prompted as the harness prompts each task.
fn from_hf(task: &str, r: &serde_json::Value) -> Option<Doc> {
    // Multiple choice: the choice texts follow the target delimiter " ".
    let mc = |context: String, texts: Vec<String>, gold: usize| Doc {
        choices: texts
            .iter()
            .map(|t| Choice::new(context.clone(), format!(" {t}")))
            .collect(),
        gold,
    };
    let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|e| e.as_str().map(str::to_string))
            .collect()
    };
    Some(match task {
        "lambada" => {
            let text = s(r, "text")?;
            let cut = text.rfind(' ')?;
            Doc {
                choices: vec![Choice::new(&text[..cut], &text[cut..])],
                gold: 0,
            }
        }
        "hellaswag" => {
            // lm-eval's `process_docs`: query and endings through `preprocess`.
            let ctx = format!("{} {}", s(r, "ctx_a")?, py_capitalize(s(r, "ctx_b")?));
            let query = hellaswag_preprocess(&format!("{}: {ctx}", s(r, "activity_label")?));
            let endings = strings(r.get("endings")?)?;
            mc(
                query,
                endings.iter().map(|e| hellaswag_preprocess(e)).collect(),
                label(r.get("label")?)?,
            )
        }
        "piqa" => mc(
            format!("Question: {}\nAnswer:", s(r, "goal")?),
            vec![s(r, "sol1")?.to_string(), s(r, "sol2")?.to_string()],
            label(r.get("label")?)?,
        ),
        "siqa" => mc(
            format!(
                "Question: {} {}\nAnswer:",
                s(r, "context")?,
                s(r, "question")?
            ),
            ["answerA", "answerB", "answerC"]
                .iter()
                .map(|k| s(r, k).map(str::to_string))
                .collect::<Option<_>>()?,
            label(r.get("label")?)?.checked_sub(1)?,
        ),
        "arc_easy" => {
            let choices = r.get("choices")?;
            let labels = strings(choices.get("label")?)?;
            let gold = labels
                .iter()
                .position(|l| Some(l.as_str()) == s(r, "answerKey"))?;
            mc(
                format!("Question: {}\nAnswer:", s(r, "question")?),
                strings(choices.get("text")?)?,
                gold,
            )
        }
        "winogrande" => {
            // Partial scoring: the option fills the blank in the context, the rest of the
            // sentence is scored; lm-eval's choices are the partial contexts.
            let sentence = s(r, "sentence")?;
            let blank = sentence.find('_')?;
            let suffix = format!(" {}", sentence[blank + 1..].trim());
            let opts = [s(r, "option1")?, s(r, "option2")?];
            Doc {
                choices: opts
                    .iter()
                    .map(|o| {
                        let context = format!("{}{o}", &sentence[..blank]);
                        Choice {
                            text: context.clone(),
                            context,
                            continuation: suffix.clone(),
                        }
                    })
                    .collect(),
                gold: label(r.get("answer")?)?.checked_sub(1)?,
            }
        }
        _ => return None,
    })
}

fn label(v: &serde_json::Value) -> Option<usize> {
    v.as_u64()
        .map(|n| n as usize)
        .or_else(|| v.as_str()?.trim().parse().ok())
}

/// Python's `str.capitalize`: the first character upper case, the rest lower case.
fn py_capitalize(x: &str) -> String {
    let mut c = x.chars();
    c.next()
        .map(|f| {
            f.to_uppercase()
                .chain(c.flat_map(char::to_lowercase))
                .collect()
        })
        .unwrap_or_default()
}

/// lm-eval's HellaSwag `preprocess`: strip, `" [title]"` → `". "`, drop `[...]` (WikiHow
/// artifacts, shortest match), `"  "` → `" "`.
fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}
