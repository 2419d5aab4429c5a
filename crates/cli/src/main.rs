//! `cocomix`: the command-line face of the cocomix crates. Each subcommand parses its
//! arguments and calls a library function; the work lives in the crates.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod attribution;
mod bench;
mod common;
mod eval;
mod generate;
mod sae;

/// Candle allocates a fresh buffer per op; by default glibc maps and unmaps every buffer
/// over 128 KiB (page faults and TLB shootdowns across threads each time). Keeping buffers
/// up to 32 MiB in the heap, never trimmed, makes training steps ~1.4x faster.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any worker thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Candle runs its own elementwise ops on a spinning thread pool next to rayon's (which runs
/// gemm and the fused kernels of `cocomix-ops`); on a small CPU the extra spinning thread
/// competes with them (measured: CoCoMix steps ~1.5x slower on 2 cores). The heavy
/// elementwise work is fused and runs on rayon, so Candle's pool is kept to the calling
/// thread unless `CANDLE_NUM_THREADS` is set.
fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called first thing in main, before any thread exists.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Pretraining language models with continuous concepts (CoCoMix, Tack et al. 2025).
#[derive(Parser)]
#[command(name = "cocomix", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize Parquet, JSONL (.gz/.zst), text files, folders, globs and hf:// datasets into
    /// train.bin / val.bin shards.
    Prepare(PrepareArgs),
    /// Run the whole method from a config: data, teacher, SAE, labels, students, report.
    Train(TrainArgs),
    /// Compare objectives over seeds (same batches per seed): mean ± std, paired differences
    /// to NTP with 95% intervals, curves, token efficiency (runs/NAME/compare.{md,json,png}).
    Compare(CompareArgs),
    /// Evaluate models (perplexity) and compare runs.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Generate text from a GPT-2 or CoCoMix model, optionally steering concepts.
    Generate(generate::GenerateArgs),
    /// Train a TopK SAE on a teacher, or encode text with one.
    #[command(subcommand)]
    Sae(sae::SaeCommand),
    /// Concept attribution scores and labels of a text (JSON).
    Attribute(attribution::AttributeArgs),
    /// Build the label cache of a prepared data folder.
    #[command(subcommand)]
    Labels(attribution::LabelsCommand),
    /// Measure throughput and peak memory; prints JSON with --json.
    Bench(bench::BenchArgs),
    /// The golden tiny batch on this build's device against the CPU and the golden values;
    /// exits non-zero naming each failing tensor.
    Parity(bench::ParityArgs),
}

/// Re-running the same command continues an interrupted job: finished stages and runs are
/// reused, an interrupted run resumes from its last checkpoint.
#[derive(clap::Args)]
struct TrainArgs {
    /// Run config (TOML).
    #[arg(long, default_value = "configs/default.toml")]
    config: PathBuf,
    /// Override a config key, e.g. --set optim.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Stop after the shared stages (data, teacher, SAE, label cache): build them once, for
    /// example before many runs or to rebuild the shipped assets (scripts/build-assets.sh).
    #[arg(long)]
    prepare_only: bool,
}

#[derive(clap::Args)]
struct CompareArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Seeds per objective (run.seeds): seed, seed + 1, … of the config.
    #[arg(long)]
    seeds: Option<usize>,
    /// Objectives to compare (run.objectives), comma-separated: ntp, kd, cocomix,
    /// predict-only, mix-only, random-labels, shuffled-labels, pause;
    /// `cocomix[lambda=0.3,labels=negative]` sets its own λ and label mode.
    #[arg(long, value_parser = cocomix_trainer::parse_arms)]
    objectives: Option<ArmList>,
    /// Add CoCoMix arms with these λ (a λ sweep), e.g. --lambdas 0.03,0.3,1.
    #[arg(long, value_delimiter = ',')]
    lambdas: Vec<f64>,
}

/// One `--objectives` value parses into a list: behind an alias so that clap's derive takes
/// the list as one value (it treats a field spelled `Vec<T>` as repeated values of `T`).
type ArmList = Vec<cocomix_trainer::Arm>;

fn run_job(cfg: &cocomix_trainer::RunConfig, prepare_only: bool) -> Result<()> {
    // One rank of a data-parallel job when launched so (`dist.backend`), else one process.
    let comm = cocomix_trainer::Comm::init(&cfg.dist)?;
    let job = |device: candle_core::Device| {
        if prepare_only {
            let shared = cocomix_trainer::pipeline::Shared::prepare(
                cfg,
                &cfg.run.objectives,
                &device,
                &comm,
            )?;
            if comm.is_root() {
                println!("{}", shared.describe(cfg));
            }
            return Ok(None);
        }
        cocomix_trainer::pipeline::run_main_job(cfg, &device, &comm).map(Some)
    };
    let dir = match cocomix_trainer::rank_device(&comm).and_then(job) {
        Ok(dir) => dir,
        Err(e) if comm.world() > 1 => {
            // Said before the communicator's drop aborts the job (and this process).
            eprintln!("error: rank {}: {e}", comm.rank());
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let root = comm.is_root();
    comm.finish();
    let Some(dir) = dir.filter(|_| root) else {
        return Ok(());
    };
    let path = dir.join("compare.md");
    let report = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the report {}", path.display()))?;
    println!("{report}");
    eprintln!("report: {}", path.display());
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    run_job(
        &cocomix_trainer::RunConfig::load(&args.config, &args.overrides)?,
        args.prepare_only,
    )
}

fn compare(args: CompareArgs) -> Result<()> {
    let mut overrides = args.train.overrides.clone();
    if let Some(n) = args.seeds {
        overrides.push(format!("run.seeds={n}"));
    }
    let mut arms = args.objectives.clone().unwrap_or_default();
    if !args.lambdas.is_empty() {
        if arms.is_empty() {
            arms = cocomix_trainer::RunConfig::load(&args.train.config, &overrides)?
                .run
                .objectives;
        }
        for l in &args.lambdas {
            arms.push(format!("cocomix[lambda={l}]").parse()?);
        }
    }
    if !arms.is_empty() {
        let list: Vec<String> = arms.iter().map(|a| format!("\"{a}\"")).collect();
        overrides.push(format!("run.objectives=[{}]", list.join(",")));
    }
    run_job(
        &cocomix_trainer::RunConfig::load(&args.train.config, &overrides)?,
        args.train.prepare_only,
    )
}

#[derive(clap::Args)]
#[command(
    after_help = "Inputs: files, folders (walked recursively), shell globs such as \
'data/**/*.parquet' (quote them), and Hugging Face datasets \
hf://datasets/OWNER/NAME[@REVISION]/PATH_GLOB (downloaded into the hub cache; offline, its \
cached files are used). Formats: .parquet (the text column, row groups streamed); \
.jsonl/.ndjson (one JSON object per line), optionally .gz or .zst, and .json.gz/.json.zst \
as JSON Lines; .txt/.md/.text (one document per file), optionally .gz or .zst.\n\n\
A killed preparation run again with the same arguments continues after its last finished \
file; an identical finished one is reused."
)]
struct PrepareArgs {
    /// Input files, folders, globs or hf://datasets/OWNER/NAME/PATH_GLOB (formats below).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output folder (train.bin, val.bin, meta.json, tokenizer.json).
    #[arg(long, short)]
    out: PathBuf,
    /// JSON Lines field / Parquet column holding the document text.
    #[arg(long, default_value = cocomix_data::DEFAULT_FIELD)]
    field: String,
    /// Tokenizer: `gpt2` (bundled), a tokenizer.json, a folder with vocab.json + merges.txt,
    /// or a Hugging Face repo id.
    #[arg(long, default_value = "gpt2", conflicts_with = "train_tokenizer")]
    tokenizer: String,
    /// Train a byte-level BPE of this many tokens on the inputs instead (small CPU runs;
    /// reads the whole corpus into memory).
    #[arg(long, value_name = "VOCAB_SIZE")]
    train_tokenizer: Option<usize>,
    /// Fraction of documents held out for validation.
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Seed of the train/validation document split.
    #[arg(long, default_value_t = 2357)]
    seed: u64,
}

fn prepare(args: PrepareArgs) -> Result<()> {
    let tok = match args.train_tokenizer {
        Some(vocab) => {
            let docs =
                cocomix_data::Corpus::resolve(&args.inputs, &args.field)?.read_documents()?;
            tracing::info!(
                "training a {vocab}-token byte-level BPE on {} documents",
                docs.len()
            );
            cocomix_data::Tokenizer::train_bpe(docs.iter(), vocab)?
        }
        None => cocomix_data::Tokenizer::load(&args.tokenizer)
            .with_context(|| format!("loading tokenizer {:?}", args.tokenizer))?,
    };
    let opts = cocomix_data::PrepareOptions {
        val_fraction: args.val_fraction,
        seed: args.seed,
        field: args.field,
        ..cocomix_data::PrepareOptions::new(args.inputs, args.out)
    };
    let meta = cocomix_data::prepare(&opts, &tok)?;
    println!("{}", serde_json::to_string_pretty(&meta)?);
    Ok(())
}

fn main() {
    tune_allocator();
    tune_threads();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // Ranks other than 0 of a data-parallel job only warn.
                let level = match cocomix_trainer::launcher_rank() {
                    0 => "info",
                    _ => "warn",
                };
                tracing_subscriber::EnvFilter::new(level)
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(a) => prepare(a),
        Command::Train(a) => train(a),
        Command::Compare(a) => compare(a),
        Command::Eval(c) => eval::run(c),
        Command::Generate(a) => generate::run(a),
        Command::Sae(c) => sae::run(c),
        Command::Attribute(a) => attribution::attribute(a),
        Command::Labels(c) => attribution::labels(c),
        Command::Bench(a) => bench::bench(a),
        Command::Parity(a) => bench::parity(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
