//! AdamW (as `torch.optim.AdamW`: decoupled decay, bias correction, one parameter group so
//! decay also hits biases, LayerNorms and embeddings, as in the reference release), the
//! warmup + cosine schedule of Hugging Face's `cosine_with_min_lr`, and global-norm clipping.
//! On the CPU the update is one fused pass per parameter (`cocomix_ops::adamw`).
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use cocomix_model::ops::adamw::{sum_squares, AdamWStep};

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
/// before clipping. [`AdamW::clip_and_update`] does the same without rewriting the gradients.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = sum_squares(grads)?.sqrt();
    let coef = clip_coef(norm, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// A parameter's moments: host buffers the fused CPU update writes in place, or tensors
/// (other devices, or fused kernels switched off).
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

/// AdamW with f32 moments whose state can be saved and restored exactly.
pub struct AdamW {
    names: Vec<String>,
    vars: Vec<Var>,
    moments: Vec<Moments>,
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
        let moments = vars
            .iter()
            .map(|(_, v)| {
                let t = v.as_tensor();
                Ok(if host_update(t) {
                    Moments::Host {
                        m: vec![0.0; t.elem_count()],
                        v: vec![0.0; t.elem_count()],
                    }
                } else {
                    let z = t.zeros_like()?.to_dtype(DType::F32)?;
                    Moments::Device { m: z.clone(), v: z }
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            names: vars.iter().map(|(n, _)| n.clone()).collect(),
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            moments,
            step: 0,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        })
    }

    /// One update with gradients `grads` (same order as the variables) at learning rate `lr`.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.update_scaled(grads, lr, 1.0)
    }

    /// Clips the gradients to a global norm of `max_norm` (as [`clip_grad_norm`]) and
    /// updates, the clipping coefficient applied inside the update's single pass over each
    /// parameter. Returns the norm before clipping.
    pub fn clip_and_update(&mut self, grads: &[Tensor], lr: f64, max_norm: f64) -> Result<f64> {
        let norm = sum_squares(grads)?.sqrt();
        self.update_scaled(grads, lr, clip_coef(norm, max_norm))?;
        Ok(norm)
    }

    fn update_scaled(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::Other(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            )));
        }
        self.step += 1;
        let step = AdamWStep {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            t: self.step,
            grad_scale,
        };
        for ((var, mom), g) in self.vars.iter().zip(&mut self.moments).zip(grads) {
            match mom {
                Moments::Host { m, v } => step.apply(var.as_tensor(), g, m, v)?,
                Moments::Device { m, v } => {
                    // Gradients carry their graph; apply_composed detaches them, or the
                    // moments would keep every step's graph alive.
                    let (p, m2, v2) = step.apply_composed(var.as_tensor(), g, m, v)?;
                    var.set(&p)?;
                    (*m, *v) = (m2, v2);
                }
            }
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<param>`, `v.<param>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for ((n, var), mom) in self.names.iter().zip(&self.vars).zip(&self.moments) {
            let (m, v) = match mom {
                Moments::Host { m, v } => {
                    let t = |x: &[f32]| {
                        Tensor::from_slice(x, var.shape(), var.device())
                            .expect("a moment buffer has its parameter's size")
                    };
                    (t(m), t(v))
                }
                Moments::Device { m, v } => (m.clone(), v.clone()),
            };
            out.push((format!("m.{n}"), m));
            out.push((format!("v.{n}"), v));
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
        for ((n, var), mom) in self.names.iter().zip(&self.vars).zip(&mut self.moments) {
            let mut take = |k: String| -> Result<Tensor> {
                let x = t
                    .remove(&k)
                    .ok_or_else(|| Error::file(path, format!("optimizer state lacks {k}")))?;
                if x.dims() != var.dims() {
                    return Err(Error::file(
                        path,
                        format!("{k} has shape {:?}, expected {:?}", x.dims(), var.dims()),
                    ));
                }
                Ok(x.to_dtype(DType::F32)?)
            };
            let (m, v) = (take(format!("m.{n}"))?, take(format!("v.{n}"))?);
            *mom = match mom {
                Moments::Host { .. } => Moments::Host {
                    m: m.flatten_all()?.to_vec1()?,
                    v: v.flatten_all()?.to_vec1()?,
                },
                Moments::Device { .. } => Moments::Device { m, v },
            };
        }
        self.step = step;
        Ok(())
    }
}

/// Whether `param` is updated in place by the fused CPU kernel.
fn host_update(param: &Tensor) -> bool {
    param.device().is_cpu()
        && param.dtype() == DType::F32
        && param.is_contiguous()
        && cocomix_model::ops::fused::fused_enabled()
}
