//! A linear layer `y = x·W (+ b)` as one graph node on the CPU.
//!
//! Composed from Candle ops a projection is four to six graph nodes (reshape in, a weight
//! transpose, the matmul, reshape out, the bias), and Candle's backward accumulates the
//! gradient of every node into a fresh zero tensor with a separate add
//! (`GradStore::or_insert`): per layer about `2·N·out + N·in` floats zeroed and added that
//! PyTorch never touches, and for a tied head or the concept predictor a `[V, d]` or
//! `[C, d]` transpose gradient on top. As one node, the forward is one gemm into a buffer
//! that starts as the bias rows; the backward is two products (Candle's matmul) and the
//! bias's fixed-order column sums, and a frozen weight (a teacher's) gets no gradient.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::bias::{bias_add, column_sums};
use crate::fused::{contiguous_f32, use_fused, with_host};

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`: GPT-2's `Conv1D`.
    InOut,
    /// `[out, in]`: `nn.Linear`, and a tied head's token embedding `[V, d]`.
    OutIn,
}

impl WeightLayout {
    /// `(in, out)` of a weight of dims `dims`.
    fn in_out(self, dims: &[usize]) -> candle_core::Result<(usize, usize)> {
        let &[a, b] = dims else {
            candle_core::bail!("linear: weight of shape {dims:?}, not a matrix")
        };
        Ok(match self {
            WeightLayout::InOut => (a, b),
            WeightLayout::OutIn => (b, a),
        })
    }

    /// The weight as an `[in, out]` view.
    fn as_in_out(self, w: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            WeightLayout::InOut => Ok(w.clone()),
            WeightLayout::OutIn => w.t(),
        }
    }
}

/// `x [.., in] → [.., out]`: `x·W + b` (f32 CPU tensors: one fused graph node; otherwise
/// composed from Candle ops, [`linear_composed`]).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    layout: WeightLayout,
) -> candle_core::Result<Tensor> {
    let mut ts = vec![x, w];
    ts.extend(b);
    if !use_fused(&ts) {
        return linear_composed(x, w, b, layout);
    }
    out_dims(x, w, b, layout)?;
    let op = Linear(layout);
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// [`linear`] with the product in `compute` precision (bf16 or f16 autocast: casts of `x`
/// and `W`), always an f32 result, the bias added in f32; plain [`linear`] when all is f32.
pub fn linear_in(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    layout: WeightLayout,
    compute: DType,
) -> candle_core::Result<Tensor> {
    if compute == DType::F32 && w.dtype() == DType::F32 && x.dtype() == DType::F32 {
        return linear(x, w, b, layout);
    }
    let y =
        linear(&x.to_dtype(compute)?, &w.to_dtype(compute)?, None, layout)?.to_dtype(DType::F32)?;
    match b {
        Some(b) => bias_add(&y, b),
        None => Ok(y),
    }
}

/// [`linear`] from Candle ops: the reference of the tests and the path of GPU and
/// low-precision tensors. A weight outside the graph gets no gradient here either.
pub fn linear_composed(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    layout: WeightLayout,
) -> candle_core::Result<Tensor> {
    let dims = out_dims(x, w, b, layout)?;
    let (d_in, _) = layout.in_out(w.dims())?;
    let x2 = x.reshape(((), d_in))?; // [N, in]
    let w = layout.as_in_out(w)?;
    let y = if w.track_op() {
        x2.matmul(&w)?
    } else {
        crate::frozen_matmul(&x2, &w)?
    }; // [N, out]
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(dims)
}

/// The output dims of `x·W (+ b)`, checking that `x`'s last dim is the weight's input and
/// that the bias is `[out]`.
fn out_dims(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    layout: WeightLayout,
) -> candle_core::Result<Vec<usize>> {
    let (d_in, d_out) = layout.in_out(w.dims())?;
    if let Some(b) = b.filter(|b| b.dims() != [d_out]) {
        candle_core::bail!("linear: bias of shape {:?} for {d_out} outputs", b.dims())
    }
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == d_in => *last = d_out,
        _ => candle_core::bail!(
            "linear: input of shape {:?} for a weight of {d_in} inputs",
            x.dims()
        ),
    }
    Ok(dims)
}

/// `c[m×n] (row stride ldc) = [c +] beta·a·b`, `a` and `b` given by row and column strides;
/// `parallel` spreads one product over rayon's threads (gemm splits the output, never the
/// inner dimension, so the result does not depend on the thread count).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    c: &mut [f32],
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    accumulate: bool,
    beta: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // The bounds checks make the raw-pointer call below safe.
    assert!((m - 1) * ldc + n <= c.len(), "gemm: dst out of bounds");
    assert!(
        (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "gemm: lhs out of bounds"
    );
    assert!(
        (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "gemm: rhs out of bounds"
    );
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index gemm touches is inside the slices (checked above); dst does not
    // alias the inputs (it is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

struct Linear(WeightLayout);

impl Linear {
    const NAME: &'static str = "fused-linear";

    fn fwd(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, Self::NAME)?;
        let w = contiguous_f32(ws, wl, Self::NAME)?;
        let (d_in, d_out) = self.0.in_out(wl.dims())?;
        let n: usize = xl.dims().iter().rev().skip(1).product(); // rows
        let mut y = vec![0f32; n * d_out]; // [N, out]
        if let Some((bs, bl)) = bias {
            let b = contiguous_f32(bs, bl, Self::NAME)?;
            if b.len() != d_out {
                candle_core::bail!("{}: bias of {} for {d_out} outputs", Self::NAME, b.len())
            }
            if d_out > 0 {
                y.par_chunks_mut(d_out).for_each(|r| r.copy_from_slice(b));
            }
        }
        // Strides of W read as [in, out].
        let w_strides = match self.0 {
            WeightLayout::InOut => (d_out, 1),
            WeightLayout::OutIn => (1, d_in),
        };
        let acc = bias.is_some();
        mm(
            &mut y,
            d_out,
            (n, d_out, d_in),
            x,
            (d_in, 1),
            w,
            w_strides,
            acc,
            1.0,
            true,
        );
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = d_out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// `(∂x, ∂W, ∂b)` from `g = ∂y`; `None` for a tensor outside the graph.
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (d_in, d_out) = self.0.in_out(w.dims())?;
        let g2 = g.contiguous()?.reshape(((), d_out))?; // [N, out]
        let x2 = x.detach().reshape(((), d_in))?; // [N, in]
        let wd = w.detach();
        let dx = match x.track_op() {
            // ∂x = g·Wᵀ: W [in, out] read transposed, or W [out, in] as it is.
            true => Some(g2.matmul(&self.0.as_in_out(&wd)?.t()?)?.reshape(x.dims())?),
            false => None,
        };
        let dw = match (w.track_op(), self.0) {
            (false, _) => None,
            (true, WeightLayout::InOut) => Some(x2.t()?.matmul(&g2)?), // [in, out]
            (true, WeightLayout::OutIn) => Some(g2.t()?.matmul(&x2)?), // [out, in]
        };
        let db = match b {
            Some(b) if b.track_op() => {
                let s = with_host(&g2, Self::NAME, |g| column_sums(g, d_out))?;
                Some(Tensor::from_vec(s, d_out, b.device())?)
            }
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, None, g)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        Self::NAME
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
        self.fwd((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, Some(b), g)
    }
}
