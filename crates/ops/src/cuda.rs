//! The CUDA kernels of `kernels/*.cu` (compiled to PTX by build.rs with the `cuda` feature):
//! dropout masks drawn on the device, and the attention's causal softmax with its backward.
//! Without the feature, [`has_kernels`] is false and callers take the composed Candle ops.
use candle_core::{DType, Tensor};

/// Whether `x` is a non-empty CUDA tensor of a type the kernels take (f32, bf16, f16), with
/// the fused kernels on (`COCOMIX_FUSED=0` composes everything, on GPUs too).
pub(crate) fn has_kernels(x: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && crate::fused::fused_enabled()
        && x.device().is_cuda()
        && x.elem_count() > 0
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// `softmax(scale · x + causal mask)` over the last dimension of scores `[.., Sq, Skv]` (key
/// `j` of query `i` visible iff `j ≤ offset + i`) in one kernel, its backward from the output
/// alone; `None` where there is no kernel (then the caller composes it).
pub(crate) fn causal_softmax(
    x: &Tensor,
    offset: usize,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if has_kernels(x) {
        return Ok(Some(x.apply_op1(imp::CausalSoftmax { offset, scale })?));
    }
    let _ = (x, offset, scale);
    Ok(None)
}

#[cfg(feature = "cuda")]
pub(crate) use imp::dropout;

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{
        CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor,
    };

    const DROPOUT: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
    const SOFTMAX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));

    /// The elements of a contiguous layout.
    fn span(l: &Layout, name: &str) -> candle_core::Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{name}: input must be contiguous")))
    }

    /// `$body` on the f32/bf16/f16 slice `$x` of `$s`, with `$sfx` the kernels' type suffix
    /// and `$t` the element type; the result is a slice of the same type.
    macro_rules! map_float {
        ($s:expr, $name:expr, |$x:ident, $sfx:ident, $t:ident| $body:expr) => {
            match &$s.slice {
                CudaStorageSlice::F32($x) => {
                    type $t = f32;
                    let $sfx = "f32";
                    CudaStorageSlice::F32($body)
                }
                CudaStorageSlice::BF16($x) => {
                    type $t = half::bf16;
                    let $sfx = "bf16";
                    CudaStorageSlice::BF16($body)
                }
                CudaStorageSlice::F16($x) => {
                    type $t = half::f16;
                    let $sfx = "f16";
                    CudaStorageSlice::F16($body)
                }
                _ => candle_core::bail!("{}: {:?} is not a float type", $name, $s.dtype()),
            }
        };
    }

    fn wrap(slice: CudaStorageSlice, dev: &CudaDevice, shape: &Shape) -> (CudaStorage, Shape) {
        let s = CudaStorage {
            slice,
            device: dev.clone(),
        };
        (s, shape.clone())
    }

    /// `value` rounded to the storage type named by `sfx`, as a Candle tensor of that type
    /// would hold it.
    fn round_to(sfx: &str, value: f32) -> f32 {
        match sfx {
            "bf16" => half::bf16::from_f32(value).to_f32(),
            "f16" => half::f16::from_f32(value).to_f32(),
            _ => value,
        }
    }

    /// `x ⊙ mask` of a contiguous tensor, the counter-based mask (see `dropout.rs`) drawn
    /// on the device. The composed path multiplies by the mask in the tensor's type, so the
    /// scale is rounded to it first.
    pub(crate) fn dropout(
        s: &CudaStorage,
        l: &Layout,
        key: u64,
        row0: u64,
        threshold: u32,
        scale: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = span(l, "dropout")?;
        let n = end - start;
        let cols = l.dims().last().copied().unwrap_or(1).max(1) as u32;
        let dev = s.device();
        let slice = map_float!(s, "dropout", |x, sfx, T| {
            let func =
                dev.get_or_load_custom_func(&format!("dropout_{sfx}"), "cocomix_dropout", DROPOUT)?;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<T>(n)? };
            let (n64, scale) = (n as u64, round_to(sfx, scale));
            let x = x.slice(start..end);
            let mut b = func.builder();
            b.arg(&x).arg(&out).arg(&n64).arg(&cols);
            b.arg(&key).arg(&row0).arg(&threshold).arg(&scale);
            // A grid-stride loop: the grid is capped, each thread takes several elements.
            let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
            // SAFETY: the kernel reads n elements of x and writes n of out.
            unsafe { b.launch(grid(blocks, 256)) }.w()?;
            out
        });
        Ok(wrap(slice, dev, l.shape()))
    }

    fn grid(blocks: u32, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Threads per row of the softmax kernels: a warp multiple, at most 256 (longer rows loop).
    fn row_threads(cols: usize) -> u32 {
        (cols.div_ceil(32) * 32).clamp(32, 256) as u32
    }

    /// Rows `[B·H·Sq, Skv]` of a contiguous layout: (rows, Skv, Sq).
    fn rows(l: &Layout, name: &str) -> candle_core::Result<(usize, usize, usize)> {
        match l.dims() {
            [lead @ .., sq, skv] if !lead.is_empty() => {
                Ok((lead.iter().product::<usize>() * sq, *skv, *sq))
            }
            d => candle_core::bail!("{name}: expected [.., Sq, Skv] scores, got {d:?}"),
        }
    }

    /// `softmax(scale · x)` over the last dimension with key `j` of query row `i` (the row
    /// index within its `[Sq, Skv]` matrix) visible iff `j ≤ offset + i`.
    pub(crate) fn causal_softmax(
        s: &CudaStorage,
        l: &Layout,
        offset: usize,
        scale: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        const NAME: &str = "causal softmax";
        let (start, end) = span(l, NAME)?;
        let (n_rows, skv, sq) = rows(l, NAME)?;
        let dev = s.device();
        let (sq, skv32, offset) = (sq as u32, skv as u32, offset as u32);
        let slice = map_float!(s, NAME, |x, sfx, T| {
            let func = dev.get_or_load_custom_func(
                &format!("causal_softmax_{sfx}"),
                "cocomix_softmax",
                SOFTMAX,
            )?;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<T>(end - start)? };
            let x = x.slice(start..end);
            let mut b = func.builder();
            b.arg(&x)
                .arg(&out)
                .arg(&sq)
                .arg(&skv32)
                .arg(&offset)
                .arg(&scale);
            // SAFETY: one block per row of skv elements, in and out.
            unsafe { b.launch(grid(n_rows as u32, row_threads(skv))) }.w()?;
            out
        });
        Ok(wrap(slice, dev, l.shape()))
    }

    /// The backward of [`causal_softmax`]: `scale · y ⊙ (g − Σ_j g y)` per row.
    pub(crate) fn causal_softmax_bwd(
        y: &CudaStorage,
        ly: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        scale: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        const NAME: &str = "causal softmax backward";
        let (ys, ye) = span(ly, NAME)?;
        let (gs, ge) = span(lg, NAME)?;
        let (n_rows, skv, _) = rows(ly, NAME)?;
        if ly.shape() != lg.shape() || y.dtype() != g.dtype() {
            candle_core::bail!(
                "{NAME}: gradient {:?} {:?} for output {:?} {:?}",
                lg.shape(),
                g.dtype(),
                ly.shape(),
                y.dtype()
            )
        }
        let dev = y.device();
        let skv32 = skv as u32;
        let slice = map_float!(y, NAME, |yv, sfx, T| {
            let func = dev.get_or_load_custom_func(
                &format!("causal_softmax_bwd_{sfx}"),
                "cocomix_softmax",
                SOFTMAX,
            )?;
            let gv = g.as_cuda_slice::<T>()?.slice(gs..ge);
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<T>(ye - ys)? };
            let yv = yv.slice(ys..ye);
            let mut b = func.builder();
            b.arg(&yv).arg(&gv).arg(&out).arg(&skv32).arg(&scale);
            // SAFETY: one block per row of skv elements in y, g and out.
            unsafe { b.launch(grid(n_rows as u32, row_threads(skv))) }.w()?;
            out
        });
        Ok(wrap(slice, dev, ly.shape()))
    }

    /// `softmax(scale · x + causal mask)` over the last dimension in one CUDA kernel, keeping
    /// only its output for the backward pass (`kernels/softmax.cu`).
    pub(super) struct CausalSoftmax {
        pub offset: usize,
        pub scale: f32,
    }

    impl CustomOp1 for CausalSoftmax {
        fn name(&self) -> &'static str {
            "causal-softmax"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("causal-softmax: a CUDA kernel; the CPU takes the composed softmax")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            causal_softmax(s, l, self.offset, self.scale)
        }

        fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
            let dx = y.apply_op2_no_bwd(&g.contiguous()?, &CausalSoftmaxBwd(self.scale))?;
            Ok(Some(dx))
        }
    }

    /// The backward of [`CausalSoftmax`] from its output `y` and the gradient `g`.
    struct CausalSoftmaxBwd(f32);

    impl CustomOp2 for CausalSoftmaxBwd {
        fn name(&self) -> &'static str {
            "causal-softmax-backward"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("causal-softmax-backward: a CUDA kernel only")
        }

        fn cuda_fwd(
            &self,
            y: &CudaStorage,
            ly: &Layout,
            g: &CudaStorage,
            lg: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            causal_softmax_bwd(y, ly, g, lg, self.0)
        }
    }
}
