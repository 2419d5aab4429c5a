//! Softmax cross-entropy over a wide last dimension (the vocabulary, the concepts), and the
//! distillation KL between two softmaxes, fused with their backward on the CPU: the forward
//! reads each row of logits once (max, then Σ exp) and keeps one log-sum-exp per row; the
//! backward writes `∂L/∂z` in one pass. No `[N, V]` log-probabilities are ever materialised.
use std::sync::{Mutex, MutexGuard};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::fused::{contiguous, contiguous_f32, use_fused, with_host, with_host_u32};
use crate::simd::{dispatch, exp, max, sum, Isa};

/// Rows and width of `[.., V]`: every leading dim is a row, so `[B, T, V]` logits go in as
/// they are (a reshape to `[B·T, V]` would be one more graph node, whose backward zero-fills
/// and adds a whole `[N, V]` gradient).
fn rows(dims: &[usize], what: &str) -> candle_core::Result<(usize, usize)> {
    match dims {
        [lead @ .., v] if !lead.is_empty() => Ok((lead.iter().product(), *v)),
        dims => candle_core::bail!("{what}: shape {dims:?} has no rows (rank ≥ 2 needed)"),
    }
}

/// Mean over rows `n` and label columns `k` of `−log softmax(z_n)[targets[n, k]]`.
/// `logits [.., V]` (f32 on the CPU for the fused kernel), `targets [.., K]` integer ids with
/// the same rows (`[N, V]` and `[N, K]`, or `[B, T, V]` and `[B, T, K]`).
pub fn softmax_cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    rows(logits.dims(), "cross-entropy logits")?;
    rows(targets.dims(), "cross-entropy targets")?;
    let lead = |t: &Tensor| t.dims()[..t.rank() - 1].to_vec();
    if lead(logits) != lead(targets) {
        candle_core::bail!(
            "cross-entropy: logits {:?} but targets {:?} (the same rows needed)",
            logits.dims(),
            targets.dims()
        )
    }
    if use_fused(&[logits]) && targets.device().is_cpu() {
        return logits.contiguous()?.apply_op2(
            &targets.to_dtype(DType::U32)?.contiguous()?,
            SoftmaxXent {
                lse: Saved::default(),
            },
        );
    }
    softmax_cross_entropy_composed(logits, targets)
}

/// The same from Candle ops (other devices; test reference).
pub fn softmax_cross_entropy_composed(
    logits: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    let ((_, v), (_, k)) = (
        rows(logits.dims(), "cross-entropy")?,
        rows(targets.dims(), "cross-entropy")?,
    );
    // Half-precision logits are scored in f32; f64 stays f64 (finite-difference references).
    let logits = match logits.dtype() {
        DType::F64 => logits.reshape(((), v))?,
        _ => logits.to_dtype(DType::F32)?.reshape(((), v))?,
    };
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = targets.to_dtype(DType::U32)?.reshape(((), k))?;
    let picked = logp.gather(&targets.contiguous()?, 1)?; // [N, K]
    picked.mean_all()?.neg()
}

struct SoftmaxXent {
    /// log Σ exp of each row, written by the forward for the backward.
    lse: Saved,
}

/// What a forward keeps for its backward (the row log-sum-exps).
#[derive(Default)]
struct Saved(Mutex<Vec<f32>>);

impl Saved {
    fn put(&self, v: Vec<f32>) -> candle_core::Result<()> {
        *self.get()? = v;
        Ok(())
    }

    fn get(&self) -> candle_core::Result<MutexGuard<'_, Vec<f32>>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("saved log-sum-exps: poisoned lock".into()))
    }
}

/// Rows per parallel task (fixed: the loss sum order never depends on scheduling).
fn block_rows(v: usize) -> usize {
    (65_536 / v.max(1)).max(1)
}

/// `log Σ exp(inv·x)` of one row (`inv > 0`), one accumulator per lane (fixed order).
#[inline(always)]
fn lse_scaled<I: Isa>(x: &[f32], inv: f32) -> f32 {
    let m = max(x) * inv;
    m + map_sum(x, |v| exp::<I>(v * inv - m)).ln()
}

/// `Σ f(x)` over a row, through a stack block: `f` runs in a plain map loop that LLVM
/// vectorises over whole registers (it does not when `f` shares a loop body with the lane
/// accumulators), then the block is summed lane by lane (fixed order).
#[inline(always)]
fn map_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    map2_sum(x, x, |a, _| f(a))
}

/// `Σ f(a, b)` over two rows of the same length, as [`map_sum`].
#[inline(always)]
fn map2_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const BLOCK: usize = 256;
    let mut buf = [0f32; BLOCK];
    let mut s = 0f32;
    for (ac, bc) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let out = &mut buf[..ac.len()];
        for ((o, &x), &y) in out.iter_mut().zip(ac).zip(bc) {
            *o = f(x, y);
        }
        s += sum(out);
    }
    s
}

dispatch!(fn lse_rows(z: &[f32], v: usize, lse: &mut [f32]) = lse_body);

#[inline(always)]
fn lse_body<I: Isa>(z: &[f32], v: usize, lse: &mut [f32]) {
    for (zr, out) in z.chunks_exact(v).zip(lse.iter_mut()) {
        *out = lse_scaled::<I>(zr, 1.0);
    }
}

dispatch!(fn grad_rows(z: &[f32], v: usize, lse: &[f32], scale: f32, dz: &mut [f32]) = grad_body);

/// `dz = scale·K·softmax(z)` per row (the caller subtracts `scale` at each target).
#[inline(always)]
fn grad_body<I: Isa>(z: &[f32], v: usize, lse: &[f32], scale: f32, dz: &mut [f32]) {
    for ((zr, dr), &l) in z.chunks_exact(v).zip(dz.chunks_exact_mut(v)).zip(lse) {
        for j in 0..v {
            dr[j] = scale * exp::<I>(zr[j] - l);
        }
    }
}

impl CustomOp2 for SoftmaxXent {
    fn name(&self) -> &'static str {
        "fused-softmax-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = contiguous_f32(zs, zl, self.name())?;
        let t = contiguous::<u32>(ts, tl, self.name())?;
        let ((n, v), (_, k)) = (rows(zl.dims(), self.name())?, rows(tl.dims(), self.name())?);
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= v) {
            candle_core::bail!("cross-entropy: target id {bad} is outside the {v} classes")
        }
        let mut lse = vec![0f32; n];
        let br = block_rows(v);
        let sums: Vec<f64> = lse
            .par_chunks_mut(br)
            .zip(z.par_chunks(br * v).zip(t.par_chunks(br * k.max(1))))
            .map(|(lc, (zc, tc))| {
                lse_rows(zc, v, lc);
                let mut s = 0f64;
                for (r, &l) in lc.iter().enumerate() {
                    for &ti in &tc[r * k..(r + 1) * k] {
                        s += (l - zc[r * v + ti as usize]) as f64;
                    }
                }
                s
            })
            .collect();
        let loss = sums.iter().sum::<f64>() / (n * k).max(1) as f64;
        self.lse.put(lse)?;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = rows(z.dims(), self.name())?;
        let (_, k) = rows(t.dims(), self.name())?;
        let g = g.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let scale = g / (n * k).max(1) as f32;
        let lse = self.lse.get()?;
        let dz = with_host(z, self.name(), |z| {
            with_host_u32(t, self.name(), |t| {
                let mut dz = vec![0f32; n * v];
                let br = block_rows(v);
                dz.par_chunks_mut(br * v)
                    .zip(z.par_chunks(br * v).zip(lse.par_chunks(br)))
                    .zip(t.par_chunks(br * k.max(1)))
                    .for_each(|((dc, (zc, lc)), tc)| {
                        grad_rows(zc, v, lc, scale * k as f32, dc);
                        for (r, row) in tc.chunks(k.max(1)).enumerate() {
                            for &ti in row {
                                dc[r * v + ti as usize] -= scale;
                            }
                        }
                    });
                dz
            })
        })??;
        Ok((Some(Tensor::from_vec(dz, z.shape(), z.device())?), None))
    }
}

/// Mean over rows of KL(softmax(t/τ) ‖ softmax(s/τ)): knowledge distillation's term, the
/// teacher `t` getting no gradient. `student`, `teacher [.., V]` of one shape (f32 on the CPU
/// for the fused kernel, which keeps two log-sum-exps per row and writes `∂/∂s` in one pass).
pub fn softmax_kl(student: &Tensor, teacher: &Tensor, tau: f64) -> candle_core::Result<Tensor> {
    rows(student.dims(), "distillation KL")?;
    if student.dims() != teacher.dims() {
        candle_core::bail!(
            "distillation KL: student logits {:?} but teacher logits {:?}",
            student.dims(),
            teacher.dims()
        )
    }
    if !(tau > 0.0 && tau.is_finite()) {
        candle_core::bail!("distillation KL: temperature {tau} must be positive")
    }
    let teacher = teacher.detach();
    if use_fused(&[student, &teacher]) {
        return student.contiguous()?.apply_op2(
            &teacher.contiguous()?,
            SoftKl {
                inv: (1.0 / tau) as f32,
                lse: Saved::default(),
            },
        );
    }
    softmax_kl_composed(student, &teacher, tau)
}

/// The same from Candle ops (other devices and dtypes; test reference).
pub fn softmax_kl_composed(
    student: &Tensor,
    teacher: &Tensor,
    tau: f64,
) -> candle_core::Result<Tensor> {
    let scaled = |x: &Tensor| -> candle_core::Result<Tensor> {
        match x.dtype() {
            DType::F64 => x / tau,
            _ => x.to_dtype(DType::F32)? / tau,
        }
    };
    let ls = candle_nn::ops::log_softmax(&scaled(student)?, D::Minus1)?;
    let lt = candle_nn::ops::log_softmax(&scaled(&teacher.detach())?, D::Minus1)?;
    (lt.exp()? * (lt - ls)?)?.sum(D::Minus1)?.mean_all()
}

struct SoftKl {
    /// 1 / τ.
    inv: f32,
    /// The student's and the teacher's log-sum-exp of each row, interleaved.
    lse: Saved,
}

dispatch!(fn kl_rows(s: &[f32], t: &[f32], v: usize, inv: f32, lse: &mut [f32]) -> f64 = kl_body);

/// Σ over the rows of KL(p_t ‖ p_s), writing each row's two log-sum-exps.
#[inline(always)]
fn kl_body<I: Isa>(s: &[f32], t: &[f32], v: usize, inv: f32, lse: &mut [f32]) -> f64 {
    let mut total = 0f64;
    for ((sr, tr), out) in s
        .chunks_exact(v)
        .zip(t.chunks_exact(v))
        .zip(lse.chunks_exact_mut(2))
    {
        let (ls, lt) = (lse_scaled::<I>(sr, inv), lse_scaled::<I>(tr, inv));
        // p_t · (log p_t − log p_s)
        let row = map2_sum(sr, tr, |sj, tj| {
            let log_pt = tj * inv - lt;
            exp::<I>(log_pt) * (log_pt - (sj * inv - ls))
        });
        total += row as f64;
        out[0] = ls;
        out[1] = lt;
    }
    total
}

dispatch!(fn kl_grad_rows(s: &[f32], t: &[f32], v: usize, inv: f32, lse: &[f32], scale: f32, ds: &mut [f32]) = kl_grad_body);

/// `ds = scale·(p_s − p_t)` per row.
#[inline(always)]
fn kl_grad_body<I: Isa>(
    s: &[f32],
    t: &[f32],
    v: usize,
    inv: f32,
    lse: &[f32],
    scale: f32,
    ds: &mut [f32],
) {
    for (((sr, tr), dr), l) in s
        .chunks_exact(v)
        .zip(t.chunks_exact(v))
        .zip(ds.chunks_exact_mut(v))
        .zip(lse.chunks_exact(2))
    {
        for j in 0..v {
            dr[j] = scale * (exp::<I>(sr[j] * inv - l[0]) - exp::<I>(tr[j] * inv - l[1]));
        }
    }
}

impl CustomOp2 for SoftKl {
    fn name(&self) -> &'static str {
        "fused-softmax-kl"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = contiguous_f32(ss, sl, self.name())?;
        let t = contiguous_f32(ts, tl, self.name())?;
        let (n, v) = rows(sl.dims(), self.name())?;
        let mut lse = vec![0f32; 2 * n];
        let br = block_rows(v);
        let sums: Vec<f64> = lse
            .par_chunks_mut(2 * br)
            .zip(s.par_chunks(br * v).zip(t.par_chunks(br * v)))
            .map(|(lc, (sc, tc))| kl_rows(sc, tc, v, self.inv, lc))
            .collect();
        let loss = sums.iter().sum::<f64>() / n.max(1) as f64;
        self.lse.put(lse)?;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        s: &Tensor,
        t: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = rows(s.dims(), self.name())?;
        let g = g.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let scale = g * self.inv / n.max(1) as f32;
        let lse = self.lse.get()?;
        let ds = with_host(s, self.name(), |s| {
            with_host(t, self.name(), |t| {
                let mut ds = vec![0f32; n * v];
                let br = block_rows(v);
                ds.par_chunks_mut(br * v)
                    .zip(s.par_chunks(br * v).zip(t.par_chunks(br * v)))
                    .zip(lse.par_chunks(2 * br))
                    .for_each(|((dc, (sc, tc)), lc)| {
                        kl_grad_rows(sc, tc, v, self.inv, lc, scale, dc)
                    });
                ds
            })
        })??;
        Ok((Some(Tensor::from_vec(ds, s.shape(), s.device())?), None))
    }
}
