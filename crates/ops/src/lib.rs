//! Tensor ops shared by the cocomix model and SAE crates, each with a correct backward
//! pass (Candle's fused LayerNorm and `softmax_last_dim` silently cut the graph), fused CPU
//! kernels with their own backward for the hot paths of training (linear layers as one graph
//! node, causal flash attention with in-kernel dropout, LayerNorm, bias + GELU, softmax
//! cross-entropy, AdamW), and a top-k that is fast on CPU and works on GPUs for rows of
//! 32768.
//!
//! Every fused op falls back to the same computation composed from Candle ops on other
//! devices and dtypes (see [`fused`]); the tests compare the two.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[0.1f32, 3.0, -1.0, 3.0]], &Device::Cpu)?;
//! let (idx, val) = cocomix_ops::topk(&x, 2)?;
//! assert_eq!(idx.to_vec2::<u32>()?, vec![vec![1, 3]]); // ties: lower index first
//! # Ok::<(), cocomix_ops::Error>(())
//! ```
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

pub mod adamw;
mod attention;
mod bias;
mod compress;
mod cuda;
mod dropout;
pub mod fused;
mod gelu;
mod layer_norm;
mod linear;
mod simd;
mod steer;
mod xent;

pub use attention::{
    causal_attention, causal_attention_composed, causal_attention_qkv, causal_mask, softmax_last,
};
pub use bias::{add_dropout, bias_add};
pub use compress::{compress_kept, compress_kept_composed};
pub use dropout::{dropout, DropoutKey};
pub use gelu::{bias_gelu, bias_gelu_composed};
pub use layer_norm::{
    layer_norm_composed, unbiased_layer_norm, unbiased_layer_norm_composed, LayerNorm,
};
pub use linear::{linear, linear_composed, linear_in, WeightLayout};
pub use simd::has_avx2_fma;
pub use steer::{apply_steer, Steer, SteerMode};
pub use xent::{
    softmax_cross_entropy, softmax_cross_entropy_composed, softmax_kl, softmax_kl_composed,
};

/// Errors of the ops crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of the ops crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes named tensors to a safetensors file through a temporary name and a rename, with
/// `meta` plus `format = pt` (which Hugging Face `transformers` requires) as metadata.
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    meta: &[(&str, String)],
    path: &std::path::Path,
) -> Result<()> {
    let mut info: std::collections::HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    info.entry("format".into()).or_insert_with(|| "pt".into());
    // Candle's `Tensor` implements safetensors' `View` (device tensors are copied to the host).
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n, t)), Some(info))
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader (or a resumed run) never sees a half-written file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let err = |e: &dyn std::fmt::Display| Error::Invalid(format!("{}: {e}", path.display()));
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| err(&e))?;
    tmp.write_all(bytes).map_err(|e| err(&e))?;
    tmp.persist(path).map_err(|e| err(&e.error))?;
    Ok(())
}

/// Mean next-token cross-entropy of `logits [.., V]` against `targets [..]` (integer ids,
/// the logits' leading shape: `[N, V]` and `[N]`, or `[B, T, V]` and `[B, T]`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    softmax_cross_entropy(logits, &targets.unsqueeze(targets.rank())?)
}

/// `x @ w` for a frozen `w`: the backward pass gives `x` its gradient and computes no
/// gradient for `w` (Candle's matmul backward always computes both).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let y = x.detach().broadcast_matmul(w)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2_arc(
        &y,
        std::sync::Arc::new(Box::new(InputGradOnly { w: w.clone() })),
    )
}

/// Forward: returns its second argument (the product, computed outside the graph).
/// Backward: `∂x = ∂y · wᵀ`, nothing for `w`.
struct InputGradOnly {
    w: Tensor,
}

fn copy_contiguous<S: Clone>(s: &S, l: &Layout, name: &str) -> candle_core::Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("{name}: product must be a fresh contiguous tensor")
    }
    Ok((s.clone(), l.shape().clone()))
}

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "input-grad-only-matmul"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        copy_contiguous(y, ly, self.name())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        ly: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if !ly.is_contiguous() || ly.start_offset() != 0 {
            candle_core::bail!("{}: product must be a fresh contiguous tensor", self.name())
        }
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        y: &candle_core::MetalStorage,
        ly: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if !ly.is_contiguous() || ly.start_offset() != 0 {
            candle_core::bail!("{}: product must be a fresh contiguous tensor", self.name())
        }
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.broadcast_matmul(&self.w.t()?)?), None))
    }
}

/// Top-k of each row of a `[N, C]` tensor: `(indices [N, k] u32, values [N, k])`, each row
/// sorted by value, descending. Ties are broken towards the **lower index**, so the result
/// is deterministic; NaN ranks below every number.
///
/// On CPU each row is scanned once against the best k so far (a quickselect for k > 64). On
/// other devices a two-stage select runs with tensor ops on rows of ≤ 4096 columns, as
/// Candle's GPU sort fails on wide rows; both stages keep the same tie rule.
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    if x.device().is_cpu() {
        topk_cpu(x, k)
    } else {
        topk_two_stage(x, k)
    }
}

fn check_k(c: usize, k: usize) -> Result<()> {
    if k == 0 || k > c {
        return Err(Error::Invalid(format!("top-k: k = {k} must be in 1..={c}")));
    }
    Ok(())
}

fn rank_desc(a: (f32, u32), b: (f32, u32)) -> std::cmp::Ordering {
    // Larger value first, NaN last, then lower index first.
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    key(b.0).total_cmp(&key(a.0)).then(a.1.cmp(&b.1))
}

fn topk_cpu(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (n, c) = x.dims2()?;
    check_k(c, k)?;
    let (mut ids, mut vals) = (vec![0u32; n * k], vec![0f32; n * k]);
    fused::with_host(&x.to_dtype(DType::F32)?, "top-k", |data| {
        data.par_chunks(c)
            .zip(ids.par_chunks_mut(k).zip(vals.par_chunks_mut(k)))
            .for_each(|(row, (ri, rv))| {
                let best = if k <= STREAM_K {
                    top_stream(row, k)
                } else {
                    top_select(row, k)
                };
                for (j, (v, i)) in best.into_iter().enumerate() {
                    (ri[j], rv[j]) = (i, v);
                }
            })
    })?;
    let ids = Tensor::from_vec(ids, (n, k), x.device())?;
    let vals = Tensor::from_vec(vals, (n, k), x.device())?.to_dtype(x.dtype())?;
    Ok((ids, vals))
}

/// Up to this k a row is scanned once against a sorted list of the best k so far (the
/// CoCoMix sizes, k ≤ 32 of thousands: a compare per element, a few dozen insertions);
/// beyond it, a quickselect.
const STREAM_K: usize = 64;

/// The `k` best `(value, index)` of a row in rank order, in one pass. The rank is a total
/// order, so the set is the quickselect's exactly.
fn top_stream(row: &[f32], k: usize) -> Vec<(f32, u32)> {
    // `rank_desc`'s order of values (NaN lowest, -0 below +0) as one integer compare.
    let key = |v: f32| {
        let b = if v.is_nan() { f32::NEG_INFINITY } else { v }.to_bits() as i32;
        b ^ (((b >> 31) as u32) >> 1) as i32
    };
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        let kv = key(v);
        // Indices only grow: a value equal to the current k-th ranks below it.
        if best.len() == k && kv <= key(best[k - 1].0) {
            continue;
        }
        let at = best.partition_point(|&(b, _)| key(b) >= kv);
        best.insert(at, (v, i as u32));
        best.truncate(k);
    }
    best
}

/// [`top_stream`] for large `k`: quickselect (O(C)), then a sort of the kept `k`.
fn top_select(row: &[f32], k: usize) -> Vec<(f32, u32)> {
    let mut idx: Vec<(f32, u32)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (v, i as u32))
        .collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |a, b| rank_desc(*a, *b));
        idx.truncate(k);
    }
    idx.sort_unstable_by(|a, b| rank_desc(*a, *b));
    idx
}

const CHUNK: usize = 4096;

/// The device-agnostic top-k [`topk`] uses off the CPU (public so tests can compare it with
/// the CPU path): per-chunk sort on rows of ≤ 4096, then an exact selection of candidates.
pub fn topk_two_stage(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (n, c) = x.dims2()?;
    check_k(c, k)?;
    // Stage 1 keeps the k best of each 4096-wide chunk with Candle's sort (which works on
    // rows this narrow on every backend); the union of those holds the row's top k. Stage 2
    // ranks the k·chunks candidates with the exact tie rule. The selected values are always
    // exact; the indices can differ from the CPU rule only when more than k equal values
    // straddle the cut inside one chunk.
    let x = x.to_dtype(DType::F32)?;
    let chunks = c.div_ceil(CHUNK);
    let padded = chunks * CHUNK;
    let xp = if padded > c {
        let pad = Tensor::full(f32::NEG_INFINITY, (n, padded - c), x.device())?;
        Tensor::cat(&[&x, &pad], 1)?
    } else {
        x.clone()
    };
    let xc = xp.reshape((n * chunks, CHUNK))?;
    let kk = k.min(CHUNK);
    let order = xc
        .arg_sort_last_dim(false)?
        .narrow(1, 0, kk)?
        .contiguous()?; // [n·chunks, kk]
    let base: Vec<u32> = (0..n * chunks)
        .map(|r| ((r % chunks) * CHUNK) as u32)
        .collect();
    let base = Tensor::from_vec(base, (n * chunks, 1), x.device())?;
    let cand_idx = order.broadcast_add(&base)?.reshape((n, chunks * kk))?;
    let cand_val = xc.gather(&order, 1)?.reshape((n, chunks * kk))?;
    // Final selection on the few candidates per row, on the host, with the exact tie rule.
    let idx: Vec<Vec<u32>> = cand_idx.to_vec2()?;
    let val: Vec<Vec<f32>> = cand_val.to_vec2()?;
    let (mut ids, mut vals) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
    for (ri, rv) in idx.into_iter().zip(val) {
        let mut pairs: Vec<(f32, u32)> = rv
            .into_iter()
            .zip(ri)
            .filter(|p| (p.1 as usize) < c)
            .collect();
        pairs.sort_unstable_by(|a, b| rank_desc(*a, *b));
        pairs.truncate(k);
        ids.extend(pairs.iter().map(|p| p.1));
        vals.extend(pairs.iter().map(|p| p.0));
    }
    let ids = Tensor::from_vec(ids, (n, k), x.device())?;
    let vals = Tensor::from_vec(vals, (n, k), x.device())?;
    Ok((ids, vals))
}

/// CoCoMix's concept loss (the reference release's loss, docs/design.md): the mean over the `K_attr` label columns of the
/// softmax cross-entropy of the full concept logits, averaged over all `B·T` positions.
/// `concept_logits [B, T, C]`, `labels [B, T, K_attr]` (integer ids).
pub fn concept_loss(concept_logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let ((b, t, _), (bl, tl, _)) = (concept_logits.dims3()?, labels.dims3()?);
    if (b, t) != (bl, tl) {
        return Err(Error::Invalid(format!(
            "concept loss: logits for [{b}, {t}] positions, labels for [{bl}, {tl}]"
        )));
    }
    Ok(softmax_cross_entropy(concept_logits, labels)?)
}

/// Distillation term KL(p_teacher^τ ‖ p_student^τ), mean over every position given.
/// Logits are `[B, T, V]` over the same vocabulary; the teacher gets no gradient.
pub fn kd_kl(student_logits: &Tensor, teacher_logits: &Tensor, tau: f64) -> Result<Tensor> {
    student_logits.dims3()?;
    Ok(softmax_kl(student_logits, teacher_logits, tau)?)
}
