//! `bench sae`: encode and training throughput at the paper's SAE shape (d of the GPT-2
//! 124M teacher, `sae.n_latents` and `sae.k` of configs/gpt2-69m.toml).
use candle_core::Tensor;
use serde_json::{json, Value};

use crate::common::{device, random_sae, timed};
use crate::configs::BenchConfig;
use crate::Result;

/// Tokens per encode call / training step.
const TOKENS: usize = 1024;

fn shape() -> Result<(BenchConfig, usize, usize, usize)> {
    let bc = BenchConfig::gpt2_69m()?;
    let d = bc.teacher()?.n_embd;
    let (c, k) = (bc.run.sae.n_latents, bc.run.sae.k);
    Ok((bc, d, c, k))
}

/// `sae-encode-768x32768`.
pub fn encode() -> Result<Value> {
    let (bc, d, c, k) = shape()?;
    let sae = random_sae(d, c, k)?;
    let x = Tensor::randn(0f32, 1.0, (TOKENS, d), &device()?)?;
    sae.encode(&x)?;
    let (n, secs) = timed(|_| {
        sae.encode(&x)?;
        Ok(())
    })?;
    Ok(json!({
        "case": format!("sae-encode-{d}x{c}"), "config": bc.file, "k": k,
        "tokens_per_call": TOKENS, "encode_tokens_per_s": (n * TOKENS) as f64 / secs,
    }))
}

/// `sae-train-768x32768`.
pub fn train() -> Result<Value> {
    let (bc, d, c, k) = shape()?;
    let x = Tensor::randn(0f32, 1.0, (TOKENS, d), &device()?)?;
    let mut tr = cocomix_sae::SaeTrainer::new(cocomix_sae::SaeTrainConfig::new(d, c, k), &x)?;
    tr.step(&x)?;
    let (n, secs) = timed(|_| {
        tr.step(&x)?;
        Ok(())
    })?;
    Ok(json!({
        "case": format!("sae-train-{d}x{c}"), "config": bc.file, "k": k,
        "tokens_per_step": TOKENS, "train_tokens_per_s": (n * TOKENS) as f64 / secs,
    }))
}
