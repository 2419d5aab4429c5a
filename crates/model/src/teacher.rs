//! The interface a frozen causal LM offers as a CoCoMix teacher (GPT-2, Llama-family models):
//! logits for distillation, the residual stream after a block for the SAE, and the gradient of
//! the next-token loss with respect to it for concept attribution.
use candle_core::{Device, Tensor};

use crate::gpt2::{Dropout, Gpt2, Hook, KvCache, ResidualGrad};
use crate::Result;

/// A causal language model usable as a teacher. Blocks are numbered from 0; "after block L"
/// is Hugging Face's `hidden_states[L + 1]`. `Sync`: the trainer runs the teacher's work for
/// the next batch on its own thread while the student trains on the current one.
///
/// ```no_run
/// use candle_core::{Device, Tensor};
/// use cocomix_model::{CausalLm, Llama};
/// let dev = Device::Cpu;
/// let teacher: Box<dyn CausalLm> = Box::new(Llama::load("SmolLM2-135M-Instruct.Q4_1.gguf", &dev)?);
/// let ids = Tensor::new(&[[504u32, 3575, 282, 4649, 314]], &dev)?;
/// let rg = teacher.residual_grad(&ids, teacher.n_layer() / 2)?;
/// # Ok::<(), cocomix_model::Error>(())
/// ```
pub trait CausalLm: Sync {
    /// Width of the residual stream.
    fn d_model(&self) -> usize;
    /// Number of blocks.
    fn n_layer(&self) -> usize;
    /// Vocabulary size (rows of the logits).
    fn vocab_size(&self) -> usize;
    /// Longest sequence the model accepts (positions).
    fn context(&self) -> usize;
    /// The device the weights are on.
    fn device(&self) -> &Device;
    /// Next-token logits `[B, T, V]` (f32) for `ids [B, T]`, eval mode.
    fn logits(&self, ids: &Tensor) -> Result<Tensor>;
    /// The residual stream right after block `layer`, `[B, T, d]`, with no graph.
    fn hidden_state(&self, ids: &Tensor, layer: usize) -> Result<Tensor>;
    /// `x_L` after block `layer` and `∂L/∂x_L` for the mean next-token cross-entropy over
    /// `B·(T−1)` predictions. Only the blocks above `layer` run with a graph, and no weight
    /// gradient is computed.
    fn residual_grad(&self, ids: &Tensor, layer: usize) -> Result<ResidualGrad>;
    /// An empty KV cache for [`CausalLm::step`].
    fn new_cache(&self) -> KvCache;
    /// Logits `[B, t, V]` of `ids [B, t]` continuing `cache` (which is extended), with an
    /// optional residual hook (e.g. SAE steering).
    fn step(&self, ids: &Tensor, cache: &mut KvCache, hook: Option<&Hook>) -> Result<Tensor>;
}

impl CausalLm for Gpt2 {
    fn d_model(&self) -> usize {
        self.cfg.n_embd
    }
    fn n_layer(&self) -> usize {
        self.cfg.n_layer
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn context(&self) -> usize {
        self.cfg.n_positions
    }
    fn device(&self) -> &Device {
        Gpt2::device(self)
    }
    fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward(ids)
    }
    fn hidden_state(&self, ids: &Tensor, layer: usize) -> Result<Tensor> {
        Gpt2::hidden_state(self, ids, layer)
    }
    fn residual_grad(&self, ids: &Tensor, layer: usize) -> Result<ResidualGrad> {
        Gpt2::residual_grad(self, ids, layer)
    }
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.n_layer)
    }
    fn step(&self, ids: &Tensor, cache: &mut KvCache, hook: Option<&Hook>) -> Result<Tensor> {
        self.forward_with(ids, Some(cache), hook, &mut Dropout::off())
    }
}
