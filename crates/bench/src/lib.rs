//! Benchmarks of the cocomix crates (throughput and peak memory per case, as JSON) and the
//! parity check of the golden tiny batch on the CPU against this build's device.
//!
//! Each benchmark case runs in its own child process, so the peak resident memory it
//! reports is that case's alone: [`run_bench`] spawns the command the caller builds for a
//! case (the `cocomix` binary re-invokes itself), and the child calls [`run_case`].
//!
//! ```no_run
//! use cocomix_bench::{run_bench, Bench, BenchOptions};
//! let opts = BenchOptions::default();
//! let report = run_bench(Bench::Model, &opts, |case| {
//!     let mut c = std::process::Command::new("cocomix");
//!     c.args(["bench", "model", "--case", case]);
//!     c
//! })?;
//! println!("{}", serde_json::to_string(&report)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
mod attribution;
mod common;
mod configs;
mod data;
mod dist;
mod eval;
mod model;
pub mod parity;
mod sae;
mod smollm2;
mod train;

use std::path::PathBuf;

pub use common::peak_rss_mib;
pub use configs::BenchConfig;
pub use train::train_flops_per_token;

use cocomix_trainer::Precision;
use serde::Serialize;

/// Errors of the bench crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From the model crate.
    #[error(transparent)]
    Model(#[from] cocomix_model::Error),
    /// From the ops crate.
    #[error(transparent)]
    Ops(#[from] cocomix_model::ops::Error),
    /// From the SAE crate.
    #[error(transparent)]
    Sae(#[from] cocomix_sae::Error),
    /// From the data crate.
    #[error(transparent)]
    Data(#[from] cocomix_data::Error),
    /// From the attribution crate.
    #[error(transparent)]
    Attribution(#[from] cocomix_attribution::Error),
    /// From the trainer crate.
    #[error(transparent)]
    Trainer(#[from] cocomix_trainer::Error),
    /// From the eval crate.
    #[error(transparent)]
    Eval(#[from] cocomix_eval::Error),
    /// From the communicator (`bench dist`).
    #[error(transparent)]
    Dist(#[from] cocomix_dist::Error),
    /// Reading or writing a file.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Anything else, in words.
    #[error("{0}")]
    Other(String),
}

/// Result alias of the bench crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bench {
    /// Tokenization MB/s and tokens/s, shard read tokens/s.
    Data,
    /// Student forward+backward and teacher residual_grad tokens/s.
    Model,
    /// SAE encode and training tokens/s.
    Sae,
    /// Online labels/s and a cached epoch versus online.
    Attribution,
    /// One optimizer step per objective, and the CoCoMix/NTP time and FLOP ratios.
    Train,
    /// HellaSwag-shaped requests/s.
    Eval,
    /// SmolLM2-135M as a teacher (skipped when its GGUF is absent): forward and residual
    /// gradient tokens/s, label-cache build.
    Smollm2,
    /// Data parallelism over MPI: gradient all-reduce bytes and time per step at the 69M
    /// shapes, NTP throughput on 1 vs 2 ranks. Each case runs as [`dist_ranks`] MPI ranks.
    Dist,
}

impl Bench {
    /// The name the CLI and the report use.
    pub fn name(self) -> &'static str {
        match self {
            Bench::Data => "data",
            Bench::Model => "model",
            Bench::Sae => "sae",
            Bench::Attribution => "attribution",
            Bench::Train => "train",
            Bench::Eval => "eval",
            Bench::Smollm2 => "smollm2",
            Bench::Dist => "dist",
        }
    }

    /// The cases of this benchmark; `small` leaves out the paper-sized ones.
    pub fn cases(self, small: bool) -> Vec<&'static str> {
        let (base, big): (&[&str], &[&str]) = match self {
            Bench::Data => (
                &["data", "data-parquet", "data-jsonl-zst", "data-text"],
                &[],
            ),
            Bench::Model => (
                &["tiny-ntp", "tiny-cocomix"],
                &["69m-ntp", "69m-cocomix", "residual-grad-124m"],
            ),
            Bench::Sae => (&["sae-encode-768x32768"], &["sae-train-768x32768"]),
            Bench::Attribution => (&[], &["labels-online-124m", "labels-cached-vs-online-124m"]),
            Bench::Train => (
                &[
                    "train-default-ntp",
                    "train-default-kd",
                    "train-default-cocomix-cached",
                    "train-default-cocomix-online",
                ],
                &[
                    "train-69m-ntp",
                    "train-69m-kd",
                    "train-69m-cocomix-cached",
                    "train-69m-cocomix-online",
                ],
            ),
            Bench::Eval => (&["eval-hellaswag-124m"], &[]),
            Bench::Smollm2 => (
                &[
                    "smollm2-forward-128",
                    "smollm2-forward-1024",
                    "smollm2-residual-grad",
                    "smollm2-labels",
                ],
                &[],
            ),
            Bench::Dist => (
                &["train-default-ntp-1rank", "train-default-ntp-2rank"],
                &["allreduce-69m"],
            ),
        };
        base.iter()
            .chain(if small { &[][..] } else { big })
            .copied()
            .collect()
    }
}

/// Settings of a benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Corpus the `data` case tokenizes.
    pub corpus: PathBuf,
    /// Leave out the paper-sized cases.
    pub small: bool,
    /// Sequences per step of the 69M `train` cases (default 1).
    pub batch: Option<usize>,
    /// Matmul precision of the `train` cases.
    pub precision: Precision,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            corpus: PathBuf::from("assets/corpus/default.jsonl.gz"),
            small: false,
            batch: None,
            precision: Precision::F32,
        }
    }
}

/// A benchmark's results: one JSON object per case (each with `case` and `peak_rss_mib`,
/// and `config` where its shapes come from a config file).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`Bench::name`].
    pub bench: String,
    /// The device of this build (`Cpu`, `Cuda(..)`, `Metal(..)`).
    pub device: String,
    /// Cores available to the children.
    pub threads: usize,
    /// One object per case, in [`Bench::cases`] order.
    pub results: Vec<serde_json::Value>,
    /// `train` only: CoCoMix/NTP step time against the FLOP ratio, per size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratios: Option<serde_json::Value>,
}

/// MPI ranks a [`Bench::Dist`] case runs on (`mpirun -np` this; 1 for every other case).
pub fn dist_ranks(case: &str) -> usize {
    dist::ranks(case)
}

/// Runs one case in this process; the result includes this process's peak RSS.
pub fn run_case(case: &str, opts: &BenchOptions) -> Result<serde_json::Value> {
    let mut v = match case {
        "data" => data::data(&opts.corpus)?,
        c if dist::CASES.contains(&c) => dist::run(c)?,
        c if c.starts_with("data-") => data::format(c, &opts.corpus)?,
        "tiny-ntp" | "tiny-cocomix" | "69m-ntp" | "69m-cocomix" => model::student_step(case)?,
        "residual-grad-124m" => model::residual_grad_124m()?,
        "sae-encode-768x32768" => sae::encode()?,
        "sae-train-768x32768" => sae::train()?,
        "labels-online-124m" => attribution::labels_online()?,
        "labels-cached-vs-online-124m" => attribution::labels_cached_vs_online()?,
        c if c.starts_with("train-") => train::train_case(c, opts.batch, opts.precision)?,
        "eval-hellaswag-124m" => eval::hellaswag()?,
        c if c.starts_with("smollm2-") => smollm2::case(c)?,
        other => return Err(Error::Other(format!("unknown bench case {other}"))),
    };
    v["peak_rss_mib"] = peak_rss_mib().into();
    Ok(v)
}

/// Runs every case of `bench`, each in the child process `child(case)` builds (which must
/// print [`run_case`]'s JSON as its last line of stdout), and collects the report.
pub fn run_bench(
    bench: Bench,
    opts: &BenchOptions,
    child: impl Fn(&str) -> std::process::Command,
) -> Result<Report> {
    let mut results = Vec::new();
    for case in bench.cases(opts.small) {
        eprintln!("bench: {case} …");
        let out = child(case)
            .output()
            .map_err(|e| Error::Other(format!("running bench case {case}: {e}")))?;
        if !out.status.success() {
            return Err(Error::Other(format!(
                "bench case {case} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        results.push(
            serde_json::from_str::<serde_json::Value>(line)
                .map_err(|e| Error::Other(format!("bench case {case} printed {line:?}: {e}")))?,
        );
    }
    let ratios = (bench == Bench::Train).then(|| train::ratios(&results));
    Ok(Report {
        bench: bench.name().into(),
        device: format!("{:?}", common::device()?),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        results,
        ratios,
    })
}
