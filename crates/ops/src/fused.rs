//! When the fused CPU kernels run, and the host-memory plumbing they share.
//!
//! A fused op runs when its inputs are f32 on the CPU and fused kernels are enabled;
//! otherwise (CUDA, Metal, other dtypes) the same function composes Candle ops, which is
//! also the reference the tests compare the kernels with. `COCOMIX_FUSED=0` in the
//! environment turns the kernels off for a process (before/after benchmarks);
//! [`with_fused`] overrides that on the current thread (tests).
use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

thread_local! {
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether fused kernels are on for this thread (default: on unless `COCOMIX_FUSED=0`).
pub fn fused_enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    OVERRIDE.with(|o| o.get()).unwrap_or_else(|| {
        *ENV.get_or_init(|| std::env::var("COCOMIX_FUSED").map_or(true, |v| v != "0"))
    })
}

/// Runs `f` with fused kernels switched on or off on this thread (the ops record which
/// kernel they used, so the backward pass follows the forward's choice).
pub fn with_fused<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(on))));
    f()
}

/// Whether the fused CPU kernel should handle these tensors.
pub(crate) fn use_fused(ts: &[&Tensor]) -> bool {
    fused_enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The elements of a contiguous CPU storage of dtype `T`.
pub(crate) fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{name}: input must be contiguous"),
    }
}

/// The f32 elements of a contiguous CPU storage.
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<&'a [f32]> {
    contiguous(s, l, name)
}

/// The forward of a row-wise op on `x [.., d]` with a bias `b [d]` (the op `name`): `f(x, b,
/// y)` on blocks of `rows(d)` whole rows in parallel, into a new output of `x`'s shape.
pub(crate) fn bias_rows_fwd(
    name: &str,
    (xs, xl): (&CpuStorage, &Layout),
    (bs, bl): (&CpuStorage, &Layout),
    rows: impl Fn(usize) -> usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(xs, xl, name)?;
    let b = contiguous_f32(bs, bl, name)?;
    let d = b.len();
    if xl.dims().last() != Some(&d) {
        candle_core::bail!("{name}: x {:?}, bias {d}", xl.dims())
    }
    let mut y = vec![0f32; x.len()];
    let n = rows(d) * d;
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(yc, xc)| f(xc, b, yc));
    Ok((CpuStorage::F32(y), xl.shape().clone()))
}

/// Runs `f` on the f32 elements of a CPU tensor (copied to contiguous first if needed).
pub(crate) fn with_host<R>(
    t: &Tensor,
    name: &str,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cs) => Ok(f(contiguous_f32(cs, l, name)?)),
        _ => candle_core::bail!("{name}: the fused kernel runs on CPU tensors only"),
    }
}

/// `with_host` for the u32 view of an integer CPU tensor (converted when needed).
pub(crate) fn with_host_u32<R>(
    t: &Tensor,
    name: &str,
    f: impl FnOnce(&[u32]) -> R,
) -> candle_core::Result<R> {
    let t = t.to_dtype(DType::U32)?.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cs) => Ok(f(contiguous::<u32>(cs, l, name)?)),
        _ => candle_core::bail!("{name}: the fused kernel runs on CPU tensors only"),
    }
}
