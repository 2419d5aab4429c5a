//! LayerNorm, fused forward and backward on the CPU: the blocks' one (biased variance, eps
//! inside the square root, scale and shift) and the SAE's / concept path's one
//! (parameter-free, unbiased std, eps added to the std, returning mean and std too).
//!
//! Row statistics are recomputed in the backward pass from `x` (one extra read of a row that
//! is about to be read anyway) instead of being kept alive with the graph.
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Module, Shape, Tensor, D};
use rayon::prelude::*;

use crate::fused::{contiguous_f32, use_fused, with_host};
use crate::simd::{dispatch, dot, sum, Isa};

/// Standard LayerNorm (biased variance, eps inside the square root).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if use_fused(&[x, &self.weight, &self.bias]) {
            return x.contiguous()?.apply_op3_arc(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                std::sync::Arc::new(Box::new(LayerNormOp {
                    eps: self.eps as f32,
                })),
            );
        }
        layer_norm_composed(x, &self.weight, &self.bias, self.eps)
    }
}

/// The same LayerNorm from Candle primitives (other devices and dtypes; test reference).
pub fn layer_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Rows per parallel task: a fixed count (not per thread), so that the order of the
/// weight-gradient sums never depends on scheduling.
fn block_rows(d: usize) -> usize {
    (32_768 / d.max(1)).clamp(1, 256)
}

struct LayerNormOp {
    eps: f32,
}

/// Mean and Σ(x − mean)² of one row (two passes, as the composed form).
#[inline(always)]
fn mean_ss<I: Isa>(x: &[f32]) -> (f32, f32) {
    let mean = sum(x) / x.len() as f32;
    let mut acc = [0f32; crate::simd::L];
    let mut chunks = x.chunks_exact(crate::simd::L);
    for c in &mut chunks {
        for l in 0..crate::simd::L {
            let v = c[l] - mean;
            acc[l] = I::madd(v, v, acc[l]);
        }
    }
    let mut ss: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for a in acc {
        ss += a;
    }
    (mean, ss)
}

/// Mean and 1/√(var + eps) of one row (biased variance).
#[inline(always)]
fn moments<I: Isa>(x: &[f32], eps: f32) -> (f32, f32) {
    let (mean, ss) = mean_ss::<I>(x);
    (mean, 1.0 / (ss / x.len() as f32 + eps).sqrt())
}

dispatch!(fn ln_fwd_rows(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32) = ln_fwd_body);

#[inline(always)]
fn ln_fwd_body<I: Isa>(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
    let d = w.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let (mean, rstd) = moments::<I>(xr, eps);
        for j in 0..d {
            yr[j] = I::madd((xr[j] - mean) * rstd, w[j], b[j]);
        }
    }
}

dispatch!(fn ln_bwd_rows(x: &[f32], w: &[f32], g: &[f32], dx: &mut [f32], dw: &mut [f32], db: &mut [f32], eps: f32) = ln_bwd_body);

/// `dx` of each row; adds the rows' `g·x̂` and `g` to `dw`, `db`.
#[inline(always)]
fn ln_bwd_body<I: Isa>(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    eps: f32,
) {
    let d = w.len();
    let mut xhat = vec![0f32; d];
    let mut dxhat = vec![0f32; d];
    for ((xr, gr), dxr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, rstd) = moments::<I>(xr, eps);
        for j in 0..d {
            xhat[j] = (xr[j] - mean) * rstd;
            dxhat[j] = gr[j] * w[j];
            dw[j] = I::madd(gr[j], xhat[j], dw[j]);
            db[j] += gr[j];
        }
        let a = sum(&dxhat) / d as f32;
        let bm = dot::<I>(&dxhat, &xhat) / d as f32;
        for j in 0..d {
            dxr[j] = rstd * (dxhat[j] - a - xhat[j] * bm);
        }
    }
}

/// Sums per-block partial vectors in block order.
fn sum_partials(parts: &[Vec<f32>], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; d];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, self.name())?;
        let w = contiguous_f32(ws, wl, self.name())?;
        let b = contiguous_f32(bs, bl, self.name())?;
        let d = w.len();
        if b.len() != d || xl.dims().last() != Some(&d) {
            candle_core::bail!(
                "{}: x {:?}, weight {}, bias {}",
                self.name(),
                xl.dims(),
                d,
                b.len()
            )
        }
        let mut y = vec![0f32; x.len()];
        let n = block_rows(d) * d;
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(yc, xc)| ln_fwd_rows(xc, w, b, yc, self.eps));
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let (dx, parts) = with_host(x, self.name(), |x| {
            with_host(w, self.name(), |w| {
                with_host(g, self.name(), |g| {
                    let mut dx = vec![0f32; x.len()];
                    let n = block_rows(d) * d;
                    let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(n)
                        .zip(x.par_chunks(n).zip(g.par_chunks(n)))
                        .map(|(dxc, (xc, gc))| {
                            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                            ln_bwd_rows(xc, w, gc, dxc, &mut dw, &mut db, self.eps);
                            (dw, db)
                        })
                        .collect();
                    (dx, parts)
                })
            })
        })???;
        let (dws, dbs): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(sum_partials(&dws, d), w.shape(), dev)?),
            Some(Tensor::from_vec(sum_partials(&dbs, d), w.shape(), dev)?),
        ))
    }
}

/// The SAE's and the CoCoMix insert block's LayerNorm: parameter-free, **unbiased** std
/// (Bessel), eps added to the std. Returns `(x̂, mean, std)`, each differentiable.
pub fn unbiased_layer_norm(x: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let d = x.dim(D::Minus1)?;
    if d < 2 {
        candle_core::bail!("unbiased LayerNorm needs at least 2 features, got {d}")
    }
    if !use_fused(&[x]) {
        return unbiased_layer_norm_composed(x, eps);
    }
    // One op writes [x̂ | mean | std] per row; the three outputs are views of it, and their
    // gradients meet again in the op's backward.
    let packed = x
        .contiguous()?
        .apply_op1(UnbiasedLayerNormOp { eps: eps as f32 })?;
    Ok((
        packed.narrow(D::Minus1, 0, d)?,
        packed.narrow(D::Minus1, d, 1)?,
        packed.narrow(D::Minus1, d + 1, 1)?,
    ))
}

/// The same from Candle primitives (other devices and dtypes; test reference).
pub fn unbiased_layer_norm_composed(
    x: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let d = x.dim(D::Minus1)?;
    let mu = x.mean_keepdim(D::Minus1)?; // [.., 1]
    let xc = x.broadcast_sub(&mu)?;
    let std = (xc.sqr()?.sum_keepdim(D::Minus1)? / (d as f64 - 1.0))?.sqrt()?; // [.., 1]
    let xn = xc.broadcast_div(&(&std + eps)?)?;
    Ok((xn, mu, std))
}

struct UnbiasedLayerNormOp {
    eps: f32,
}

/// Mean and unbiased std of a row.
#[inline(always)]
fn mean_std<I: Isa>(x: &[f32]) -> (f32, f32) {
    let (mean, ss) = mean_ss::<I>(x);
    (mean, (ss / (x.len() as f32 - 1.0)).sqrt())
}

dispatch!(fn uln_fwd_rows(x: &[f32], out: &mut [f32], d: usize, eps: f32) = uln_fwd_body);

#[inline(always)]
fn uln_fwd_body<I: Isa>(x: &[f32], out: &mut [f32], d: usize, eps: f32) {
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d + 2)) {
        let (mean, std) = mean_std::<I>(xr);
        let a = 1.0 / (std + eps);
        for j in 0..d {
            or[j] = (xr[j] - mean) * a;
        }
        or[d] = mean;
        or[d + 1] = std;
    }
}

dispatch!(fn uln_bwd_rows(x: &[f32], g: &[f32], dx: &mut [f32], d: usize, eps: f32) = uln_bwd_body);

/// With c = x − μ, s the unbiased std, a = 1/(s + eps):
/// `dx = a·(dx̂ − mean(dx̂)) + dμ/d + c·(ds − a²·Σ dx̂·c) / ((d − 1)·s)`.
#[inline(always)]
fn uln_bwd_body<I: Isa>(x: &[f32], g: &[f32], dx: &mut [f32], d: usize, eps: f32) {
    let mut c = vec![0f32; d];
    for ((xr, gr), dxr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d + 2))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, std) = mean_std::<I>(xr);
        let a = 1.0 / (std + eps);
        for j in 0..d {
            c[j] = xr[j] - mean;
        }
        let dxn = &gr[..d];
        let (dmu, dstd) = (gr[d], gr[d + 1]);
        let mean_dxn = sum(dxn) / d as f32;
        let k = if std > 0.0 {
            (dstd - a * a * dot::<I>(dxn, &c)) / ((d as f32 - 1.0) * std)
        } else {
            0.0
        };
        let base = dmu / d as f32 - a * mean_dxn;
        for j in 0..d {
            dxr[j] = I::madd(a, dxn[j], I::madd(c[j], k, base));
        }
    }
}

impl CustomOp1 for UnbiasedLayerNormOp {
    fn name(&self) -> &'static str {
        "fused-unbiased-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let mut dims = l.dims().to_vec();
        let d = *dims.last().unwrap_or(&0);
        let rows = x.len() / d.max(1);
        let mut out = vec![0f32; rows * (d + 2)];
        let br = block_rows(d);
        out.par_chunks_mut(br * (d + 2))
            .zip(x.par_chunks(br * d))
            .for_each(|(o, xc)| uln_fwd_rows(xc, o, d, self.eps));
        if let Some(last) = dims.last_mut() {
            *last = d + 2;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = x.dim(D::Minus1)?;
        let dx = with_host(x, self.name(), |x| {
            with_host(g, self.name(), |g| {
                let mut dx = vec![0f32; x.len()];
                let br = block_rows(d);
                dx.par_chunks_mut(br * d)
                    .zip(x.par_chunks(br * d).zip(g.par_chunks(br * (d + 2))))
                    .for_each(|(dxc, (xc, gc))| uln_bwd_rows(xc, gc, dxc, d, self.eps));
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
