//! CoCoMix's concept labels (Tack et al. 2025; the reference release's `compute_attribute`, see docs/design.md): which SAE concepts matter for the
//! teacher's next-token loss, per token, and a cache of them so training need not run the
//! teacher every step.
//!
//! For token t with SAE latents z and g = ∂L/∂x at the SAE's layer (L the mean next-token
//! loss of the whole sequence), the attribution of concept c is `a = z_c · ⟨g, W_dec[:, c]⟩`.
//! It is computed on the ≤ k active latents only.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use cocomix_attribution::{attribute, labels, LabelMode};
//! let dev = Device::Cpu;
//! let teacher = cocomix_model::Gpt2::load("gpt2-folder", &dev)?;
//! let sae = cocomix_sae::Sae::load("5.pt", &dev)?;
//! let ids = Tensor::new(&[[464u32, 2068, 7586, 21831]], &dev)?;
//! let att = attribute(&teacher, &sae, &ids, 5)?;
//! let (lab, scores) = labels(&att, sae.n_latents(), 4, LabelMode::Faithful)?; // [N, 4]
//! # Ok::<(), cocomix_attribution::Error>(())
//! ```
mod cache;
mod score;

pub use cache::{CacheMeta, LabelCache, LabelCacheSpec, LabelChoice};
pub use score::{attribute, attribute_dense, labels, Attribution, LabelMode};

/// Errors of the attribution crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] cocomix_model::Error),
    #[error(transparent)]
    Sae(#[from] cocomix_sae::Error),
    #[error(transparent)]
    Data(#[from] cocomix_data::Error),
    #[error(transparent)]
    Dist(#[from] cocomix_dist::Error),
    #[error("{path}: {reason}")]
    File {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Other(String),
}

/// Result alias of the attribution crate.
pub type Result<T> = std::result::Result<T, Error>;
