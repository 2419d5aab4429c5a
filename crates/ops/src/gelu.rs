//! `gelu_new(x + b)` (the tanh GELU of GPT-2) with its bias add fused, forward and
//! backward, on the CPU. `0.5·u·(1 + tanh(t/2)) = u·σ(t)` with `t = 2√(2/π)(u + 0.044715u³)`,
//! so one vectorised `exp` replaces libm's scalar `tanhf`.
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{bias_rows_fwd, use_fused, with_host};
use crate::simd::{dispatch, exp, Isa};

/// `gelu_new(x + b)` over the last dimension of `x` (`b` has that width).
pub fn bias_gelu(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if use_fused(&[x, b]) {
        return x.contiguous()?.apply_op2(&b.contiguous()?, BiasGelu);
    }
    bias_gelu_composed(x, b)
}

/// The same from Candle ops (other devices and dtypes; test reference).
pub fn bias_gelu_composed(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_add(b)?.gelu()
}

/// 2·√(2/π)
const TWO_K: f32 = 1.595_769;
const C: f32 = 0.044_715;

struct BiasGelu;

/// Rows per parallel task (fixed, so the bias-gradient sum order is too).
fn block_rows(d: usize) -> usize {
    (16_384 / d.max(1)).max(1)
}

dispatch!(fn fwd_rows(x: &[f32], b: &[f32], y: &mut [f32]) = fwd_body);

#[inline(always)]
fn fwd_body<I: Isa>(x: &[f32], b: &[f32], y: &mut [f32]) {
    let d = b.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        for j in 0..d {
            let u = xr[j] + b[j];
            let t = TWO_K * I::madd(C * u, u * u, u);
            yr[j] = u / (1.0 + exp::<I>(-t));
        }
    }
}

dispatch!(fn bwd_rows(x: &[f32], b: &[f32], g: &[f32], dx: &mut [f32], db: &mut [f32]) = bwd_body);

#[inline(always)]
fn bwd_body<I: Isa>(x: &[f32], b: &[f32], g: &[f32], dx: &mut [f32], db: &mut [f32]) {
    let d = b.len();
    for ((xr, gr), dxr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        for j in 0..d {
            let u = xr[j] + b[j];
            let u2 = u * u;
            let t = TWO_K * I::madd(C * u, u2, u);
            let s = 1.0 / (1.0 + exp::<I>(-t));
            let dt = TWO_K * I::madd(3.0 * C, u2, 1.0);
            let grad = I::madd(u * s * (1.0 - s), dt, s);
            dxr[j] = gr[j] * grad;
            db[j] += dxr[j];
        }
    }
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "fused-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bias_rows_fwd(self.name(), (xs, xl), (bs, bl), block_rows, fwd_rows)
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = b.elem_count();
        let (dx, parts) = with_host(x, self.name(), |x| {
            with_host(b, self.name(), |b| {
                with_host(g, self.name(), |g| {
                    let mut dx = vec![0f32; x.len()];
                    let n = block_rows(d) * d;
                    let parts: Vec<Vec<f32>> = dx
                        .par_chunks_mut(n)
                        .zip(x.par_chunks(n).zip(g.par_chunks(n)))
                        .map(|(dxc, (xc, gc))| {
                            let mut db = vec![0f32; d];
                            bwd_rows(xc, b, gc, dxc, &mut db);
                            db
                        })
                        .collect();
                    (dx, parts)
                })
            })
        })???;
        let mut db = vec![0f32; d];
        for p in &parts {
            for (o, v) in db.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}
