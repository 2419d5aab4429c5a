//! `cocomix bench` and `cocomix parity`: arguments for the `cocomix-bench` library.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cocomix_bench::{parity, run_bench, run_case, Bench, BenchOptions};
use cocomix_trainer::Precision;

use crate::common::print_json;

/// What to measure.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BenchArg {
    /// Tokenization MB/s and tokens/s, shard read tokens/s.
    Data,
    /// Student forward+backward and teacher residual_grad tokens/s.
    Model,
    /// SAE encode and training tokens/s (d = 768, C = 32768, k = 32).
    Sae,
    /// Online labels/s (GPT-2 124M shapes, T = 1024) and a cached epoch versus online.
    Attribution,
    /// One optimizer step per objective, and the CoCoMix/NTP time and FLOP ratios.
    Train,
    /// HellaSwag requests/s (4 alternatives per document) with a GPT-2 124M-shaped model.
    Eval,
    /// SmolLM2-135M as a teacher (the GGUF of scripts/fetch-smollm2.sh; skipped when
    /// absent): forward tokens/s at T = 128 and 1024, residual gradient at its middle layer,
    /// label-cache build.
    Smollm2,
    /// Data parallelism over MPI (build with --features mpi): gradient all-reduce bytes and
    /// time per step at the 69M shapes on 2 ranks, NTP throughput on 1 vs 2 ranks.
    Dist,
}

impl From<BenchArg> for Bench {
    fn from(b: BenchArg) -> Self {
        match b {
            BenchArg::Data => Bench::Data,
            BenchArg::Model => Bench::Model,
            BenchArg::Sae => Bench::Sae,
            BenchArg::Attribution => Bench::Attribution,
            BenchArg::Train => Bench::Train,
            BenchArg::Eval => Bench::Eval,
            BenchArg::Smollm2 => Bench::Smollm2,
            BenchArg::Dist => Bench::Dist,
        }
    }
}

/// `--precision`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
    F16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F16 => Precision::F16,
        }
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    what: BenchArg,
    /// Print one JSON object instead of one line per case.
    #[arg(long)]
    json: bool,
    /// Corpus to measure tokenization on (bench data).
    #[arg(long, default_value = "assets/corpus/default.jsonl.gz")]
    corpus: PathBuf,
    /// Skip the large (paper-sized) cases.
    #[arg(long)]
    small: bool,
    /// Sequences per step of the 69M `train` cases (default 1).
    #[arg(long)]
    batch: Option<usize>,
    /// Matmul precision of the `train` cases.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    /// Run one case in this process (each case runs in its own child process).
    #[arg(long, hide = true)]
    case: Option<String>,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let opts = BenchOptions {
        corpus: a.corpus.clone(),
        small: a.small,
        batch: a.batch,
        precision: a.precision.into(),
    };
    if let Some(case) = &a.case {
        let v = run_case(case, &opts)?;
        // Of the MPI ranks of a `dist` case, rank 0 answers.
        if cocomix_dist::launcher_rank() != 0 {
            return Ok(());
        }
        return print_json(&v, true);
    }
    let exe = std::env::current_exe().context("locating the cocomix binary")?;
    let what = clap::ValueEnum::to_possible_value(&a.what)
        .map(|v| v.get_name().to_string())
        .context("bench name")?;
    let precision = clap::ValueEnum::to_possible_value(&a.precision)
        .map(|v| v.get_name().to_string())
        .context("precision name")?;
    let bench: Bench = a.what.into();
    let dist = bench == Bench::Dist;
    if dist && cocomix_dist::mpirun_command(1).is_none() {
        bail!("bench dist needs mpirun (apt-get install openmpi-bin)");
    }
    let report = run_bench(bench, &opts, |case| {
        // A `dist` case runs as its ranks under mpirun, one thread each (they share the cores).
        let mpirun = dist
            .then(|| cocomix_dist::mpirun_command(cocomix_bench::dist_ranks(case)))
            .flatten();
        let mut c = match mpirun {
            Some(mut m) => {
                m.env("RAYON_NUM_THREADS", "1").arg(&exe);
                m
            }
            None => std::process::Command::new(&exe),
        };
        c.args(["bench", &what, "--case", case, "--precision", &precision])
            .arg("--corpus")
            .arg(&a.corpus);
        if let Some(b) = a.batch {
            c.args(["--batch", &b.to_string()]);
        }
        c
    })?;
    if a.json {
        print_json(&report, true)?;
    } else {
        for r in &report.results {
            println!("{r}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ParityArgs {
    /// Folder with the golden tiny weights (teacher/, student/, sae.safetensors,
    /// expected.safetensors).
    #[arg(long, default_value = "testdata/golden")]
    golden: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn parity(a: ParityArgs) -> Result<()> {
    let dev = cocomix_trainer::default_device()?;
    let report = parity::run_parity(&a.golden, &dev)?;
    if a.json {
        print_json(&report, true)?;
    } else {
        for c in &report.tensors {
            println!(
                "{:>34} vs {:<6}  max |Δ| {:>9}  {}",
                c.tensor,
                c.against,
                c.max_abs_diff.map_or("-".into(), |d| format!("{d:.3e}")),
                c.failure
                    .as_ref()
                    .map_or("ok".into(), |f| format!("FAIL: {f}"))
            );
        }
        println!(
            "device {}: {} checks, {} failed",
            report.device,
            report.compared,
            report.failed.len()
        );
    }
    if !report.passed() {
        let lines: Vec<String> = report
            .failed
            .iter()
            .map(|f| format!("  {} (vs {}): {}", f.tensor, f.against, f.reason))
            .collect();
        bail!(
            "parity FAILED on {} ({} of {} checks):\n{}",
            report.device,
            report.failed.len(),
            report.compared,
            lines.join("\n")
        );
    }
    Ok(())
}
