//! CoCoMix's compress layer on the kept concept logits only, as one graph node on the CPU:
//! `c[n] = Σ_j z[n, i_nj] · W[:, i_nj]` for the `K_c` indices `i_n` of row `n`, the value of
//! `W·(mask ⊙ z)` with the reference release's dense top-k mask in O(N·K_c·d).
//!
//! Composed from Candle ops (a gather of the kept logits, an `index_select` of `W`'s columns,
//! a transpose copy, a broadcast product and a sum) it leaves an `[N, K_c, d]` tensor and its
//! gradient in the graph, and Candle zero-fills and adds each node's gradient; fused, the
//! forward reads `W`'s kept columns as rows of one transposed copy `Wᵀ [C, d]`, and the
//! backward writes `∂z` at the kept entries and `∂W` in one pass each.
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{contiguous, contiguous_f32, use_fused, with_host, with_host_u32};
use crate::simd::{dispatch, dot_rows, Isa};

/// `Σ_j z[n, idx[n, j]] · w[:, idx[n, j]]` for `z [.., C]` with `N` rows, `idx [N, K]` (any
/// integer dtype) and `w [d, C]` (`nn.Linear(C, d)`'s weight): `[N, d]`. Gradients reach the
/// kept logits and the kept columns only. A repeated index counts once per occurrence.
pub fn compress_kept(z: &Tensor, idx: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k, c, d) = dims(z, idx, w)?;
    // Empty shapes take the composed path (the kernels' chunk sizes would be 0).
    if use_fused(&[z, w]) && n * k * c * d > 0 {
        return z.contiguous()?.apply_op3(
            &idx.to_dtype(DType::U32)?.contiguous()?,
            &w.contiguous()?,
            CompressKept {
                n,
                k,
                c,
                wt: Mutex::new(Vec::new()),
            },
        );
    }
    compress_kept_composed(z, idx, w)
}

/// The same from Candle ops (other devices and dtypes; test reference).
pub fn compress_kept_composed(z: &Tensor, idx: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k, _, d) = dims(z, idx, w)?;
    // z [.., C] with N rows is read where it is (a reshape would add an [N, C] node).
    let mut kept = z.dims().to_vec();
    if let Some(last) = kept.last_mut() {
        *last = k;
    }
    let vals = z
        .gather(&idx.reshape(kept)?, z.rank() - 1)?
        .reshape((n, k))?; // [N, K]
    let cols = w.index_select(&idx.flatten_all()?, 1)?; // [d, N·K]
    let cols = cols.t()?.reshape((n, k, d))?; // [N, K, d]
    vals.unsqueeze(2)?.broadcast_mul(&cols)?.sum(1)
}

/// `(N, K, C, d)`, checking that `z` has `N` rows of `C` and `w` is `[d, C]`.
fn dims(z: &Tensor, idx: &Tensor, w: &Tensor) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (n, k) = idx.dims2()?;
    let (d, c) = w.dims2()?;
    if z.dims().last() != Some(&c) || z.elem_count() != n * c {
        candle_core::bail!(
            "compress: logits {:?} for {n} rows of indices and a weight {:?}",
            z.dims(),
            w.dims()
        )
    }
    Ok((n, k, c, d))
}

struct CompressKept {
    n: usize,
    k: usize,
    c: usize,
    /// `Wᵀ [C, d]` from the forward pass, for the backward's `∂z` (taken by the first).
    wt: Mutex<Vec<f32>>,
}

const NAME: &str = "fused-compress-kept";

/// Rows per parallel task.
const ROWS: usize = 64;
/// Concepts per task of the weight gradient (each task scans all the indices).
const CONCEPTS: usize = 512;

/// `Wᵀ` of a row-major `[d, C]` matrix, in parallel over blocks of its columns.
fn transpose(w: &[f32], d: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    t.par_chunks_mut(ROWS * d).enumerate().for_each(|(b, tc)| {
        let i0 = b * ROWS;
        for (r, row) in tc.chunks_exact_mut(d).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = w[j * c + i0 + r];
            }
        }
    });
    t
}

/// Index `i` as a checked `usize` below `c`.
fn index(i: u32, c: usize) -> candle_core::Result<usize> {
    let i = i as usize;
    if i >= c {
        candle_core::bail!("{NAME}: concept index {i} out of range for {c} concepts")
    }
    Ok(i)
}

dispatch!(fn axpy(a: f32, x: &[f32], y: &mut [f32]) = axpy_body);

/// `y += a·x`
#[inline(always)]
fn axpy_body<I: Isa>(a: f32, x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = I::madd(a, v, *o);
    }
}

impl CustomOp3 for CompressKept {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        is: &CpuStorage,
        il: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k, c) = (self.n, self.k, self.c);
        let z = contiguous_f32(zs, zl, NAME)?;
        let w = contiguous_f32(ws, wl, NAME)?;
        let d = w.len() / c.max(1);
        let idx = contiguous::<u32>(is, il, NAME)?;
        let wt = transpose(w, d, c); // [C, d]
        let mut out = vec![0f32; n * d];
        out.par_chunks_mut(ROWS * d).enumerate().try_for_each(
            |(b, oc)| -> candle_core::Result<()> {
                for (r, row) in oc.chunks_exact_mut(d).enumerate() {
                    let i = b * ROWS + r;
                    for &j in &idx[i * k..(i + 1) * k] {
                        let j = index(j, c)?;
                        axpy(z[i * c + j], &wt[j * d..(j + 1) * d], row);
                    }
                }
                Ok(())
            },
        )?;
        *self.wt.lock().map_err(|_| poisoned())? = wt;
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }

    fn bwd(
        &self,
        z: &Tensor,
        idx: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k, c) = (self.n, self.k, self.c);
        let d = w.dim(0)?;
        // The forward's copy, freed here; a second backward over the same graph rebuilds it.
        let mut wt = std::mem::take(&mut *self.wt.lock().map_err(|_| poisoned())?);
        if wt.len() != c * d {
            wt = with_host(w, NAME, |w| transpose(w, d, c))?;
        }
        let want_dw = w.track_op();
        let (dz, dw) = with_host(g, NAME, |g| {
            with_host_u32(idx, NAME, |idx| {
                with_host(z, NAME, |z| -> candle_core::Result<_> {
                    // ∂z[n, i] = ⟨g[n], W[:, i]⟩ at the kept entries, 0 elsewhere.
                    let dz = z_grad(g, idx, &wt, (n, k, c, d))?;
                    // ∂Wᵀ[i] = Σ over kept (n, i) of z[n, i]·g[n]: each task owns a block of
                    // concepts and scans all rows in order, so the sums' order is fixed.
                    if !want_dw {
                        return Ok((dz, None));
                    }
                    let mut dwt = vec![0f32; c * d];
                    dwt.par_chunks_mut(CONCEPTS * d)
                        .enumerate()
                        .for_each(|(b, dc)| {
                            let lo = b * CONCEPTS;
                            let hi = lo + dc.len() / d.max(1);
                            for (p, &i) in idx.iter().enumerate() {
                                let i = i as usize;
                                if (lo..hi).contains(&i) {
                                    let r = p / k;
                                    let row = &mut dc[(i - lo) * d..(i - lo + 1) * d];
                                    axpy(z[r * c + i], &g[r * d..(r + 1) * d], row);
                                }
                            }
                        });
                    Ok((dz, Some(transpose(&dwt, c, d))))
                })
            })
        })????;
        let dz = Tensor::from_vec(dz, z.shape(), z.device())?;
        let dw = dw
            .map(|dw| Tensor::from_vec(dw, w.shape(), w.device()))
            .transpose()?;
        Ok((Some(dz), None, dw))
    }
}

/// `∂z [N, C]`: zero but at the kept entries.
fn z_grad(
    g: &[f32],
    idx: &[u32],
    wt: &[f32],
    (n, k, c, d): (usize, usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    let mut dz = vec![0f32; n * c];
    dz.par_chunks_mut(ROWS * c)
        .enumerate()
        .try_for_each(|(b, zc)| -> candle_core::Result<()> {
            for (r, row) in zc.chunks_exact_mut(c).enumerate() {
                let i = b * ROWS + r;
                for &j in &idx[i * k..(i + 1) * k] {
                    let j = index(j, c)?;
                    row[j] += dot_rows(&g[i * d..(i + 1) * d], &wt[j * d..(j + 1) * d]);
                }
            }
            Ok(())
        })?;
    Ok(dz)
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg(format!("{NAME}: poisoned lock"))
}
