//! The transformer side of CoCoMix on Candle: GPT-2 (teacher and NTP baseline),
//! Llama-family teachers (Hugging Face layout or GGUF, e.g. SmolLM2-135M) and the CoCoMix
//! student, with correct backward passes, a KV cache that knows about the interleaved
//! concept positions, steering and sampling.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use cocomix_model::{CausalLm, Gpt2, Llama, Student};
//! let dev = Device::Cpu;
//! let teacher = Gpt2::load("path/to/gpt2", &dev)?; // config.json + model.safetensors
//! let ids = Tensor::new(&[[15496u32, 995, 13]], &dev)?;
//! let rg = teacher.residual_grad(&ids, 5)?; // x_L and ∂L/∂x_L after block 5
//! let smol = Llama::load("data/models/SmolLM2-135M-Instruct.Q4_1.gguf", &dev)?;
//! let teachers: [&dyn CausalLm; 2] = [&teacher, &smol];
//! let student = Student::load("runs/x/final".as_ref(), &dev)?;
//! let out = student.forward(&ids, &mut cocomix_model::Dropout::off())?;
//! # Ok::<(), cocomix_model::Error>(())
//! ```
mod any;
mod error;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod llama;
pub mod params;
pub mod student;
mod teacher;

pub use any::AnyModel;
pub use cocomix_ops as ops;
pub use error::{Error, Result};
pub use generate::{generate, Sampling};
pub use gpt2::{
    next_token_loss, Dropout, Gpt2, Gpt2Config, Hook, KvCache, ResidualGrad, ResidualHook,
};
pub use llama::{Llama, LlamaConfig};
pub use params::{Params, TensorFile};
pub use student::{
    ConceptConfig, PauseConfig, Steer, SteerMode, Student, StudentConfig, StudentOutput,
};
pub use teacher::CausalLm;
