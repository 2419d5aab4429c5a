//! AdamW (torch.optim.AdamW: decoupled decay, bias correction) as one pass over each
//! parameter on the CPU, updating the parameter in place and the moments in their host
//! buffers, with the gradient-clipping coefficient applied in the same pass; and the
//! clipping norm as a fixed-order sum of squares.
use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use crate::fused::{contiguous_f32, with_host};
use crate::simd::{dispatch, Isa};

/// Elements per parallel task (fixed, so partial sums are added in a fixed order).
const CHUNK: usize = 1 << 15;

/// `Σ g²` over all gradients. On the CPU each tensor is summed in fixed chunks (f32 lanes
/// within a chunk, f64 across chunks and tensors), in the same order whatever the thread
/// count; elsewhere with Candle ops, every tensor's sum kept on the device and all of them
/// read back at once (one synchronisation per step, not one per tensor).
pub fn sum_squares(grads: &[Tensor]) -> candle_core::Result<f64> {
    let mut total = 0f64;
    let mut on_device = Vec::new();
    for g in grads {
        if g.device().is_cpu() && g.dtype() == DType::F32 {
            total += with_host(g, "sum of squares", |x| {
                let parts: Vec<f64> = x
                    .par_chunks(CHUNK)
                    .map(|c| chunk_squares(c) as f64)
                    .collect();
                parts.iter().sum::<f64>()
            })?;
        } else {
            on_device.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    // One read-back per device (gradients normally share one).
    while let Some(first) = on_device.first() {
        let here = first.device().location();
        let (same, rest): (Vec<Tensor>, Vec<Tensor>) = on_device
            .into_iter()
            .partition(|t| t.device().location() == here);
        let sums = Tensor::stack(&same, 0)?.to_dtype(DType::F64)?;
        total += sums.to_vec1::<f64>()?.iter().sum::<f64>();
        on_device = rest;
    }
    Ok(total)
}

dispatch!(fn chunk_squares(x: &[f32]) -> f32 = squares_body);

#[inline(always)]
fn squares_body<I: Isa>(x: &[f32]) -> f32 {
    crate::simd::dot::<I>(x, x)
}

/// The hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The update's number, from 1 (bias correction).
    pub t: u64,
    /// Multiplies every gradient first (the clipping coefficient, 1 when not clipping).
    pub grad_scale: f64,
}

/// Per-element constants, in f32.
#[derive(Clone, Copy)]
struct Coeffs {
    scale: f32,
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    decay: f32,
    step: f32,
}

impl AdamWStep {
    fn coeffs(&self) -> Coeffs {
        let t = self.t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        Coeffs {
            scale: self.grad_scale as f32,
            b1: self.beta1 as f32,
            one_minus_b1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            one_minus_b2: (1.0 - self.beta2) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: self.eps as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            step: (self.lr / bc1) as f32,
        }
    }

    /// The same update with Candle ops on tensor moments (other devices and dtypes; the
    /// reference of the fused one). Returns the new `(param, m, v)`.
    pub fn apply_composed(
        &self,
        param: &Tensor,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let t = self.t.min(i32::MAX as u64) as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        let g = (grad.detach().to_dtype(DType::F32)? * self.grad_scale)?;
        let m = ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
        let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
        let p = param.to_dtype(DType::F32)?;
        let decayed = (p * (1.0 - self.lr * self.weight_decay))?;
        let next = (decayed - ((&m / denom)? * (self.lr / bc1))?)?;
        Ok((next.to_dtype(param.dtype())?, m, v))
    }

    /// Updates a contiguous f32 CPU `param` in place from `grad`, and its moments `m`, `v`
    /// (host buffers of the parameter's size).
    pub fn apply(
        &self,
        param: &Tensor,
        grad: &Tensor,
        m: &mut [f32],
        v: &mut [f32],
    ) -> candle_core::Result<()> {
        let n = param.elem_count();
        if grad.elem_count() != n || m.len() != n || v.len() != n {
            candle_core::bail!(
                "AdamW: parameter of {n} elements, gradient {}, moments {} and {}",
                grad.elem_count(),
                m.len(),
                v.len()
            )
        }
        let grad = grad.detach().to_dtype(DType::F32)?.contiguous()?;
        param.inplace_op2(
            &grad,
            &AdamWOp {
                k: self.coeffs(),
                m: RefCell::new(m),
                v: RefCell::new(v),
            },
        )
    }
}

struct AdamWOp<'a> {
    k: Coeffs,
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
}

dispatch!(fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Coeffs) = update_body);

#[inline(always)]
fn update_body<I: Isa>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Coeffs) {
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    for i in 0..n {
        let gi = g[i] * k.scale;
        let mi = I::madd(m[i], k.b1, gi * k.one_minus_b1);
        let vi = I::madd(v[i], k.b2, gi * gi * k.one_minus_b2);
        let denom = I::madd(vi.sqrt(), k.inv_sqrt_bc2, k.eps);
        p[i] = I::madd(-k.step, mi / denom, p[i] * k.decay);
        m[i] = mi;
        v[i] = vi;
    }
}

impl InplaceOp2 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let g = contiguous_f32(gs, gl, self.name())?;
        let (a, b) = match pl.contiguous_offsets() {
            Some(r) => r,
            None => candle_core::bail!("{}: parameter must be contiguous", self.name()),
        };
        let p = match ps {
            CpuStorage::F32(p) => &mut p[a..b],
            _ => candle_core::bail!("{}: parameter must be f32", self.name()),
        };
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        let k = self.k;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| update_chunk(p, g, m, v, &k));
        Ok(())
    }
}
