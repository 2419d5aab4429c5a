//! Any model this crate loads, behind one interface (evaluation, generation).
use candle_core::{Device, Tensor};

use crate::gpt2::{resolve_model_files, Dropout, Gpt2, Hook, KvCache};
use crate::student::{Steer, Student, StudentConfig};
use crate::Result;

/// A GPT-2 (teacher, NTP or KD student, or a hub model) or a CoCoMix student.
pub enum AnyModel {
    Gpt2(Gpt2),
    Student(Box<Student>),
}

impl AnyModel {
    /// Loads a model folder or hub id: a config with concept keys is a CoCoMix student.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (config, _) = resolve_model_files(spec)?;
        let is_cocomix = StudentConfig::from_file(&config).is_ok_and(|c| c.concept.is_some());
        if is_cocomix {
            let dir = config.parent().expect("config.json sits in a folder");
            Ok(Self::Student(Box::new(Student::load(dir, device)?)))
        } else {
            Ok(Self::Gpt2(Gpt2::load(spec, device)?))
        }
    }

    /// The GPT-2 backbone (the whole model for GPT-2).
    pub fn gpt2(&self) -> &Gpt2 {
        match self {
            Self::Gpt2(g) => g,
            Self::Student(s) => &s.gpt,
        }
    }

    /// Context length (positions).
    pub fn context(&self) -> usize {
        self.gpt2().cfg.n_positions
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.gpt2().cfg.vocab_size
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.gpt2().device()
    }

    /// Next-token logits `[B, T, V]` in eval mode.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gpt2(g) => g.forward(ids),
            Self::Student(s) => Ok(s.forward(ids, &mut Dropout::off())?.logits),
        }
    }

    /// An empty KV cache.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.gpt2().cfg.n_layer)
    }

    /// Logits of new tokens continuing `cache`. Steering applies to a CoCoMix student's
    /// predicted concepts; a residual hook to a GPT-2.
    pub fn step(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        steer: &[Steer],
        hook: Option<&Hook>,
    ) -> Result<Tensor> {
        match self {
            Self::Gpt2(g) => g.forward_with(ids, Some(cache), hook, &mut Dropout::off()),
            Self::Student(s) => s.forward_cached(ids, cache, steer),
        }
    }
}
