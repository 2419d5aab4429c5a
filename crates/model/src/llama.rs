//! Llama-family causal LMs (Touvron et al. 2023; Llama 2/3, SmolLM2, Mistral's layout) as
//! frozen CoCoMix teachers: RMSNorm, rotary position embeddings (RoPE), grouped-query
//! attention, SwiGLU MLP, tied or untied LM head.
//!
//! Weights come from a Hugging Face folder or hub id (`config.json` + `model.safetensors`,
//! or shards listed in `model.safetensors.index.json`) or from a GGUF file ([`crate::gguf`]).
//! In a graph, RMSNorm, softmax and RoPE are built from ops that have a backward pass
//! (Candle's fused ones cut the graph), so the gradient of the loss reaches the residual
//! stream; without one (inference) the fused kernels run. Matmuls against frozen weights
//! compute no weight gradient.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::gpt2::{head_next_token_loss, Hook, KvCache, LayerKv, ResidualGrad};
use crate::ops::{causal_mask, linear_in, WeightLayout};
use crate::params::{Init, Params, TensorFile};
use crate::{Error, Result};

/// Rope scaling as a Hugging Face config spells it: `rope_scaling` (most hub configs), or
/// `rope_parameters` (transformers 5, which also carries `rope_theta`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// How rotary frequencies are scaled (the kinds implemented; others are refused by name).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeKind {
    /// `θ_i = base^(−2i/d)`.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's scaling: low frequencies divided by `factor`, high ones kept, a smooth
    /// blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The fields of a Hugging Face Llama (or Mistral) `config.json` this implementation reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); `None`: one per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; `None`: `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v and o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Mistral's sliding attention window: sequences are limited to it (where the full
    /// causal mask is exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

/// Model types whose `config.json` this loader reads.
pub const MODEL_TYPES: &[&str] = &["llama", "mistral"];

impl LlamaConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Key/value heads.
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Longest sequence accepted: the position table, or Mistral's window when smaller.
    pub fn context(&self) -> usize {
        self.sliding_window
            .map_or(self.max_position_embeddings, |w| {
                w.min(self.max_position_embeddings)
            })
    }

    /// The rope base `θ` and the scaling, from `rope_parameters` or `rope_theta` +
    /// `rope_scaling`. Unimplemented kinds (dynamic, yarn, longrope, …) are refused by name.
    pub fn rope(&self) -> Result<(f64, RopeKind)> {
        let scaling = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = scaling
            .and_then(|s| s.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        let Some(s) = scaling else {
            return Ok((theta, RopeKind::Default));
        };
        let need = |v: Option<f64>, field: &str| {
            v.ok_or_else(|| Error::Config(format!("rope scaling needs `{field}`: {s:?}")))
        };
        let kind = s
            .rope_type
            .as_deref()
            .or(s.kind.as_deref())
            .unwrap_or("default");
        let kind = match kind {
            "default" => RopeKind::Default,
            "linear" => RopeKind::Linear {
                factor: need(s.factor, "factor")?,
            },
            "llama3" => RopeKind::Llama3 {
                factor: need(s.factor, "factor")?,
                low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: s.original_max_position_embeddings.ok_or_else(
                    || {
                        Error::Config(format!(
                            "rope scaling needs `original_max_position_embeddings`: {s:?}"
                        ))
                    },
                )?,
            },
            other => {
                return Err(Error::Config(format!(
                    "rope scaling {other:?} is not supported (supported: default, linear, llama3)"
                )))
            }
        };
        Ok((theta, kind))
    }

    /// Checks that the shape is buildable and the variant is one implemented here.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if let Some(t) = self
            .model_type
            .as_deref()
            .filter(|t| !MODEL_TYPES.contains(t))
        {
            return bad(format!(
                "model_type {t:?} is not a Llama-family model this loader reads ({})",
                MODEL_TYPES.join(", ")
            ));
        }
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.num_attention_heads == 0
            || self.n_kv_heads() == 0
            || self.max_position_embeddings == 0
            || self.head_dim() == 0
        {
            return bad(format!("every size must be positive: {self:?}"));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.n_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act {:?} is not supported (silu)",
                self.hidden_act
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        let (theta, kind) = self.rope()?;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let ok = positive(theta)
            && match kind {
                RopeKind::Default => true,
                RopeKind::Linear { factor } => positive(factor),
                RopeKind::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => {
                    positive(factor)
                        && positive(low_freq_factor)
                        && high_freq_factor > low_freq_factor
                        && original_max_position_embeddings > 0
                }
            };
        if !ok {
            return bad(format!(
                "rope parameters out of range: theta {theta}, {kind:?}"
            ));
        }
        Ok(())
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_config(path, "Llama", Self::validate)
    }
}

/// Rotary frequencies `θ_i` (f32, as Hugging Face computes them), one per pair of channels.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The frequencies of a config, scaled as it says.
    pub fn new(cfg: &LlamaConfig) -> Result<Self> {
        let (theta, kind) = cfg.rope()?;
        let hd = cfg.head_dim();
        let base: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / hd as f32))
            .collect();
        let inv_freq = match kind {
            RopeKind::Default => base,
            RopeKind::Linear { factor } => base.iter().map(|&f| f / factor as f32).collect(),
            RopeKind::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: ctx,
            } => {
                let ctx = ctx as f64;
                let (low_wavelen, high_wavelen) = (ctx / low, ctx / high);
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect()
            }
        };
        Ok(Self { inv_freq })
    }

    /// Divides frequency `i` by `factors[i]` (llama.cpp's `rope_freqs` tensor, which is how a
    /// GGUF carries Llama 3 scaling).
    pub fn with_freq_factors(mut self, factors: &[f32]) -> Result<Self> {
        if factors.len() != self.inv_freq.len() {
            return Err(Error::Config(format!(
                "{} rope frequency factors for {} frequencies",
                factors.len(),
                self.inv_freq.len()
            )));
        }
        for (f, s) in self.inv_freq.iter_mut().zip(factors) {
            *f /= s;
        }
        Ok(self)
    }

    /// The frequencies, `[head_dim / 2]`.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `cos` and `sin` of the angles of positions `offset..offset + t`, `[t, head_dim / 2]`
    /// each (angles in f32 as Hugging Face computes them).
    fn cos_sin(&self, offset: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        for p in offset..offset + t {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), device)?,
            Tensor::from_vec(sin, (t, half), device)?,
        ))
    }
}

/// Rotates channel pairs `(i, i + hd/2)` of `x [B, H, T, hd]` by the angles in `cos`/`sin`
/// `[T, hd/2]` (Hugging Face's rotate-half layout), from primitives so it has a backward.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
}

/// Softmax over the last dimension. Candle's fused kernel has no backward, so it runs only
/// where no gradient is wanted (inference, the blocks below a residual gradient); in a graph
/// the softmax is built from primitives.
fn attention_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        crate::gpt2::softmax_last(x)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// RMSNorm (Zhang & Sennrich 2019): `x / √(mean(x²) + ε) · w`, in f32. From primitives in a
/// graph; Candle's fused kernel (no backward) otherwise.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.track_op() && !self.weight.track_op() {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // [.., 1]
        x.broadcast_mul(&(ms + self.eps)?.sqrt()?.recip()?)?
            .broadcast_mul(&self.weight)
    }
}

/// `y = x Wᵀ + b` with `W [out, in]` (Hugging Face's `nn.Linear`). The matmul runs in the
/// weight's dtype with an f32 result; a frozen layer's backward computes no gradient for `W`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = &self.weight;
        linear_in(x, w, self.bias.as_ref(), WeightLayout::OutIn, w.dtype())
    }
}

/// Where a model's tensors come from, by Hugging Face name: a safetensors file, a GGUF file
/// ([`crate::gguf`]), or [`Params`] (seeded random init for tests, trainable or not).
pub(crate) trait Weights {
    /// Tensor `name` of `shape` on the model's device: matrices in the compute dtype, norms
    /// and biases in f32.
    fn get(&mut self, name: &str, shape: &[usize], init: Init, matrix: bool) -> Result<Tensor>;
}

impl Weights for Params<'_> {
    fn get(&mut self, name: &str, shape: &[usize], init: Init, _matrix: bool) -> Result<Tensor> {
        Params::get(self, name, shape, init)
    }
}

/// A frozen model's weights from safetensors, matrices cast to `dtype`.
struct SafetensorWeights<'a> {
    file: &'a TensorFile,
    device: Device,
    dtype: DType,
}

impl Weights for SafetensorWeights<'_> {
    fn get(&mut self, name: &str, shape: &[usize], _init: Init, matrix: bool) -> Result<Tensor> {
        let dtype = if matrix { self.dtype } else { DType::F32 };
        self.file.get(name, shape, &self.device, dtype)
    }
}

/// Grouped-query causal self-attention with RoPE.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl Attention {
    /// `x [B, S, d]`, rotary `cos`/`sin` `[S, hd/2]` of this call's positions, additive
    /// `mask [S, past + S]`; appends this call's (rotated) keys and values to `kv`.
    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
        kv: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (h, kvh, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let heads = |y: Tensor, n: usize| y.reshape((b, s, n, hd))?.transpose(1, 2); // [B, n, S, hd]
        let q = apply_rope(&heads(self.q_proj.forward(x)?, h)?, cos, sin)?; // [B, H, S, hd]
        let mut k = apply_rope(&heads(self.k_proj.forward(x)?, kvh)?, cos, sin)?; // [B, KV, S, hd]
        let mut v = heads(self.v_proj.forward(x)?, kvh)?.contiguous()?; // [B, KV, S, hd]
        if let Some(kv) = kv {
            if let Some((pk, pv)) = kv.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *kv = Some((k.clone(), v.clone()));
        }
        let p = k.dim(2)?; // past + S
        let g = h / kvh;
        // Query head i reads key/value head i / g (Hugging Face's `repeat_kv`). Stacking the
        // g query heads of a group along time lets every group share its K/V without copies.
        // The 1/√hd scale goes on q: P/hd times fewer products than on the scores.
        let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((b, kvh, g * s, hd))?;
        let att = q.matmul(&k.t()?)?; // [B, KV, g·S, P]
        let att = att.reshape((b, h, s, p))?.broadcast_add(mask)?;
        let att = attention_softmax(&att)?; // [B, H, S, P]
        let y = att.reshape((b, kvh, g * s, p))?.matmul(&v)?; // [B, KV, g·S, hd]
        let y = y
            .reshape((b, h, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, h * hd))?;
        Ok(self.o_proj.forward(&y)?) // [B, S, d]
    }
}

/// The SwiGLU MLP (Shazeer 2020): `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?; // [B, S, ffn]
        self.down_proj.forward(&h)
    }
}

/// One pre-norm decoder block.
#[derive(Clone, Debug)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: &Tensor,
        kv: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope, mask, kv)?;
        let x = (x + a)?;
        Ok((&x
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&x)?)?)?)
    }
}

/// The config and weight files of a Hugging Face model.
#[derive(Clone, Debug)]
pub struct HfFiles {
    pub config: PathBuf,
    /// `model.safetensors`, or the shards an index lists.
    pub weights: Vec<PathBuf>,
    /// `model.safetensors.index.json` of a sharded model.
    pub index: Option<PathBuf>,
}

impl HfFiles {
    /// The file that names the weights in errors: the single file or the index.
    pub fn weights_name(&self) -> &Path {
        self.index.as_deref().unwrap_or(&self.weights[0])
    }
}

/// The shards named by a `model.safetensors.index.json`, in order, each listed once.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let idx: Index = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(index, format!("not a safetensors index: {e}")))?;
    let shards: BTreeSet<String> = idx.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err(Error::invalid(index, "the weight_map lists no shard"));
    }
    if let Some(s) = shards.iter().find(|s| s.contains('/') || s.contains('\\')) {
        return Err(Error::invalid(
            index,
            format!("shard {s:?} is not a file name in the model folder"),
        ));
    }
    Ok(shards.into_iter().collect())
}

/// Config and weights of a model folder (`model.safetensors` or a sharded index), or of a
/// hub repo when the hub is reachable.
pub fn resolve_hf_files(spec: &str) -> Result<HfFiles> {
    let path = PathBuf::from(spec);
    if path.is_dir() {
        let config = path.join("config.json");
        if !config.is_file() {
            return Err(Error::invalid(
                &config,
                "missing: a model folder holds config.json",
            ));
        }
        let single = path.join("model.safetensors");
        if single.is_file() {
            return Ok(HfFiles {
                config,
                weights: vec![single],
                index: None,
            });
        }
        let index = path.join("model.safetensors.index.json");
        if !index.is_file() {
            return Err(Error::invalid(
                &path,
                "no model.safetensors nor model.safetensors.index.json in the folder",
            ));
        }
        let weights = index_shards(&index)?
            .into_iter()
            .map(|s| path.join(s))
            .collect();
        return Ok(HfFiles {
            config,
            weights,
            index: Some(index),
        });
    }
    if path.exists()
        || spec.starts_with('.')
        || spec.starts_with('/')
        || spec.split('/').count() != 2
    {
        return Err(Error::invalid(
            path,
            "not a model folder (config.json + safetensors), a .gguf file, nor a hub id owner/name",
        ));
    }
    let fetch = || -> std::result::Result<HfFiles, Error> {
        let hub = |e: hf_hub::api::sync::ApiError| Error::Other(e.to_string());
        let repo = hf_hub::api::sync::Api::new()
            .map_err(hub)?
            .model(spec.to_string());
        let config = repo.get("config.json").map_err(hub)?;
        if let Ok(single) = repo.get("model.safetensors") {
            return Ok(HfFiles {
                config,
                weights: vec![single],
                index: None,
            });
        }
        let index = repo.get("model.safetensors.index.json").map_err(hub)?;
        let weights = index_shards(&index)?
            .iter()
            .map(|s| repo.get(s).map_err(hub))
            .collect::<Result<_>>()?;
        Ok(HfFiles {
            config,
            weights,
            index: Some(index),
        })
    };
    fetch().map_err(|e| {
        Error::Other(format!(
            "could not fetch {spec:?} from the Hugging Face Hub ({e}); offline, download \
             config.json and the safetensors elsewhere and pass their folder"
        ))
    })
}

/// A Llama-family causal LM.
pub struct Llama {
    pub cfg: LlamaConfig,
    /// `[V, d]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// The LM head (`embed_tokens` itself when tied).
    pub lm_head: Linear,
    rope: Rope,
}

impl Llama {
    /// Builds the model with parameters from `p` (a safetensors file or a seeded init), f32.
    pub fn new(cfg: &LlamaConfig, p: &mut Params) -> Result<Self> {
        let rope = Rope::new(cfg)?;
        Self::from_weights(cfg, rope, p)
    }

    pub(crate) fn from_weights(cfg: &LlamaConfig, rope: Rope, w: &mut dyn Weights) -> Result<Self> {
        cfg.validate()?;
        let (d, hd, ffn) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
        let (h, kvh) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let mut linear = |name: &str, d_in: usize, d_out: usize, bias: bool| -> Result<Linear> {
            Ok(Linear {
                weight: w.get(
                    &format!("{name}.weight"),
                    &[d_out, d_in],
                    Init::Normal(0.02),
                    true,
                )?,
                bias: if bias {
                    Some(w.get(&format!("{name}.bias"), &[d_out], Init::Zeros, false)?)
                } else {
                    None
                },
            })
        };
        let embed_tokens = linear("model.embed_tokens", d, cfg.vocab_size, false)?.weight;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            let ab = cfg.attention_bias;
            let self_attn = Attention {
                q_proj: linear(&n("self_attn.q_proj"), d, h * hd, ab)?,
                k_proj: linear(&n("self_attn.k_proj"), d, kvh * hd, ab)?,
                v_proj: linear(&n("self_attn.v_proj"), d, kvh * hd, ab)?,
                o_proj: linear(&n("self_attn.o_proj"), h * hd, d, ab)?,
                n_head: h,
                n_kv_head: kvh,
                head_dim: hd,
            };
            let mb = cfg.mlp_bias;
            let mlp = Mlp {
                gate_proj: linear(&n("mlp.gate_proj"), d, ffn, mb)?,
                up_proj: linear(&n("mlp.up_proj"), d, ffn, mb)?,
                down_proj: linear(&n("mlp.down_proj"), ffn, d, mb)?,
            };
            layers.push((
                self_attn,
                mlp,
                n("input_layernorm"),
                n("post_attention_layernorm"),
            ));
        }
        let mut norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get(&format!("{name}.weight"), &[d], Init::Ones, false)?,
                eps: cfg.rms_norm_eps,
            })
        };
        let layers = layers
            .into_iter()
            .map(|(self_attn, mlp, ln1, ln2)| {
                Ok(Block {
                    input_layernorm: norm(&ln1)?,
                    self_attn,
                    post_attention_layernorm: norm(&ln2)?,
                    mlp,
                })
            })
            .collect::<Result<_>>()?;
        let final_norm = norm("model.norm")?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear {
                weight: embed_tokens.clone(),
                bias: None,
            }
        } else {
            Linear {
                weight: w.get(
                    "lm_head.weight",
                    &[cfg.vocab_size, d],
                    Init::Normal(0.02),
                    true,
                )?,
                bias: None,
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            rope,
        })
    }

    /// Loads a frozen model (f32) from a Hugging Face folder or hub id, or a `.gguf` file.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        Self::load_with(spec, device, DType::F32)
    }

    /// As [`Llama::load`], with the weight matrices (embedding and head included) stored and
    /// multiplied in `dtype` (f32, bf16 or f16); norms, softmax and RoPE stay f32. GGUF
    /// weights are dequantized once, here.
    pub fn load_with(spec: &str, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Config(format!(
                "compute dtype {dtype:?}: expected f32, bf16 or f16"
            )));
        }
        if crate::gguf::is_gguf_path(Path::new(spec)) {
            return crate::gguf::load_llama(Path::new(spec), device, dtype);
        }
        let files = resolve_hf_files(spec)?;
        let cfg = LlamaConfig::from_file(&files.config)?;
        let file = TensorFile::load_shards(files.weights_name(), &files.weights)?;
        let rope = Rope::new(&cfg)?;
        Self::from_weights(
            &cfg,
            rope,
            &mut SafetensorWeights {
                file: &file,
                device: device.clone(),
                dtype,
            },
        )
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The rotary frequencies in use.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Token embeddings `[B, T, d]` (f32) of `ids [B, T]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    fn check_positions(&self, end: usize) -> Result<()> {
        if end > self.cfg.context() {
            return Err(Error::Other(format!(
                "{end} positions exceed the model's context of {}",
                self.cfg.context()
            )));
        }
        Ok(())
    }

    /// Runs the blocks of `layers` on `h [B, S, d]` at positions `offset..offset + S`, with
    /// an optional cache (holding `offset` positions) and residual hook.
    pub fn run_blocks(
        &self,
        mut h: Tensor,
        layers: std::ops::Range<usize>,
        offset: usize,
        mut cache: Option<&mut KvCache>,
        hook: Option<&Hook>,
    ) -> Result<Tensor> {
        let s = h.dim(1)?;
        self.check_positions(offset + s)?;
        let past = if cache.is_some() { offset } else { 0 };
        let (cos, sin) = self.rope.cos_sin(offset, s, self.device())?;
        let mask = causal_mask(s, past + s, past, self.device())?;
        for i in layers {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = self.layers[i].forward(&h, (&cos, &sin), &mask, kv)?;
            if let Some(hk) = hook.filter(|hk| hk.layer == i) {
                h = hk.hook.apply(&h)?;
            }
        }
        Ok(h)
    }

    /// The final norm and the head: `[B, S, d]` → logits `[B, S, V]` (f32).
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.norm.forward(h)?)?)
    }

    /// Logits `[B, T, V]` for `ids [B, T]`, continuing `cache` when given.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        hook: Option<&Hook>,
    ) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let past = cache.as_ref().map_or(0, |c| c.tokens);
        if let Some(c) = cache.as_ref() {
            if c.layers.len() != self.layers.len() {
                return Err(Error::Other(format!(
                    "a KV cache of {} layers for a {}-layer model",
                    c.layers.len(),
                    self.layers.len()
                )));
            }
        }
        let mut cache = cache;
        let h = self.run_blocks(
            self.embed(ids)?,
            0..self.layers.len(),
            past,
            cache.as_deref_mut(),
            hook,
        )?;
        if let Some(c) = cache {
            c.tokens += t;
        }
        self.head(&h)
    }

    /// Logits `[B, T, V]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(ids, None, None)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(Error::Config(format!(
                "layer {layer} is out of range for a {}-block model",
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// The residual stream right after block `layer` (Hugging Face `hidden_states[layer + 1]`).
    pub fn hidden_state(&self, ids: &Tensor, layer: usize) -> Result<Tensor> {
        self.check_layer(layer)?;
        let h = self.embed(&ids.detach())?;
        Ok(self.run_blocks(h, 0..layer + 1, 0, None, None)?.detach())
    }

    /// `x_L` and `∂L/∂x_L` for the mean next-token cross-entropy over `B·(T−1)` positions:
    /// blocks `0..=layer` run with no graph, `x_L` is the only leaf, and the blocks above run
    /// forward and backward with input-only gradients (no weight gradients when frozen).
    pub fn residual_grad(&self, ids: &Tensor, layer: usize) -> Result<ResidualGrad> {
        let (_, t) = ids.dims2()?;
        if t < 2 {
            return Err(Error::Other(
                "residual_grad needs at least two tokens per row".into(),
            ));
        }
        let hidden = self.hidden_state(ids, layer)?;
        let x = Var::from_tensor(&hidden)?;
        let h = self.run_blocks(
            x.as_tensor().clone(),
            layer + 1..self.layers.len(),
            0,
            None,
            None,
        )?;
        let loss = head_next_token_loss(|h| self.head(h), &h, ids)?;
        let grads = loss.backward()?;
        let grad = grads
            .get(x.as_tensor())
            .map(Tensor::detach)
            .ok_or_else(|| Error::Other("no gradient reached x_L".into()))?;
        Ok(ResidualGrad {
            hidden,
            grad,
            loss: loss.to_dtype(DType::F32)?.to_scalar()?,
        })
    }
}

impl crate::CausalLm for Llama {
    fn d_model(&self) -> usize {
        self.cfg.hidden_size
    }
    fn n_layer(&self) -> usize {
        self.layers.len()
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn context(&self) -> usize {
        self.cfg.context()
    }
    fn device(&self) -> &Device {
        Llama::device(self)
    }
    fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward(ids)
    }
    fn hidden_state(&self, ids: &Tensor, layer: usize) -> Result<Tensor> {
        Llama::hidden_state(self, ids, layer)
    }
    fn residual_grad(&self, ids: &Tensor, layer: usize) -> Result<ResidualGrad> {
        Llama::residual_grad(self, ids, layer)
    }
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }
    fn step(&self, ids: &Tensor, cache: &mut KvCache, hook: Option<&Hook>) -> Result<Tensor> {
        self.forward_with(ids, Some(cache), hook)
    }
}
