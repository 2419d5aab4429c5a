//! A thin wrapper over the `tokenizers` crate with GPT-2 byte-level BPE as the default.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, ModelWrapper};

use crate::{Error, Result};

/// The end-of-text token every tokenizer here carries; documents are joined with it.
pub const EOT: &str = "<|endoftext|>";

static GPT2_VOCAB: &str = include_str!("../../../assets/gpt2/vocab.json");
static GPT2_MERGES: &str = include_str!("../../../assets/gpt2/merges.txt");

/// A byte-level BPE tokenizer with an end-of-text token.
///
/// `encode` splits `<|endoftext|>` written in the text into the EOT id (as Hugging Face
/// does); `encode_ordinary` treats it as plain text (as tiktoken's `encode_ordinary`, which
/// corpus preparation uses so that only document boundaries become EOT).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    ordinary: tokenizers::Tokenizer,
    eot_id: u32,
    identity: String,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

fn byte_level_tokenizer(model: BPE) -> Result<tokenizers::Tokenizer> {
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.add_special_tokens([AddedToken::from(EOT, true)])
        .map_err(tok_err)?;
    Ok(tok)
}

impl Tokenizer {
    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        let eot_id = inner
            .token_to_id(EOT)
            .ok_or_else(|| Error::Tokenizer(format!("the vocabulary has no {EOT} token")))?;
        let identity = crate::sha256_hex(inner.to_string(false).map_err(tok_err)?.as_bytes());
        let mut ordinary = inner.clone();
        ordinary.set_encode_special_tokens(true);
        Ok(Self {
            inner,
            ordinary,
            eot_id,
            identity,
        })
    }

    /// The exact GPT-2 tokenizer (50257 tokens), bundled in the binary.
    pub fn gpt2() -> Result<Self> {
        Self::from_vocab_merges_str(GPT2_VOCAB, GPT2_MERGES, Path::new("<bundled gpt2>"))
    }

    fn from_vocab_merges_str(vocab: &str, merges: &str, origin: &Path) -> Result<Self> {
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab).map_err(|e| {
            Error::invalid(origin, format!("vocab.json is not a token→id map: {e}"))
        })?;
        let mut pairs = Vec::new();
        for (n, line) in merges.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let mut it = line.split(' ');
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) => pairs.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(Error::invalid(
                        origin,
                        format!(
                            "merges.txt line {}: expected two symbols, got {line:?}",
                            n + 1
                        ),
                    ))
                }
            }
        }
        let model = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), pairs)
            .build()
            .map_err(tok_err)?;
        Self::from_inner(byte_level_tokenizer(model)?)
    }

    /// Loads a byte-level BPE from a `vocab.json` + `merges.txt` pair (GPT-2 layout).
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let v = std::fs::read_to_string(vocab).map_err(|e| Error::io(vocab, e))?;
        let m = std::fs::read_to_string(merges).map_err(|e| Error::io(merges, e))?;
        Self::from_vocab_merges_str(&v, &m, vocab)
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::invalid(path, "no such file"));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::invalid(path, format!("not a tokenizer.json: {e}")))?;
        Self::from_inner(inner).map_err(|e| Error::invalid(path, e.to_string()))
    }

    /// Downloads `tokenizer.json` (or `vocab.json` + `merges.txt`) of a Hugging Face repo.
    pub fn from_hub(repo_id: &str) -> Result<Self> {
        let api = hf_hub::api::sync::Api::new().map_err(|e| hub_error(repo_id, e))?;
        let repo = api.model(repo_id.to_string());
        if let Ok(p) = repo.get("tokenizer.json") {
            return Self::from_file(&p);
        }
        let vocab = repo.get("vocab.json").map_err(|e| hub_error(repo_id, e))?;
        let merges = repo.get("merges.txt").map_err(|e| hub_error(repo_id, e))?;
        Self::from_vocab_merges(&vocab, &merges)
    }

    /// Resolves a tokenizer spec: `gpt2` (bundled), a `tokenizer.json` file, a folder
    /// holding `tokenizer.json` or `vocab.json` + `merges.txt`, else a hub repo id.
    pub fn load(spec: &str) -> Result<Self> {
        if spec == "gpt2" || spec == "openai-community/gpt2" {
            return Self::gpt2();
        }
        let path = PathBuf::from(spec);
        if path.is_file() {
            return Self::from_file(&path);
        }
        if path.is_dir() {
            return Self::from_dir(&path)?.ok_or_else(|| {
                Error::invalid(
                    &path,
                    "folder has no tokenizer.json nor vocab.json + merges.txt",
                )
            });
        }
        if spec.contains('/')
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && spec.split('/').count() == 2
        {
            return Self::from_hub(spec);
        }
        Err(Error::invalid(
            path,
            "no such file or folder (nor a hub repo id like owner/name)",
        ))
    }

    /// The tokenizer stored in a model or data folder, if it has one.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json).map(Some);
        }
        let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if v.is_file() && m.is_file() {
            return Self::from_vocab_merges(&v, &m).map(Some);
        }
        Ok(None)
    }

    /// Trains a byte-level BPE with `vocab_size` tokens (EOT included) on `texts`.
    /// Small CPU runs want a small vocabulary: the LM head dominates their cost.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let alphabet = ByteLevel::alphabet();
        if vocab_size < alphabet.len() + 1 {
            return Err(Error::Tokenizer(format!(
                "vocab_size {vocab_size} is below the 256 byte symbols + {EOT}"
            )));
        }
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(alphabet.into_iter().collect())
            .special_tokens(vec![AddedToken::from(EOT, true)])
            .build();
        let mut tok = byte_level_tokenizer(BPE::default())?;
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        tok.train(&mut trainer, texts).map_err(tok_err)?;
        if !matches!(tok.get_model(), ModelWrapper::BPE(_)) {
            return Err(Error::Tokenizer("trainer produced a non-BPE model".into()));
        }
        Self::from_inner(tok)
    }

    /// Writes `tokenizer.json` into `dir` (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = self.inner.to_string(false).map_err(tok_err)?;
        crate::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())
    }

    /// Token ids of `text`; a literal `<|endoftext|>` becomes the EOT id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Token ids of `text` with no special-token parsing (tiktoken's `encode_ordinary`).
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .ordinary
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids` (special tokens kept, so decode(encode(s)) == s).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Id of `<|endoftext|>`.
    pub fn eot_id(&self) -> u32 {
        self.eot_id
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Hex sha256 of the serialised tokenizer: equal identities encode identically.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The text form of one id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

fn hub_error(repo: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!(
        "could not fetch the tokenizer of hub repo {repo:?} ({e}); offline, pass a local \
         tokenizer.json, a folder with vocab.json + merges.txt, or `gpt2` for the bundled one"
    ))
}
