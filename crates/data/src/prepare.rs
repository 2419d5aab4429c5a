//! Text files, folders and JSONL → EOT-joined token shards `train.bin` / `val.bin` in the
//! nanoGPT layout, with a `meta.json` that records how they were made.
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Tokenizer};

/// On-disk width of one token id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Little-endian u16 (nanoGPT's layout), used when the vocabulary fits.
    U16,
    /// Little-endian u32.
    U32,
}

impl TokenDtype {
    /// The narrowest width that holds every id of a `vocab_size` vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }
    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// One input file and its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: String,
    pub sha256: String,
}

/// `meta.json` of a prepared data folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataMeta {
    pub format_version: u32,
    pub dtype: TokenDtype,
    pub vocab_size: usize,
    pub eot_id: u32,
    pub tokenizer_identity: String,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub train_documents: u64,
    pub val_documents: u64,
    pub val_fraction: f64,
    pub seed: u64,
    pub sources: Vec<SourceFile>,
    /// Invalid UTF-8 sequences replaced by U+FFFD while reading the sources.
    pub replaced_invalid_utf8: u64,
}

/// What to prepare and where.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files (`.txt`, `.md`, `.jsonl`, each optionally `.gz`) and folders of them.
    pub inputs: Vec<PathBuf>,
    /// Output folder for `train.bin`, `val.bin`, `meta.json` and `tokenizer.json`.
    pub out_dir: PathBuf,
    /// Fraction of documents held out for validation (at least one document).
    pub val_fraction: f64,
    /// Seed of the document split.
    pub seed: u64,
}

impl PrepareOptions {
    /// Options with a 1% validation split and seed 2357 (nanoGPT's split seed).
    pub fn new(inputs: Vec<PathBuf>, out_dir: PathBuf) -> Self {
        Self {
            inputs,
            out_dir,
            val_fraction: 0.01,
            seed: 2357,
        }
    }
}

const FORMAT_VERSION: u32 = 1;
/// Documents tokenized together, in parallel, before they are written.
const CHUNK_DOCS: usize = 512;

enum Kind {
    Text,
    Jsonl,
}

fn kind_of(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    if name.ends_with(".jsonl") {
        Some(Kind::Jsonl)
    } else if name.ends_with(".txt") || name.ends_with(".md") || name.ends_with(".text") {
        Some(Kind::Text)
    } else {
        None
    }
}

/// Expands inputs into the sorted list of corpus files.
fn collect_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if kind_of(&p).is_some() {
                out.push(p);
            }
        }
        Ok(())
    }
    if inputs.is_empty() {
        return Err(Error::Other("no input files or folders given".into()));
    }
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            if files.len() == before {
                return Err(Error::invalid(
                    input,
                    "folder holds no .txt, .md or .jsonl files (optionally .gz)",
                ));
            }
        } else if input.is_file() {
            if kind_of(input).is_none() {
                return Err(Error::invalid(
                    input,
                    "unknown file type: expected .txt, .md or .jsonl (optionally .gz)",
                ));
            }
            files.push(input.clone());
        } else {
            return Err(Error::invalid(input, "no such file or folder"));
        }
    }
    Ok(files)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn decompress(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::invalid(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Decodes UTF-8, replacing invalid sequences; returns the text and how many were replaced.
fn lossy_utf8(bytes: &[u8]) -> (String, u64) {
    let mut replaced = 0u64;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            replaced += 1;
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
    (out, replaced)
}

/// The documents of one file: the whole text, or one per JSONL line (field `text`).
fn documents(path: &Path, bytes: &[u8]) -> Result<(Vec<String>, u64)> {
    let (text, replaced) = lossy_utf8(bytes);
    match kind_of(path) {
        Some(Kind::Text) => Ok((vec![text], replaced)),
        Some(Kind::Jsonl) => {
            let mut docs = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| Error::invalid(path, format!("line {}: not JSON: {e}", n + 1)))?;
                match v.get("text") {
                    Some(serde_json::Value::String(s)) => docs.push(s.clone()),
                    Some(_) => {
                        return Err(Error::invalid(
                            path,
                            format!("line {}: field \"text\" is not a string", n + 1),
                        ))
                    }
                    None => {
                        return Err(Error::invalid(
                            path,
                            format!("line {}: no field \"text\"", n + 1),
                        ))
                    }
                }
            }
            Ok((docs, replaced))
        }
        None => unreachable!("collect_files keeps only known kinds"),
    }
}

struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<std::fs::File>,
    dtype: TokenDtype,
    tokens: u64,
    docs: u64,
}

impl ShardWriter {
    fn create(path: PathBuf, dtype: TokenDtype) -> Result<Self> {
        let tmp = crate::tmp_path(&path);
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self {
            path,
            tmp,
            out: BufWriter::new(f),
            dtype,
            tokens: 0,
            docs: 0,
        })
    }
    fn write_doc(&mut self, ids: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(ids.len() * self.dtype.size());
        for &id in ids {
            match self.dtype {
                TokenDtype::U16 => buf.extend_from_slice(&(id as u16).to_le_bytes()),
                TokenDtype::U32 => buf.extend_from_slice(&id.to_le_bytes()),
            }
        }
        self.out
            .write_all(&buf)
            .map_err(|e| Error::io(&self.tmp, e))?;
        self.tokens += ids.len() as u64;
        self.docs += 1;
        Ok(())
    }
    fn finish(self) -> Result<(u64, u64)> {
        let f = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok((self.tokens, self.docs))
    }
}

fn read_meta(dir: &Path) -> Option<DataMeta> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Tokenizes the corpus into `opts.out_dir`, or reuses what a previous identical call left
/// there (same source hashes, tokenizer, split fraction and seed). Returns the metadata.
pub fn prepare(opts: &PrepareOptions, tok: &Tokenizer) -> Result<DataMeta> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Other(format!(
            "val_fraction must be in [0, 1), got {}",
            opts.val_fraction
        )));
    }
    let files = collect_files(&opts.inputs)?;
    let mut sources = Vec::with_capacity(files.len());
    for f in &files {
        sources.push(SourceFile {
            path: f.display().to_string(),
            sha256: crate::file_sha256(f)?,
        });
    }
    if let Some(meta) = read_meta(&opts.out_dir) {
        let same_sources = meta
            .sources
            .iter()
            .map(|s| &s.sha256)
            .eq(sources.iter().map(|s| &s.sha256));
        if same_sources
            && meta.tokenizer_identity == tok.identity()
            && meta.val_fraction == opts.val_fraction
            && meta.seed == opts.seed
            && crate::Dataset::open(&opts.out_dir).is_ok()
        {
            tracing::info!(
                "{}: reusing prepared shards (same sources, tokenizer and split)",
                opts.out_dir.display()
            );
            return Ok(meta);
        }
    }

    // Pass 1 counts documents so the held-out set is an exact seeded sample of them.
    let mut n_docs = 0usize;
    for f in &files {
        let bytes = decompress(f, read_bytes(f)?)?;
        n_docs += documents(f, &bytes)?
            .0
            .iter()
            .filter(|d| !d.trim().is_empty())
            .count();
    }
    if n_docs == 0 {
        return Err(Error::Other(format!(
            "the corpus is empty: {} file(s) hold no non-blank document",
            files.len()
        )));
    }
    let n_val = if opts.val_fraction > 0.0 {
        ((n_docs as f64 * opts.val_fraction).round() as usize)
            .clamp(1, n_docs.saturating_sub(1).max(1))
    } else {
        0
    };
    if n_val > 0 && n_docs < 2 {
        return Err(Error::Other(
            "a validation split needs at least two documents; pass val_fraction 0 or more text"
                .into(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut is_val = vec![false; n_docs];
    for i in sample(&mut rng, n_docs, n_val) {
        is_val[i] = true;
    }

    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
    let dtype = TokenDtype::for_vocab(tok.vocab_size());
    let mut train = ShardWriter::create(opts.out_dir.join("train.bin"), dtype)?;
    let mut val = ShardWriter::create(opts.out_dir.join("val.bin"), dtype)?;
    let total_bytes: u64 = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = crate::progress::progress_bar_bytes(total_bytes, "tokenizing");
    let mut doc_index = 0usize;
    let mut replaced_total = 0u64;
    for f in &files {
        let raw = read_bytes(f)?;
        let raw_len = raw.len() as u64;
        let (docs, replaced) = documents(f, &decompress(f, raw)?)?;
        if replaced > 0 {
            tracing::warn!(
                "{}: replaced {replaced} invalid UTF-8 sequence(s) with U+FFFD",
                f.display()
            );
        }
        replaced_total += replaced;
        let docs: Vec<String> = docs.into_iter().filter(|d| !d.trim().is_empty()).collect();
        for chunk in docs.chunks(CHUNK_DOCS) {
            let encoded: Vec<Result<Vec<u32>>> = chunk
                .par_iter()
                .map(|d| {
                    let mut ids = tok.encode_ordinary(d)?;
                    ids.push(tok.eot_id());
                    Ok(ids)
                })
                .collect();
            for ids in encoded {
                let ids = ids.map_err(|e| Error::invalid(f, e.to_string()))?;
                if is_val[doc_index] {
                    val.write_doc(&ids)?
                } else {
                    train.write_doc(&ids)?
                }
                doc_index += 1;
            }
        }
        bar.inc(raw_len);
    }
    bar.finish_and_clear();
    let (train_tokens, train_documents) = train.finish()?;
    let (val_tokens, val_documents) = val.finish()?;
    let meta = DataMeta {
        format_version: FORMAT_VERSION,
        dtype,
        vocab_size: tok.vocab_size(),
        eot_id: tok.eot_id(),
        tokenizer_identity: tok.identity().to_string(),
        train_tokens,
        val_tokens,
        train_documents,
        val_documents,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        sources,
        replaced_invalid_utf8: replaced_total,
    };
    tok.save(&opts.out_dir)?;
    let json = serde_json::to_string_pretty(&meta).map_err(|e| Error::Other(e.to_string()))?;
    crate::write_atomic(&opts.out_dir.join("meta.json"), json.as_bytes())?;
    tracing::info!(
        "{}: {train_tokens} train tokens ({train_documents} docs), {val_tokens} val tokens ({val_documents} docs)",
        opts.out_dir.display()
    );
    Ok(meta)
}

/// sha256 of every corpus file the inputs expand to, in preparation order.
pub fn source_hashes(inputs: &[PathBuf]) -> Result<Vec<String>> {
    collect_files(inputs)?
        .iter()
        .map(|f| crate::file_sha256(f))
        .collect()
}

/// Reads the documents of a corpus (files and folders, as [`prepare`] does), e.g. to train a
/// tokenizer on it.
pub fn read_documents(inputs: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in collect_files(inputs)? {
        let bytes = decompress(&f, read_bytes(&f)?)?;
        out.extend(
            documents(&f, &bytes)?
                .0
                .into_iter()
                .filter(|d| !d.trim().is_empty()),
        );
    }
    Ok(out)
}
