//! `cocomix`: the command-line face of the cocomix crates. Each subcommand parses its
//! arguments and calls a library function; the work lives in the crates.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod bench;

/// Pretraining language models with continuous concepts (CoCoMix, Tack et al. 2025).
#[derive(Parser)]
#[command(name = "cocomix", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize text files, folders and JSONL (field `text`) into train.bin / val.bin shards.
    Prepare(PrepareArgs),
    /// Measure throughput; prints JSON with --json.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Input files (.txt, .md, .jsonl, optionally .gz) or folders of them.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output folder (train.bin, val.bin, meta.json, tokenizer.json).
    #[arg(long, short)]
    out: PathBuf,
    /// Tokenizer: `gpt2` (bundled), a tokenizer.json, a folder with vocab.json + merges.txt,
    /// or a Hugging Face repo id.
    #[arg(long, default_value = "gpt2", conflicts_with = "train_tokenizer")]
    tokenizer: String,
    /// Train a byte-level BPE of this many tokens on the inputs instead (small CPU runs).
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
            let docs = cocomix_data::read_documents(&args.inputs)?;
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
        ..cocomix_data::PrepareOptions::new(args.inputs, args.out)
    };
    let meta = cocomix_data::prepare(&opts, &tok)?;
    println!("{}", serde_json::to_string_pretty(&meta)?);
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(a) => prepare(a),
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
