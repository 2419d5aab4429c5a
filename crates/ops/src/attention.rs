//! Causal self-attention, flash-style on the CPU (Dao et al. 2022; FlashAttention-2's
//! loop order): tiles of queries and keys, an online softmax, and only the output and one
//! log-sum-exp per query kept for the backward pass, which recomputes each tile's scores.
//! No `[S, S]` tensor exists at any time. Attention dropout draws its mask from the
//! counter-based [`DropoutKey`] inside the kernel and redraws it in the backward pass.
//!
//! Two entry points share the kernel: [`causal_attention`] takes `q [B, H, Sq, hd]`,
//! `k`, `v` `[B, H_kv, Skv, hd]` (grouped-query attention when `H_kv < H`; any strides with a
//! contiguous last dimension, so transposed views cost no copy) and [`causal_attention_qkv`]
//! reads GPT-2's packed `c_attn` output `[B, S, 3·H·hd]` directly and returns `[B, S, H·hd]`,
//! so neither direction copies heads in or out. Tile products go through `gemm` (single
//! threaded per tile; the tiles run in parallel), elementwise work through dispatched SIMD.
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use crate::dropout::{DropoutKey, RowMask};
use crate::fused::use_fused;
use crate::linear::mm;
use crate::simd::{dispatch, dot_rows, exp, Isa};

/// Query rows per tile.
const BR: usize = 64;
/// Keys per tile.
const BC: usize = 64;

/// Softmax over the last dimension from primitives (Candle's fused one has no backward).
/// The max is detached: softmax does not depend on it.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Additive causal mask `[q, kv]`: query `i` (absolute position `offset + i`) sees keys
/// `0..=offset + i`; the rest get −∞.
pub fn causal_mask(
    q: usize,
    kv: usize,
    offset: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    // Built on the device from two index ranges: a GPU step would otherwise upload a
    // [q, kv] host mask per layer.
    let i = Tensor::arange(offset as u32, (offset + q) as u32, device)?.reshape((q, 1))?;
    let j = Tensor::arange(0u32, kv as u32, device)?.reshape((1, kv))?;
    let zero = Tensor::zeros((q, kv), candle_core::DType::F32, device)?;
    let minus_inf = Tensor::full(f32::NEG_INFINITY, (q, kv), device)?;
    j.broadcast_le(&i)?.where_cond(&zero, &minus_inf)
}

/// `softmax(q·kᵀ·scale + causal) · v` with optional attention dropout.
///
/// `q [B, H, Sq, hd]`, `k`, `v` `[B, H_kv, Skv, hd]` with `H_kv` dividing `H` and `Sq ≤ Skv`:
/// the queries are the last `Sq` positions (query `i` sees keys `0..=Skv − Sq + i`, as with a
/// KV cache). Returns `[B, H, Sq, hd]`. The dropout mask of `(b, h, i, j)` is row
/// `(b·H + h)·Sq + i`, column `j` of `dropout`'s mask (`b` counted from its batch offset).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    dropout: Option<DropoutKey>,
) -> candle_core::Result<Tensor> {
    let dims = Dims::of(q, k, v, scale)?;
    let dropout = dropout.map(|d| d.rows_per_item(dims.h * dims.sq));
    if use_fused(&[q, k, v]) {
        let op = AttentionOp {
            dims,
            dropout,
            lse: Mutex::new(Vec::new()),
        };
        return q.apply_op3_arc(k, v, std::sync::Arc::new(Box::new(op)));
    }
    causal_attention_composed(q, k, v, scale, dropout)
}

/// The same from Candle ops, materialising `[B, H, Sq, Skv]` (other devices; test
/// reference). Draws the identical dropout mask.
pub fn causal_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    dropout: Option<DropoutKey>,
) -> candle_core::Result<Tensor> {
    let dims = Dims::of(q, k, v, scale)?;
    let dropout = dropout.map(|d| d.rows_per_item(dims.h * dims.sq));
    let rep = dims.h / dims.hkv;
    let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
        if rep == 1 {
            return t.contiguous();
        }
        t.unsqueeze(2)?
            .expand((dims.b, dims.hkv, rep, dims.skv, dims.hd))?
            .reshape((dims.b, dims.h, dims.skv, dims.hd))
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let att = q.contiguous()?.matmul(&k.t()?)?; // [B, H, Sq, Skv]
    let offset = dims.skv - dims.sq;
    let mut att = match crate::cuda::causal_softmax(&att, offset, scale as f32)? {
        Some(p) => p,
        None => {
            let mask = causal_mask(dims.sq, dims.skv, offset, q.device())?;
            softmax_last(&(&att * scale)?.broadcast_add(&mask.to_dtype(att.dtype())?)?)?
        }
    };
    if let Some(key) = dropout {
        att = crate::dropout::dropout(&att, key)?;
    }
    att.matmul(&v)
}

/// GPT-2's attention on the packed projections: `qkv [B, S, 3·d]` (queries, keys, values,
/// each `n_head` heads of `d / n_head`) → `[B, S, d]`, causal over the `S` positions.
pub fn causal_attention_qkv(
    qkv: &Tensor,
    n_head: usize,
    scale: f64,
    dropout: Option<DropoutKey>,
) -> candle_core::Result<Tensor> {
    let (b, s, d3) = qkv.dims3()?;
    if d3 % (3 * n_head) != 0 {
        candle_core::bail!("attention: width {d3} is not 3 × {n_head} heads")
    }
    let (d, hd) = (d3 / 3, d3 / 3 / n_head);
    let dropout = dropout.map(|k| k.rows_per_item(n_head * s));
    if use_fused(&[qkv]) {
        let dims = Dims {
            b,
            h: n_head,
            hkv: n_head,
            sq: s,
            skv: s,
            hd,
            scale: scale as f32,
        };
        return qkv
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(PackedOp {
                dims,
                dropout,
                lse: Mutex::new(Vec::new()),
            })));
    }
    let heads = |i: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(2, i * d, d)?
            .reshape((b, s, n_head, hd))?
            .transpose(1, 2)
    }; // [B, H, S, hd]
    causal_attention_composed(&heads(0)?, &heads(1)?, &heads(2)?, scale, dropout)?
        .transpose(1, 2)?
        .reshape((b, s, d))
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    sq: usize,
    skv: usize,
    hd: usize,
    scale: f32,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Self> {
        let (b, h, sq, hd) = q.dims4()?;
        let (bk, hkv, skv, hdk) = k.dims4()?;
        if k.dims() != v.dims() || bk != b || hdk != hd || hkv == 0 || h % hkv != 0 || sq > skv {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} (need k = v = [B, H_kv, Skv, hd], H_kv | H, Sq ≤ Skv)",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        Ok(Self {
            b,
            h,
            hkv,
            sq,
            skv,
            hd,
            scale: scale as f32,
        })
    }

    /// Position of query 0 among the keys.
    fn offset(&self) -> usize {
        self.skv - self.sq
    }

    /// Query heads per key/value head.
    fn rep(&self) -> usize {
        self.h / self.hkv
    }
}

/// Element offsets of a `[B, H, S, hd]` view with a contiguous last dimension.
#[derive(Clone, Copy, Debug)]
struct View {
    off: usize,
    sb: usize,
    sh: usize,
    ss: usize,
}

impl View {
    fn at(&self, b: usize, h: usize, s: usize) -> usize {
        self.off + b * self.sb + h * self.sh + s * self.ss
    }

    /// The view of a rank-4 layout `[B, H, S, hd]`.
    fn of4(l: &Layout, name: &str) -> candle_core::Result<Self> {
        let st = l.stride();
        if st.len() != 4 || (st[3] != 1 && l.dims()[3] > 1) {
            candle_core::bail!("{name}: the head dimension must be contiguous, strides {st:?}")
        }
        Ok(Self {
            off: l.start_offset(),
            sb: st[0],
            sh: st[1],
            ss: st[2],
        })
    }

    /// Part `part` (0 = q, 1 = k, 2 = v) of a packed `[B, S, 3·H·hd]` layout.
    fn packed(l: &Layout, part: usize, h: usize, hd: usize) -> Self {
        let st = l.stride();
        Self {
            off: l.start_offset() + part * h * hd,
            sb: st[0],
            sh: hd,
            ss: st[1],
        }
    }

    /// A `[B, S, H·hd]` layout (the packed op's output and its gradient) as heads.
    fn merged(l: &Layout, hd: usize) -> Self {
        let st = l.stride();
        Self {
            off: l.start_offset(),
            sb: st[0],
            sh: hd,
            ss: st[1],
        }
    }
}

/// Columns of key tile `j0` that query `i` (absolute position `pos`) sees.
fn visible(pos: usize, j0: usize, cols: usize) -> usize {
    (pos + 1).saturating_sub(j0).min(cols)
}

dispatch!(fn online_softmax(s: &mut [f32], o: &mut [f32], m: &mut [f32], l: &mut [f32], rows: usize, cols: usize, hd: usize, pos0: usize, j0: usize, masks: &[Option<RowMask>]) = online_softmax_body);

/// One key tile of the forward pass: turns scores `s [rows, BC]` into (dropped) weights,
/// updates the running max `m` and sum `l`, and rescales the output rows `o [rows, hd]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn online_softmax_body<I: Isa>(
    s: &mut [f32],
    o: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    rows: usize,
    cols: usize,
    hd: usize,
    pos0: usize,
    j0: usize,
    masks: &[Option<RowMask>],
) {
    for r in 0..rows {
        let sr = &mut s[r * BC..r * BC + cols];
        let valid = visible(pos0 + r, j0, cols);
        if valid == 0 {
            sr.fill(0.0);
            continue;
        }
        let mnew = crate::simd::max(&sr[..valid]).max(m[r]);
        let corr = if m[r] == f32::NEG_INFINITY {
            0.0
        } else {
            exp::<I>(m[r] - mnew)
        };
        let sum = exp_sum::<I>(&mut sr[..valid], mnew);
        sr[valid..].fill(0.0);
        l[r] = l[r] * corr + sum;
        m[r] = mnew;
        if let Some(mask) = &masks[r] {
            mask.apply(&mut sr[..valid], j0);
        }
        for x in o[r * hd..(r + 1) * hd].iter_mut() {
            *x *= corr;
        }
    }
}

/// `x ← exp(x − m)` in place; returns `Σ x` (one accumulator per lane).
#[inline(always)]
fn exp_sum<I: Isa>(x: &mut [f32], m: f32) -> f32 {
    // A plain map loop, then the sum: LLVM vectorises `exp` over whole registers this way,
    // not when it shares a loop body with the lane accumulators.
    for v in x.iter_mut() {
        *v = exp::<I>(*v - m);
    }
    crate::simd::sum(x)
}

/// The forward pass of query rows `i0..i0 + rows` of head `h` of batch `b`: writes their
/// outputs `o [rows, hd]` and log-sum-exps.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    (q, qv): (&[f32], View),
    (k, kv): (&[f32], View),
    (v, vv): (&[f32], View),
    dims: &Dims,
    dropout: Option<&DropoutKey>,
    (b, h, i0): (usize, usize, usize),
    o: &mut [f32],
    lse: &mut [f32],
) {
    let rows = lse.len();
    let hd = dims.hd;
    let hk = h / dims.rep();
    let pos0 = dims.offset() + i0;
    let kend = (pos0 + rows).min(dims.skv);
    let masks: Vec<Option<RowMask>> = (0..rows)
        .map(|r| dropout.map(|d| d.row(((b * dims.h + h) * dims.sq + i0 + r) as u64)))
        .collect();
    let mut s = vec![0f32; BR * BC];
    let (mut m, mut l) = ([f32::NEG_INFINITY; BR], [0f32; BR]);
    o.fill(0.0);
    let qa = &q[qv.at(b, h, i0)..];
    for j0 in (0..kend).step_by(BC) {
        let cols = BC.min(kend - j0);
        // s = scale · Q Kᵀ (K read transposed through its strides)
        mm(
            &mut s,
            BC,
            (rows, cols, hd),
            qa,
            (qv.ss, 1),
            &k[kv.at(b, hk, j0)..],
            (1, kv.ss),
            false,
            dims.scale,
            false,
        );
        online_softmax(&mut s, o, &mut m, &mut l, rows, cols, hd, pos0, j0, &masks);
        // o += P V
        mm(
            o,
            hd,
            (rows, hd, cols),
            &s,
            (BC, 1),
            &v[vv.at(b, hk, j0)..],
            (vv.ss, 1),
            true,
            1.0,
            false,
        );
    }
    for r in 0..rows {
        let inv = 1.0 / l[r];
        for x in o[r * hd..(r + 1) * hd].iter_mut() {
            *x *= inv;
        }
        lse[r] = m[r] + l[r].ln();
    }
}

/// Forward over all heads: `o [B, H, Sq, hd]` (contiguous) and `lse [B, H, Sq]`.
fn forward(
    q: (&[f32], View),
    k: (&[f32], View),
    v: (&[f32], View),
    dims: &Dims,
    dropout: Option<&DropoutKey>,
) -> (Vec<f32>, Vec<f32>) {
    let (hd, sq) = (dims.hd, dims.sq);
    let mut o = vec![0f32; dims.b * dims.h * sq * hd];
    let mut lse = vec![0f32; dims.b * dims.h * sq];
    o.par_chunks_mut(sq * hd)
        .zip(lse.par_chunks_mut(sq))
        .enumerate()
        .for_each(|(bh, (oh, lh))| {
            let (b, h) = (bh / dims.h, bh % dims.h);
            oh.par_chunks_mut(BR * hd)
                .zip(lh.par_chunks_mut(BR))
                .enumerate()
                .for_each(|(t, (ot, lt))| {
                    forward_tile(q, k, v, dims, dropout, (b, h, t * BR), ot, lt)
                });
        });
    (o, lse)
}

dispatch!(fn softmax_grad(s: &[f32], dp: &mut [f32], pd: &mut [f32], rows: usize, cols: usize, pos0: usize, j0: usize, lse: &[f32], dd: &[f32], masks: &[Option<RowMask>]) = softmax_grad_body);

/// One tile of the backward pass. In: scores `s`, `dp = dO·Vᵀ` (`[rows, BC]`). Out: `pd` =
/// P ⊙ Z (the dropped weights, for `dV += Pdᵀ dO`) and `dp` = dS = P ⊙ (dP ⊙ Z − D).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn softmax_grad_body<I: Isa>(
    s: &[f32],
    dp: &mut [f32],
    pd: &mut [f32],
    rows: usize,
    cols: usize,
    pos0: usize,
    j0: usize,
    lse: &[f32],
    dd: &[f32],
    masks: &[Option<RowMask>],
) {
    let mut z = [1f32; BC];
    for r in 0..rows {
        let valid = visible(pos0 + r, j0, cols);
        if let Some(mask) = &masks[r] {
            mask.fill(&mut z[..valid], j0);
        }
        let sr = &s[r * BC..r * BC + valid];
        let pr = &mut pd[r * BC..(r + 1) * BC];
        let dr = &mut dp[r * BC..(r + 1) * BC];
        let (l, d) = (lse[r], dd[r]);
        for c in 0..valid {
            let p = exp::<I>(sr[c] - l);
            pr[c] = p * z[c];
            dr[c] = p * I::madd(dr[c], z[c], -d);
        }
        pr[valid..cols].fill(0.0);
        dr[valid..cols].fill(0.0);
    }
}

/// Gradients of one key/value head group of batch `b`: `dq [rep, Sq, hd]`, `dk`, `dv`
/// `[Skv, hd]` (all zero on entry).
#[allow(clippy::too_many_arguments)]
fn backward_group(
    (q, qv): (&[f32], View),
    (k, kv): (&[f32], View),
    (v, vv): (&[f32], View),
    (o, ov): (&[f32], View),
    (go, gv): (&[f32], View),
    lse_all: &[f32],
    dims: &Dims,
    dropout: Option<&DropoutKey>,
    (b, g): (usize, usize),
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (hd, sq, skv) = (dims.hd, dims.sq, dims.skv);
    let offset = dims.offset();
    let mut s = vec![0f32; BR * BC];
    let mut dp = vec![0f32; BR * BC];
    let mut pd = vec![0f32; BR * BC];
    for hr in 0..dims.rep() {
        let h = g * dims.rep() + hr;
        let lse = &lse_all[(b * dims.h + h) * sq..(b * dims.h + h + 1) * sq];
        // D_i = dO_i · O_i
        let dd: Vec<f32> = (0..sq)
            .map(|i| {
                let (a, c) = (gv.at(b, h, i), ov.at(b, h, i));
                dot_rows(&go[a..a + hd], &o[c..c + hd])
            })
            .collect();
        let masks: Vec<Option<RowMask>> = (0..sq)
            .map(|i| dropout.map(|d| d.row(((b * dims.h + h) * sq + i) as u64)))
            .collect();
        let dqh = &mut dq[hr * sq * hd..(hr + 1) * sq * hd];
        for j0 in (0..skv).step_by(BC) {
            let cols = BC.min(skv - j0);
            let first = j0.saturating_sub(offset) / BR * BR;
            for i0 in (first..sq).step_by(BR) {
                let rows = BR.min(sq - i0);
                let (qa, ga) = (&q[qv.at(b, h, i0)..], &go[gv.at(b, h, i0)..]);
                let (ka, va) = (&k[kv.at(b, g, j0)..], &v[vv.at(b, g, j0)..]);
                mm(
                    &mut s,
                    BC,
                    (rows, cols, hd),
                    qa,
                    (qv.ss, 1),
                    ka,
                    (1, kv.ss),
                    false,
                    dims.scale,
                    false,
                );
                mm(
                    &mut dp,
                    BC,
                    (rows, cols, hd),
                    ga,
                    (gv.ss, 1),
                    va,
                    (1, vv.ss),
                    false,
                    1.0,
                    false,
                );
                softmax_grad(
                    &s,
                    &mut dp,
                    &mut pd,
                    rows,
                    cols,
                    offset + i0,
                    j0,
                    &lse[i0..i0 + rows],
                    &dd[i0..i0 + rows],
                    &masks[i0..i0 + rows],
                );
                let dvj = &mut dv[j0 * hd..];
                mm(
                    dvj,
                    hd,
                    (cols, hd, rows),
                    &pd,
                    (1, BC),
                    ga,
                    (gv.ss, 1),
                    true,
                    1.0,
                    false,
                );
                let dqi = &mut dqh[i0 * hd..];
                mm(
                    dqi,
                    hd,
                    (rows, hd, cols),
                    &dp,
                    (BC, 1),
                    ka,
                    (kv.ss, 1),
                    true,
                    dims.scale,
                    false,
                );
                let dkj = &mut dk[j0 * hd..];
                mm(
                    dkj,
                    hd,
                    (cols, hd, rows),
                    &dp,
                    (1, BC),
                    qa,
                    (qv.ss, 1),
                    true,
                    dims.scale,
                    false,
                );
            }
        }
    }
}

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Backward over all heads: `dq [B, H, Sq, hd]`, `dk`, `dv` `[B, H_kv, Skv, hd]` (contiguous).
#[allow(clippy::too_many_arguments)]
fn backward(
    q: (&[f32], View),
    k: (&[f32], View),
    v: (&[f32], View),
    o: (&[f32], View),
    go: (&[f32], View),
    lse: &[f32],
    dims: &Dims,
    dropout: Option<&DropoutKey>,
) -> Grads {
    let (hd, sq, skv, rep) = (dims.hd, dims.sq, dims.skv, dims.rep());
    let mut dq = vec![0f32; dims.b * dims.h * sq * hd];
    let mut dk = vec![0f32; dims.b * dims.hkv * skv * hd];
    let mut dv = vec![0f32; dims.b * dims.hkv * skv * hd];
    dq.par_chunks_mut(rep * sq * hd)
        .zip(dk.par_chunks_mut(skv * hd).zip(dv.par_chunks_mut(skv * hd)))
        .enumerate()
        .for_each(|(bg, (dqg, (dkg, dvg)))| {
            let (b, g) = (bg / dims.hkv, bg % dims.hkv);
            backward_group(q, k, v, o, go, lse, dims, dropout, (b, g), (dqg, dkg, dvg));
        });
    (dq, dk, dv)
}

/// The f32 elements and layout of a CPU tensor, strides kept.
fn host<'a>(s: &'a Storage, name: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(cs) => cs.as_slice::<f32>(),
        _ => candle_core::bail!("{name}: the fused kernel runs on CPU tensors only"),
    }
}

fn lse_of(lse: &Mutex<Vec<f32>>) -> candle_core::Result<std::sync::MutexGuard<'_, Vec<f32>>> {
    lse.lock()
        .map_err(|_| candle_core::Error::Msg("attention: poisoned lock".into()))
}

struct AttentionOp {
    dims: Dims,
    dropout: Option<DropoutKey>,
    lse: Mutex<Vec<f32>>,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (o, lse) = forward(
            (qs.as_slice::<f32>()?, View::of4(ql, n)?),
            (ks.as_slice::<f32>()?, View::of4(kl, n)?),
            (vs.as_slice::<f32>()?, View::of4(vl, n)?),
            &self.dims,
            self.dropout.as_ref(),
        );
        *lse_of(&self.lse)? = lse;
        Ok((CpuStorage::F32(o), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.name();
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (dq, dk, dv) = backward(
            (host(&qs, n)?, View::of4(ql, n)?),
            (host(&ks, n)?, View::of4(kl, n)?),
            (host(&vs, n)?, View::of4(vl, n)?),
            (host(&os, n)?, View::of4(ol, n)?),
            (host(&gs, n)?, View::of4(gl, n)?),
            &lse_of(&self.lse)?,
            &self.dims,
            self.dropout.as_ref(),
        );
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

struct PackedOp {
    dims: Dims,
    dropout: Option<DropoutKey>,
    lse: Mutex<Vec<f32>>,
}

/// `[B, H, S, hd]` (contiguous) → `[B, S, H·hd]` rows at `dst` with row stride `ld` and
/// column offset `col`.
fn merge_heads(src: &[f32], dims: &Dims, dst: &mut [f32], ld: usize, col: usize) {
    let (h, s, hd) = (dims.h, dims.sq, dims.hd);
    dst.par_chunks_mut(ld).enumerate().for_each(|(bs, row)| {
        let (b, i) = (bs / s, bs % s);
        for hh in 0..h {
            let from = ((b * h + hh) * s + i) * hd;
            row[col + hh * hd..col + (hh + 1) * hd].copy_from_slice(&src[from..from + hd]);
        }
    });
}

impl CustomOp1 for PackedOp {
    fn name(&self) -> &'static str {
        "fused-causal-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = s.as_slice::<f32>()?;
        let d = &self.dims;
        let (h, hd) = (d.h, d.hd);
        let (o, lse) = forward(
            (x, View::packed(l, 0, h, hd)),
            (x, View::packed(l, 1, h, hd)),
            (x, View::packed(l, 2, h, hd)),
            d,
            self.dropout.as_ref(),
        );
        *lse_of(&self.lse)? = lse;
        let mut y = vec![0f32; d.b * d.sq * h * hd];
        merge_heads(&o, d, &mut y, h * hd, 0);
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.sq, h * hd))))
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = self.name();
        let d = &self.dims;
        let (h, hd) = (d.h, d.hd);
        let g = g.to_dtype(DType::F32)?;
        let (xs, xl) = qkv.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let x = host(&xs, n)?;
        if gl.stride().last() != Some(&1) || yl.stride().last() != Some(&1) {
            candle_core::bail!("{n}: gradient rows must be contiguous")
        }
        let (dq, dk, dv) = backward(
            (x, View::packed(xl, 0, h, hd)),
            (x, View::packed(xl, 1, h, hd)),
            (x, View::packed(xl, 2, h, hd)),
            (host(&ys, n)?, View::merged(yl, hd)),
            (host(&gs, n)?, View::merged(gl, hd)),
            &lse_of(&self.lse)?,
            d,
            self.dropout.as_ref(),
        );
        let mut dx = vec![0f32; d.b * d.sq * 3 * h * hd];
        for (i, part) in [dq, dk, dv].iter().enumerate() {
            merge_heads(part, d, &mut dx, 3 * h * hd, i * h * hd);
        }
        Ok(Some(Tensor::from_vec(dx, qkv.shape(), qkv.device())?))
    }
}
