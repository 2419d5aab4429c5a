//! `bench data`: tokenization and shard reads.
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::Result;

/// Prepares `corpus` with the GPT-2 tokenizer (MB/s, tokens/s), then reads batches of
/// 16 × 1024 tokens from the shard for one second.
pub fn data(corpus: &Path) -> Result<Value> {
    let tok = cocomix_data::Tokenizer::gpt2()?;
    let docs = cocomix_data::read_documents(&[corpus.to_path_buf()])?;
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("data");
    let opts = cocomix_data::PrepareOptions::new(vec![corpus.to_path_buf()], out.clone());
    let t = Instant::now();
    let meta = cocomix_data::prepare(&opts, &tok)?;
    let prep_s = t.elapsed().as_secs_f64();
    let tokens = meta.train_tokens + meta.val_tokens;
    let data = cocomix_data::Dataset::open(&out)?;
    let (b, t_len) = (16usize, 1024usize);
    let t = Instant::now();
    let (mut read, mut i) = (0usize, 0u64);
    while t.elapsed().as_secs_f64() < 1.0 {
        read += data.train_batch(b, t_len, 22, i)?.len();
        i += 1;
    }
    let read_s = t.elapsed().as_secs_f64();
    Ok(json!({
        "case": "data", "corpus": corpus.display().to_string(), "corpus_mb": bytes as f64 / 1e6,
        "tokenize_mb_per_s": bytes as f64 / 1e6 / prep_s, "tokenize_tokens_per_s": tokens as f64 / prep_s,
        "shard_read_tokens_per_s": read as f64 / read_s,
    }))
}

/// `data-parquet`, `data-jsonl-zst`, `data-text`: the corpus's documents written in that
/// format and prepared with the GPT-2 tokenizer (MB/s and tokens/s per core, decode speed).
pub fn format(case: &str, corpus: &Path) -> Result<Value> {
    use cocomix_data::bench::{prepare_throughput, BenchFormat};
    let format = case
        .strip_prefix("data-")
        .and_then(BenchFormat::from_name)
        .ok_or_else(|| crate::Error::Other(format!("unknown bench case {case}")))?;
    let docs = cocomix_data::read_documents(&[corpus.to_path_buf()])?;
    let dir = tempfile::tempdir()?;
    let result = prepare_throughput(format, &docs, dir.path(), &cocomix_data::Tokenizer::gpt2()?)?;
    let mut v = serde_json::to_value(result).map_err(|e| crate::Error::Other(e.to_string()))?;
    v["case"] = case.into();
    Ok(v)
}
