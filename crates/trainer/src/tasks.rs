//! Zero-shot downstream tasks scored as lm-evaluation-harness scores them (the paper's
//! Table 1): LAMBADA (last-word accuracy, perplexity), HellaSwag / PIQA / Social IQa /
//! ARC-Easy (acc, acc_norm), WinoGrande (partial scoring, acc).
//!
//! Data: lm-eval-style request files (`requests.jsonl[.gz]`, one loglikelihood request per
//! line with `doc_id`, `idx`, `label`, `request.context`, `request.continuation`), or the
//! Hugging Face JSON/JSONL exports of each data set.
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
    pub context: String,
    pub continuation: String,
}

/// One document: its alternatives and the index of the right one.
#[derive(Clone, Debug, PartialEq)]
pub struct Doc {
    pub choices: Vec<Choice>,
    pub gold: usize,
}

/// A task's documents.
#[derive(Clone, Debug)]
pub struct Task {
    pub name: String,
    pub docs: Vec<Doc>,
}

/// A metric's value and standard error.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub value: f64,
    pub stderr: f64,
}

/// The result of one task.
#[derive(Clone, Debug, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub samples: usize,
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
        let logp = log_softmax_last(&self.model.logits(&x)?)?; // [G, W, V]
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

fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
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

/// Evaluates `task` with `scorer` on at most `limit` documents.
pub fn evaluate(
    task: &Task,
    tok: &Tokenizer,
    scorer: &dyn Scorer,
    limit: Option<usize>,
) -> Result<TaskResult> {
    let docs = &task.docs[..limit.unwrap_or(usize::MAX).min(task.docs.len())];
    if docs.is_empty() {
        return Err(Error::Other(format!("{}: no documents", task.name)));
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
        let argmax = |f: &dyn Fn(usize) -> f64| {
            (0..scores.len()).fold(0, |b, i| if f(i) > f(b) { i } else { b })
        };
        let best = argmax(&|i| scores[i].0);
        let best_norm = argmax(&|i| scores[i].0 / doc.choices[i].continuation.len().max(1) as f64);
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

/// Where a task's data lives under `data_dir`: `<task>/requests.jsonl.gz` (as
/// `scripts/fetch-eval-data.sh` writes it), or `<task>.jsonl` / `<task>.json` (HF export).
pub fn find_task_file(data_dir: &Path, task: &str) -> Option<PathBuf> {
    [
        data_dir.join(task).join("requests.jsonl.gz"),
        data_dir.join(task).join("requests.jsonl"),
        data_dir.join(format!("{task}.jsonl")),
        data_dir.join(format!("{task}.json")),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Loads a task from a request file or an HF export.
pub fn load_task(task: &str, path: &Path) -> Result<Task> {
    if !TASKS.contains(&task) {
        return Err(Error::Config(format!(
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
/// are offset by 1,000,000), alternatives in `idx` order, gold from `label`.
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
        let choice = Choice {
            context: req
                .get("context")
                .and_then(|v| v.as_str())
                .ok_or_else(bad)?
                .to_string(),
            continuation: req
                .get("continuation")
                .and_then(|v| v.as_str())
                .ok_or_else(bad)?
                .to_string(),
        };
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
    let mc = |context: String, conts: Vec<String>, gold: usize| Doc {
        choices: conts
            .into_iter()
            .map(|c| Choice {
                context: context.clone(),
                continuation: c,
            })
            .collect(),
        gold,
    };
    Some(match task {
        "lambada" => {
            let text = s(r, "text")?;
            let cut = text.rfind(' ')?;
            Doc {
                choices: vec![Choice {
                    context: text[..cut].to_string(),
                    continuation: text[cut..].to_string(),
                }],
                gold: 0,
            }
        }
        "hellaswag" => {
            let ctx = format!(
                "{}: {} {}",
                s(r, "activity_label")?,
                s(r, "ctx_a")?,
                capitalize(s(r, "ctx_b")?)
            );
            let endings: Vec<String> = r
                .get("endings")?
                .as_array()?
                .iter()
                .map(|e| format!(" {}", e.as_str().unwrap_or_default()))
                .collect();
            mc(ctx.trim().to_string(), endings, label(r.get("label")?)?)
        }
        "piqa" => mc(
            format!("Question: {}\nAnswer:", s(r, "goal")?),
            vec![format!(" {}", s(r, "sol1")?), format!(" {}", s(r, "sol2")?)],
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
                .map(|k| s(r, k).map(|a| format!(" {a}")))
                .collect::<Option<_>>()?,
            label(r.get("label")?)?.checked_sub(1)?,
        ),
        "arc_easy" => {
            let choices = r.get("choices")?;
            let texts: Vec<String> = choices
                .get("text")?
                .as_array()?
                .iter()
                .map(|t| format!(" {}", t.as_str().unwrap_or_default()))
                .collect();
            let labels: Vec<&str> = choices
                .get("label")?
                .as_array()?
                .iter()
                .filter_map(|l| l.as_str())
                .collect();
            let gold = labels.iter().position(|l| Some(*l) == s(r, "answerKey"))?;
            mc(
                format!("Question: {}\nAnswer:", s(r, "question")?),
                texts,
                gold,
            )
        }
        "winogrande" => {
            let sentence = s(r, "sentence")?;
            let blank = sentence.find('_')?;
            let suffix = format!(" {}", sentence[blank + 1..].trim());
            let opts = [s(r, "option1")?, s(r, "option2")?];
            Doc {
                choices: opts
                    .iter()
                    .map(|o| Choice {
                        context: format!("{}{o}", &sentence[..blank]),
                        continuation: suffix.clone(),
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

fn capitalize(x: &str) -> String {
    let mut c = x.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
