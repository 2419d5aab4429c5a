//! The CoCoMix student (Tack et al. 2025, §2; the reference release's `GPT2CoCoMixModel`, see docs/design.md): a GPT-2 whose hidden state before block
//! `insert_layer` predicts concept logits; the top `K_c` of them are compressed into a
//! continuous concept vector, interleaved as an extra position after each token for all
//! later blocks. Without the concept path it is the NTP baseline (plain GPT-2).
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::gpt2::{Dropout, Gpt2, Gpt2Config, KvCache};
use crate::ops::{apply_steer, compress_kept, linear_in, topk, unbiased_layer_norm, WeightLayout};
pub use crate::ops::{Steer, SteerMode};
use crate::params::{save_safetensors, Init, Params, TensorFile};
use crate::{Error, Result};

/// eps of the concept path's LayerNorm (added to the unbiased std), as in the SAE.
pub const CONCEPT_LN_EPS: f64 = 1e-5;

/// The concept path's shape. Names match the reference release's config keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConceptConfig {
    /// C: number of concepts (the SAE's latents), 32768 in the paper.
    pub concept_dim: usize,
    /// K_c: predicted concept logits kept by the TopK, 32 in the paper.
    pub concept_num: usize,
    /// The concept is computed before this block; blocks from here on run on 2T positions.
    pub insert_layer_index: usize,
    /// Interleave the continuous concept after every token (CoCoMix). `false` is the
    /// paper's "concept prediction only" ablation: the concept logits are predicted (and
    /// trained by the concept loss) but never fed back, and every block runs on T positions.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub interleave: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The pause-token baseline (Goyal et al. 2024, as the CoCoMix paper compares it): one
/// learned vector `pause [d]` interleaved after every token from the insert block on, in the
/// place where CoCoMix puts its continuous concept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PauseConfig {
    /// The pause vector enters before this block; blocks from here on run on 2T positions.
    pub pause_insert_layer_index: usize,
}

/// A student's `config.json`: GPT-2 fields, plus the concept path for CoCoMix (or the pause
/// vector of the pause baseline).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudentConfig {
    #[serde(flatten)]
    pub gpt2: Gpt2Config,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub concept: Option<ConceptConfig>,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseConfig>,
}

impl StudentConfig {
    /// A plain GPT-2 (the NTP and KD baselines).
    pub fn gpt2(gpt2: Gpt2Config) -> Self {
        Self {
            gpt2,
            concept: None,
            pause: None,
        }
    }

    /// The block before which the concept (or pause) slot is interleaved, if any.
    pub fn interleave_layer(&self) -> Option<usize> {
        match (&self.concept, &self.pause) {
            (Some(c), _) if c.interleave => Some(c.insert_layer_index),
            (_, Some(p)) => Some(p.pause_insert_layer_index),
            _ => None,
        }
    }

    /// Checks the shape, including `insert_layer < n_layer` and `K_c ≤ C`.
    pub fn validate(&self) -> Result<()> {
        self.gpt2.validate()?;
        if self.concept.is_some() && self.pause.is_some() {
            return Err(Error::Config(
                "a student has a concept path or a pause vector, not both".into(),
            ));
        }
        if let Some(p) = &self.pause {
            if p.pause_insert_layer_index >= self.gpt2.n_layer {
                return Err(Error::Config(format!(
                    "pause_insert_layer_index {} must be below n_layer {}",
                    p.pause_insert_layer_index, self.gpt2.n_layer
                )));
            }
        }
        if let Some(c) = &self.concept {
            if c.insert_layer_index >= self.gpt2.n_layer {
                return Err(Error::Config(format!(
                    "insert_layer_index {} must be below n_layer {}",
                    c.insert_layer_index, self.gpt2.n_layer
                )));
            }
            if c.concept_num == 0 || c.concept_num > c.concept_dim {
                return Err(Error::Config(format!(
                    "concept_num (K_c) {} must be in 1..=concept_dim {}",
                    c.concept_num, c.concept_dim
                )));
            }
        }
        Ok(())
    }

    /// Reads a student `config.json`. A `dropout` key (the reference release's) sets every
    /// dropout probability.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(path, format!("not JSON: {e}")))?;
        let mut cfg: Self = serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid(path, format!("not a student config.json: {e}")))?;
        if let Some(p) = v.get("dropout").and_then(|p| p.as_f64()) {
            cfg.gpt2 = cfg.gpt2.with_dropout(p);
        }
        cfg.validate()
            .map_err(|e| Error::invalid(path, e.to_string()))?;
        Ok(cfg)
    }
}

/// The concept path's parameters (reference-release names).
pub struct ConceptPath {
    pub cfg: ConceptConfig,
    /// `pre_bias [d]`
    pub pre_bias: Tensor,
    /// `concept_predictor.weight [C, d]` (Linear layout) and `.bias [C]`
    pub predictor_w: Tensor,
    pub predictor_b: Tensor,
    /// `compress_layer.weight [d, C]` (Linear layout) and `.bias [d]`; absent when the
    /// concept is predicted but not interleaved.
    pub compress: Option<(Tensor, Tensor)>,
    compute_dtype: DType,
}

/// What the student's forward returns.
pub struct StudentOutput {
    /// Next-token logits `[B, T, V]` (from the concept slots for CoCoMix).
    pub logits: Tensor,
    /// Concept logits before the TopK, `[B, T, C]` (students with a concept path).
    pub concept_logits: Option<Tensor>,
}

/// A trainable student: CoCoMix (or one of its ablations), or the NTP baseline when it has
/// neither a concept path nor a pause vector.
pub struct Student {
    pub cfg: StudentConfig,
    pub gpt: Gpt2,
    pub concept: Option<ConceptPath>,
    /// The pause baseline's learned vector `pause [d]`.
    pub pause: Option<Tensor>,
    vars: Vec<(String, Var)>,
}

impl Student {
    fn build(cfg: &StudentConfig, mut p: Params) -> Result<Self> {
        cfg.validate()?;
        let gpt = Gpt2::new(&cfg.gpt2, &mut p)?;
        let d = cfg.gpt2.n_embd;
        let concept = match &cfg.concept {
            None => None,
            Some(c) => Some(ConceptPath {
                cfg: c.clone(),
                pre_bias: p.get("pre_bias", &[d], Init::Zeros)?,
                predictor_w: p.get(
                    "concept_predictor.weight",
                    &[c.concept_dim, d],
                    Init::Normal(0.02),
                )?,
                predictor_b: p.get("concept_predictor.bias", &[c.concept_dim], Init::Zeros)?,
                compress: if c.interleave {
                    Some((
                        p.get(
                            "compress_layer.weight",
                            &[d, c.concept_dim],
                            Init::Normal(0.02),
                        )?,
                        p.get("compress_layer.bias", &[d], Init::Zeros)?,
                    ))
                } else {
                    None
                },
                compute_dtype: DType::F32,
            }),
        };
        let pause = cfg
            .pause
            .as_ref()
            .map(|_| p.get("pause", &[d], Init::Normal(0.02)))
            .transpose()?;
        Ok(Self {
            cfg: cfg.clone(),
            gpt,
            concept,
            pause,
            vars: p.into_vars(),
        })
    }

    /// A freshly initialised student (N(0, 0.02), residual projections scaled by
    /// 1/√(2·n_layer), biases and `pre_bias` zero), deterministic for `seed`.
    pub fn new(cfg: &StudentConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::build(cfg, Params::random(seed, device, true))
    }

    /// Loads a student folder (`config.json` + `model.safetensors`) as trainable weights.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = StudentConfig::from_file(&dir.join("config.json"))?;
        let file = TensorFile::load(&dir.join("model.safetensors"))?;
        Self::build(&cfg, Params::from_file(&file, device, true))
    }

    /// Saves `config.json` + `model.safetensors`. An NTP student is written in the exact
    /// Hugging Face GPT-2 layout (`GPT2LMHeadModel.from_pretrained(dir)` loads it).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut cfg = serde_json::to_value(&self.cfg).map_err(|e| Error::Other(e.to_string()))?;
        let obj = cfg.as_object_mut().expect("struct serialises to an object");
        obj.insert("model_type".into(), "gpt2".into());
        let arch = if self.concept.is_some() || self.pause.is_some() {
            "GPT2CoCoMixLMHeadModel"
        } else {
            "GPT2LMHeadModel"
        };
        obj.insert("architectures".into(), serde_json::json!([arch]));
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Other(e.to_string()))?;
        crate::ops::write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        save_safetensors(&tensors, &dir.join("model.safetensors"), &[])
    }

    /// Autocast the matmuls (backbone, head and concept predictor) to `dtype`; see
    /// [`Gpt2::set_compute_dtype`]. Weights and optimizer state stay f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.gpt.set_compute_dtype(dtype);
        if let Some(c) = &mut self.concept {
            c.compute_dtype = dtype;
        }
    }

    /// The trainable variables by checkpoint name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.gpt.device()
    }

    /// Full-sequence forward of `ids [B, T]` (training or evaluation, per `dropout`).
    pub fn forward(&self, ids: &Tensor, dropout: &mut Dropout) -> Result<StudentOutput> {
        self.forward_inner(ids, None, &[], dropout)
    }

    /// Forward of new tokens `ids [B, t]` continuing `cache` (generation), with optional
    /// steering of the predicted concepts. Returns logits `[B, t, V]`.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        steer: &[Steer],
    ) -> Result<Tensor> {
        Ok(self
            .forward_inner(ids, Some(cache), steer, &mut Dropout::off())?
            .logits)
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.gpt2.n_layer)
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        steer: &[Steer],
        dropout: &mut Dropout,
    ) -> Result<StudentOutput> {
        let (b, t) = ids.dims2()?;
        let d = self.cfg.gpt2.n_embd;
        let past = cache.as_ref().map_or(0, |c| c.tokens());
        let n_layer = self.cfg.gpt2.n_layer;
        if !steer.is_empty() && self.cfg.interleave_layer().is_none() {
            return Err(Error::Other(
                "steering needs a student whose predicted concepts are interleaved".into(),
            ));
        }
        // Blocks before `split` read the tokens alone; the concept (or pause) is computed at
        // `split` and, when interleaved, every later block reads 2T positions.
        let split = match (&self.concept, &self.cfg.pause) {
            (Some(cp), _) => cp.cfg.insert_layer_index,
            (None, Some(p)) => p.pause_insert_layer_index,
            (None, None) => n_layer,
        };
        let h = self.gpt.embed(ids, past, dropout)?; // [B, T, d]
        let h = self
            .gpt
            .run_blocks(h, 0..split, cache.as_deref_mut(), None, dropout)?;
        let (slot, concept_logits) = match (&self.concept, &self.pause) {
            (Some(cp), _) => {
                let (c, z) = cp.concept(&h, steer)?; // Option<[B, T, d]>, [B, T, C]
                (c, Some(z))
            }
            (None, Some(p)) => (Some(p.reshape((1, 1, d))?.broadcast_as((b, t, d))?), None),
            (None, None) => (None, None),
        };
        let h = match slot {
            None => self
                .gpt
                .run_blocks(h, split..n_layer, cache.as_deref_mut(), None, dropout)?,
            Some(c) => {
                // [B, 2T, d]: h1, c1, h2, c2, …; plain causal attention over the 2T positions.
                let h = Tensor::stack(&[&h, &c], 2)?.reshape((b, 2 * t, d))?;
                let h =
                    self.gpt
                        .run_blocks(h, split..n_layer, cache.as_deref_mut(), None, dropout)?;
                h.reshape((b, t, 2, d))?.narrow(2, 1, 1)?.squeeze(2)? // the slots [B, T, d]
            }
        };
        if let Some(c) = cache {
            c.tokens += t;
        }
        Ok(StudentOutput {
            logits: self.gpt.head(&h)?,
            concept_logits,
        })
    }
}

impl ConceptPath {
    /// The continuous concept `c [B, T, d]` (`None` when it is not interleaved) and the
    /// concept logits `[B, T, C]` from the hidden state `h [B, T, d]` before the insert block.
    pub fn concept(&self, h: &Tensor, steer: &[Steer]) -> Result<(Option<Tensor>, Tensor)> {
        let (b, t, d) = h.dims3()?;
        let (n, c_dim, k) = (b * t, self.cfg.concept_dim, self.cfg.concept_num);
        // [B, T, ·] throughout: each reshape of z would be an [N, C] node in the graph.
        let (x, mu, std) = unbiased_layer_norm(h, CONCEPT_LN_EPS)?; // [B,T,d], [B,T,1], [B,T,1]
        let u = x.broadcast_sub(&self.pre_bias)?;
        let (w, bias) = (&self.predictor_w, Some(&self.predictor_b));
        let z = linear_in(&u, w, bias, WeightLayout::OutIn, self.compute_dtype)?; // [B, T, C]
        let Some((_, compress_b)) = &self.compress else {
            return Ok((None, z));
        };
        let z_used = apply_steer(&z, steer)?; // z itself without steering
        let z_rows = z_used.detach().reshape((n, c_dim))?; // no gradient through the choice
        let (mut idx, _) = topk(&z_rows, k)?; // [N, K_c]
        if steer.iter().any(|s| s.force) {
            idx = force_into_topk(&idx, steer, n, k)?;
        }
        let c_hat = self.compress_sparse(&z_used, &idx)?; // [N, d]
        let c_hat = c_hat
            .broadcast_add(compress_b)?
            .broadcast_add(&self.pre_bias)?;
        let c = c_hat
            .reshape((b, t, d))?
            .broadcast_mul(&std)?
            .broadcast_add(&mu)?;
        Ok((Some(c), z))
    }

    fn compress_w(&self) -> Result<&Tensor> {
        self.compress
            .as_ref()
            .map(|(w, _)| w)
            .ok_or_else(|| Error::Other("this concept path has no compress layer".into()))
    }

    /// `compress_layer.weight @ (mask ⊙ z)` without the bias, computed on the `K_c` kept
    /// logits only: `Σ_j z[i_j] · W[:, i_j]`, O(N·K_c·d) instead of O(N·C·d). Gradients reach
    /// only the kept logits and the kept columns, exactly as with the dense mask. `z [.., C]`
    /// with `N` rows (`[N, C]` or `[B, T, C]`), `idx [N, K_c]`; returns `[N, d]`.
    pub fn compress_sparse(&self, z: &Tensor, idx: &Tensor) -> Result<Tensor> {
        Ok(compress_kept(z, idx, self.compress_w()?)?)
    }

    /// The same product with the dense mask of the reference release (for tests).
    pub fn compress_dense(&self, z: &Tensor, idx: &Tensor) -> Result<Tensor> {
        let (n, c) = z.dims2()?;
        let k = idx.dim(1)?;
        let idx_v: Vec<Vec<u32>> = idx.to_vec2()?;
        let mut mask = vec![0f32; n * c];
        for (r, row) in idx_v.iter().enumerate() {
            for &i in row.iter().take(k) {
                mask[r * c + i as usize] = 1.0;
            }
        }
        let mask = Tensor::from_vec(mask, (n, c), z.device())?.to_dtype(z.dtype())?;
        Ok((z * mask)?.matmul(&self.compress_w()?.t()?)?)
    }
}

fn force_into_topk(idx: &Tensor, steer: &[Steer], n: usize, k: usize) -> Result<Tensor> {
    let mut rows: Vec<Vec<u32>> = idx.to_vec2()?;
    let forced: Vec<u32> = steer
        .iter()
        .filter(|s| s.force)
        .map(|s| s.index as u32)
        .collect();
    if forced.len() > k {
        return Err(Error::Other(format!(
            "{} forced concepts exceed K_c = {k}",
            forced.len()
        )));
    }
    for row in rows.iter_mut() {
        // Rows are sorted by value; forced concepts replace the lowest-ranked free slots.
        let mut slot = k;
        for &f in &forced {
            if !row.contains(&f) {
                while slot > 0 && forced.contains(&row[slot - 1]) {
                    slot -= 1;
                }
                slot -= 1;
                row[slot] = f;
            }
        }
    }
    Ok(Tensor::from_vec(rows.concat(), (n, k), idx.device())?.to_dtype(DType::U32)?)
}
