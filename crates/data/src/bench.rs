//! Throughput of [`crate::prepare`] per corpus format, for `cocomix bench data`.
//!
//! The same documents are written as Parquet (snappy, 1,024 rows per row group, four files),
//! zstd JSON Lines (level 3, four files) and one text file per document, then prepared.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::{prepare, Corpus, Error, FileStats, PrepareOptions, Result, Tokenizer, DEFAULT_FIELD};

/// A corpus format the benchmark writes and prepares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchFormat {
    /// Parquet files, one `text` column, snappy pages.
    Parquet,
    /// zstd-compressed JSON Lines.
    JsonlZst,
    /// One `.txt` file per document.
    Text,
}

impl BenchFormat {
    /// Every format, in report order.
    pub const ALL: [BenchFormat; 3] = [
        BenchFormat::Parquet,
        BenchFormat::JsonlZst,
        BenchFormat::Text,
    ];

    /// Short name (`parquet`, `jsonl-zst`, `text`).
    pub fn name(self) -> &'static str {
        match self {
            BenchFormat::Parquet => "parquet",
            BenchFormat::JsonlZst => "jsonl-zst",
            BenchFormat::Text => "text",
        }
    }

    /// The format named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Figures of one preparation.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareThroughput {
    /// [`BenchFormat::name`].
    pub format: &'static str,
    /// Corpus files.
    pub files: usize,
    /// Their size on disk, MB (10^6 bytes).
    pub disk_mb: f64,
    /// Document text, MB.
    pub text_mb: f64,
    /// Documents.
    pub documents: u64,
    /// Tokens written (EOTs included).
    pub tokens: u64,
    /// Threads of the rayon pool that tokenizes.
    pub threads: usize,
    /// One pass that reads (decompresses, parses) every document without tokenizing, s.
    pub read_s: f64,
    /// The whole [`prepare`] (hash, count, tokenize, write), s.
    pub prepare_s: f64,
    /// Text MB per second of the read pass alone.
    pub read_mb_per_s: f64,
    /// Text MB per second of the whole preparation.
    pub mb_per_s: f64,
    /// `mb_per_s` per thread.
    pub mb_per_s_per_core: f64,
    /// Tokens per second of the whole preparation.
    pub tokens_per_s: f64,
    /// `tokens_per_s` per thread.
    pub tokens_per_s_per_core: f64,
}

fn other(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

/// Writes `docs` into `dir` in `format` (spread over up to four files), returning the files.
pub fn write_corpus(format: BenchFormat, docs: &[String], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = Vec::new();
    match format {
        BenchFormat::Text => {
            for (i, d) in docs.iter().enumerate() {
                let p = dir.join(format!("{i:06}.txt"));
                std::fs::write(&p, d).map_err(|e| Error::io(&p, e))?;
                paths.push(p);
            }
        }
        BenchFormat::JsonlZst | BenchFormat::Parquet => {
            for (i, part) in docs.chunks(docs.len().div_ceil(4).max(1)).enumerate() {
                let p = if format == BenchFormat::Parquet {
                    let p = dir.join(format!("part-{i:05}.parquet"));
                    write_parquet(&p, part).map_err(|e| Error::invalid(&p, e.to_string()))?;
                    p
                } else {
                    let p = dir.join(format!("part-{i:05}.jsonl.zst"));
                    write_jsonl_zst(&p, part).map_err(|e| Error::io(&p, e))?;
                    p
                };
                paths.push(p);
            }
        }
    }
    Ok(paths)
}

fn write_jsonl_zst(path: &Path, docs: &[String]) -> std::io::Result<()> {
    let mut z = zstd::stream::write::Encoder::new(std::fs::File::create(path)?, 3)?;
    for d in docs {
        serde_json::to_writer(&mut z, &serde_json::json!({ "text": d }))?;
        z.write_all(b"\n")?;
    }
    z.finish()?.sync_all()
}

fn write_parquet(path: &Path, docs: &[String]) -> parquet::errors::Result<()> {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    let schema = Arc::new(parquet::schema::parser::parse_message_type(
        "message document { required binary text (UTF8); }",
    )?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut w = SerializedFileWriter::new(std::fs::File::create(path)?, schema, props)?;
    for rows in docs.chunks(1024) {
        let mut group = w.next_row_group()?;
        while let Some(mut column) = group.next_column()? {
            let values: Vec<ByteArray> = rows.iter().map(|d| ByteArray::from(d.as_str())).collect();
            column
                .typed::<ByteArrayType>()
                .write_batch(&values, None, None)?;
            column.close()?;
        }
        group.close()?;
    }
    w.close()?;
    Ok(())
}

/// Writes `docs` in `format` under `work_dir`, times one read pass and one [`prepare`]
/// with `tok`, and removes what it wrote.
pub fn prepare_throughput(
    format: BenchFormat,
    docs: &[String],
    work_dir: &Path,
    tok: &Tokenizer,
) -> Result<PrepareThroughput> {
    let corpus_dir = work_dir.join(format!("corpus-{}", format.name()));
    let out = work_dir.join(format!("data-{}", format.name()));
    let paths = write_corpus(format, docs, &corpus_dir)?;
    let mut disk = 0u64;
    for p in &paths {
        disk += p.metadata().map_err(|e| Error::io(p, e))?.len();
    }

    let t = Instant::now();
    let corpus = Corpus::resolve(std::slice::from_ref(&corpus_dir), DEFAULT_FIELD)?;
    let mut read = FileStats::default();
    for f in corpus.files() {
        read += f.for_each_document(DEFAULT_FIELD, |_| Ok(()))?;
    }
    let read_s = t.elapsed().as_secs_f64();

    let opts = PrepareOptions::new(vec![corpus_dir.clone()], out.clone());
    let t = Instant::now();
    let meta = prepare(&opts, tok)?;
    let prepare_s = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&corpus_dir).map_err(other)?;
    std::fs::remove_dir_all(&out).map_err(other)?;

    let threads = rayon::current_num_threads();
    let text_mb = read.text_bytes as f64 / 1e6;
    let tokens = meta.train_tokens + meta.val_tokens;
    Ok(PrepareThroughput {
        format: format.name(),
        files: paths.len(),
        disk_mb: disk as f64 / 1e6,
        text_mb,
        documents: read.documents,
        tokens,
        threads,
        read_s,
        prepare_s,
        read_mb_per_s: text_mb / read_s,
        mb_per_s: text_mb / prepare_s,
        mb_per_s_per_core: text_mb / prepare_s / threads as f64,
        tokens_per_s: tokens as f64 / prepare_s,
        tokens_per_s_per_core: tokens as f64 / prepare_s / threads as f64,
    })
}
