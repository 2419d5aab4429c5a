//! NCCL through cudarc (Candle's `nccl` feature): one process per GPU. Gradients are summed
//! on the device, on the very stream Candle computed them on, so the all-reduce is ordered
//! after the backward without any extra synchronisation. Host buffers (loss sums, flags,
//! bytes) make a round trip through the device.
//!
//! Ranks find each other either through MPI (rank 0 makes the NCCL id, MPI broadcasts it:
//! llm.c's way) or through NCCL's own bootstrap at `NCCL_COMM_ID` (torchrun, Slurm).
//!
//! NCCL calls return as soon as the work is queued: each collective here then polls an event
//! on the stream, so a peer that died turns into [`Wait`]'s timeout rather than a hang.
use std::sync::Arc;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, DriverError};
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm as NcclComm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};
use half::bf16;

use crate::launch::{resolve_bootstrap, EnvLaunch};
use crate::{DistConfig, Engine, Error, NcclBootstrap, Result, Wait, TIMEOUT_EXIT_CODE};

pub(crate) struct Nccl {
    // Fields drop in order: NCCL's communicator goes before MPI finalises.
    comm: NcclComm,
    stream: Arc<CudaStream>,
    device: Device,
    rank: usize,
    world: usize,
    local_rank: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<crate::mpi::Mpi>,
}

fn nccl_err(what: &'static str) -> impl Fn(NcclError) -> Error {
    move |e| Error::Nccl(format!("{what}: {e:?}"))
}

fn cuda_err(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Nccl(format!("{what}: CUDA {e}"))
}

/// The GPU of local rank `ordinal` and the stream Candle runs its work on.
fn open_gpu(ordinal: usize) -> Result<(Device, Arc<CudaStream>)> {
    let device = Device::new_cuda(ordinal).map_err(|e| {
        Error::Nccl(format!(
            "cannot open GPU {ordinal} (this rank's LOCAL_RANK / local MPI rank): {e}"
        ))
    })?;
    let stream = device.as_cuda_device()?.cuda_stream();
    Ok((device, stream))
}

impl Nccl {
    /// Joins the job: opens the GPU of the local rank and builds the NCCL communicator over
    /// the bootstrap `cfg.nccl_bootstrap` resolves to.
    pub(crate) fn init(cfg: &DistConfig) -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok();
        match resolve_bootstrap(cfg.nccl_bootstrap, cfg!(feature = "mpi"), env) {
            NcclBootstrap::Mpi => Self::init_mpi(),
            _ => Self::init_env(EnvLaunch::from_env()?),
        }
    }

    #[cfg(feature = "mpi")]
    fn init_mpi() -> Result<Self> {
        let mpi = crate::mpi::Mpi::init()?;
        let (rank, world, local_rank) = (mpi.rank(), mpi.world(), mpi.local_rank());
        let (device, stream) = open_gpu(local_rank)?;
        let mut id = [0u8; 128];
        if rank == 0 {
            let made = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
            id.iter_mut()
                .zip(made.internal())
                .for_each(|(b, &c)| *b = c as u8);
        }
        let w = Wait {
            op: "broadcast of the NCCL id",
            phase: "setup",
            timeout: None,
        };
        mpi.broadcast(&mut id, 0, &w)?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = NcclComm::from_rank(stream.clone(), rank, world, id)
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(Self {
            comm,
            stream,
            device,
            rank,
            world,
            local_rank,
            mpi: Some(mpi),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn init_mpi() -> Result<Self> {
        Err(Error::Other(
            "dist.nccl_bootstrap = \"mpi\" needs a build with the cargo features `nccl` and \
             `mpi` (or use nccl_bootstrap = \"env\" under torchrun / Slurm)"
                .into(),
        ))
    }

    fn init_env(launch: EnvLaunch) -> Result<Self> {
        if let Some(root) = &launch.nccl_comm_id {
            // Read by ncclGetUniqueId (every rank derives the same id from it) and by rank 0's
            // ncclCommInitRank (which hosts the bootstrap root there). Set before any other
            // thread of ours reads the environment.
            std::env::set_var("NCCL_COMM_ID", root);
        }
        let (device, stream) = open_gpu(launch.local_rank)?;
        let id = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
        let comm = NcclComm::from_rank(stream.clone(), launch.rank, launch.world, id)
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(Self {
            comm,
            stream,
            device,
            rank: launch.rank,
            world: launch.world,
            local_rank: launch.local_rank,
            #[cfg(feature = "mpi")]
            mpi: None,
        })
    }

    /// Waits until the stream has done everything queued so far, polling, with `w`'s deadline.
    fn wait(&self, w: &Wait) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(cuda_err("recording an event"))?;
        let since = Instant::now();
        while !done
            .try_is_complete()
            .map_err(cuda_err("waiting for a collective"))?
        {
            if w.idle(self.rank, since) {
                self.abort(TIMEOUT_EXIT_CODE);
            }
        }
        Ok(())
    }

    /// Runs the collective `op` on a device copy of the host buffer `buf` and copies the
    /// result back (an empty buffer is a barrier).
    fn through_device<T: DeviceRepr + NcclType>(
        &self,
        buf: &mut [T],
        w: &Wait,
        op: impl FnOnce(&mut CudaSlice<T>) -> Result<()>,
    ) -> Result<()> {
        if buf.is_empty() {
            return self.barrier(w);
        }
        let mut dev = self
            .stream
            .clone_htod(buf)
            .map_err(cuda_err("copy to the GPU"))?;
        op(&mut dev)?;
        self.wait(w)?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(cuda_err("copy from the GPU"))?;
        self.stream
            .synchronize()
            .map_err(cuda_err("copy from the GPU"))
    }

    /// Sums a host buffer over the ranks through the device.
    fn host_sum<T: DeviceRepr + NcclType>(&self, buf: &mut [T], w: &Wait) -> Result<()> {
        self.through_device(buf, w, |dev| {
            self.comm
                .all_reduce_in_place(dev, &ReduceOp::Sum)
                .map(drop)
                .map_err(nccl_err("ncclAllReduce"))
        })
    }

    /// A new device buffer holding `src[start..end]` summed over the ranks.
    fn device_sum<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        src: &CudaSlice<T>,
        (start, end): (usize, usize),
        dev: &CudaDevice,
    ) -> Result<CudaStorage> {
        // SAFETY: the all-reduce writes every element before anything reads the buffer.
        let mut dst = unsafe { self.stream.alloc::<T>(end - start) }
            .map_err(cuda_err("allocating the all-reduce buffer"))?;
        self.comm
            .all_reduce(&src.slice(start..end), &mut dst, &ReduceOp::Sum)
            .map_err(nccl_err("ncclAllReduce"))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    fn reduce_tensor(&self, flat: &Tensor, w: &Wait) -> Result<Tensor> {
        if !flat.device().same_device(&self.device) {
            return Err(Error::Nccl(format!(
                "a tensor on {:?} cannot be all-reduced by the communicator of {:?}",
                flat.device().location(),
                self.device.location()
            )));
        }
        let flat = flat.contiguous()?;
        let summed = {
            let (storage, layout) = flat.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(Error::Nccl("the tensor is not in CUDA memory".into()));
            };
            let range = layout
                .contiguous_offsets()
                .ok_or_else(|| Error::Nccl("the tensor is not contiguous".into()))?;
            match flat.dtype() {
                DType::F32 => self.device_sum(cs.as_cuda_slice::<f32>()?, range, &cs.device)?,
                DType::BF16 => self.device_sum(cs.as_cuda_slice::<bf16>()?, range, &cs.device)?,
                d => {
                    return Err(Error::Other(format!(
                        "all-reduce of {d:?} tensors: only f32 and bf16 are supported"
                    )))
                }
            }
        };
        self.wait(w)?;
        Ok(Tensor::from_storage(
            Storage::Cuda(summed),
            flat.elem_count(),
            BackpropOp::none(),
            false,
        ))
    }
}

impl Engine for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn all_reduce_f32(&self, buf: &mut [f32], w: &Wait) -> Result<()> {
        self.host_sum(buf, w)
    }
    fn all_reduce_f64(&self, buf: &mut [f64], w: &Wait) -> Result<()> {
        self.host_sum(buf, w)
    }
    fn all_reduce_bf16(&self, buf: &mut [bf16], w: &Wait) -> Result<()> {
        self.host_sum(buf, w)
    }
    fn broadcast(&self, buf: &mut [u8], root: usize, w: &Wait) -> Result<()> {
        self.through_device(buf, w, |dev| {
            self.comm
                .broadcast_in_place(dev, root as i32)
                .map(drop)
                .map_err(nccl_err("ncclBroadcast"))
        })
    }
    fn barrier(&self, w: &Wait) -> Result<()> {
        self.host_sum(&mut [0f32], w)
    }
    fn all_reduce_device(&self, flat: &Tensor, w: &Wait) -> Option<Result<Tensor>> {
        flat.device().is_cuda().then(|| self.reduce_tensor(flat, w))
    }
    fn device(&self) -> Option<Device> {
        Some(self.device.clone())
    }
    fn reduces_alone(&self) -> bool {
        true
    }
    fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.abort(code);
        }
        // Under torchrun or `srun --kill-on-bad-exit` the launcher then ends the other ranks.
        std::process::exit(code)
    }
}
