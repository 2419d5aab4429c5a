//! Micro-batches one ahead: the teacher's per-batch work (distillation logits, online concept
//! labels) for the next micro-batch runs on its own thread while the student trains on the
//! current one.
//!
//! On a CPU such a step is two halves of similar size (the teacher's forward or attribution,
//! then the student's forward, backward and update), each a chain of kernels that leaves the
//! worker threads idle between and inside its ops. Both halves submit their parallel work to
//! the same rayon pool, so each fills the other's gaps. Nothing else changes: a batch is a
//! pure function of `(seed, step, micro)` and the frozen teacher, and every kernel sees the
//! same pool (the same thread count, the same chunking) and the caller's fused-kernel setting
//! as without the overlap, so the run is the same bit for bit. (The producer submits to the
//! global pool: a caller training inside another pool's `install` gets the same numbers only
//! where the kernels do not depend on the thread count.)
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::Scope;

use crate::run::{make_batch, Batch, Relabel, TrainSpec};
use crate::{Error, Result};

/// Whether runs overlap the teacher's work with the student's step: yes unless the
/// environment sets `COCOMIX_OVERLAP=0` (a speed and memory setting only: the results are the
/// same either way).
pub fn overlap_from_env() -> bool {
    std::env::var("COCOMIX_OVERLAP").map_or(true, |v| v.trim() != "0")
}

/// Where [`accumulate`](crate::run) takes its micro-batches from.
pub(crate) struct Batches<'a> {
    spec: &'a TrainSpec<'a>,
    rows: usize,
    part: Range<usize>,
    relabel: &'a Relabel,
    ahead: Option<Ahead>,
}

/// The consumer's ends of the channels to the producer thread (requests out, batches in), and
/// the batch the producer is working on.
struct Ahead {
    requests: Sender<u64>,
    results: Receiver<(u64, Result<Batch>)>,
    pending: Option<u64>,
}

impl<'a> Batches<'a> {
    /// Batches of `rows` rows (this rank's `part`). With `overlap`, a thread of `scope`
    /// builds the next one while the caller works.
    pub(crate) fn new<'s>(
        scope: &'s Scope<'s, '_>,
        spec: &'a TrainSpec<'a>,
        rows: usize,
        part: Range<usize>,
        relabel: &'a Relabel,
        overlap: bool,
    ) -> Self
    where
        'a: 's,
    {
        let ahead = overlap.then(|| {
            let (requests, todo) = channel::<u64>();
            let (done, results) = channel();
            let part = part.clone();
            let fused = cocomix_model::ops::fused::fused_enabled(); // a thread-local override
            scope.spawn(move || {
                // Ends when the consumer drops its sender (or stops listening).
                for index in todo {
                    let b = cocomix_model::ops::fused::with_fused(fused, || {
                        make_batch(spec, index, rows, part.clone(), relabel)
                    });
                    if done.send((index, b)).is_err() {
                        break;
                    }
                }
            });
            Ahead {
                requests,
                results,
                pending: None,
            }
        });
        Self {
            spec,
            rows,
            part,
            relabel,
            ahead,
        }
    }

    /// Micro-batch `index` (`step · grad_accum + micro`); with the overlap, the producer then
    /// starts on `index + 1` unless that is past the last step.
    pub(crate) fn get(&mut self, index: u64) -> Result<Batch> {
        let build = || make_batch(self.spec, index, self.rows, self.part.clone(), self.relabel);
        let Some(a) = self.ahead.as_mut() else {
            return build();
        };
        let b = match a.pending.take() {
            Some(p) if p == index => a.recv(p)?,
            stale => {
                if let Some(p) = stale {
                    // A batch nobody asks for any more (not expected): dropped, errors too.
                    let _ = a.recv(p);
                }
                build()?
            }
        };
        let next = index + 1;
        let o = &self.spec.optim;
        if next < o.steps * o.grad_accum as u64 {
            a.requests
                .send(next)
                .map_err(|_| Error::Other("the batch producer thread has stopped".into()))?;
            a.pending = Some(next);
        }
        Ok(b)
    }
}

impl Ahead {
    /// The producer's batch `index` (its results come in the order of the requests).
    fn recv(&self, index: u64) -> Result<Batch> {
        let (i, b) = self
            .results
            .recv()
            .map_err(|_| Error::Other("the batch producer thread has stopped".into()))?;
        if i != index {
            return Err(Error::Other(format!(
                "the batch producer sent batch {i}, expected {index}"
            )));
        }
        b
    }
}
