//! `cocomix bench`: throughput measurements, printed as JSON with `--json`.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    what: What,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Corpus to measure tokenization on (default: the embedded corpus).
    #[arg(long, default_value = "assets/corpus/default.jsonl.gz")]
    corpus: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    /// Tokenization MB/s and tokens/s, shard read tokens/s.
    Data,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let report = match args.what {
        What::Data => data(&args.corpus)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for (k, v) in report.as_object().into_iter().flatten() {
            println!("{k:>28}  {v}");
        }
    }
    Ok(())
}

fn data(corpus: &std::path::Path) -> Result<serde_json::Value> {
    let tok = cocomix_data::Tokenizer::gpt2()?;
    let docs = cocomix_data::read_documents(&[corpus.to_path_buf()])?;
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    let dir = tempdir()?;
    let opts = cocomix_data::PrepareOptions::new(vec![corpus.to_path_buf()], dir.join("data"));
    let t = Instant::now();
    let meta = cocomix_data::prepare(&opts, &tok)?;
    let prep_s = t.elapsed().as_secs_f64();
    let tokens = meta.train_tokens + meta.val_tokens;

    let data = cocomix_data::Dataset::open(dir.join("data"))?;
    let (b, t_len) = (16usize, 1024usize);
    let t = Instant::now();
    let mut read = 0usize;
    let mut i = 0u64;
    while t.elapsed().as_secs_f64() < 1.0 {
        read += data.train_batch(b, t_len, 22, i)?.len();
        i += 1;
    }
    let read_s = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir).ok();
    Ok(serde_json::json!({
        "bench": "data",
        "corpus": corpus.display().to_string(),
        "corpus_mb": bytes as f64 / 1e6,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "tokenize_mb_per_s": bytes as f64 / 1e6 / prep_s,
        "tokenize_tokens_per_s": tokens as f64 / prep_s,
        "shard_read_tokens_per_s": read as f64 / read_s,
    }))
}

/// A fresh scratch folder under the system temp dir, removed by the caller.
fn tempdir() -> std::io::Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("cocomix-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
