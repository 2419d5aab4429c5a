//! A thin wrapper over the `tokenizers` crate with GPT-2 byte-level BPE as the default, and
//! byte-level BPEs rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, ModelWrapper, SplitDelimiterBehavior};

use crate::{Error, Result};

/// The end-of-text token of GPT-2-style vocabularies; documents are joined with it.
pub const EOT: &str = "<|endoftext|>";

/// End-of-text tokens looked for, in order, in a vocabulary without [`EOT`] (Llama 3,
/// Llama 2 / Mistral, Gemma spellings).
const EOT_FALLBACKS: &[&str] = &["<|end_of_text|>", "</s>", "<eos>"];

/// llama.cpp pre-tokenizer kinds (`tokenizer.ggml.pre`) a GGUF tokenizer may have here.
/// `default` and `gpt2` split as GPT-2 does; `smollm` isolates every digit first (SmolLM2's
/// `tokenizer.json` and llama.cpp); `llama-bpe` (also `llama3`, `llama-v3`) is Llama 3's split.
pub const GGUF_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt2",
    "smollm",
    "llama-bpe",
    "llama3",
    "llama-v3",
];

/// Llama 3's pre-tokenizer regex (its `tokenizer.json`; llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`tokenizer.ggml.token_type`) that are added tokens.
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

static GPT2_VOCAB: &str = include_str!("../../../assets/gpt2/vocab.json");
static GPT2_MERGES: &str = include_str!("../../../assets/gpt2/merges.txt");

/// A byte-level BPE tokenizer with an end-of-text token ([`EOT`], or the vocabulary's own
/// end-of-text token).
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
    /// Wraps `inner`; the end-of-text id is `eot`, else that of [`EOT`] or a usual spelling.
    fn from_inner(inner: tokenizers::Tokenizer, eot: Option<u32>) -> Result<Self> {
        let eot_id = eot
            .or_else(|| {
                std::iter::once(EOT)
                    .chain(EOT_FALLBACKS.iter().copied())
                    .find_map(|t| inner.token_to_id(t))
            })
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "the vocabulary has no end-of-text token ({EOT} or {})",
                    EOT_FALLBACKS.join(", ")
                ))
            })?;
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
        Self::from_inner(byte_level_tokenizer(model)?, None)
    }

    /// Loads a byte-level BPE from a `vocab.json` + `merges.txt` pair (GPT-2 layout).
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let v = std::fs::read_to_string(vocab).map_err(|e| Error::io(vocab, e))?;
        let m = std::fs::read_to_string(merges).map_err(|e| Error::io(merges, e))?;
        Self::from_vocab_merges_str(&v, &m, vocab)
    }

    /// Loads a Hugging Face `tokenizer.json`, or the tokenizer in a `.gguf` file's metadata.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::invalid(path, "no such file"));
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Self::from_gguf(path);
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::invalid(path, format!("not a tokenizer.json: {e}")))?;
        Self::from_inner(inner, None).map_err(|e| Error::invalid(path, e.to_string()))
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

    /// Resolves a tokenizer spec: `gpt2` (bundled), a `tokenizer.json` or `.gguf` file, a folder
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
        Self::from_inner(tok, None)
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

/// The `tokenizers` pre-tokenizer of a llama.cpp pre-tokenizer kind.
fn gguf_pre_tokenizer(kind: &str, add_prefix_space: bool) -> Option<PreTokenizerWrapper> {
    let gpt2 = || ByteLevel::new(add_prefix_space, true, true);
    Some(match kind {
        "default" | "gpt2" => gpt2().into(),
        "smollm" => Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into(),
        "llama-bpe" | "llama3" | "llama-v3" => Sequence::new(vec![
            Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .ok()?
            .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        _ => return None,
    })
}

/// The `tokenizer.ggml.*` metadata of a GGUF file, read with Candle's GGUF reader.
struct GgufMeta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl GgufMeta<'_> {
    fn bad(&self, key: &str, want: &str) -> Error {
        Error::invalid(self.path, format!("metadata key `{key}` is not {want}"))
    }
    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }
    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(self.bad(key, "an array")),
        }
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.bad(key, "an array of strings")),
            })
            .collect::<Result<_>>()
            .map(Some)
    }
    fn id(&self, key: &str) -> Result<Option<u32>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => v.to_u32().map(Some).map_err(|_| self.bad(key, "a u32")),
        }
    }
    fn flag(&self, key: &str) -> Result<bool> {
        match self.md.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.bad(key, "a bool")),
        }
    }
}

impl Tokenizer {
    /// The tokenizer a GGUF file describes in its metadata (llama.cpp's `tokenizer.ggml.*`):
    /// a byte-level BPE (`tokenizer.ggml.model = gpt2`) from its tokens and merges, split as
    /// `tokenizer.ggml.pre` says (one of [`GGUF_PRE_TOKENIZERS`]), control tokens as special
    /// tokens and user-defined ones as added tokens. The end-of-text token is [`EOT`] when
    /// the vocabulary has it, else `tokenizer.ggml.eos_token_id`. No BOS is ever prepended.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut std::io::BufReader::new(file))
            .map_err(|e| Error::invalid(path, format!("not a readable GGUF file: {e}")))?;
        let m = GgufMeta {
            path,
            md: &content.metadata,
        };
        let model = m.string("tokenizer.ggml.model")?.ok_or_else(|| {
            Error::invalid(path, "no tokenizer in the metadata (tokenizer.ggml.model)")
        })?;
        if model != "gpt2" {
            return Err(Error::invalid(
                path,
                format!("tokenizer.ggml.model `{model}` is not supported (supported: gpt2, a byte-level BPE)"),
            ));
        }
        let pre = m.string("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre_tokenizer = gguf_pre_tokenizer(pre, m.flag("tokenizer.ggml.add_space_prefix")?)
            .ok_or_else(|| {
                Error::invalid(
                    path,
                    format!(
                        "pre-tokenizer `{pre}` (tokenizer.ggml.pre) is not supported (supported: {})",
                        GGUF_PRE_TOKENIZERS.join(", ")
                    ),
                )
            })?;
        let tokens = m.strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
            Error::invalid(path, "metadata key `tokenizer.ggml.tokens` is missing")
        })?;
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if let Some(first) = vocab.insert(t.to_string(), i as u32) {
                return Err(Error::invalid(
                    path,
                    format!("token {t:?} appears twice in the vocabulary (ids {first} and {i})"),
                ));
            }
        }
        let merges = m
            .strings("tokenizer.ggml.merges")?
            .ok_or_else(|| Error::invalid(path, "metadata key `tokenizer.ggml.merges` is missing"))?
            .into_iter()
            .enumerate()
            .map(|(n, line)| match line.split_once(' ') {
                Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
                _ => Err(Error::invalid(
                    path,
                    format!("tokenizer.ggml.merges[{n}] = {line:?}: expected two symbols"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        // llama.cpp (and Llama 3's tokenizer.json) take a piece that is a whole token as is.
        let ignore_merges = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| Error::invalid(path, format!("tokenizer.ggml.merges: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(pre_tokenizer));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let types: Vec<i32> = match m.array("tokenizer.ggml.token_type")? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| {
                    v.to_i32()
                        .map_err(|_| m.bad("tokenizer.ggml.token_type", "i32s"))
                })
                .collect::<Result<_>>()?,
        };
        let added = |kind: i32| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == kind)
                .map(|(s, _)| {
                    AddedToken::from(s.to_string(), kind == TOKEN_CONTROL).normalized(false)
                })
                .collect()
        };
        tok.add_special_tokens(added(TOKEN_CONTROL))
            .map_err(tok_err)?;
        tok.add_tokens(added(TOKEN_USER_DEFINED)).map_err(tok_err)?;
        if tok.get_vocab_size(true) != tokens.len() {
            return Err(Error::invalid(
                path,
                format!(
                    "the tokenizer has {} ids, the file lists {} tokens",
                    tok.get_vocab_size(true),
                    tokens.len()
                ),
            ));
        }
        let eot = match tokens.iter().position(|t| *t == EOT) {
            Some(i) => Some(i as u32),
            None => m.id("tokenizer.ggml.eos_token_id")?,
        };
        if let Some(e) = eot.filter(|&e| e as usize >= tokens.len()) {
            return Err(Error::invalid(
                path,
                format!(
                    "end-of-text id {e} is outside the vocabulary of {}",
                    tokens.len()
                ),
            ));
        }
        Self::from_inner(tok, eot).map_err(|e| Error::invalid(path, e.to_string()))
    }
}

fn hub_error(repo: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!(
        "could not fetch the tokenizer of hub repo {repo:?} ({e}); offline, pass a local \
         tokenizer.json, a folder with vocab.json + merges.txt, or `gpt2` for the bundled one"
    ))
}
