//! Corpus → EOT-joined token shards `train.bin` / `val.bin` in the nanoGPT layout, with a
//! `meta.json` that records how they were made.
//!
//! Streaming and resumable. The files are hashed, read once to count their documents (which
//! also finds a bad file before the long work), then read again and tokenized in parallel,
//! in batches of bounded size, by one reader thread and the rayon pool. After each finished
//! file the shards' lengths and the split state are checkpointed in `prepare.progress.json`;
//! a killed preparation run again with the same inputs and options truncates the partial
//! shards to the last checkpoint and continues after the last finished file, ending with the
//! same bytes as an uninterrupted run.
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::corpus::{Corpus, CorpusFile, FileStats, DEFAULT_FIELD};
use crate::split::{val_count, ValSampler, SPLIT_RULE};
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
    /// Bytes of `tokens` tokens (64-bit: shards may exceed 4 GB); `None` on overflow.
    pub fn byte_len(self, tokens: u64) -> Option<u64> {
        tokens.checked_mul(self.size() as u64)
    }
}

/// One input file and its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Where the file was read from.
    pub path: String,
    /// Hex sha256 of its bytes.
    pub sha256: String,
}

fn split_rule_1() -> u32 {
    1
}

fn default_field() -> String {
    DEFAULT_FIELD.to_string()
}

/// `meta.json` of a prepared data folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataMeta {
    /// Layout of the shards (1: EOT-joined little-endian ids).
    pub format_version: u32,
    /// Width of one token id.
    pub dtype: TokenDtype,
    /// Size of the tokenizer's vocabulary.
    pub vocab_size: usize,
    /// Id of `<|endoftext|>`, which ends every document.
    pub eot_id: u32,
    /// sha256 of the tokenizer (see [`Tokenizer::identity`]).
    pub tokenizer_identity: String,
    /// Tokens in `train.bin`.
    pub train_tokens: u64,
    /// Tokens in `val.bin`.
    pub val_tokens: u64,
    /// Documents in `train.bin`.
    pub train_documents: u64,
    /// Documents in `val.bin`.
    pub val_documents: u64,
    /// Fraction of documents held out for validation.
    pub val_fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// The split rule (2: sequential selection sampling while streaming, see the crate
    /// README; 1: folders prepared before it).
    #[serde(default = "split_rule_1")]
    pub split_rule: u32,
    /// The JSON Lines field / Parquet column documents were read from.
    #[serde(default = "default_field")]
    pub field: String,
    /// Every source file, in preparation order, with its sha256.
    pub sources: Vec<SourceFile>,
    /// Invalid UTF-8 sequences replaced by U+FFFD while reading the sources.
    pub replaced_invalid_utf8: u64,
    /// Null, empty or whitespace-only documents skipped.
    #[serde(default)]
    pub skipped_empty_documents: u64,
    /// Source files a resumed preparation found already finished (`None`: one run).
    #[serde(default)]
    pub resumed_from: Option<usize>,
}

/// What to prepare and where.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files, folders, globs and `hf://datasets/...` inputs (see [`Corpus::resolve`]).
    pub inputs: Vec<PathBuf>,
    /// Output folder for `train.bin`, `val.bin`, `meta.json` and `tokenizer.json`.
    pub out_dir: PathBuf,
    /// Fraction of documents held out for validation (at least one document when > 0).
    pub val_fraction: f64,
    /// Seed of the document split.
    pub seed: u64,
    /// JSON Lines field / Parquet column holding the text.
    pub field: String,
    /// Stop with [`Error::Stopped`] once this many source files are finished, leaving the
    /// state a kill would leave; running again continues. For tests and time-boxed jobs.
    pub stop_after_files: Option<usize>,
}

impl PrepareOptions {
    /// Options with a 1% validation split, seed 2357 (nanoGPT's split seed) and field `text`.
    pub fn new(inputs: Vec<PathBuf>, out_dir: PathBuf) -> Self {
        Self {
            inputs,
            out_dir,
            val_fraction: 0.01,
            seed: 2357,
            field: DEFAULT_FIELD.to_string(),
            stop_after_files: None,
        }
    }
}

const FORMAT_VERSION: u32 = 1;
/// The checkpoint of an unfinished preparation, beside the shards.
pub const PROGRESS_FILE: &str = "prepare.progress.json";
/// A batch of documents tokenized in parallel holds at most this much text …
const BATCH_BYTES: usize = 8 << 20;
/// … and this many documents.
const BATCH_DOCS: usize = 4096;

/// Tokens and documents written to one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ShardPos {
    tokens: u64,
    documents: u64,
}

/// `prepare.progress.json`: enough to continue after the last finished file.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    /// Identity of the preparation (sources, tokenizer, options); another one starts anew.
    key: String,
    /// What the counting pass found in each source file.
    files: Vec<FileStats>,
    /// Documents the split holds out in all.
    val_target: u64,
    files_done: usize,
    train: ShardPos,
    val: ShardPos,
}

impl Progress {
    fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|e| Error::Other(e.to_string()))?;
        crate::write_atomic(&dir.join(PROGRESS_FILE), json.as_bytes())
    }

    fn total_documents(&self) -> u64 {
        self.files.iter().map(|s| s.documents).sum()
    }
}

/// A shard written through `NAME.tmp`, renamed into place when finished.
struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<std::fs::File>,
    dtype: TokenDtype,
    pos: ShardPos,
    buf: Vec<u8>,
}

impl ShardWriter {
    fn create(path: PathBuf, dtype: TokenDtype) -> Result<Self> {
        let tmp = crate::tmp_path(&path);
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self::with_file(path, tmp, f, dtype, ShardPos::default()))
    }

    /// Reopens the partial shard of an interrupted run, cut back to `pos` (bytes written
    /// after the last checkpoint go); `None` when it is missing or shorter than `pos`.
    fn resume(path: PathBuf, dtype: TokenDtype, pos: ShardPos) -> Result<Option<Self>> {
        let tmp = crate::tmp_path(&path);
        let mut f = match std::fs::OpenOptions::new().write(true).open(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&tmp, e)),
        };
        let len = f.metadata().map_err(|e| Error::io(&tmp, e))?.len();
        let want = dtype
            .byte_len(pos.tokens)
            .ok_or_else(|| Error::invalid(&tmp, "checkpointed length overflows"))?;
        if len < want {
            return Ok(None);
        }
        f.set_len(want).map_err(|e| Error::io(&tmp, e))?;
        f.seek(SeekFrom::Start(want))
            .map_err(|e| Error::io(&tmp, e))?;
        Ok(Some(Self::with_file(path, tmp, f, dtype, pos)))
    }

    fn with_file(
        path: PathBuf,
        tmp: PathBuf,
        f: std::fs::File,
        dtype: TokenDtype,
        pos: ShardPos,
    ) -> Self {
        Self {
            path,
            tmp,
            out: BufWriter::with_capacity(1 << 20, f),
            dtype,
            pos,
            buf: Vec::new(),
        }
    }

    fn write_doc(&mut self, ids: &[u32]) -> Result<()> {
        self.buf.clear();
        match self.dtype {
            TokenDtype::U16 => {
                for &id in ids {
                    debug_assert!(id <= u16::MAX as u32, "id {id} chosen for a u16 shard");
                    self.buf.extend_from_slice(&(id as u16).to_le_bytes());
                }
            }
            TokenDtype::U32 => {
                for &id in ids {
                    self.buf.extend_from_slice(&id.to_le_bytes());
                }
            }
        }
        self.out
            .write_all(&self.buf)
            .map_err(|e| Error::io(&self.tmp, e))?;
        self.pos.tokens += ids.len() as u64;
        self.pos.documents += 1;
        Ok(())
    }

    /// Hands buffered bytes to the OS: a killed process loses nothing written before this.
    fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.tmp, e))
    }

    fn finish(self) -> Result<ShardPos> {
        let f = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self.pos)
    }
}

fn read_meta(dir: &Path) -> Option<DataMeta> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The finished preparation in `opts.out_dir`, if it was made from the same sources with
/// the same tokenizer and options.
fn reusable(opts: &PrepareOptions, tok: &Tokenizer, sources: &[SourceFile]) -> Option<DataMeta> {
    let meta = read_meta(&opts.out_dir)?;
    let same = meta.split_rule == SPLIT_RULE
        && meta.field == opts.field
        && meta
            .sources
            .iter()
            .map(|s| &s.sha256)
            .eq(sources.iter().map(|s| &s.sha256))
        && meta.tokenizer_identity == tok.identity()
        && meta.val_fraction == opts.val_fraction
        && meta.seed == opts.seed
        && crate::Dataset::open(&opts.out_dir).is_ok();
    same.then_some(meta)
}

fn preparation_key(
    opts: &PrepareOptions,
    tok: &Tokenizer,
    sources: &[SourceFile],
    dtype: TokenDtype,
) -> String {
    let identity = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "split_rule": SPLIT_RULE,
        "field": opts.field,
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "tokenizer": tok.identity(),
        "dtype": dtype,
        "sources": sources.iter().map(|s| &s.sha256).collect::<Vec<_>>(),
    });
    crate::sha256_hex(identity.to_string().as_bytes())
}

/// The checkpoint and partial shards of an interrupted run of this preparation, if usable.
fn try_resume(
    dir: &Path,
    key: &str,
    n_files: usize,
    dtype: TokenDtype,
) -> Result<Option<(Progress, ShardWriter, ShardWriter)>> {
    let Ok(text) = std::fs::read_to_string(dir.join(PROGRESS_FILE)) else {
        return Ok(None);
    };
    let progress: Progress = match serde_json::from_str(&text) {
        Ok(p) => p,
        Err(_) => return Ok(None),
    };
    if progress.key != key || progress.files.len() != n_files || progress.files_done > n_files {
        tracing::info!(
            "{}: the checkpoint there is of another preparation; starting anew",
            dir.display()
        );
        return Ok(None);
    }
    let train = ShardWriter::resume(dir.join("train.bin"), dtype, progress.train)?;
    let val = ShardWriter::resume(dir.join("val.bin"), dtype, progress.val)?;
    match (train, val) {
        (Some(t), Some(v)) => Ok(Some((progress, t, v))),
        _ => {
            tracing::warn!(
                "{}: partial shards shorter than their checkpoint; starting anew",
                dir.display()
            );
            Ok(None)
        }
    }
}

fn file_len(f: &CorpusFile) -> u64 {
    f.path.metadata().map(|m| m.len()).unwrap_or(0)
}

fn hash_sources(corpus: &Corpus) -> Result<Vec<SourceFile>> {
    let files = corpus.files();
    let bar = crate::progress_bar_bytes(files.iter().map(file_len).sum(), "hashing");
    let sources = files
        .par_iter()
        .map(|f| {
            let sha256 = crate::file_sha256(&f.path)?;
            bar.inc(file_len(f));
            Ok(SourceFile {
                path: f.path.display().to_string(),
                sha256,
            })
        })
        .collect::<Result<Vec<_>>>();
    bar.finish_and_clear();
    sources
}

/// The counting pass: every file read through once, in parallel, without tokenizing.
fn count_documents(corpus: &Corpus) -> Result<Vec<FileStats>> {
    let files = corpus.files();
    let bar = crate::progress_bar_bytes(files.iter().map(file_len).sum(), "reading");
    let stats = files
        .par_iter()
        .map(|f| {
            let s = f.for_each_document(corpus.field(), |_| Ok(()))?;
            if s.replaced_invalid_utf8 > 0 {
                tracing::warn!(
                    "{}: replaced {} invalid UTF-8 sequence(s) with U+FFFD",
                    f.path.display(),
                    s.replaced_invalid_utf8
                );
            }
            bar.inc(file_len(f));
            Ok(s)
        })
        .collect::<Result<Vec<_>>>();
    bar.finish_and_clear();
    stats
}

/// Tokenizes the corpus into `opts.out_dir`, reuses what a previous identical call left
/// there (same source hashes, tokenizer, field, split fraction and seed), or continues an
/// interrupted one. Returns the metadata.
pub fn prepare(opts: &PrepareOptions, tok: &Tokenizer) -> Result<DataMeta> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Other(format!(
            "val_fraction must be in [0, 1), got {}",
            opts.val_fraction
        )));
    }
    if opts.stop_after_files == Some(0) {
        return Err(Error::Other("stop_after_files must be at least 1".into()));
    }
    let corpus = Corpus::resolve(&opts.inputs, &opts.field)?;
    let n_files = corpus.files().len();
    let sources = hash_sources(&corpus)?;
    if let Some(meta) = reusable(opts, tok, &sources) {
        tracing::info!(
            "{}: reusing prepared shards (same sources, tokenizer and split)",
            opts.out_dir.display()
        );
        return Ok(meta);
    }
    let dir = &opts.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dtype = TokenDtype::for_vocab(tok.vocab_size());
    let key = preparation_key(opts, tok, &sources, dtype);

    let (mut progress, mut train, mut val, resumed_from) =
        match try_resume(dir, &key, n_files, dtype)? {
            Some((p, t, v)) => {
                tracing::info!(
                    "{}: continuing after {} of {n_files} finished files",
                    dir.display(),
                    p.files_done
                );
                let done = p.files_done;
                (p, t, v, Some(done))
            }
            None => {
                let files = count_documents(&corpus)?;
                let total: u64 = files.iter().map(|s| s.documents).sum();
                if total == 0 {
                    return Err(Error::Other(format!(
                        "the corpus is empty: {n_files} file(s) hold no non-blank document \
                         in field \"{}\"",
                        opts.field
                    )));
                }
                let progress = Progress {
                    key,
                    files,
                    val_target: val_count(total, opts.val_fraction).map_err(Error::Other)?,
                    files_done: 0,
                    train: ShardPos::default(),
                    val: ShardPos::default(),
                };
                let train = ShardWriter::create(dir.join("train.bin"), dtype)?;
                let val = ShardWriter::create(dir.join("val.bin"), dtype)?;
                progress.save(dir)?;
                (progress, train, val, None)
            }
        };

    tokenize_files(&corpus, tok, opts, &mut progress, &mut train, &mut val)?;

    // Shards and meta.json change together: no reader may pair new shards with old meta.
    match std::fs::remove_file(dir.join("meta.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(dir.join("meta.json"), e))
        }
        _ => {}
    }
    let train = train.finish()?;
    let val = val.finish()?;
    tok.save(dir)?;
    let mut totals = FileStats::default();
    for s in &progress.files {
        totals += *s;
    }
    let meta = DataMeta {
        format_version: FORMAT_VERSION,
        dtype,
        vocab_size: tok.vocab_size(),
        eot_id: tok.eot_id(),
        tokenizer_identity: tok.identity().to_string(),
        train_tokens: train.tokens,
        val_tokens: val.tokens,
        train_documents: train.documents,
        val_documents: val.documents,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        split_rule: SPLIT_RULE,
        field: opts.field.clone(),
        sources,
        replaced_invalid_utf8: totals.replaced_invalid_utf8,
        skipped_empty_documents: totals.empty,
        resumed_from,
    };
    let json = serde_json::to_string_pretty(&meta).map_err(|e| Error::Other(e.to_string()))?;
    crate::write_atomic(&dir.join("meta.json"), json.as_bytes())?;
    std::fs::remove_file(dir.join(PROGRESS_FILE))
        .map_err(|e| Error::io(dir.join(PROGRESS_FILE), e))?;
    tracing::info!(
        "{}: {} train tokens ({} docs), {} val tokens ({} docs)",
        dir.display(),
        train.tokens,
        train.documents,
        val.tokens,
        val.documents
    );
    Ok(meta)
}

/// What the reader thread hands to the tokenizer, in corpus order.
enum Item {
    Doc { file: usize, text: String },
    FileEnd(usize),
}

/// The reader thread: documents of `files[start..]` in batches of bounded size, each file
/// followed by its end marker. Stops when the receiver is gone.
fn read_batches(
    files: &[CorpusFile],
    start: usize,
    field: &str,
    tx: SyncSender<Result<Vec<Item>>>,
) {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    for (i, file) in files.iter().enumerate().skip(start) {
        let read = file.for_each_document(field, |text| {
            bytes += text.len();
            batch.push(Item::Doc { file: i, text });
            if bytes >= BATCH_BYTES || batch.len() >= BATCH_DOCS {
                bytes = 0;
                tx.send(Ok(std::mem::take(&mut batch)))
                    .map_err(|_| Error::Other("the tokenizer stopped".into()))?;
            }
            Ok(())
        });
        if let Err(e) = read {
            // Fails only when the receiver is gone, which then needs nothing more.
            let _ = tx.send(Err(e));
            return;
        }
        batch.push(Item::FileEnd(i));
    }
    let _ = tx.send(Ok(batch));
}

fn changed(f: &CorpusFile) -> Error {
    Error::invalid(
        &f.path,
        "changed while it was being prepared (its document count differs from the counting pass)",
    )
}

/// Tokenizes files `progress.files_done..` into the shards, checkpointing after each file.
fn tokenize_files(
    corpus: &Corpus,
    tok: &Tokenizer,
    opts: &PrepareOptions,
    progress: &mut Progress,
    train: &mut ShardWriter,
    val: &mut ShardWriter,
) -> Result<()> {
    let files = corpus.files();
    let total = progress.total_documents();
    let done = progress.train.documents + progress.val.documents;
    let mut sampler = ValSampler::resume(
        opts.seed,
        total,
        progress.val_target,
        done,
        progress.val.documents,
    );
    let bar = crate::progress_bar(total, "tokenizing");
    bar.set_position(done);
    let start = progress.files_done;
    let eot = tok.eot_id();
    std::thread::scope(|scope| -> Result<()> {
        // Created here so that returning early drops the receiver and ends the reader.
        let (tx, rx) = sync_channel(1);
        scope.spawn(move || read_batches(files, start, corpus.field(), tx));
        let mut docs_in_file = 0u64;
        for batch in rx {
            let batch = batch?;
            let encoded: Vec<Result<Vec<u32>>> = batch
                .par_iter()
                .map(|item| match item {
                    Item::Doc { text, .. } => tok.encode_ordinary(text).map(|mut ids| {
                        ids.push(eot);
                        ids
                    }),
                    Item::FileEnd(_) => Ok(Vec::new()),
                })
                .collect();
            for (item, ids) in batch.iter().zip(encoded) {
                match *item {
                    Item::Doc { file, .. } => {
                        let f = &files[file];
                        let ids = ids.map_err(|e| Error::invalid(&f.path, e.to_string()))?;
                        docs_in_file += 1;
                        if docs_in_file > progress.files[file].documents {
                            return Err(changed(f));
                        }
                        match sampler.next_is_val() {
                            Some(true) => val.write_doc(&ids)?,
                            Some(false) => train.write_doc(&ids)?,
                            None => return Err(changed(f)),
                        }
                        bar.inc(1);
                    }
                    Item::FileEnd(i) => {
                        if docs_in_file != progress.files[i].documents {
                            return Err(changed(&files[i]));
                        }
                        docs_in_file = 0;
                        train.flush()?;
                        val.flush()?;
                        progress.files_done = i + 1;
                        progress.train = train.pos;
                        progress.val = val.pos;
                        progress.save(&opts.out_dir)?;
                        if opts.stop_after_files == Some(progress.files_done)
                            && progress.files_done < files.len()
                        {
                            return Err(Error::Stopped {
                                dir: opts.out_dir.clone(),
                                done: progress.files_done,
                                total: files.len(),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    if progress.files_done != files.len() {
        return Err(Error::Other(format!(
            "the reader stopped after {} of {} files",
            progress.files_done,
            files.len()
        )));
    }
    Ok(())
}

/// sha256 of every corpus file the inputs expand to, in preparation order (field `text`).
pub fn source_hashes(inputs: &[PathBuf]) -> Result<Vec<String>> {
    Corpus::resolve(inputs, DEFAULT_FIELD)?.sha256s()
}

/// The documents of a corpus (inputs as [`prepare`] takes them, field `text`), in memory,
/// e.g. to train a tokenizer on it.
pub fn read_documents(inputs: &[PathBuf]) -> Result<Vec<String>> {
    Corpus::resolve(inputs, DEFAULT_FIELD)?.read_documents()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_lengths_are_64_bit() {
        assert_eq!(TokenDtype::U16.byte_len(3 << 30), Some(6 << 30));
        assert_eq!(TokenDtype::U32.byte_len(1 << 40), Some(1 << 42));
        assert_eq!(TokenDtype::U32.byte_len(u64::MAX / 2), None);
    }

    /// A shard past 4 GiB continues at the right byte, without writing 4 GiB (sparse file).
    #[test]
    fn resumes_a_shard_past_four_gib() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.bin");
        let tokens = (5u64 << 30) / 2 + 3; // 5 GiB + 6 bytes of u16
        let f = std::fs::File::create(crate::tmp_path(&path)).unwrap();
        f.set_len(TokenDtype::U16.byte_len(tokens).unwrap() + 100)
            .unwrap();
        drop(f);
        let pos = ShardPos {
            tokens,
            documents: 9,
        };
        let mut w = ShardWriter::resume(path.clone(), TokenDtype::U16, pos)
            .unwrap()
            .unwrap();
        w.write_doc(&[513, 50256]).unwrap();
        let end = w.finish().unwrap();
        assert_eq!(end.tokens, tokens + 2);
        assert_eq!(end.documents, 10);
        let mut f = std::fs::File::open(&path).unwrap();
        assert_eq!(f.metadata().unwrap().len(), (5u64 << 30) + 6 + 4);
        f.seek(SeekFrom::Start((5u64 << 30) + 4)).unwrap();
        let mut tail = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut tail).unwrap();
        assert_eq!(tail, [0, 0, 1, 2, 0x50, 0xc4]); // 513, 50256 little-endian
                                                    // Shorter than its checkpoint: not resumable.
        std::fs::File::create(crate::tmp_path(&path)).unwrap();
        assert!(ShardWriter::resume(path, TokenDtype::U16, pos)
            .unwrap()
            .is_none());
    }
}
