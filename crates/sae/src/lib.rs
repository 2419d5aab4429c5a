//! Sparse autoencoders, CoCoMix's concept extractor, in one [`Sae`] type with each format's
//! own encode rule: OpenAI's TopK SAEs for GPT-2 (Gao et al. 2024; `torch.save` files and
//! safetensors), SAELens folders (`standard` = ReLU, `topk`, `jumprelu`) and EleutherAI
//! sparsify hookpoint folders (TopK). Exact encode/decode, and a trainer that follows the
//! TopK recipe.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! let sae = cocomix_sae::Sae::load("5.pt", &Device::Cpu)?; // or a SAELens / sparsify folder
//! let x = Tensor::zeros((4, sae.d_model()), candle_core::DType::F32, &Device::Cpu)?;
//! let codes = sae.encode(&x)?;          // indices/values [4, w], sorted by value
//! let recon = sae.decode(&codes)?;      // [4, d]
//! # Ok::<(), cocomix_sae::Error>(())
//! ```
mod error;
mod load;
mod sae;
mod saelens;
mod sparsify;
mod steer;
mod train;

pub use error::{Error, Result};
pub use sae::{Activation, InputNorm, Sae, SaeParts, SparseCodes, LN_EPS};
pub use train::{SaeTrainConfig, SaeTrainer, StepStats};
