//! TopK sparse autoencoders (Gao et al. 2024) in the format of OpenAI's GPT-2 SAEs, the
//! concept extractor of CoCoMix: exact encode/decode, loaders for the `torch.save` file and
//! safetensors, and a trainer that follows the TopK recipe.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! let sae = cocomix_sae::Sae::load("5.pt", &Device::Cpu)?; // k read from the file
//! let x = Tensor::zeros((4, sae.d_model()), candle_core::DType::F32, &Device::Cpu)?;
//! let codes = sae.encode(&x)?;          // indices/values [4, k], sorted by value
//! let recon = sae.decode(&codes)?;      // [4, d]
//! # Ok::<(), cocomix_sae::Error>(())
//! ```
mod error;
mod load;
mod sae;
mod steer;
mod train;

pub use error::{Error, Result};
pub use sae::{Sae, SparseCodes, LN_EPS};
pub use train::{SaeTrainConfig, SaeTrainer, StepStats};
