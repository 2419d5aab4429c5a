//! The training loop and its run folder.
//!
//! ```text
//! run_dir/
//!   config.toml            resolved config of the run
//!   metrics.jsonl          one line per step (and per validation)
//!   checkpoints/step-N/    config.json, model.safetensors, optim.safetensors, state.json
//!   best/                  the checkpoint with the lowest validation loss (model only)
//!   final/                 the model at the end (+ tokenizer.json)
//! ```
//! Checkpoints are written into a temporary folder and renamed; `state.json`, written last,
//! records the sha256 of the weight files, so a truncated checkpoint is detected on resume
//! and the previous one is used. Batches and dropout masks are pure functions of
//! `(seed, step)`, so a resumed run reproduces the uninterrupted one.
//!
//! Data parallel ([`train_dist`]): every rank holds the whole model and takes a contiguous
//! slice of the rows of every micro-batch of the global batch (`optim.batch_size` stays the
//! global batch), with the dropout masks of those global rows; its loss is weighted by its
//! share of the rows, and the gradients are summed over ranks in bucketed flat all-reduces
//! after the backward of the last micro-batch (Candle has no backward hooks to overlap
//! them with). Clipping then sees the global gradient, and every rank makes the same AdamW
//! update. Rank 0 alone writes the run folder; validation blocks are split across ranks.
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use cocomix_attribution::{attribute, labels, LabelCache, LabelMode};
use cocomix_data::Dataset;
use cocomix_dist::{Comm, ReduceOp};
use cocomix_model::ops::{concept_loss, cross_entropy, kd_kl};
use cocomix_model::{CausalLm, Dropout, Student, StudentConfig};
use cocomix_sae::Sae;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::optim::{lr_at, AdamW};
use crate::prefetch::Batches;
use crate::{ConceptSection, Error, KdSection, Objective, OptimSection, Result};

/// Where CoCoMix labels come from.
pub enum Labels<'a> {
    /// Run the teacher and the SAE on every batch (random window offsets, as the paper).
    Online {
        sae: &'a Sae,
        layer: usize,
        mode: LabelMode,
    },
    /// Read them from a label cache (windows aligned to the cache's).
    Cache(&'a LabelCache),
}

/// Everything one training run needs.
pub struct TrainSpec<'a> {
    pub objective: Objective,
    pub student: StudentConfig,
    pub optim: OptimSection,
    pub data: &'a Dataset,
    pub run_dir: PathBuf,
    pub seed: u64,
    /// Frozen teacher (KD, and CoCoMix with online labels).
    pub teacher: Option<&'a dyn CausalLm>,
    pub labels: Option<Labels<'a>>,
    /// Sample aligned windows `w·T` with `w < n` (the label cache's windows) for every
    /// objective, so students compared with a cached CoCoMix run see the same batches.
    pub aligned_windows: Option<usize>,
    pub concept: ConceptSection,
    pub kd: KdSection,
    pub eval_every: u64,
    pub max_val_blocks: usize,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    /// Continue from the latest checkpoint of `run_dir`.
    pub resume: bool,
    /// Stop (as if killed) right after this step: for tests of resumption.
    pub stop_after: Option<u64>,
    pub device: Device,
    /// Run the teacher's work for the next micro-batch (KD logits, online labels) on its own
    /// thread while the student trains on the current one (CPU only; the same results).
    pub overlap_teacher: bool,
    /// Text written into `run_dir/config.toml`.
    pub config_text: String,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub tokens: u64,
    pub lr: f64,
    pub loss_ntp: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_concept: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_kd: Option<f64>,
    pub loss: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_ppl: Option<f64>,
    /// On the first step a resumed process ran: the checkpoint step it continued from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resumed_from: Option<u64>,
    /// Hash of the step's token ids (hex): equal across objectives that saw the same batches.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub batch_hash: Option<String>,
}

/// What a finished (or stopped) run reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainOutcome {
    pub objective: Objective,
    pub steps: u64,
    pub tokens: u64,
    pub params: usize,
    pub val_loss: f64,
    pub val_ppl: f64,
    /// Mean training throughput (tokens per second of training steps).
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub final_dir: PathBuf,
    pub stopped_early: bool,
    /// The checkpoint step this process continued from (`None`: it started at step 0).
    #[serde(default)]
    pub resumed_from: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    tokens: u64,
    wall_s: f64,
    train_s: f64,
    best_val: Option<f64>,
    model_sha256: String,
    optim_sha256: String,
}

fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:07}"))
}

/// Checkpoints of a run folder, newest first.
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    name.strip_prefix("step-")
                        .and_then(|s| s.parse::<u64>().ok())
                        .map(|s| (s, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    out
}

fn read_valid_checkpoint(dir: &Path) -> Result<CheckpointState> {
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::file(&sp, e))?;
    let st: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::file(&sp, e))?;
    for (f, want) in [
        ("model.safetensors", &st.model_sha256),
        ("optim.safetensors", &st.optim_sha256),
    ] {
        if &cocomix_data::file_sha256(&dir.join(f))? != want {
            return Err(Error::file(
                dir.join(f),
                "checksum differs from state.json: truncated or corrupt",
            ));
        }
    }
    Ok(st)
}

/// Copies a model folder's `config.json` + `model.safetensors` into `dst` atomically.
fn save_model_dir(student: &Student, data: &Dataset, dst: &Path) -> Result<()> {
    let tmp = dst.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    student.save(&tmp)?;
    if let Ok(tok) = data.tokenizer() {
        tok.save(&tmp)?;
    }
    replace_dir(&tmp, dst)
}

/// Mean next-token loss over (at most `max_blocks`) validation blocks of `context` tokens.
pub fn validate(
    student: &Student,
    data: &Dataset,
    context: usize,
    max_blocks: usize,
    batch: usize,
) -> Result<f64> {
    validate_dist(student, data, context, max_blocks, batch, &Comm::single())
}

/// [`validate`] with the blocks split across the ranks of `comm` (each scores its share,
/// the loss sums are all-reduced): every rank returns the mean over all blocks.
pub fn validate_dist(
    student: &Student,
    data: &Dataset,
    context: usize,
    max_blocks: usize,
    batch: usize,
    comm: &Comm,
) -> Result<f64> {
    let starts: Vec<usize> = data
        .val_block_starts(context)
        .into_iter()
        .take(max_blocks)
        .collect();
    if starts.is_empty() {
        return Err(Error::file(
            data.val.path(),
            format!("fewer than {} validation tokens", context + 1),
        ));
    }
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in starts[comm.share(starts.len())].chunks(batch.max(1)) {
        let mut ids = Vec::with_capacity(chunk.len() * (context + 1));
        for &s in chunk {
            data.val.read_into(s, context + 1, &mut ids);
        }
        let ids = Tensor::from_vec(ids, (chunk.len(), context + 1), student.device())?;
        let (x, y) = (ids.narrow(1, 0, context)?, ids.narrow(1, 1, context)?);
        let out = student.forward(&x, &mut Dropout::off())?;
        let l = cross_entropy(&out.logits, &y)?;
        sum += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        n += chunk.len();
    }
    let mut acc = [sum, n as f64];
    comm.all_reduce_f64(&mut acc, ReduceOp::Sum)?;
    Ok(acc[0] / acc[1])
}

pub(crate) struct Batch {
    x: Tensor,
    y: Tensor,
    labels: Option<Tensor>,
    /// The teacher's logits `[B, T, V]` (KD).
    teacher_logits: Option<Tensor>,
    /// FNV-1a hash of the batch's token ids (recorded so comparisons can prove that
    /// objectives saw the same batches).
    hash: u64,
}

fn batch_rng(seed: u64, index: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_add(0x5851_F42D_4C95_7F2D),
    )
}

fn fnv1a(ids: &[u32], mut h: u64) -> u64 {
    for &id in ids {
        for b in id.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Rows `part` of the `rows` rows of micro-batch `index` (`step · grad_accum + micro`), with
/// the teacher's work on them (online labels, KD logits): a pure function of
/// `(seed, index)`, the data and the frozen teacher, the same for every objective. With
/// aligned windows (a label cache), rows are whole cached windows; otherwise windows at
/// random offsets. `relabel` applies the label ablations. The hash covers all `rows` rows.
pub(crate) fn make_batch(
    spec: &TrainSpec,
    index: u64,
    rows: usize,
    part: Range<usize>,
    relabel: &Relabel,
) -> Result<Batch> {
    let t = spec.student.gpt2.n_positions;
    let dev = &spec.device;
    let wants_labels = spec.objective.needs_labels();
    let cache = match &spec.labels {
        Some(Labels::Cache(c)) if wants_labels => Some(*c),
        _ => None,
    };
    let (ids, mut lab) = match cache.map(|c| c.n_windows()).or(spec.aligned_windows) {
        Some(n_windows) => {
            let mut rng = batch_rng(spec.seed, index);
            let (mut ids, mut lab) = (Vec::new(), Vec::new());
            for r in 0..rows {
                let w = rng.random_range(0..n_windows);
                spec.data.train.read_into(w * t, t + 1, &mut ids);
                if let Some(c) = cache.filter(|_| part.contains(&r)) {
                    lab.extend(c.window_labels(relabel.window(w)));
                }
            }
            (ids, cache.map(|_| lab))
        }
        None => (spec.data.train_batch(rows, t, spec.seed, index)?, None),
    };
    let hash = fnv1a(&ids, FNV_OFFSET);
    let mine = ids[part.start * (t + 1)..part.end * (t + 1)].to_vec();
    let rows = part.len();
    let ids = Tensor::from_vec(mine, (rows, t + 1), dev)?;
    let (x, y) = (
        ids.narrow(1, 0, t)?.contiguous()?,
        ids.narrow(1, 1, t)?.contiguous()?,
    );
    let k = spec.concept.k_attr;
    if lab.is_none() && wants_labels {
        if let Some(Labels::Online { sae, layer, mode }) = &spec.labels {
            let teacher = spec
                .teacher
                .ok_or_else(|| Error::Other("online labels need a teacher".into()))?;
            let att = attribute(teacher, sae, &x, *layer)?;
            let (l, _) = labels(&att, sae.n_latents(), k, *mode)?;
            lab = Some(l.flatten_all()?.to_vec1()?);
        }
    }
    let labels = lab
        .map(|mut l| {
            relabel.concepts(&mut l);
            Tensor::from_vec(l, (rows, t, k), dev)
        })
        .transpose()?;
    let teacher_logits = if spec.objective == Objective::Kd {
        let teacher = spec
            .teacher
            .ok_or_else(|| Error::Other("KD needs a teacher".into()))?;
        Some(teacher.logits(&x)?)
    } else {
        None
    };
    Ok(Batch {
        x,
        y,
        labels,
        teacher_logits,
        hash,
    })
}

struct Losses {
    total: Tensor,
    ntp: f64,
    concept: Option<f64>,
    kd: Option<f64>,
}

fn losses(spec: &TrainSpec, student: &Student, b: &Batch, dropout: &mut Dropout) -> Result<Losses> {
    let out = student.forward(&b.x, dropout)?;
    let ce = cross_entropy(&out.logits, &b.y)?; // [B, T, V] against [B, T]
    let ntp = ce.to_scalar::<f32>()? as f64;
    let plain = Losses {
        total: ce.clone(),
        ntp,
        concept: None,
        kd: None,
    };
    if let Some(tl) = &b.teacher_logits {
        let (a, tau) = (spec.kd.alpha, spec.kd.tau);
        let kl = kd_kl(&out.logits, tl, tau)?;
        let kd_term = (&kl * (a * tau * tau))?;
        // α = 1 (the default): the CE is only logged, so its backward is not run.
        let total = if a == 1.0 {
            kd_term
        } else {
            (kd_term + (ce * (1.0 - a))?)?
        };
        return Ok(Losses {
            total,
            kd: Some(kl.to_scalar::<f32>()? as f64),
            ..plain
        });
    }
    if !spec.objective.needs_labels() {
        return Ok(plain);
    }
    let lab = b
        .labels
        .as_ref()
        .ok_or_else(|| Error::Other(format!("{} needs concept labels", spec.objective)))?;
    let cl = out
        .concept_logits
        .as_ref()
        .ok_or_else(|| Error::Other("the student has no concept path".into()))?;
    let lc = concept_loss(cl, lab)?;
    Ok(Losses {
        total: (ce + (&lc * spec.concept.lambda)?)?,
        concept: Some(lc.to_scalar::<f32>()? as f64),
        ..plain
    })
}

/// The fixed random permutation of concept ids of the `random-labels` ablation: the same
/// for every run with `n_latents` concepts (seeded by a constant, not by the run's seed).
pub fn label_permutation(n_latents: usize) -> Vec<u32> {
    use rand::seq::SliceRandom;
    let mut p: Vec<u32> = (0..n_latents as u32).collect();
    p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0xC0C0_4A11));
    p
}

/// The fixed window map of the `shuffled-labels` ablation: one cycle through `0..n`
/// (Sattolo's shuffle), so for n ≥ 2 no window reads its own labels; the same for every run
/// (seeded by a constant).
pub fn window_shuffle(n: usize) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5AF7_1ED0);
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.random_range(0..i));
    }
    p
}

/// How a label ablation changes the teacher's labels before the student sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Relabel {
    /// The labels as the teacher gave them.
    #[default]
    None,
    /// Concept `c` becomes `p[c]` (`random-labels`).
    Concepts(Vec<u32>),
    /// Cached window `w` reads the labels of window `p[w]` (`shuffled-labels`).
    Windows(Vec<u32>),
}

impl Relabel {
    /// The relabelling `objective` asks for, with `n_latents` concepts and a label cache of
    /// `n_windows` windows (`None`: labels computed online).
    pub fn of(objective: Objective, n_latents: usize, n_windows: Option<usize>) -> Result<Self> {
        Ok(match objective {
            Objective::RandomLabels => Relabel::Concepts(label_permutation(n_latents)),
            Objective::ShuffledLabels => {
                Relabel::Windows(window_shuffle(n_windows.ok_or_else(|| {
                    Error::Config("shuffled-labels needs concept.labels = \"cache\"".into())
                })?))
            }
            _ => Relabel::None,
        })
    }

    /// The window whose labels window `w` reads.
    pub fn window(&self, w: usize) -> usize {
        match self {
            Relabel::Windows(p) => p[w] as usize,
            _ => w,
        }
    }

    /// Maps concept ids in place.
    pub fn concepts(&self, labels: &mut [u32]) {
        if let Relabel::Concepts(p) = self {
            labels.iter_mut().for_each(|c| *c = p[*c as usize]);
        }
    }
}

fn truncate_metrics(path: &Path, upto: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= upto))
        .map(|l| format!("{l}\n"))
        .collect();
    cocomix_data::write_atomic(path, kept.as_bytes())?;
    Ok(())
}

/// What a checkpoint holds: the model, the optimizer and the run's counters.
struct RunState {
    student: Student,
    opt: AdamW,
    /// Optimizer steps done.
    step: u64,
    tokens: u64,
    /// Wall time of earlier processes of this run.
    wall_s: f64,
    /// Time spent in training steps (for tokens/s).
    train_s: f64,
    best_val: Option<f64>,
    /// The checkpoint step this process continued from.
    resumed_from: Option<u64>,
    /// sha256 of the checkpoint's model and optimizer files, as its `state.json` records.
    checksums: Option<(String, String)>,
}

impl RunState {
    /// Continues from the newest valid checkpoint of the run folder when asked (a corrupt
    /// one is skipped for the one before), else starts fresh (and clears old metrics).
    /// Rank 0 chooses the checkpoint; every rank loads that one and checks its checksums,
    /// and all fail together when one cannot.
    fn resume_or_init(spec: &TrainSpec, metrics_path: &Path, comm: &Comm) -> Result<Self> {
        let chosen = if comm.is_root() && spec.resume {
            list_checkpoints(&spec.run_dir)
                .into_iter()
                .find_map(|(step, dir)| match read_valid_checkpoint(&dir) {
                    Ok(_) => Some(step),
                    Err(e) => {
                        tracing::warn!("skipping checkpoint: {e}");
                        None
                    }
                })
        } else {
            None
        };
        let mut step = chosen.unwrap_or(u64::MAX).to_le_bytes();
        comm.broadcast(&mut step, 0)?;
        let chosen = Some(u64::from_le_bytes(step)).filter(|&s| s != u64::MAX);
        let state = comm.agree(Self::load_or_new(
            spec,
            metrics_path,
            chosen,
            comm.is_root(),
        ))?;
        if chosen.is_none() && spec.resume && comm.is_root() {
            tracing::info!(
                "{}: no valid checkpoint, starting fresh",
                spec.run_dir.display()
            );
        }
        Ok(state)
    }

    /// The state of checkpoint `step` of the run folder, or a fresh one; `writer` (rank 0)
    /// also trims or clears `metrics.jsonl` to match.
    fn load_or_new(
        spec: &TrainSpec,
        metrics_path: &Path,
        step: Option<u64>,
        writer: bool,
    ) -> Result<Self> {
        let o = &spec.optim;
        let mut state = match step {
            Some(step) => {
                let dir = step_dir(&spec.run_dir, step);
                let st = read_valid_checkpoint(&dir)?;
                let student = Student::load(&dir, &spec.device)?;
                if student.cfg != spec.student {
                    return Err(Error::file(
                        dir.join("config.json"),
                        "the checkpoint's model config differs from this run's",
                    ));
                }
                let mut opt = AdamW::new(student.vars(), o)?;
                opt.load_state(&dir.join("optim.safetensors"), st.step)?;
                if writer {
                    truncate_metrics(metrics_path, st.step)?;
                    tracing::info!("resuming {} at step {}", spec.run_dir.display(), st.step);
                }
                Self {
                    student,
                    opt,
                    step: st.step,
                    tokens: st.tokens,
                    wall_s: st.wall_s,
                    train_s: st.train_s,
                    best_val: st.best_val,
                    resumed_from: Some(st.step),
                    checksums: Some((st.model_sha256, st.optim_sha256)),
                }
            }
            None => {
                if writer {
                    let _ = std::fs::remove_file(metrics_path);
                }
                let student = Student::new(&spec.student, spec.seed, &spec.device)?;
                let opt = AdamW::new(student.vars(), o)?;
                Self {
                    student,
                    opt,
                    step: 0,
                    tokens: 0,
                    wall_s: 0.0,
                    train_s: 0.0,
                    best_val: None,
                    resumed_from: None,
                    checksums: None,
                }
            }
        };
        state.student.set_compute_dtype(o.precision.dtype());
        Ok(state)
    }

    /// Writes `checkpoints/step-N/` (model, optimizer, counters with the files' sha256,
    /// `state.json` last) under a temporary name, renames it into place and prunes old ones.
    fn checkpoint(&self, spec: &TrainSpec, wall_s: f64) -> Result<PathBuf> {
        let dir = step_dir(&spec.run_dir, self.step);
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        self.student.save(&tmp)?;
        cocomix_model::params::save_safetensors(
            &self.opt.state(),
            &tmp.join("optim.safetensors"),
            &[],
        )?;
        let st = CheckpointState {
            step: self.step,
            tokens: self.tokens,
            wall_s,
            train_s: self.train_s,
            best_val: self.best_val,
            model_sha256: cocomix_data::file_sha256(&tmp.join("model.safetensors"))?,
            optim_sha256: cocomix_data::file_sha256(&tmp.join("optim.safetensors"))?,
        };
        cocomix_data::write_atomic(
            &tmp.join("state.json"),
            serde_json::to_string_pretty(&st)
                .map_err(|e| Error::Other(e.to_string()))?
                .as_bytes(),
        )?;
        replace_dir(&tmp, &dir)?;
        for (_, old) in list_checkpoints(&spec.run_dir)
            .into_iter()
            .skip(spec.keep_last.max(1))
        {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(dir)
    }
}

/// Loss sums of one optimizer step over its micro-batches, and its batches' hash.
#[derive(Default)]
struct StepLosses {
    ntp: f64,
    concept: Option<f64>,
    kd: Option<f64>,
    total: f64,
    batch_hash: u64,
}

/// Forward and backward of every micro-batch of optimizer step `step` on this rank's rows:
/// the gradients summed over micro-batches and ranks (each loss divided by the number of
/// micro-batches and weighted by the rank's share of the rows) and the summed losses.
fn accumulate(
    spec: &TrainSpec,
    student: &Student,
    step: u64,
    batches: &mut Batches,
    last_good: Option<&Path>,
    comm: &Comm,
) -> Result<(Vec<Tensor>, StepLosses)> {
    let o = &spec.optim;
    let rows = o.batch_size / o.grad_accum;
    let part = comm.share(rows);
    // This rank's share of the global batch's mean losses (1 on a single process, exact).
    let weight = part.len() as f64 / rows as f64;
    let mut acc: Option<Vec<Tensor>> = None;
    let mut sums = StepLosses::default();
    for micro in 0..o.grad_accum as u64 {
        let index = step * o.grad_accum as u64 + micro;
        let b = batches.get(index)?;
        sums.batch_hash = b.hash ^ sums.batch_hash.rotate_left(7);
        let mut dropout = Dropout::seeded(spec.seed ^ index.wrapping_mul(0xD129_0A5B_3C31_4F6B))
            .with_row_offset(part.start as u64);
        let l = losses(spec, student, &b, &mut dropout)?;
        let lt = l.total.to_scalar::<f32>()? as f64 * weight;
        let total = if part.len() == rows {
            l.total
        } else {
            (l.total * weight)?
        };
        // Gradients are built from tracked ops: detach them, or each would keep its step's
        // whole graph alive through the optimizer moments.
        let grads = (total / o.grad_accum as f64)?.backward()?;
        let gs: Vec<Tensor> = student
            .vars()
            .iter()
            .map(|(n, v)| {
                grads
                    .get(v.as_tensor())
                    .map(|g| g.detach())
                    .ok_or_else(|| Error::Other(format!("no gradient for {n}")))
            })
            .collect::<Result<_>>()?;
        acc = Some(match acc {
            None => gs,
            Some(a) => a
                .iter()
                .zip(&gs)
                .map(|(x, y)| x + y)
                .collect::<candle_core::Result<_>>()?,
        });
        sums.ntp += l.ntp * weight;
        sums.total += lt;
        if let Some(c) = l.concept {
            *sums.concept.get_or_insert(0.0) += c * weight;
        }
        if let Some(k) = l.kd {
            *sums.kd.get_or_insert(0.0) += k * weight;
        }
    }
    let grads = comm.all_reduce_tensors(&acc.expect("grad_accum ≥ 1"), ReduceOp::Sum)?;
    let mut l = [
        sums.ntp,
        sums.total,
        sums.concept.unwrap_or(0.0),
        sums.kd.unwrap_or(0.0),
    ];
    comm.all_reduce_f64(&mut l, ReduceOp::Sum)?;
    sums.ntp = l[0];
    sums.total = l[1];
    sums.concept = sums.concept.map(|_| l[2]);
    sums.kd = sums.kd.map(|_| l[3]);
    if !sums.total.is_finite() {
        let keep = last_good.map_or("none yet".to_string(), |p| p.display().to_string());
        return Err(Error::Other(format!(
            "step {step}: the loss is {}; stopping. Last good checkpoint: {keep}",
            sums.total
        )));
    }
    Ok((grads, sums))
}

/// `metrics.jsonl`, appended and flushed line by line (a killed run loses no finished step).
struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::file(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn append(&mut self, m: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(m).map_err(|e| Error::Other(e.to_string()))?;
        writeln!(self.file, "{line}").map_err(|e| Error::file(&self.path, e))?;
        self.file.flush().map_err(|e| Error::file(&self.path, e))
    }
}

/// Trains a student as `spec` says; returns the outcome and writes the run folder.
pub fn train(spec: &TrainSpec) -> Result<TrainOutcome> {
    train_dist(spec, &Comm::single())
}

fn digest(parts: &[&[u8]]) -> String {
    let hexes: Vec<String> = parts.iter().map(|p| cocomix_data::sha256_hex(p)).collect();
    cocomix_data::sha256_hex(hexes.concat().as_bytes())
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Refuses to train unless every rank has the same settings, data, teacher / labels and
/// starting point (checkpoint and weights).
fn check_ranks_agree(spec: &TrainSpec, st: &RunState, comm: &Comm) -> Result<()> {
    let json = |v: serde_json::Value| v.to_string().into_bytes();
    let settings = json(serde_json::json!({
        "objective": spec.objective,
        "student": spec.student,
        "optim": spec.optim,
        "concept": spec.concept,
        "kd": spec.kd,
        "seed": spec.seed,
        "aligned_windows": spec.aligned_windows,
        "eval_every": spec.eval_every,
        "max_val_blocks": spec.max_val_blocks,
        "checkpoint_every": spec.checkpoint_every,
        "keep_last": spec.keep_last,
        "stop_after": spec.stop_after,
        "config": spec.config_text,
    }));
    comm.check_same("config", &digest(&[&settings]))?;
    let data = json(serde_json::json!({
        "meta": spec.data.meta(),
        "train_tokens": spec.data.train.len(),
        "val_tokens": spec.data.val.len(),
    }));
    comm.check_same("data", &digest(&[&data]))?;
    let teacher = match spec.teacher {
        Some(t) => {
            // A GPT-2 or Llama teacher exposes no weights: its shape and its logits on a fixed
            // probe of (at most) 8 ids stand for them.
            let probe = (0..t.vocab_size().min(8) as u32).collect::<Vec<_>>();
            let probe = Tensor::new(probe.as_slice(), t.device())?.unsqueeze(0)?;
            let shape = serde_json::json!({
                "d_model": t.d_model(),
                "n_layer": t.n_layer(),
                "vocab_size": t.vocab_size(),
                "context": t.context(),
            });
            digest(&[&json(shape), &tensor_bytes(&t.logits(&probe)?)?])
        }
        None => "none".into(),
    };
    comm.check_same("teacher", &teacher)?;
    let labels = match &spec.labels {
        Some(Labels::Cache(c)) => digest(&[&json(serde_json::json!(c.meta()))]),
        Some(Labels::Online { sae, layer, mode }) => {
            let p = sae.parts();
            let rule = format!("{:?} {:?} {}", p.activation, p.input_norm, p.b_dec_on_input);
            digest(&[
                &json(serde_json::json!({"layer": layer, "mode": mode, "rule": rule})),
                &tensor_bytes(&p.w_enc)?,
                &tensor_bytes(&p.b_enc)?,
                &tensor_bytes(&p.w_dec)?,
                &tensor_bytes(&p.b_dec)?,
            ])
        }
        None => "none".into(),
    };
    comm.check_same("concept labels", &labels)?;
    let start = match &st.checksums {
        Some((m, o)) => format!("step {} (model {m}, optimizer {o})", st.step),
        None => "a fresh start".into(),
    };
    comm.check_same("starting checkpoint", &start)?;
    let mut weights = Vec::new();
    for (_, v) in st.student.vars() {
        weights.push(tensor_bytes(v.as_tensor())?);
    }
    let weights: Vec<&[u8]> = weights.iter().map(|w| w.as_slice()).collect();
    comm.check_same("initial weights", &digest(&weights))?;
    Ok(())
}

/// [`train`] as one rank of the data-parallel job of `comm`: each rank takes its slice of
/// every micro-batch, gradients and losses are summed over ranks, and rank 0 alone writes
/// the run folder (metrics, checkpoints, `best/`, `final/`). Every rank returns the same
/// outcome. A world of N gives the single process's losses up to float summation order.
pub fn train_dist(spec: &TrainSpec, comm: &Comm) -> Result<TrainOutcome> {
    let run_dir = &spec.run_dir;
    let writer = comm.is_root();
    let metrics_path = run_dir.join("metrics.jsonl");
    let o = &spec.optim;
    let t = spec.student.gpt2.n_positions;
    let rows = o.batch_size / o.grad_accum;
    if rows < comm.world() {
        return Err(Error::Config(format!(
            "optim.batch_size / optim.grad_accum = {rows} rows per micro-batch cannot be \
             split over {} ranks: use a larger batch, fewer micro-batches or fewer ranks",
            comm.world()
        )));
    }
    if writer {
        std::fs::create_dir_all(run_dir.join("checkpoints"))
            .map_err(|e| Error::file(run_dir, e))?;
        cocomix_data::write_atomic(&run_dir.join("config.toml"), spec.config_text.as_bytes())?;
    }

    comm.set_phase(format!("the start of {}", run_dir.display()));
    let mut st = RunState::resume_or_init(spec, &metrics_path, comm)?;
    if comm.world() > 1 {
        check_ranks_agree(spec, &st, comm)?;
    }
    let relabel = match (&spec.student.concept, &spec.labels) {
        (Some(c), Some(Labels::Cache(cache))) => {
            Relabel::of(spec.objective, c.concept_dim, Some(cache.n_windows()))?
        }
        (Some(c), _) => Relabel::of(spec.objective, c.concept_dim, None)?,
        (None, _) => Relabel::None,
    };
    let params: usize = st.student.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let mut log = if writer {
        Some(MetricsLog::open(&metrics_path)?)
    } else {
        None
    };
    let began = Instant::now();
    let wall = |st: &RunState| st.wall_s + began.elapsed().as_secs_f64();
    let bar = if writer {
        cocomix_data::progress_bar(o.steps, &spec.objective.to_string()).with_position(st.step)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut last_val = None;
    let mut stopped_early = false;
    let mut last_good = list_checkpoints(run_dir).first().map(|c| c.1.clone());

    // The teacher's work per batch (KD logits, online labels) overlaps the student's step
    // on the CPU (same results); a GPU runs its kernels in order anyway.
    let overlap = spec.overlap_teacher
        && spec.device.is_cpu()
        && spec.teacher.is_none_or(|t| t.device().is_cpu())
        && (spec.objective == Objective::Kd
            || (spec.objective.needs_labels()
                && matches!(spec.labels, Some(Labels::Online { .. }))));
    std::thread::scope(|scope| -> Result<()> {
        let mut batches = Batches::new(scope, spec, rows, comm.share(rows), &relabel, overlap);
        while st.step < o.steps {
            comm.set_phase(format!("step {} of {}", st.step + 1, run_dir.display()));
            let t0 = Instant::now();
            let lr = lr_at(o, st.step);
            let (grads, sums) = accumulate(
                spec,
                &st.student,
                st.step,
                &mut batches,
                last_good.as_deref(),
                comm,
            )?;
            let grad_norm = st.opt.clip_and_update(&grads, lr, o.clip)?;
            let step_s = t0.elapsed().as_secs_f64();
            st.train_s += step_s;
            let step_tokens = (o.batch_size * t) as u64;
            st.tokens += step_tokens;
            st.step += 1;
            let n = o.grad_accum as f64;
            let mut m = StepMetrics {
                step: st.step,
                tokens: st.tokens,
                lr,
                loss_ntp: sums.ntp / n,
                loss_concept: sums.concept.map(|c| c / n),
                loss_kd: sums.kd.map(|k| k / n),
                loss: sums.total / n,
                grad_norm,
                tokens_per_s: step_tokens as f64 / step_s,
                wall_s: wall(&st),
                resumed_from: st.resumed_from.filter(|&r| r + 1 == st.step),
                batch_hash: Some(format!("{:016x}", sums.batch_hash)),
                ..Default::default()
            };
            if st.step % spec.eval_every == 0 || st.step == o.steps {
                let vl = validate_dist(&st.student, spec.data, t, spec.max_val_blocks, rows, comm)?;
                m.val_loss = Some(vl);
                m.val_ppl = Some(vl.exp());
                last_val = Some(vl);
                if st.best_val.is_none_or(|b| vl < b) {
                    st.best_val = Some(vl);
                    if writer {
                        save_model_dir(&st.student, spec.data, &run_dir.join("best"))?;
                    }
                }
            }
            if let Some(log) = log.as_mut() {
                log.append(&m)?;
            }
            bar.set_position(st.step);
            bar.set_message(format!(
                "loss {:.3}{} {:.0} tok/s",
                m.loss_ntp,
                m.loss_concept
                    .map(|c| format!(" concept {c:.3}"))
                    .or(m.loss_kd.map(|k| format!(" kd {k:.3}")))
                    .unwrap_or_default(),
                m.tokens_per_s
            ));
            if writer && (st.step % spec.checkpoint_every == 0 || st.step == o.steps) {
                last_good = Some(st.checkpoint(spec, wall(&st))?);
            }
            if spec.stop_after == Some(st.step) && st.step < o.steps {
                stopped_early = true;
                break;
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let final_dir = run_dir.join("final");
    let saved = if writer && !stopped_early {
        save_model_dir(&st.student, spec.data, &final_dir)
    } else {
        Ok(())
    };
    // The other ranks may read `final/` next (a teacher): they wait for rank 0's writes.
    comm.wait_for_all()?;
    comm.agree(saved)?;
    let val_loss = match last_val {
        Some(v) => v,
        None => validate_dist(&st.student, spec.data, t, spec.max_val_blocks, rows, comm)?,
    };
    Ok(TrainOutcome {
        objective: spec.objective,
        steps: st.step,
        tokens: st.tokens,
        params,
        val_loss,
        val_ppl: val_loss.exp(),
        tokens_per_s: st.tokens as f64 / st.train_s.max(1e-9),
        wall_s: wall(&st),
        final_dir,
        stopped_early,
        resumed_from: st.resumed_from,
    })
}

/// Puts the finished folder `tmp` at `dst`, replacing an older one; a reader sees either
/// the old or the new folder (a crash between the two renames leaves `dst.old`).
fn replace_dir(tmp: &Path, dst: &Path) -> Result<()> {
    let old = dst.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(dst, &old).map_err(|e| Error::file(dst, e))?;
    }
    std::fs::rename(tmp, dst).map_err(|e| Error::file(dst, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Reads a run's `metrics.jsonl`.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<StepMetrics>> {
    let p = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| Error::file(&p, e)))
        .collect()
}

/// The device of this rank: the communicator's own (NCCL: the GPU of its local rank, on the
/// stream its all-reduces use); with CUDA, the GPU of its local rank (one process per GPU);
/// otherwise [`default_device`].
pub fn rank_device(comm: &Comm) -> Result<Device> {
    if let Some(device) = comm.device() {
        return Ok(device);
    }
    #[cfg(feature = "cuda")]
    return Ok(Device::new_cuda(comm.local_rank())?);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = comm;
        default_device()
    }
}

/// The default device of this build: CUDA or Metal when compiled with that feature, else CPU.
pub fn default_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    return Ok(Device::new_cuda(0)?);
    #[cfg(all(feature = "metal", not(feature = "cuda")))]
    return Ok(Device::new_metal(0)?);
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    Ok(Device::Cpu)
}
