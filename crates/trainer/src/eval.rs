//! Perplexity of any loadable model on a token stream.
use candle_core::Tensor;
use cocomix_model::ops::cross_entropy;
use cocomix_model::AnyModel;
use serde::Serialize;

use crate::{Error, Result};

/// Result of a perplexity evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct Perplexity {
    /// Number of scored predictions.
    pub tokens: usize,
    /// Mean negative log-likelihood per predicted token (nats).
    pub nll: f64,
    /// exp(nll).
    pub ppl: f64,
    /// Window length used.
    pub seq_len: usize,
}

/// Scores `tokens` in non-overlapping windows: each window reads `seq_len` tokens and
/// predicts the next `seq_len`, so every token after the first is predicted exactly once
/// (the last window may be shorter). `batch` windows run per forward.
pub fn perplexity(
    model: &AnyModel,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
) -> Result<Perplexity> {
    if seq_len == 0 || seq_len > model.context() {
        return Err(Error::Config(format!(
            "seq_len {seq_len} must be in 1..={} (the model's context)",
            model.context()
        )));
    }
    if tokens.len() < 2 {
        return Err(Error::Other("need at least two tokens to score".into()));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= model.vocab_size()) {
        return Err(Error::Other(format!(
            "token id {bad} is outside the model's vocabulary of {}",
            model.vocab_size()
        )));
    }
    let starts: Vec<usize> = (0..tokens.len() - 1).step_by(seq_len).collect();
    let (mut sum, mut n) = (0f64, 0usize);
    let dev = model.device().clone();
    let mut i = 0;
    while i < starts.len() {
        // Windows of equal length batch together; the shorter last one runs alone.
        let len = seq_len.min(tokens.len() - 1 - starts[i]);
        let mut group = vec![starts[i]];
        while group.len() < batch
            && i + group.len() < starts.len()
            && seq_len.min(tokens.len() - 1 - starts[i + group.len()]) == len
        {
            group.push(starts[i + group.len()]);
        }
        let mut x = Vec::with_capacity(group.len() * len);
        let mut y = Vec::with_capacity(group.len() * len);
        for &s in &group {
            x.extend_from_slice(&tokens[s..s + len]);
            y.extend_from_slice(&tokens[s + 1..s + 1 + len]);
        }
        let x = Tensor::from_vec(x, (group.len(), len), &dev)?;
        let y = Tensor::from_vec(y, group.len() * len, &dev)?;
        let logits = model.logits(&x)?;
        let v = logits.dim(2)?;
        let l = cross_entropy(&logits.reshape(((), v))?, &y)?.to_scalar::<f32>()? as f64;
        sum += l * (group.len() * len) as f64;
        n += group.len() * len;
        i += group.len();
    }
    let nll = sum / n as f64;
    Ok(Perplexity {
        tokens: n,
        nll,
        ppl: nll.exp(),
        seq_len,
    })
}
