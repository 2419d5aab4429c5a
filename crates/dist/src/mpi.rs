//! MPI through rsmpi. Collectives are MPI's non-blocking ones, polled, so that a rank
//! whose peers stop answering notices it (a blocking MPI call would wait forever).
use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::{Engine, Error, Result, Wait, TIMEOUT_EXIT_CODE};

pub(crate) struct Mpi {
    // Dropping the universe finalises MPI; it must outlive `world`.
    world: SimpleCommunicator,
    _universe: Universe,
    rank: usize,
    size: usize,
    local_rank: usize,
}

/// Waits for an MPI request by polling it, aborting the job past the deadline (MPI still
/// owns the request's buffers: the process cannot go on without it).
macro_rules! poll {
    ($self:expr, $w:expr, $req:expr) => {{
        let since = Instant::now();
        let mut req = $req;
        loop {
            match req.test() {
                Ok(_) => break,
                Err(r) => req = r,
            }
            if $w.idle($self.rank, since) {
                $self.world.abort(TIMEOUT_EXIT_CODE);
            }
        }
    }};
}

impl Mpi {
    /// Initialises MPI (main thread calls only; Candle's worker threads never call MPI).
    pub(crate) fn init() -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Mpi("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let local_rank = world.split_shared(0).rank() as usize;
        Ok(Self {
            world,
            _universe: universe,
            rank,
            size,
            local_rank,
        })
    }
}

impl Mpi {
    /// Sums `buf` over the ranks, in place.
    fn sum<T: Equivalence + Clone>(&self, buf: &mut [T], w: &Wait) -> Result<()> {
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            poll!(
                self,
                w,
                self.world
                    .immediate_all_reduce_into(scope, &send[..], buf, SystemOperation::sum())
            )
        });
        Ok(())
    }
}

impl Engine for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn all_reduce_f32(&self, buf: &mut [f32], w: &Wait) -> Result<()> {
        self.sum(buf, w)
    }

    fn all_reduce_f64(&self, buf: &mut [f64], w: &Wait) -> Result<()> {
        self.sum(buf, w)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize, w: &Wait) -> Result<()> {
        let root = self.world.process_at_rank(root as i32);
        mpi::request::scope(|scope| poll!(self, w, root.immediate_broadcast_into(scope, buf)));
        Ok(())
    }

    fn barrier(&self, w: &Wait) -> Result<()> {
        poll!(self, w, self.world.immediate_barrier());
        Ok(())
    }

    fn abort(&self, code: i32) {
        self.world.abort(code)
    }
}
