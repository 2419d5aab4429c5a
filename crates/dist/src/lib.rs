//! Data-parallel communication for cocomix, built on existing engines as llm.c does: MPI
//! launches the ranks (and hands NCCL its id), NCCL all-reduces on GPUs, MPI's own
//! all-reduce serves CPUs. No socket protocol of our own.
//!
//! A [`Comm`] knows its rank, the world size and the local rank (the GPU of a multi-GPU
//! node), and offers all-reduce (sum or mean) of flat f32 / f64 / bf16 buffers and of
//! tensors (bucketed, on the device for NCCL), broadcast and barrier, over one of three
//! backends:
//! - [`Backend::Single`]: one process (the default; needs nothing);
//! - [`Backend::Mpi`]: rsmpi over the system's MPI (cargo feature `mpi`);
//! - [`Backend::Nccl`]: cudarc's NCCL on CUDA devices, one process per GPU (cargo feature
//!   `nccl`), bootstrapped through MPI or the torchrun-style environment ([`EnvLaunch`]).
//!
//! Faults: every collective but [`Comm::wait_for_all`] has a deadline (`timeout_s`). A rank
//! whose peers do not answer in time prints what it was waiting for and aborts the job (MPI
//! still owns the buffers of an unfinished collective: the process cannot go on). A [`Comm`]
//! of several ranks dropped without [`Comm::finish`] (an error, a panic) aborts the job too,
//! so one failing rank never leaves the others waiting.
//!
//! ```
//! use cocomix_dist::{Comm, ReduceOp};
//! let comm = Comm::single();
//! let mut grads = vec![1.0f32, 2.0];
//! comm.all_reduce_f32(&mut grads, ReduceOp::Mean)?;
//! assert_eq!((comm.rank(), comm.world(), grads), (0, 1, vec![1.0, 2.0]));
//! comm.finish();
//! # Ok::<(), cocomix_dist::Error>(())
//! ```
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use half::bf16;
use serde::{Deserialize, Serialize};

mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

pub use launch::{resolve_bootstrap, EnvLaunch};

/// Errors of the communicator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("dist.backend = \"{backend}\" needs a build with the cargo feature `{feature}` (cargo build --features {feature})")]
    NotBuilt {
        backend: &'static str,
        feature: &'static str,
    },
    #[error("launch environment: {0}")]
    Env(String),
    #[error("MPI: {0}")]
    Mpi(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("rank {rank} failed: {message}")]
    Peer { rank: usize, message: String },
    #[error("rank {rank}: {what} differs from rank 0's ({mine} here, {root} on rank 0): every rank must run the same {what}")]
    Mismatch {
        rank: usize,
        what: String,
        mine: String,
        root: String,
    },
    #[error("{0}")]
    Other(String),
}

/// Result alias of the communicator.
pub type Result<T> = std::result::Result<T, Error>;

/// Which engine moves the bytes (`dist.backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One process, no communication.
    #[default]
    Single,
    /// MPI (launch with `mpirun` or `srun`).
    Mpi,
    /// NCCL on CUDA devices (one process per GPU).
    Nccl,
}

/// How NCCL ranks find each other (`dist.nccl_bootstrap`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NcclBootstrap {
    /// MPI when launched by an MPI launcher (its rank variables are set), else `env`.
    #[default]
    Auto,
    /// MPI broadcasts rank 0's NCCL id.
    Mpi,
    /// torchrun / Slurm variables: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` and NCCL's own
    /// bootstrap at `MASTER_ADDR:MASTER_PORT` (`NCCL_COMM_ID`).
    Env,
}

/// The `[dist]` section of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// `single`, `mpi` or `nccl`.
    #[serde(default)]
    pub backend: Backend,
    /// Seconds a rank waits in a collective for the others before it aborts the job.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Gradients are all-reduced in flat buckets of about this many MiB.
    #[serde(default = "default_bucket")]
    pub bucket_mb: f64,
    /// How NCCL ranks find each other.
    #[serde(default)]
    pub nccl_bootstrap: NcclBootstrap,
}

fn default_timeout() -> f64 {
    600.0
}
fn default_bucket() -> f64 {
    25.0
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Single,
            timeout_s: default_timeout(),
            bucket_mb: default_bucket(),
            nccl_bootstrap: NcclBootstrap::Auto,
        }
    }
}

impl DistConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            return Err(Error::Other(format!(
                "dist.timeout_s {} must be a positive number of seconds",
                self.timeout_s
            )));
        }
        if !(self.bucket_mb > 0.0 && self.bucket_mb.is_finite()) {
            return Err(Error::Other(format!(
                "dist.bucket_mb {} must be positive",
                self.bucket_mb
            )));
        }
        Ok(())
    }

    /// Bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * (1 << 20) as f64) as usize
    }
}

/// How the values of all ranks are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Mean,
}

/// All-reduce traffic so far (for benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// All-reduce calls.
    pub calls: u64,
    /// Bytes all-reduced (each rank's buffer size, summed over calls).
    pub bytes: u64,
    /// Seconds spent in all-reduce calls (waiting for slower ranks included).
    pub seconds: f64,
}

/// What a collective is waiting for, for the timeout message.
#[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]
pub(crate) struct Wait<'a> {
    pub op: &'static str,
    pub phase: &'a str,
    pub timeout: Option<Duration>,
}

#[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]
impl Wait<'_> {
    /// Between two polls of an unfinished collective: yields (MPI's non-blocking collectives
    /// progress only inside the polls, so a timed collective, which moves data, never
    /// sleeps); an untimed one (a barrier while rank 0 works alone) sleeps 1 ms. Past the
    /// deadline, prints what timed out and returns true.
    pub(crate) fn idle(&self, rank: usize, since: Instant) -> bool {
        let waited = since.elapsed();
        if let Some(t) = self.timeout.filter(|&t| waited > t) {
            let msg = format!(
                "rank {rank}: {} during {} has waited {:.0} s for the other ranks \
                 (dist.timeout_s = {}): a rank died or hangs; aborting the job",
                self.op,
                self.phase,
                waited.as_secs_f64(),
                t.as_secs_f64()
            );
            tracing::error!("{msg}");
            eprintln!("error: {msg}");
            return true;
        }
        if self.timeout.is_some() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

/// The operations a backend provides; [`Comm`] adds reductions of tensors, means,
/// agreement and statistics on top.
pub(crate) trait Engine {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn local_rank(&self) -> usize;
    /// Sum over ranks, in place.
    fn all_reduce_f32(&self, buf: &mut [f32], w: &Wait) -> Result<()>;
    fn all_reduce_f64(&self, buf: &mut [f64], w: &Wait) -> Result<()>;
    /// Sum over ranks, in place; by default through f32 (MPI has no bf16 type).
    fn all_reduce_bf16(&self, buf: &mut [bf16], w: &Wait) -> Result<()> {
        let mut wide: Vec<f32> = buf.iter().map(|x| x.to_f32()).collect();
        self.all_reduce_f32(&mut wide, w)?;
        buf.iter_mut()
            .zip(wide)
            .for_each(|(b, x)| *b = bf16::from_f32(x));
        Ok(())
    }
    fn broadcast(&self, buf: &mut [u8], root: usize, w: &Wait) -> Result<()>;
    fn barrier(&self, w: &Wait) -> Result<()>;
    /// Sum of a flat, contiguous tensor on this backend's device without a host round trip
    /// (`None`: not on such a device, use the host path).
    fn all_reduce_device(&self, _flat: &Tensor, _w: &Wait) -> Option<Result<Tensor>> {
        None
    }
    /// The device this backend reduces on, where the rank's tensors must live.
    fn device(&self) -> Option<Device> {
        None
    }
    /// Whether collectives go through the engine in a world of one too (NCCL: so that a
    /// one-GPU run exercises the same path as a multi-GPU one).
    fn reduces_alone(&self) -> bool {
        false
    }
    /// Ends the whole job now (another rank failed or this one is giving up).
    fn abort(&self, code: i32);
}

struct Single;

impl Engine for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn all_reduce_f32(&self, _: &mut [f32], _: &Wait) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64], _: &Wait) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [u8], _: usize, _: &Wait) -> Result<()> {
        Ok(())
    }
    fn barrier(&self, _: &Wait) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _: i32) {}
}

struct Inner {
    engine: Box<dyn Engine>,
    /// A world of one whose collectives return at once.
    trivial: bool,
    timeout: Option<Duration>,
    bucket_bytes: usize,
    phase: RefCell<String>,
    stats: Cell<CommStats>,
    finished: Cell<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.finished.get() && self.engine.world() > 1 {
            eprintln!(
                "error: rank {} is stopping without finishing: aborting the job",
                self.engine.rank()
            );
            self.engine.abort(1);
        }
    }
}

/// A communicator: this process's place among the ranks of a data-parallel job and the
/// collectives between them. Cheap to clone (clones share one communicator); not for use
/// from several threads.
#[derive(Clone)]
pub struct Comm {
    inner: Rc<Inner>,
}

/// Exit code of a rank that aborts the job because a collective timed out.
pub const TIMEOUT_EXIT_CODE: i32 = 75;

impl Comm {
    fn new(engine: Box<dyn Engine>, cfg: &DistConfig) -> Self {
        Self {
            inner: Rc::new(Inner {
                trivial: engine.world() == 1 && !engine.reduces_alone(),
                engine,
                timeout: Some(Duration::from_secs_f64(cfg.timeout_s)),
                bucket_bytes: cfg.bucket_bytes().max(4),
                phase: RefCell::new("setup".into()),
                stats: Cell::new(CommStats::default()),
                finished: Cell::new(false),
            }),
        }
    }

    /// One process: rank 0 of a world of 1; every collective returns at once.
    pub fn single() -> Self {
        Self::new(Box::new(Single), &DistConfig::default())
    }

    /// The communicator `cfg` asks for (MPI and NCCL are initialised here, once per
    /// process). Errors when the backend was not compiled in or the launch environment is
    /// incomplete.
    pub fn init(cfg: &DistConfig) -> Result<Self> {
        cfg.validate()?;
        let engine: Box<dyn Engine> = match cfg.backend {
            Backend::Single => Box::new(Single),
            #[cfg(feature = "mpi")]
            Backend::Mpi => Box::new(mpi::Mpi::init()?),
            #[cfg(not(feature = "mpi"))]
            Backend::Mpi => {
                return Err(Error::NotBuilt {
                    backend: "mpi",
                    feature: "mpi",
                })
            }
            #[cfg(feature = "nccl")]
            Backend::Nccl => Box::new(nccl::Nccl::init(cfg)?),
            #[cfg(not(feature = "nccl"))]
            Backend::Nccl => {
                return Err(Error::NotBuilt {
                    backend: "nccl",
                    feature: "nccl",
                })
            }
        };
        let comm = Self::new(engine, cfg);
        if comm.world() > 1 {
            tracing::info!(
                "rank {} of {} (local rank {}, {:?})",
                comm.rank(),
                comm.world(),
                comm.local_rank(),
                cfg.backend
            );
        }
        Ok(comm)
    }

    /// This process's rank, `0..world`.
    pub fn rank(&self) -> usize {
        self.inner.engine.rank()
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.inner.engine.world()
    }

    /// Rank among the processes of this node (the GPU it drives).
    pub fn local_rank(&self) -> usize {
        self.inner.engine.local_rank()
    }

    /// The device this rank's tensors must live on, when the backend has one (NCCL: the GPU of
    /// the local rank, opened on the stream its collectives use).
    pub fn device(&self) -> Option<Device> {
        self.inner.engine.device()
    }

    /// Rank 0: the one that writes files.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's contiguous share of `n` items (rows of a batch, validation blocks,
    /// windows to label): `n·rank/world .. n·(rank + 1)/world`. The shares of all ranks
    /// cover `0..n` in order.
    pub fn share(&self, n: usize) -> std::ops::Range<usize> {
        let (r, w) = (self.rank(), self.world());
        n * r / w..n * (r + 1) / w
    }

    /// The bucket size of [`Comm::all_reduce_tensors`] in bytes.
    pub fn bucket_bytes(&self) -> usize {
        self.inner.bucket_bytes
    }

    /// Names what the ranks are doing (`"step 12"`), for timeout messages.
    pub fn set_phase(&self, phase: impl Into<String>) {
        *self.inner.phase.borrow_mut() = phase.into();
    }

    /// All-reduce traffic so far.
    pub fn stats(&self) -> CommStats {
        self.inner.stats.get()
    }

    fn timed<T>(&self, op: &'static str, f: impl FnOnce(&Wait) -> T) -> T {
        let phase = self.inner.phase.borrow();
        f(&Wait {
            op,
            phase: &phase,
            timeout: self.inner.timeout,
        })
    }

    fn count(&self, bytes: usize, since: Instant) {
        let mut s = self.inner.stats.get();
        s.calls += 1;
        s.bytes += bytes as u64;
        s.seconds += since.elapsed().as_secs_f64();
        self.inner.stats.set(s);
    }

    /// Combines `buf` over all ranks, in place (every rank ends with the same values).
    pub fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        if self.inner.trivial {
            return Ok(());
        }
        let t0 = Instant::now();
        self.timed("all-reduce", |w| self.inner.engine.all_reduce_f32(buf, w))?;
        if op == ReduceOp::Mean {
            let s = 1.0 / self.world() as f32;
            buf.iter_mut().for_each(|x| *x *= s);
        }
        self.count(std::mem::size_of_val(buf), t0);
        Ok(())
    }

    /// [`Comm::all_reduce_f32`] in f64 (loss sums, counts).
    pub fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        if self.inner.trivial {
            return Ok(());
        }
        let t0 = Instant::now();
        self.timed("all-reduce", |w| self.inner.engine.all_reduce_f64(buf, w))?;
        if op == ReduceOp::Mean {
            let s = 1.0 / self.world() as f64;
            buf.iter_mut().for_each(|x| *x *= s);
        }
        self.count(std::mem::size_of_val(buf), t0);
        Ok(())
    }

    /// [`Comm::all_reduce_f32`] of bf16 values: NCCL sums in bf16, MPI (which has no bf16
    /// type) in f32, rounded back.
    pub fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        if self.inner.trivial {
            return Ok(());
        }
        let t0 = Instant::now();
        self.timed("all-reduce", |w| self.inner.engine.all_reduce_bf16(buf, w))?;
        if op == ReduceOp::Mean {
            let s = 1.0 / self.world() as f32;
            buf.iter_mut()
                .for_each(|x| *x = bf16::from_f32(x.to_f32() * s));
        }
        self.count(std::mem::size_of_val(buf), t0);
        Ok(())
    }

    /// Combines each tensor over all ranks: f32 or bf16 tensors of any shape, flattened into
    /// buckets of about `bucket_bytes` and reduced one bucket at a time (on the device with
    /// NCCL, through host buffers otherwise). Returns new tensors of the same shapes; a world
    /// of 1 returns the inputs themselves.
    pub fn all_reduce_tensors(&self, ts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
        if self.inner.trivial {
            return Ok(ts.to_vec());
        }
        let mut out = Vec::with_capacity(ts.len());
        let mut start = 0;
        while start < ts.len() {
            // A bucket: tensors of one dtype and device, up to bucket_bytes (at least one).
            let (dtype, dev) = (ts[start].dtype(), ts[start].device());
            let mut end = start;
            let mut bytes = 0;
            while end < ts.len()
                && ts[end].dtype() == dtype
                && ts[end].device().same_device(dev)
                && (end == start
                    || bytes + ts[end].elem_count() * dtype.size_in_bytes()
                        <= self.inner.bucket_bytes)
            {
                bytes += ts[end].elem_count() * dtype.size_in_bytes();
                end += 1;
            }
            out.extend(self.all_reduce_bucket(&ts[start..end], op)?);
            start = end;
        }
        Ok(out)
    }

    fn all_reduce_bucket(&self, ts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
        let dtype = ts[0].dtype();
        let dev = ts[0].device().clone();
        let flat: Vec<Tensor> = ts
            .iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let t0 = Instant::now();
        let device_sum = if dev.is_cpu() {
            None
        } else {
            let cat = Tensor::cat(&flat, 0)?;
            self.timed("all-reduce", |w| {
                self.inner.engine.all_reduce_device(&cat, w)
            })
        };
        let summed = match device_sum {
            Some(r) => {
                let s = r?;
                self.count(s.elem_count() * dtype.size_in_bytes(), t0);
                s
            }
            None => match dtype {
                DType::F32 => {
                    let mut buf = Vec::with_capacity(flat.iter().map(|t| t.elem_count()).sum());
                    for t in &flat {
                        buf.extend(t.to_vec1::<f32>()?);
                    }
                    self.all_reduce_f32(&mut buf, ReduceOp::Sum)?;
                    let n = buf.len();
                    Tensor::from_vec(buf, n, &dev)?
                }
                DType::BF16 => {
                    let mut buf = Vec::with_capacity(flat.iter().map(|t| t.elem_count()).sum());
                    for t in &flat {
                        buf.extend(t.to_vec1::<bf16>()?);
                    }
                    self.all_reduce_bf16(&mut buf, ReduceOp::Sum)?;
                    let n = buf.len();
                    Tensor::from_vec(buf, n, &dev)?
                }
                d => {
                    return Err(Error::Other(format!(
                        "all-reduce of {d:?} tensors: only f32 and bf16 are supported"
                    )))
                }
            },
        };
        let summed = match op {
            ReduceOp::Sum => summed,
            ReduceOp::Mean => (summed / self.world() as f64)?,
        };
        let mut off = 0;
        ts.iter()
            .map(|t| {
                let n = t.elem_count();
                let piece = summed.narrow(0, off, n)?.reshape(t.shape())?;
                off += n;
                Ok(piece)
            })
            .collect()
    }

    /// Copies rank `root`'s `buf` into every rank's `buf` (same length everywhere).
    pub fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if self.inner.trivial {
            return Ok(());
        }
        self.check_root(root)?;
        self.timed("broadcast", |w| self.inner.engine.broadcast(buf, root, w))
    }

    /// Rank `root`'s `bytes` on every rank (the other ranks' `bytes` are ignored; lengths
    /// may differ).
    pub fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        if self.inner.trivial {
            return Ok(bytes.to_vec());
        }
        let mut len = (bytes.len() as u64).to_le_bytes();
        self.broadcast(&mut len, root)?;
        let mut buf = if self.rank() == root {
            bytes.to_vec()
        } else {
            vec![0u8; u64::from_le_bytes(len) as usize]
        };
        self.broadcast(&mut buf, root)?;
        Ok(buf)
    }

    fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.world() {
            return Err(Error::Other(format!(
                "root rank {root} is outside the world of {}",
                self.world()
            )));
        }
        Ok(())
    }

    /// Waits until every rank has arrived (with the timeout).
    pub fn barrier(&self) -> Result<()> {
        if self.inner.trivial {
            return Ok(());
        }
        self.timed("barrier", |w| self.inner.engine.barrier(w))
    }

    /// A barrier without the timeout: for stages where rank 0 works alone (preparing data,
    /// training an SAE) while the others wait, sleeping.
    pub fn wait_for_all(&self) -> Result<()> {
        if self.inner.trivial {
            return Ok(());
        }
        let phase = self.inner.phase.borrow();
        self.inner.engine.barrier(&Wait {
            op: "barrier",
            phase: &phase,
            timeout: None,
        })
    }

    /// Makes a rank's local success or failure collective: if any rank's `local` is an
    /// error, every rank returns an error (its own, or [`Error::Peer`] naming the first
    /// failing rank and its message), so no rank goes on to wait for one that stopped.
    pub fn agree<T, E>(&self, local: std::result::Result<T, E>) -> std::result::Result<T, E>
    where
        E: std::fmt::Display + From<Error>,
    {
        if self.inner.trivial {
            return local;
        }
        let mut failed = vec![0f64; self.world()];
        failed[self.rank()] = local.is_err() as u8 as f64;
        self.all_reduce_f64(&mut failed, ReduceOp::Sum)?;
        let Some(first) = failed.iter().position(|&f| f > 0.0) else {
            return local;
        };
        let msg = match &local {
            Err(e) if self.rank() == first => e.to_string(),
            _ => String::new(),
        };
        let msg = self.broadcast_bytes(msg.as_bytes(), first)?;
        match local {
            Err(e) => Err(e),
            Ok(_) => Err(Error::Peer {
                rank: first,
                message: String::from_utf8_lossy(&msg).into_owned(),
            }
            .into()),
        }
    }

    /// Refuses to go on unless every rank has the same `fingerprint` of `what` (a config, the
    /// data, a checkpoint): all ranks return [`Error::Mismatch`] (or [`Error::Peer`]) when
    /// one differs from rank 0's.
    pub fn check_same(&self, what: &str, fingerprint: &str) -> Result<()> {
        if self.inner.trivial {
            return Ok(());
        }
        let root = self.broadcast_bytes(fingerprint.as_bytes(), 0)?;
        let root = String::from_utf8_lossy(&root).into_owned();
        let local = if root == fingerprint {
            Ok(())
        } else {
            Err(Error::Mismatch {
                rank: self.rank(),
                what: what.to_string(),
                mine: fingerprint.to_string(),
                root,
            })
        };
        self.agree(local)
    }

    /// Ends this rank's part cleanly (MPI_Finalize on the last clone's drop). Without it, a
    /// communicator of several ranks aborts the job when dropped.
    pub fn finish(self) {
        self.inner.finished.set(true);
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm(rank {} of {})", self.rank(), self.world())
    }
}

/// The rank an MPI, Slurm or torchrun launcher gave this process, read from its
/// environment before any communicator exists (to choose a log level, say); 0 when not
/// launched by one.
pub fn launcher_rank() -> usize {
    [
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "PMIX_RANK",
        "SLURM_PROCID",
        "RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

/// `mpirun -np <np>` from `PATH`, set up for tests and benchmarks on one machine (root
/// allowed, oversubscription allowed, no single-copy shared memory, which containers often
/// forbid); `None` when no `mpirun` is installed.
pub fn mpirun_command(np: usize) -> Option<std::process::Command> {
    let path = std::env::var_os("PATH")?;
    let exe = std::env::split_paths(&path)
        .map(|d| d.join("mpirun"))
        .find(|p| p.is_file())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("-np")
        .arg(np.to_string())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    Some(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_is_a_world_of_one() {
        let c = Comm::single();
        assert_eq!(
            (c.rank(), c.world(), c.local_rank(), c.is_root()),
            (0, 1, 0, true)
        );
        let mut x = vec![1.5f32, -2.0];
        c.all_reduce_f32(&mut x, ReduceOp::Sum).unwrap();
        c.all_reduce_f32(&mut x, ReduceOp::Mean).unwrap();
        assert_eq!(x, [1.5, -2.0]);
        let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &candle_core::Device::Cpu).unwrap();
        let r = c
            .all_reduce_tensors(std::slice::from_ref(&t), ReduceOp::Mean)
            .unwrap();
        assert_eq!(r[0].to_vec2::<f32>().unwrap(), [[1., 2.], [3., 4.]]);
        assert_eq!(c.broadcast_bytes(b"abc", 0).unwrap(), b"abc");
        c.check_same("config", "x").unwrap();
        c.barrier().unwrap();
        let e: std::result::Result<(), Error> = c.agree(Err(Error::Other("boom".into())));
        assert_eq!(e.unwrap_err().to_string(), "boom");
        c.finish();
    }

    #[test]
    fn backends_not_built_are_named_with_their_feature() {
        if cfg!(not(feature = "mpi")) {
            let cfg = DistConfig {
                backend: Backend::Mpi,
                ..Default::default()
            };
            let e = Comm::init(&cfg).unwrap_err().to_string();
            assert!(e.contains("--features mpi"), "{e}");
        }
        if cfg!(not(feature = "nccl")) {
            let nccl = DistConfig {
                backend: Backend::Nccl,
                ..Default::default()
            };
            let e = Comm::init(&nccl).unwrap_err().to_string();
            assert!(e.contains("--features nccl"), "{e}");
        }
        let bad = DistConfig {
            timeout_s: 0.0,
            ..Default::default()
        };
        assert!(Comm::init(&bad)
            .unwrap_err()
            .to_string()
            .contains("timeout_s"));
    }
}
