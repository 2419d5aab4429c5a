//! Training for cocomix: the objectives (NTP, KD, CoCoMix and the paper's ablations), AdamW
//! with a warmup + cosine schedule and clipping, run folders with atomic checkpoints and
//! exact resume, SAE training on a teacher's residual stream, the end-to-end main job and the
//! comparison of objectives over seeds; data-parallel training over MPI or NCCL ranks
//! ([`train_dist`], the `[dist]` config section).
pub mod compare;
mod config;
pub mod optim;
pub mod pipeline;
mod prefetch;
pub mod report;
mod run;

pub use cocomix_dist::{launcher_rank, Comm, DistConfig};
pub use config::*;
pub use prefetch::overlap_from_env;
pub use run::{
    default_device, label_permutation, list_checkpoints, rank_device, read_metrics, train,
    train_dist, validate, validate_dist, window_shuffle, Labels, Relabel, StepMetrics,
    TrainOutcome, TrainSpec,
};

use std::path::PathBuf;

/// Errors of the trainer crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] cocomix_model::Error),
    #[error(transparent)]
    Ops(#[from] cocomix_model::ops::Error),
    #[error(transparent)]
    Sae(#[from] cocomix_sae::Error),
    #[error(transparent)]
    Data(#[from] cocomix_data::Error),
    #[error(transparent)]
    Attribution(#[from] cocomix_attribution::Error),
    #[error(transparent)]
    Dist(#[from] cocomix_dist::Error),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            reason: e.to_string(),
        }
    }
}

/// Result alias of the trainer crate.
pub type Result<T> = std::result::Result<T, Error>;
