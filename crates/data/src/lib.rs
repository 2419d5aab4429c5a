//! Data side of cocomix: the tokenizer, turning corpora (Parquet, JSON Lines and text files,
//! gzip or zstd, folders, globs, Hugging Face datasets) into token shards, and reading them.
//!
//! ```no_run
//! use cocomix_data::{prepare, Dataset, PrepareOptions, Tokenizer};
//! let tok = Tokenizer::gpt2()?;
//! let opts = PrepareOptions::new(vec!["corpus/*.parquet".into()], "data/corpus".into());
//! prepare(&opts, &tok)?;
//! let data = Dataset::open("data/corpus")?;
//! data.check_tokenizer(&tok)?;
//! let batch = data.train_batch(4, 128, 22, 0)?; // [4, 129] token windows
//! # Ok::<(), cocomix_data::Error>(())
//! ```
pub mod bench;
mod corpus;
mod error;
mod hub;
mod loader;
mod prepare;
mod progress;
mod split;
mod tokenizer;

pub use corpus::{
    Compression, Corpus, CorpusFile, FileStats, Format, ACCEPTED_FORMATS, DEFAULT_FIELD,
};
pub use error::{Error, Result};
pub use loader::{Dataset, TokenShard};
pub use prepare::{
    prepare, read_documents, source_hashes, DataMeta, PrepareOptions, SourceFile, TokenDtype,
    PROGRESS_FILE,
};
pub use progress::{progress_bar, progress_bar_bytes};
pub use tokenizer::Tokenizer;

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so
/// a reader never sees a half-written file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(path, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// The temporary name a streaming writer (a shard) uses before renaming to `path`.
pub fn tmp_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Hex sha256 of a file's bytes (identities of corpora, weights and SAEs in metadata),
/// streamed so multi-GB files need no memory.
pub fn file_sha256(path: &std::path::Path) -> Result<String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

/// Hex sha256 of a byte slice (file identities in metadata).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
