//! The two elementwise steps around every projection, fused on the CPU: `x + b` (the bias of
//! a linear layer, whose gradient is a column sum that Candle computes with a slow strided
//! reduction) and the residual `x + dropout(y)` (one pass instead of a mask, a product and a
//! sum). Both run on rayon; Candle's own elementwise pool spins a thread of its own.
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::dropout::{rows_per_task, DropoutKey};
use crate::fused::{bias_rows_fwd, contiguous_f32, use_fused, with_host};
use crate::simd::{dispatch, Isa};

/// `x + b` with `b` broadcast over the last dimension of `x`.
pub fn bias_add(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if use_fused(&[x, b]) {
        return x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd);
    }
    x.broadcast_add(b)
}

/// Column sums of `g [rows, d]` in fixed row blocks, added in block order.
pub(crate) fn column_sums(g: &[f32], d: usize) -> Vec<f32> {
    let rows = rows_per_task(d);
    let parts: Vec<Vec<f32>> = g
        .par_chunks(rows * d)
        .map(|c| {
            let mut s = vec![0f32; d];
            add_rows(c, &mut s);
            s
        })
        .collect();
    let mut out = vec![0f32; d];
    for p in &parts {
        add_rows(p, &mut out);
    }
    out
}

dispatch!(fn add_rows(x: &[f32], acc: &mut [f32]) = add_rows_body);

/// `acc += Σ rows of x` (rows of `acc.len()`).
#[inline(always)]
fn add_rows_body<I: Isa>(x: &[f32], acc: &mut [f32]) {
    let d = acc.len();
    for r in x.chunks_exact(d) {
        for j in 0..d {
            acc[j] += r[j];
        }
    }
}

struct BiasAdd;

dispatch!(fn bias_rows(x: &[f32], b: &[f32], y: &mut [f32]) = bias_rows_body);

#[inline(always)]
fn bias_rows_body<I: Isa>(x: &[f32], b: &[f32], y: &mut [f32]) {
    let d = b.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        for j in 0..d {
            yr[j] = xr[j] + b[j];
        }
    }
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bias_rows_fwd(self.name(), (xs, xl), (bs, bl), rows_per_task, bias_rows)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = b.elem_count();
        let db = with_host(g, self.name(), |g| column_sums(g, d))?;
        Ok((
            Some(g.clone()),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// The residual step `x + dropout(y)` (plain `x + y` without a key).
pub fn add_dropout(x: &Tensor, y: &Tensor, key: Option<DropoutKey>) -> candle_core::Result<Tensor> {
    let key = key.filter(|k| k.p > 0.0).map(|k| k.for_shape(y.dims()));
    if use_fused(&[x, y]) && x.dims() == y.dims() {
        return x.contiguous()?.apply_op2(&y.contiguous()?, AddDropout(key));
    }
    match key {
        Some(k) => x + crate::dropout::dropout(y, k)?,
        None => x + y,
    }
}

struct AddDropout(Option<DropoutKey>);

dispatch!(fn add_dropout_rows(x: &[f32], y: &[f32], out: &mut [f32], cols: usize, row0: usize, key: &Option<DropoutKey>) = add_dropout_body);

#[inline(always)]
fn add_dropout_body<I: Isa>(
    x: &[f32],
    y: &[f32],
    out: &mut [f32],
    cols: usize,
    row0: usize,
    key: &Option<DropoutKey>,
) {
    for (r, ((xr, yr), or)) in x
        .chunks(cols)
        .zip(y.chunks(cols))
        .zip(out.chunks_mut(cols))
        .enumerate()
    {
        match key {
            Some(k) => {
                let m = k.row((row0 + r) as u64);
                for (j, o) in or.iter_mut().enumerate() {
                    *o = I::madd(yr[j], m.at(j as u32), xr[j]);
                }
            }
            None => {
                for (j, o) in or.iter_mut().enumerate() {
                    *o = xr[j] + yr[j];
                }
            }
        }
    }
}

impl CustomOp2 for AddDropout {
    fn name(&self) -> &'static str {
        "fused-add-dropout"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, self.name())?;
        let y = contiguous_f32(ys, yl, self.name())?;
        let cols = xl.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        let rows = rows_per_task(cols);
        out.par_chunks_mut(rows * cols)
            .zip(x.par_chunks(rows * cols).zip(y.par_chunks(rows * cols)))
            .enumerate()
            .for_each(|(i, (o, (xc, yc)))| add_dropout_rows(xc, yc, o, cols, i * rows, &self.0));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = match self.0 {
            Some(k) => crate::dropout::dropout(g, k)?,
            None => g.clone(),
        };
        Ok((Some(g.clone()), Some(gy)))
    }
}
