//! What every case shares: the device, the timing loop, peak memory, random weights and
//! synthetic data folders.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use cocomix_data::{DataMeta, Dataset, TokenDtype};
use cocomix_model::StudentConfig;
use cocomix_model::{Gpt2, Gpt2Config, Params};
use cocomix_sae::Sae;
use cocomix_trainer::{Objective, RunConfig, TrainSpec};

use crate::Result;

/// The device of this build (CUDA / Metal with those features, else the CPU).
pub fn device() -> Result<Device> {
    Ok(cocomix_trainer::default_device()?)
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Repeats `f` for about 3 s (at least twice, at most 20 times); returns (runs, seconds).
/// Waits for the device after each run (GPU ops return before they finish).
pub fn timed(mut f: impl FnMut(u64) -> Result<()>) -> Result<(usize, f64)> {
    let device = device()?;
    let t0 = Instant::now();
    let mut n = 0;
    while n < 2 || (t0.elapsed().as_secs_f64() < 3.0 && n < 20) {
        f(n as u64 + 1)?;
        device.synchronize()?;
        n += 1;
    }
    Ok((n, t0.elapsed().as_secs_f64()))
}

/// Deterministic pseudo-random token ids (Knuth's multiplicative hash) below `vocab`.
pub fn pseudo_ids(n: usize, vocab: usize) -> impl Iterator<Item = u32> {
    (0..n).map(move |i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32)
}

/// `[b, t]` pseudo-random ids on the bench device.
pub fn random_ids(b: usize, t: usize, vocab: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        pseudo_ids(b * t, vocab).collect(),
        (b, t),
        &device()?,
    )?)
}

/// A GPT-2 of shape `cfg` with seeded random weights, frozen, dropout off (a teacher).
pub fn random_gpt2(cfg: &Gpt2Config, seed: u64) -> Result<Gpt2> {
    Ok(Gpt2::new(
        &cfg.clone().with_dropout(0.0),
        &mut Params::random(seed, &device()?, false),
    )?)
}

/// A TopK SAE with random `[c, d]` weights of scale `1/√d` and zero biases.
pub fn random_sae(d: usize, c: usize, k: usize) -> Result<Sae> {
    let dev = device()?;
    let w = |shape: (usize, usize)| Tensor::randn(0f32, 1.0, shape, &dev)? / (d as f64).sqrt();
    Ok(Sae::new(
        Tensor::zeros(d, DType::F32, &dev)?,
        w((c, d))?,
        Tensor::zeros(c, DType::F32, &dev)?,
        w((d, c))?,
        k,
        "random".into(),
    )?)
}

/// Writes a prepared data folder (u16 `train.bin` / `val.bin` of pseudo-random ids below
/// `vocab`, and its `meta.json`) into `dir` and opens it.
pub fn synthetic_data(
    dir: &Path,
    vocab: usize,
    train_tokens: usize,
    val_tokens: usize,
) -> Result<Dataset> {
    std::fs::create_dir_all(dir)?;
    let bytes = |n: usize| -> Vec<u8> {
        pseudo_ids(n, vocab)
            .flat_map(|t| (t as u16).to_le_bytes())
            .collect()
    };
    std::fs::write(dir.join("train.bin"), bytes(train_tokens))?;
    std::fs::write(dir.join("val.bin"), bytes(val_tokens))?;
    let meta = DataMeta {
        format_version: 1,
        dtype: TokenDtype::U16,
        vocab_size: vocab,
        eot_id: 0,
        tokenizer_identity: "bench".into(),
        train_tokens: train_tokens as u64,
        val_tokens: val_tokens as u64,
        train_documents: 1,
        val_documents: 1,
        val_fraction: 0.0,
        seed: 0,
        sources: Vec::new(),
        replaced_invalid_utf8: 0,
        split_rule: 2,
        field: "text".into(),
        skipped_empty_documents: 0,
        resumed_from: None,
    };
    let json =
        serde_json::to_string_pretty(&meta).map_err(|e| crate::Error::Other(e.to_string()))?;
    std::fs::write(dir.join("meta.json"), json)?;
    Ok(Dataset::open(dir)?)
}

/// The trainer run of a `train` or `dist` case: NTP with `student` for `steps` optimizer steps
/// of `batch` sequences from `data` (no warm-up, no accumulation, no evaluation or checkpoint
/// in between) under `r`'s optimizer, on the CPU. Cases change the fields they need.
pub fn bench_spec<'a>(
    r: &RunConfig,
    student: StudentConfig,
    data: &'a Dataset,
    run_dir: PathBuf,
    steps: u64,
    batch: usize,
) -> TrainSpec<'a> {
    let mut optim = r.optim.clone();
    optim.steps = steps;
    optim.warmup = 0;
    optim.batch_size = batch;
    optim.grad_accum = 1;
    TrainSpec {
        objective: Objective::Ntp,
        student,
        optim,
        data,
        run_dir,
        seed: 0,
        teacher: None,
        labels: None,
        concept: r.concept.clone(),
        kd: r.kd.clone(),
        eval_every: 1_000_000,
        max_val_blocks: 1,
        checkpoint_every: 1_000_000,
        keep_last: 1,
        resume: false,
        stop_after: None,
        aligned_windows: None,
        overlap_teacher: cocomix_trainer::overlap_from_env(),
        device: Device::Cpu,
        config_text: String::new(),
    }
}

/// Tokens per second of a finished bench run: the harmonic mean over its steps in the steady
/// state. The first step (allocation warm-up, and its batch built while nothing overlaps it)
/// is left out when there are more than two, the last (no next batch to build alongside it)
/// when there are more than three.
pub fn run_tokens_per_s(run_dir: &Path) -> Result<f64> {
    let m = cocomix_trainer::read_metrics(run_dir)?;
    let first = usize::from(m.len() > 2);
    let last = m.len() - usize::from(m.len() > 3);
    let timed: Vec<f64> = m[first..last].iter().map(|r| r.tokens_per_s).collect();
    Ok(timed.len() as f64 / timed.iter().map(|x| 1.0 / x).sum::<f64>())
}
