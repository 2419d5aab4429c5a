//! Counter-based dropout: the mask of an element is a hash of (seed, call site, row,
//! column), so a kernel can draw it anywhere (inside the fused attention, in parallel, in
//! any order) and recompute it in the backward pass instead of storing it.
//!
//! A model's forward numbers its dropout call sites in order (`call`), and the trainer's
//! seed already mixes (run seed, step, micro-batch); the row is the flattened index over
//! all but the last dimension (for attention: batch, head, query), the column the last index
//! (for attention: the key). A run and its resumption therefore draw identical masks.
//!
//! Dimension 0 holds the batch rows. A key made [`DropoutKey::with_batch_offset`]`(r0)`
//! counts them from `r0`: a data-parallel rank holding rows `r0..` of a global batch draws
//! exactly the masks those rows get in the whole batch.
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// One dropout call site: `p` and the 64-bit key of (seed, call).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutKey {
    /// Drop probability in [0, 1).
    pub p: f32,
    key: u64,
    /// Global index of the first batch row (dimension 0).
    batch0: u64,
    /// `batch0` in flattened rows, set by [`DropoutKey::rows_per_item`] from the shape.
    row0: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Chris Wellons' `lowbias32` integer hash (32-bit multiplies vectorise on AVX2).
#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

impl DropoutKey {
    /// The key of dropout call number `call` of a forward pass seeded with `seed`.
    pub fn new(seed: u64, call: u64, p: f64) -> Self {
        Self {
            p: p as f32,
            key: splitmix64(seed ^ splitmix64(call)),
            batch0: 0,
            row0: 0,
        }
    }

    /// The same key with the batch rows (dimension 0) counted from `batch0`.
    pub fn with_batch_offset(mut self, batch0: u64) -> Self {
        self.batch0 = batch0;
        self.row0 = 0;
        self
    }

    /// Resolves the batch offset for a tensor whose batch rows span `n` flattened rows each
    /// (the product of the dimensions between the first and the last). Idempotent.
    pub(crate) fn rows_per_item(mut self, n: usize) -> Self {
        self.row0 = self.batch0 * n as u64;
        self
    }

    /// [`DropoutKey::rows_per_item`] for a tensor of shape `dims`.
    pub(crate) fn for_shape(self, dims: &[usize]) -> Self {
        let n = match dims {
            [_, mid @ .., _] => mid.iter().product(),
            _ => 1,
        };
        self.rows_per_item(n)
    }

    /// Per-row state: the row's two 32-bit hash keys and the drop threshold.
    #[inline(always)]
    pub(crate) fn row(&self, row: u64) -> RowMask {
        let row = self.row0 + row;
        let k = splitmix64(self.key ^ row.wrapping_mul(0xD129_0A5B_3C31_4F6B));
        RowMask {
            lo: k as u32,
            hi: (k >> 32) as u32,
            threshold: self.threshold(),
            scale: self.scale(),
        }
    }

    /// What a device kernel needs to draw the masks: the key, the first row's number, the
    /// threshold and the scale of a kept element.
    #[cfg(feature = "cuda")]
    fn device_params(&self) -> (u64, u64, u32, f32) {
        (self.key, self.row0, self.threshold(), self.scale())
    }

    /// 1/(1−p), the multiplier of a kept element.
    fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// An element is kept when its 32-bit hash is at least this.
    fn threshold(&self) -> u32 {
        (self.p as f64 * 4_294_967_296.0) as u32
    }

    /// The `[rows, cols]` multiplier mask (0 or 1/(1−p)) as host values (rows counted from
    /// the resolved batch offset).
    pub fn mask(&self, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(r, o)| self.row(r as u64).fill(o, 0));
        out
    }
}

/// The dropout mask of one row.
#[derive(Clone, Copy)]
pub(crate) struct RowMask {
    lo: u32,
    hi: u32,
    threshold: u32,
    /// 1/(1−p).
    pub scale: f32,
}

impl RowMask {
    /// The multiplier (0 or 1/(1−p)) of column `col`.
    #[inline(always)]
    pub fn at(&self, col: u32) -> f32 {
        let h = lowbias32(lowbias32(col ^ self.lo).wrapping_add(self.hi));
        if h >= self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// Writes the multipliers of columns `start..start + out.len()`.
    #[inline(always)]
    pub fn fill(&self, out: &mut [f32], start: usize) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.at((start + j) as u32);
        }
    }

    /// Multiplies columns `start..start + x.len()` by their multipliers.
    #[inline(always)]
    pub fn apply(&self, x: &mut [f32], start: usize) {
        for (j, v) in x.iter_mut().enumerate() {
            *v *= self.at((start + j) as u32);
        }
    }
}

/// `x ⊙ mask`, with the mask of `key` over `x` viewed as `[rows, last dim]`. The backward
/// pass applies the same mask to the gradient (recomputed, never stored).
pub fn dropout(x: &Tensor, key: DropoutKey) -> candle_core::Result<Tensor> {
    if key.p == 0.0 {
        return Ok(x.clone());
    }
    let key = key.for_shape(x.dims());
    if crate::fused::use_fused(&[x]) || crate::cuda::has_kernels(x) {
        return x.contiguous()?.apply_op1(DropoutOp(key));
    }
    let cols = x.dims().last().copied().unwrap_or(1);
    let mask = Tensor::from_vec(
        key.mask(x.elem_count() / cols.max(1), cols),
        x.shape(),
        x.device(),
    )?;
    x.mul(&mask.to_dtype(x.dtype())?)
}

struct DropoutOp(DropoutKey);

crate::simd::dispatch!(fn apply_rows(x: &[f32], out: &mut [f32], cols: usize, row0: usize, key: &DropoutKey) = apply_rows_body);

#[inline(always)]
fn apply_rows_body<I: crate::simd::Isa>(
    x: &[f32],
    out: &mut [f32],
    cols: usize,
    row0: usize,
    key: &DropoutKey,
) {
    for (r, (xr, or)) in x.chunks(cols).zip(out.chunks_mut(cols)).enumerate() {
        let m = key.row((row0 + r) as u64);
        for (j, (o, &v)) in or.iter_mut().zip(xr).enumerate() {
            *o = v * m.at(j as u32);
        }
    }
}

/// Rows per parallel task of the elementwise kernels.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::fused::contiguous_f32(s, l, self.name())?;
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        let rows = rows_per_task(cols);
        out.par_chunks_mut(rows * cols)
            .zip(x.par_chunks(rows * cols))
            .enumerate()
            .for_each(|(i, (o, xs))| apply_rows(xs, o, cols, i * rows, &self.0));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (key, row0, threshold, scale) = self.0.device_params();
        crate::cuda::dropout(s, l, key, row0, threshold, scale)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&DropoutOp(self.0))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_one_minus_p_and_depend_on_every_key_part() {
        let k = DropoutKey::new(7, 3, 0.1);
        let m = k.mask(64, 1000);
        let kept = m.iter().filter(|&&v| v > 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        assert_ne!(m, DropoutKey::new(8, 3, 0.1).mask(64, 1000));
        assert_ne!(m, DropoutKey::new(7, 4, 0.1).mask(64, 1000));
        // Rows differ from each other, and a mask is a pure function of its key.
        assert_ne!(m[..1000], m[1000..2000]);
        assert_eq!(m, k.mask(64, 1000));
    }

    #[test]
    fn a_batch_slice_with_its_offset_draws_the_whole_batch_rows_masks() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::ones((6, 3, 40), candle_core::DType::F32, &dev)?;
        let key = DropoutKey::new(11, 0, 0.25);
        let tail = x.narrow(0, 4, 2)?;
        let full = dropout(&x, key)?
            .narrow(0, 4, 2)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let sliced = dropout(&tail, key.with_batch_offset(4))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(sliced, full);
        // Without the offset the slice draws rows 0 and 1 instead.
        let unshifted = dropout(&tail, key)?.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(unshifted, full);
        // The composed path (other devices) resolves the offset the same way.
        let m = key.with_batch_offset(4).for_shape(tail.dims()).mask(6, 40);
        assert_eq!(m, full);
        Ok(())
    }

    #[test]
    fn fused_dropout_matches_the_mask_and_masks_its_gradient() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 70), &dev)?;
        let key = DropoutKey::new(1, 2, 0.3);
        let mask = Tensor::from_vec(key.mask(15, 70), (3, 5, 70), &dev)?;
        let var = candle_core::Var::from_tensor(&x)?;
        let y = dropout(var.as_tensor(), key)?;
        let diff = (&y - x.mul(&mask)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let w = Tensor::randn(0f32, 1.0, (3, 5, 70), &dev)?;
        let g = (y * &w)?.sum_all()?.backward()?;
        let gx = g.get(var.as_tensor()).expect("grad");
        let diff = (gx - w.mul(&mask)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
