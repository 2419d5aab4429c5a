//! GPT-2 (Radford et al. 2019) in the Hugging Face layout: the teacher, the NTP baseline,
//! and the backbone of the CoCoMix student. Pre-LN blocks, learned absolute positions,
//! `gelu_new`, biases everywhere, LM head tied to `wte`.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use serde::{Deserialize, Serialize};

pub use crate::ops::softmax_last;
use crate::ops::{
    add_dropout, bias_gelu, causal_attention, causal_attention_qkv, linear_in, DropoutKey,
    LayerNorm, WeightLayout,
};
use crate::params::{Init, Params, TensorFile};
use crate::{Error, Result};

/// The fields of a Hugging Face GPT-2 `config.json` this implementation reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_pdrop")]
    pub resid_pdrop: f64,
    #[serde(default = "default_pdrop")]
    pub embd_pdrop: f64,
    #[serde(default = "default_pdrop")]
    pub attn_pdrop: f64,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// The tokenizer's begin/end-of-text ids (GPT-2: both `<|endoftext|>`), written so that
    /// `transformers` does not fall back to GPT-2's 50256 for another vocabulary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_pdrop() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}

impl Gpt2Config {
    /// GPT-2 124M (`openai-community/gpt2`).
    pub fn gpt2_small() -> Self {
        Self::new(50257, 1024, 768, 12, 12)
    }

    /// A config with GPT-2's defaults for everything but the shape.
    pub fn new(
        vocab_size: usize,
        n_positions: usize,
        n_embd: usize,
        n_layer: usize,
        n_head: usize,
    ) -> Self {
        Self {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            layer_norm_epsilon: default_eps(),
            activation_function: default_activation(),
            resid_pdrop: default_pdrop(),
            embd_pdrop: default_pdrop(),
            attn_pdrop: default_pdrop(),
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Records the tokenizer's end-of-text id as `bos_token_id` and `eos_token_id`.
    pub fn with_eot(mut self, eot: u32) -> Self {
        self.bos_token_id = Some(eot);
        self.eos_token_id = Some(eot);
        self
    }

    /// Sets every dropout probability.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.resid_pdrop = p;
        self.embd_pdrop = p;
        self.attn_pdrop = p;
        self
    }

    /// Checks that the shape is buildable and the variant is the one implemented.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.n_layer == 0
            || self.n_embd == 0
            || self.n_head == 0
            || self.vocab_size == 0
            || self.n_positions == 0
        {
            return bad(format!("every size must be positive: {self:?}"));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return bad(format!(
                "activation_function {:?} is not supported (gelu_new)",
                self.activation_function
            ));
        }
        if !self.tie_word_embeddings {
            return bad("untied LM heads are not supported (GPT-2 ties lm_head to wte)".into());
        }
        for id in [self.bos_token_id, self.eos_token_id].into_iter().flatten() {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "special token id {id} is outside the vocabulary of {}",
                    self.vocab_size
                ));
            }
        }
        for p in [self.resid_pdrop, self.embd_pdrop, self.attn_pdrop] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("dropout {p} must be in [0, 1)"));
            }
        }
        Ok(())
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_config(path, "GPT-2", Self::validate)
    }

    /// Parameters of the model (tied head counted once).
    pub fn num_params(&self) -> usize {
        let d = self.n_embd;
        let block =
            2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d);
        self.vocab_size * d + self.n_positions * d + self.n_layer * block + 2 * d
    }
}

/// Dropout of one forward pass: off (inference), or on with masks that are a pure function
/// of (seed, call site, element), so a run (and a resumed run) is reproducible whatever the
/// thread count, and the fused attention can redraw its mask in the backward pass.
///
/// Call sites are numbered in forward order (embedding, then per block: attention weights,
/// attention output, MLP output); the trainer seeds each micro-batch with (run seed, step,
/// micro-batch). Dimension 0 of every dropped tensor holds the batch rows, and masks are keyed
/// by the global row: a data-parallel rank holding rows `r0..` of a batch draws, with
/// [`Dropout::with_row_offset`]`(r0)`, exactly the masks of those rows in the whole batch.
pub struct Dropout {
    seed: Option<u64>,
    row_offset: u64,
    calls: u64,
}

impl Dropout {
    /// Inference: no dropout.
    pub fn off() -> Self {
        Self {
            seed: None,
            row_offset: 0,
            calls: 0,
        }
    }
    /// Training: dropout masks keyed by `seed` (reproducible), the batch's first row being
    /// row 0.
    pub fn seeded(seed: u64) -> Self {
        Self {
            seed: Some(seed),
            row_offset: 0,
            calls: 0,
        }
    }
    /// The global index of the first row of the batches this pass sees (a data-parallel
    /// rank's slice of a global batch starts at `r0`).
    pub fn with_row_offset(mut self, r0: u64) -> Self {
        self.row_offset = r0;
        self
    }
    /// Numbers the next call site and returns its mask key (`None` when off or `p == 0`).
    pub fn next_key(&mut self, p: f64) -> Option<DropoutKey> {
        let call = self.calls;
        self.calls += 1;
        self.seed
            .filter(|_| p > 0.0)
            .map(|s| DropoutKey::new(s, call, p).with_batch_offset(self.row_offset))
    }
    /// Inverted dropout with probability `p` (identity when off).
    pub fn apply(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        Ok(match self.next_key(p) {
            Some(key) => crate::ops::dropout(x, key)?,
            None => x.clone(),
        })
    }
}

/// GPT-2's Conv1D: `y = x @ w + b` with `w` stored `[in, out]`. A frozen layer's backward
/// gives its input a gradient and computes none for `w`.
#[derive(Clone, Debug)]
pub struct Conv1D {
    pub weight: Tensor,
    pub bias: Tensor,
    compute: DType,
}

impl Conv1D {
    fn new(p: &mut Params, name: &str, d_in: usize, d_out: usize, std: f64) -> Result<Self> {
        Ok(Self {
            weight: p.get(&format!("{name}.weight"), &[d_in, d_out], Init::Normal(std))?,
            bias: p.get(&format!("{name}.bias"), &[d_out], Init::Zeros)?,
            compute: DType::F32,
        })
    }

    /// `x @ w` without the bias: `[.., in]` → `[.., out]`.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear_in(x, &self.weight, None, WeightLayout::InOut, self.compute)
    }
}

impl Module for Conv1D {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear_in(
            x,
            &self.weight,
            Some(&self.bias),
            WeightLayout::InOut,
            self.compute,
        )
    }
}

fn layer_norm(p: &mut Params, name: &str, d: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: p.get(&format!("{name}.weight"), &[d], Init::Ones)?,
        bias: p.get(&format!("{name}.bias"), &[d], Init::Zeros)?,
        eps,
    })
}

/// Cached keys and values of one block, `[B, H, S, head_dim]` each.
pub type LayerKv = Option<(Tensor, Tensor)>;

/// Multi-head causal self-attention.
#[derive(Clone, Debug)]
pub struct Attention {
    pub c_attn: Conv1D,
    pub c_proj: Conv1D,
    n_head: usize,
    attn_pdrop: f64,
    resid_pdrop: f64,
}

impl Attention {
    /// Causal attention over `x [B, S, d]` and its output projection (the block applies the
    /// residual dropout, fused with the residual add); with `kv`, the queries continue the
    /// cached positions and this call's keys and values are appended to it.
    pub fn forward(
        &self,
        x: &Tensor,
        kv: Option<&mut LayerKv>,
        dropout: &mut Dropout,
    ) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let hd = d / self.n_head;
        let scale = 1.0 / (hd as f64).sqrt();
        let qkv = self.c_attn.forward(x)?; // [B, S, 3d]
        let key = dropout.next_key(self.attn_pdrop);
        let y = match kv {
            // Training and full-sequence scoring: heads read from qkv in place.
            None => causal_attention_qkv(&qkv, self.n_head, scale, key)?, // [B, S, d]
            Some(kv) => {
                let heads = |i: usize| -> candle_core::Result<Tensor> {
                    qkv.narrow(2, i * d, d)?
                        .reshape((b, s, self.n_head, hd))?
                        .transpose(1, 2)?
                        .contiguous()
                }; // [B, H, S, hd]
                let (q, mut k, mut v) = (heads(0)?, heads(1)?, heads(2)?);
                if let Some((pk, pv)) = kv.as_ref() {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                *kv = Some((k.clone(), v.clone()));
                causal_attention(&q, &k, &v, scale, key)? // [B, H, S, hd]
                    .transpose(1, 2)?
                    .reshape((b, s, d))?
            }
        };
        Ok(self.c_proj.forward(&y)?)
    }
}

/// The MLP: `c_fc` (d → 4d), `gelu_new`, `c_proj` (4d → d).
#[derive(Clone, Debug)]
pub struct Mlp {
    pub c_fc: Conv1D,
    pub c_proj: Conv1D,
    resid_pdrop: f64,
}

impl Mlp {
    /// `x [B, S, d]` → `[B, S, d]` (the block applies the residual dropout).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = bias_gelu(&self.c_fc.matmul(x)?, &self.c_fc.bias)?; // [B, S, 4d]
        Ok(self.c_proj.forward(&h)?)
    }
}

/// One pre-LN transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    fn new(p: &mut Params, i: usize, cfg: &Gpt2Config) -> Result<Self> {
        let d = cfg.n_embd;
        let eps = cfg.layer_norm_epsilon;
        // GPT-2 scales the init of the residual projections by 1/√(2·n_layer).
        let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let name = |s: &str| format!("h.{i}.{s}");
        Ok(Self {
            ln_1: layer_norm(p, &name("ln_1"), d, eps)?,
            attn: Attention {
                c_attn: Conv1D::new(p, &name("attn.c_attn"), d, 3 * d, 0.02)?,
                c_proj: Conv1D::new(p, &name("attn.c_proj"), d, d, proj_std)?,
                n_head: cfg.n_head,
                attn_pdrop: cfg.attn_pdrop,
                resid_pdrop: cfg.resid_pdrop,
            },
            ln_2: layer_norm(p, &name("ln_2"), d, eps)?,
            mlp: Mlp {
                c_fc: Conv1D::new(p, &name("mlp.c_fc"), d, 4 * d, 0.02)?,
                c_proj: Conv1D::new(p, &name("mlp.c_proj"), 4 * d, d, proj_std)?,
                resid_pdrop: cfg.resid_pdrop,
            },
        })
    }

    /// `x [B, S, d]` → `[B, S, d]`.
    pub fn forward(
        &self,
        x: &Tensor,
        kv: Option<&mut LayerKv>,
        dropout: &mut Dropout,
    ) -> Result<Tensor> {
        let a = self.attn.forward(&self.ln_1.forward(x)?, kv, dropout)?;
        let x = add_dropout(x, &a, dropout.next_key(self.attn.resid_pdrop))?;
        let m = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        Ok(add_dropout(&x, &m, dropout.next_key(self.mlp.resid_pdrop))?)
    }
}

/// Something that rewrites the residual stream after a block (e.g. SAE steering).
pub trait ResidualHook {
    /// `x [B, S, d]` after block `layer` → the residual the next block reads.
    fn apply(&self, x: &Tensor) -> Result<Tensor>;
}

/// Any `Fn(&Tensor) -> Result<Tensor>` is a hook (e.g. a closure over an SAE and its edits).
impl<F: Fn(&Tensor) -> Result<Tensor>> ResidualHook for F {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self(x)
    }
}

/// A residual hook at one layer.
pub struct Hook<'a> {
    pub layer: usize,
    pub hook: &'a dyn ResidualHook,
}

/// Per-block key/value caches and the number of positions already processed.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) tokens: usize,
}

impl KvCache {
    /// An empty cache for a model with `n_layer` blocks.
    pub fn new(n_layer: usize) -> Self {
        Self {
            layers: vec![None; n_layer],
            tokens: 0,
        }
    }
    /// Tokens already in the cache.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Positions cached in block `layer` (2 per token after an interleaving student's
    /// insert layer; 0 for a block not run yet).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(|kv| kv.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }
}

/// `x_L` and `g = ∂L/∂x_L` for the mean next-token loss `L` (see [`Gpt2::residual_grad`]).
pub struct ResidualGrad {
    /// Residual after block `layer`, `[B, T, d]`.
    pub hidden: Tensor,
    /// Its gradient, `[B, T, d]` (zero at the last position).
    pub grad: Tensor,
    /// The mean cross-entropy over `B·(T−1)` predictions.
    pub loss: f32,
}

/// A GPT-2 language model.
pub struct Gpt2 {
    pub cfg: Gpt2Config,
    pub wte: Tensor,
    pub wpe: Tensor,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    compute_dtype: DType,
}

impl Gpt2 {
    /// Builds the model with parameters from `p` (a file or a seeded init).
    pub fn new(cfg: &Gpt2Config, p: &mut Params) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.n_embd;
        let wte = p.get("wte.weight", &[cfg.vocab_size, d], Init::Normal(0.02))?;
        let wpe = p.get("wpe.weight", &[cfg.n_positions, d], Init::Normal(0.02))?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(p, i, cfg))
            .collect::<Result<_>>()?;
        let ln_f = layer_norm(p, "ln_f", d, cfg.layer_norm_epsilon)?;
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            compute_dtype: DType::F32,
        })
    }

    /// Autocast: every matmul of the blocks and the head runs in `dtype` (bf16 or f16) on
    /// casts of the f32 weights, with f32 results; norms, softmax and losses stay f32, and
    /// gradients reach the f32 weights through the casts.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
        for b in &mut self.blocks {
            for l in [
                &mut b.attn.c_attn,
                &mut b.attn.c_proj,
                &mut b.mlp.c_fc,
                &mut b.mlp.c_proj,
            ] {
                l.compute = dtype;
            }
        }
    }

    /// The dtype the matmuls run in (f32 unless autocast was set).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Loads a frozen GPT-2 from a folder (`config.json` + `model.safetensors`) or a hub id.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (config, weights) = resolve_model_files(spec)?;
        let cfg = Gpt2Config::from_file(&config)?;
        let file = TensorFile::load(&weights)?;
        Self::new(&cfg, &mut Params::from_file(&file, device, false))
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// Token + position embeddings for `ids [B, T]` starting at position `offset`.
    pub fn embed(&self, ids: &Tensor, offset: usize, dropout: &mut Dropout) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if offset + t > self.cfg.n_positions {
            return Err(Error::Other(format!(
                "{} positions exceed the model's context of {}",
                offset + t,
                self.cfg.n_positions
            )));
        }
        let tok =
            self.wte
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, self.cfg.n_embd))?;
        let pos = self.wpe.narrow(0, offset, t)?;
        dropout.apply(&tok.broadcast_add(&pos)?, self.cfg.embd_pdrop)
    }

    /// `ln_f` then the tied head: `[B, S, d]` → logits `[B, S, V]`.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.ln_f.forward(h)?;
        // The tied head reads wte [V, d] as it is stored: no transpose in the graph.
        Ok(linear_in(
            &h,
            &self.wte,
            None,
            WeightLayout::OutIn,
            self.compute_dtype,
        )?)
    }

    /// Runs the blocks of `layers` on `h [B, S, d]`, with an optional cache and hook.
    pub fn run_blocks(
        &self,
        mut h: Tensor,
        layers: std::ops::Range<usize>,
        mut cache: Option<&mut KvCache>,
        hook: Option<&Hook>,
        dropout: &mut Dropout,
    ) -> Result<Tensor> {
        for i in layers {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = self.blocks[i].forward(&h, kv, dropout)?;
            if let Some(hk) = hook.filter(|hk| hk.layer == i) {
                h = hk.hook.apply(&h)?;
            }
        }
        Ok(h)
    }

    /// Logits `[B, T, V]` for `ids [B, T]`, continuing `cache` when given.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        hook: Option<&Hook>,
        dropout: &mut Dropout,
    ) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let past = cache.as_ref().map_or(0, |c| c.tokens);
        let h = self.embed(ids, past, dropout)?;
        let mut cache = cache;
        let h = self.run_blocks(h, 0..self.blocks.len(), cache.as_deref_mut(), hook, dropout)?;
        if let Some(c) = cache {
            c.tokens += t;
        }
        self.head(&h)
    }

    /// Logits `[B, T, V]` in eval mode.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(ids, None, None, &mut Dropout::off())
    }

    /// The residual stream right after block `layer` (0-indexed): Hugging Face
    /// `hidden_states[layer + 1]`, TransformerLens `blocks.{layer}.hook_resid_post`.
    pub fn hidden_state(&self, ids: &Tensor, layer: usize) -> Result<Tensor> {
        self.check_layer(layer)?;
        let mut dropout = Dropout::off();
        let h = self.embed(&ids.detach(), 0, &mut dropout)?;
        self.run_blocks(h, 0..layer + 1, None, None, &mut dropout)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.n_layer {
            return Err(Error::Config(format!(
                "layer {layer} is out of range for a {}-block model",
                self.cfg.n_layer
            )));
        }
        Ok(())
    }

    /// `x_L` and `∂L/∂x_L` for the mean next-token cross-entropy over `B·(T−1)` positions.
    ///
    /// Blocks `0..=layer` run with no graph; `x_L` becomes the only leaf; the upper blocks,
    /// `ln_f` and the head run once forward and once backward. Their frozen projections
    /// compute no weight gradient (LayerNorm scales and biases cost O(B·T·d) products that
    /// are discarded with the gradient store).
    pub fn residual_grad(&self, ids: &Tensor, layer: usize) -> Result<ResidualGrad> {
        let (_, t) = ids.dims2()?;
        if t < 2 {
            return Err(Error::Other(
                "residual_grad needs at least two tokens per row".into(),
            ));
        }
        let hidden = self.hidden_state(ids, layer)?.detach();
        let x = Var::from_tensor(&hidden)?;
        let mut dropout = Dropout::off();
        let h = self.run_blocks(
            x.as_tensor().clone(),
            layer + 1..self.cfg.n_layer,
            None,
            None,
            &mut dropout,
        )?;
        let loss = head_next_token_loss(|h| self.head(h), &h, ids)?;
        let grads = loss.backward()?;
        let grad = grads
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Other("no gradient reached x_L".into()))?;
        Ok(ResidualGrad {
            hidden,
            grad,
            loss: loss.to_dtype(DType::F32)?.to_scalar()?,
        })
    }
}

/// [`next_token_loss`] of `head(h)` for `h [B, T, d]`, with the head run on positions
/// `..T-1` only: the last position predicts nothing, and narrowing `h` rather than the
/// logits keeps a `[B, T, V]` copy (and its gradient) out of the graph.
pub(crate) fn head_next_token_loss(
    head: impl Fn(&Tensor) -> Result<Tensor>,
    h: &Tensor,
    ids: &Tensor,
) -> Result<Tensor> {
    let t = h.dim(1)?;
    let logits = head(&h.narrow(1, 0, t - 1)?.contiguous()?)?; // [B, T-1, V]
    let target = ids
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .contiguous()?; // [B, T-1]
    Ok(crate::ops::cross_entropy(&logits, &target)?)
}

/// Mean cross-entropy of `logits [B, T, V]` predicting `ids[:, 1:]` from positions `..T-1`.
pub fn next_token_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let target = ids
        .narrow(1, 1, t - 1)?
        .flatten_all()?
        .to_dtype(DType::U32)?;
    Ok(crate::ops::cross_entropy(&pred, &target)?)
}

/// `(config.json, model.safetensors)` of a model folder, or of a hub repo when reachable.
pub fn resolve_model_files(spec: &str) -> Result<(PathBuf, PathBuf)> {
    let path = PathBuf::from(spec);
    if path.is_dir() {
        let (c, w) = (path.join("config.json"), path.join("model.safetensors"));
        for f in [&c, &w] {
            if !f.is_file() {
                return Err(Error::invalid(
                    f,
                    "missing: a model folder holds config.json and model.safetensors",
                ));
            }
        }
        return Ok((c, w));
    }
    if path.exists()
        || spec.starts_with('.')
        || spec.starts_with('/')
        || spec.split('/').count() != 2
    {
        return Err(Error::invalid(
            path,
            "not a model folder (config.json + model.safetensors) nor a hub id owner/name",
        ));
    }
    let fetch = || -> std::result::Result<(PathBuf, PathBuf), hf_hub::api::sync::ApiError> {
        let repo = hf_hub::api::sync::Api::new()?.model(spec.to_string());
        Ok((repo.get("config.json")?, repo.get("model.safetensors")?))
    };
    fetch().map_err(|e| {
        Error::Other(format!(
            "could not fetch {spec:?} from the Hugging Face Hub ({e}); offline, download \
             config.json and model.safetensors elsewhere and pass their folder"
        ))
    })
}
