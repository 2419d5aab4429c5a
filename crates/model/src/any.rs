//! Any model this crate loads, behind one interface (evaluation, generation).
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::gpt2::{resolve_model_files, Dropout, Gpt2, Hook, KvCache};
use crate::llama::{resolve_hf_files, Llama, MODEL_TYPES};
use crate::student::{Steer, Student, StudentConfig};
use crate::teacher::CausalLm;
use crate::{Error, Result};

/// A GPT-2 (teacher, NTP or KD student, or a hub model), a Llama-family model (Hugging Face
/// layout or GGUF) or a CoCoMix student.
pub enum AnyModel {
    Gpt2(Gpt2),
    Llama(Box<Llama>),
    Student(Box<Student>),
}

/// What a `config.json` says the model is.
#[derive(serde::Deserialize)]
struct ModelKind {
    #[serde(default)]
    model_type: Option<String>,
    /// `null` in some GPT-2 configs.
    #[serde(default)]
    architectures: Option<Vec<String>>,
}

impl AnyModel {
    /// Loads a `.gguf` file (Llama), or a model folder or hub id: a Llama or Mistral config
    /// (`model_type` / `architectures`) is a [`Llama`], a config with concept keys a CoCoMix
    /// student, a GPT-2 config a [`Gpt2`]. Other model types are refused by name.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        if crate::gguf::is_gguf_path(Path::new(spec)) {
            return Ok(Self::Llama(Box::new(Llama::load(spec, device)?)));
        }
        let config = resolve_hf_files(spec)?.config;
        let text = std::fs::read_to_string(&config).map_err(|e| Error::io(&config, e))?;
        let kind: ModelKind = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(&config, format!("not a model config.json: {e}")))?;
        let llama_arch = kind
            .architectures
            .iter()
            .flatten()
            .any(|a| a == "LlamaForCausalLM" || a == "MistralForCausalLM");
        match kind.model_type.as_deref() {
            Some(t) if MODEL_TYPES.contains(&t) => {
                return Ok(Self::Llama(Box::new(Llama::load(spec, device)?)))
            }
            None if llama_arch => return Ok(Self::Llama(Box::new(Llama::load(spec, device)?))),
            None | Some("gpt2") => {}
            Some(other) => {
                return Err(Error::invalid(
                    &config,
                    format!(
                        "model_type {other:?} is not supported (supported: gpt2, {})",
                        MODEL_TYPES.join(", ")
                    ),
                ))
            }
        }
        let (config, _) = resolve_model_files(spec)?;
        let is_cocomix = StudentConfig::from_file(&config).is_ok_and(|c| c.concept.is_some());
        if is_cocomix {
            let dir = config.parent().expect("config.json sits in a folder");
            Ok(Self::Student(Box::new(Student::load(dir, device)?)))
        } else {
            Ok(Self::Gpt2(Gpt2::load(spec, device)?))
        }
    }

    /// The model as a teacher (GPT-2 or Llama); `None` for a CoCoMix student, whose residual
    /// stream carries inserted concepts.
    pub fn teacher(&self) -> Option<&dyn CausalLm> {
        match self {
            Self::Gpt2(g) => Some(g),
            Self::Llama(l) => Some(l.as_ref()),
            Self::Student(_) => None,
        }
    }

    /// The model as an owned teacher; a CoCoMix student is refused (its residual stream
    /// carries inserted concepts, and it is no plain causal LM).
    pub fn into_teacher(self) -> Result<Box<dyn CausalLm>> {
        match self {
            Self::Gpt2(g) => Ok(Box::new(g)),
            Self::Llama(l) => Ok(l),
            Self::Student(_) => Err(Error::Other(
                "a CoCoMix student cannot be a teacher (use a GPT-2, a Llama-family model or an \
                 NTP/KD student)"
                    .into(),
            )),
        }
    }

    /// The file that identifies the weights of `spec` (hashed into label caches and SAE
    /// metadata): the `.gguf` file, `model.safetensors`, or a sharded model's index.
    pub fn weights_file(&self, spec: &str) -> Result<PathBuf> {
        if crate::gguf::is_gguf_path(Path::new(spec)) {
            return Ok(PathBuf::from(spec));
        }
        match self {
            Self::Llama(_) => Ok(resolve_hf_files(spec)?.weights_name().to_path_buf()),
            Self::Gpt2(_) | Self::Student(_) => Ok(resolve_model_files(spec)?.1),
        }
    }

    /// Width of the residual stream (the student's backbone for a student).
    pub fn d_model(&self) -> usize {
        match self {
            Self::Gpt2(g) => g.cfg.n_embd,
            Self::Llama(l) => l.cfg.hidden_size,
            Self::Student(s) => s.gpt.cfg.n_embd,
        }
    }

    /// Context length (positions).
    pub fn context(&self) -> usize {
        match self {
            Self::Gpt2(g) => g.cfg.n_positions,
            Self::Llama(l) => l.cfg.context(),
            Self::Student(s) => s.gpt.cfg.n_positions,
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Gpt2(g) => g.cfg.vocab_size,
            Self::Llama(l) => l.cfg.vocab_size,
            Self::Student(s) => s.gpt.cfg.vocab_size,
        }
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Gpt2(g) => g.device(),
            Self::Llama(l) => l.device(),
            Self::Student(s) => s.gpt.device(),
        }
    }

    /// Next-token logits `[B, T, V]` in eval mode.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gpt2(g) => g.forward(ids),
            Self::Llama(l) => l.forward(ids),
            Self::Student(s) => Ok(s.forward(ids, &mut Dropout::off())?.logits),
        }
    }

    /// An empty KV cache.
    pub fn new_cache(&self) -> KvCache {
        match self {
            Self::Gpt2(g) => KvCache::new(g.cfg.n_layer),
            Self::Llama(l) => KvCache::new(l.layers.len()),
            Self::Student(s) => KvCache::new(s.gpt.cfg.n_layer),
        }
    }

    /// Logits of new tokens continuing `cache`. Steering applies to a CoCoMix student's
    /// predicted concepts; a residual hook to a GPT-2 or Llama.
    pub fn step(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        steer: &[Steer],
        hook: Option<&Hook>,
    ) -> Result<Tensor> {
        match self {
            Self::Gpt2(g) => g.forward_with(ids, Some(cache), hook, &mut Dropout::off()),
            Self::Llama(l) => l.forward_with(ids, Some(cache), hook),
            Self::Student(s) => s.forward_cached(ids, cache, steer),
        }
    }
}
