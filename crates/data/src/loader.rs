//! Memory-mapped token shards and the batches a trainer draws from them.
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::{Rng, SeedableRng};

use crate::{DataMeta, Error, Result, TokenDtype, Tokenizer};

/// One memory-mapped shard of little-endian token ids.
pub struct TokenShard {
    path: PathBuf,
    mmap: Option<Mmap>,
    dtype: TokenDtype,
    len: usize,
}

impl TokenShard {
    /// Maps `path`, checking that it holds exactly `expected_tokens` ids of `dtype`.
    pub fn open(path: &Path, dtype: TokenDtype, expected_tokens: u64) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let bytes = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let (Some(expected), Ok(len)) = (
            dtype.byte_len(expected_tokens),
            usize::try_from(expected_tokens),
        ) else {
            return Err(Error::invalid(
                path,
                format!("meta.json records {expected_tokens} tokens, more than this machine can address"),
            ));
        };
        if bytes != expected {
            return Err(Error::invalid(
                path,
                format!(
                    "holds {bytes} bytes but meta.json records {expected_tokens} tokens of {dtype:?} \
                     ({expected} bytes): the shard is truncated or from another preparation"
                ),
            ));
        }
        // An empty file cannot be mapped on every platform.
        let mmap = if bytes == 0 {
            None
        } else {
            // SAFETY: the shard is only read; preparation replaces shards by rename, never in place.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?)
        };
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            dtype,
            len,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the shard holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file this shard maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends tokens `[start, start + n)` to `out`. Panics when out of range.
    pub fn read_into(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        assert!(
            start + n <= self.len,
            "window [{start}, {}) past {} tokens",
            start + n,
            self.len
        );
        let bytes = self.mmap.as_ref().map(|m| &m[..]).unwrap_or(&[]);
        match self.dtype {
            TokenDtype::U16 => out.extend(
                bytes[start * 2..(start + n) * 2]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            ),
            TokenDtype::U32 => out.extend(
                bytes[start * 4..(start + n) * 4]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
    }

    /// Tokens `[start, start + n)`.
    pub fn window(&self, start: usize, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        self.read_into(start, n, &mut out);
        out
    }
}

/// A prepared data folder: `meta.json`, `train.bin`, `val.bin`.
pub struct Dataset {
    dir: PathBuf,
    meta: DataMeta,
    /// Training shard.
    pub train: TokenShard,
    /// Validation shard.
    pub val: TokenShard,
}

impl Dataset {
    /// Opens a folder written by [`crate::prepare`], checking the shards against `meta.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: DataMeta = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(&meta_path, format!("not a cocomix data meta.json: {e}"))
        })?;
        let train = TokenShard::open(&dir.join("train.bin"), meta.dtype, meta.train_tokens)?;
        let val = TokenShard::open(&dir.join("val.bin"), meta.dtype, meta.val_tokens)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            train,
            val,
        })
    }

    /// The folder's metadata.
    pub fn meta(&self) -> &DataMeta {
        &self.meta
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tokenizer saved beside the shards.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_dir(&self.dir)?
            .ok_or_else(|| Error::invalid(&self.dir, "no tokenizer.json beside the shards"))
    }

    /// Errors unless `tok` is the tokenizer the shards were made with.
    pub fn check_tokenizer(&self, tok: &Tokenizer) -> Result<()> {
        if tok.identity() != self.meta.tokenizer_identity {
            return Err(Error::invalid(
                self.dir.join("meta.json"),
                format!(
                    "shards were tokenized with tokenizer {} ({} tokens) but the run uses {} ({} tokens)",
                    &self.meta.tokenizer_identity[..12],
                    self.meta.vocab_size,
                    &tok.identity()[..12],
                    tok.vocab_size()
                ),
            ));
        }
        Ok(())
    }

    /// Training batch number `index`: `batch` windows of `seq_len + 1` tokens at uniformly
    /// random offsets (the paper draws a random offset per window), flattened row-major
    /// `[batch, seq_len + 1]`. A pure function of `(seed, index)`, so a resumed run draws
    /// the same batches.
    pub fn train_batch(
        &self,
        batch: usize,
        seq_len: usize,
        seed: u64,
        index: u64,
    ) -> Result<Vec<u32>> {
        let n = self.train.len();
        if n < seq_len + 1 {
            return Err(Error::invalid(
                self.train.path(),
                format!("{n} tokens, fewer than one window of {}", seq_len + 1),
            ));
        }
        let mut rng = batch_rng(seed, index);
        let mut out = Vec::with_capacity(batch * (seq_len + 1));
        for _ in 0..batch {
            let start = rng.random_range(0..=n - (seq_len + 1));
            self.train.read_into(start, seq_len + 1, &mut out);
        }
        Ok(out)
    }

    /// Start offsets of all validation blocks: windows of `seq_len + 1` tokens stepping by
    /// `seq_len`, so every token after the first is predicted exactly once.
    pub fn val_block_starts(&self, seq_len: usize) -> Vec<usize> {
        block_starts(self.val.len(), seq_len)
    }
}

/// Starts of non-overlapping prediction blocks of `seq_len` over `n` tokens.
pub(crate) fn block_starts(n: usize, seq_len: usize) -> Vec<usize> {
    if n < seq_len + 1 || seq_len == 0 {
        return Vec::new();
    }
    (0..=(n - seq_len - 1) / seq_len)
        .map(|i| i * seq_len)
        .collect()
}

fn batch_rng(seed: u64, index: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(crate::split::mix64(seed, index))
}
