//! AdamW (as `torch.optim.AdamW`: decoupled decay, bias correction, one parameter group so
//! decay also hits biases, LayerNorms and embeddings, as in the reference release), the
//! warmup + cosine schedule of Hugging Face's `cosine_with_min_lr`, and global-norm clipping.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use crate::{Error, OptimSection, Result};

/// Learning rate for optimizer update `step` (0-indexed, as the scheduler is stepped after
/// each update): `lr·step/warmup` during warmup (so the very first update has lr 0, as with
/// HF), then `lr·[r + (1 − r)·½(1 + cos(π·progress))]` with `r = min_lr/lr`.
pub fn lr_at(o: &OptimSection, step: u64) -> f64 {
    if step < o.warmup {
        return o.lr * step as f64 / o.warmup.max(1) as f64;
    }
    let progress = (step - o.warmup) as f64 / (o.steps - o.warmup).max(1) as f64;
    let r = o.min_lr / o.lr;
    o.lr * (r + (1.0 - r) * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()))
}

/// Scales gradients so their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)` when below 1). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// AdamW with f32 moments whose state can be saved and restored exactly.
pub struct AdamW {
    names: Vec<String>,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates taken so far.
    pub step: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// An optimizer over named variables with zero moments.
    pub fn new(vars: &[(String, Var)], o: &OptimSection) -> Result<Self> {
        let zeros = |v: &Var| {
            v.as_tensor()
                .zeros_like()
                .and_then(|t| t.to_dtype(DType::F32))
        };
        Ok(Self {
            names: vars.iter().map(|(n, _)| n.clone()).collect(),
            m: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            step: 0,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        })
    }

    /// One update with gradients `grads` (same order as the variables) at learning rate `lr`.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::Other(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            )));
        }
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (((var, m), v), g) in self
            .vars
            .iter()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(grads)
        {
            // Detached: a gradient carries its graph, which the moments would otherwise keep.
            let g = g.detach().to_dtype(DType::F32)?;
            *m = ((&*m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let p = var.as_tensor();
            let decayed = (p * (1.0 - lr * self.weight_decay))?;
            let next = (decayed - ((&*m / denom)? * (lr / bc1))?)?;
            var.set(&next.to_dtype(p.dtype())?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<param>`, `v.<param>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for (i, n) in self.names.iter().enumerate() {
            out.push((format!("m.{n}"), self.m[i].clone()));
            out.push((format!("v.{n}"), self.v[i].clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(&mut self, path: &Path, step: u64) -> Result<()> {
        let dev = self
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut t: HashMap<String, Tensor> =
            candle_core::safetensors::load(path, &dev).map_err(|e| Error::file(path, e))?;
        for (i, n) in self.names.iter().enumerate() {
            let mut take = |k: String, like: &Tensor| -> Result<Tensor> {
                let x = t
                    .remove(&k)
                    .ok_or_else(|| Error::file(path, format!("optimizer state lacks {k}")))?;
                if x.dims() != like.dims() {
                    return Err(Error::file(
                        path,
                        format!("{k} has shape {:?}, expected {:?}", x.dims(), like.dims()),
                    ));
                }
                Ok(x)
            };
            self.m[i] = take(format!("m.{n}"), &self.m[i])?;
            self.v[i] = take(format!("v.{n}"), &self.v[i])?;
        }
        self.step = step;
        Ok(())
    }
}
