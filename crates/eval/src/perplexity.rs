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

impl Perplexity {
    /// Total negative log-likelihood of the predicted tokens (nats).
    pub fn total_nll(&self) -> f64 {
        self.nll * self.tokens as f64
    }
}

/// Scores every token of `tokens` after the first exactly once, in lm-evaluation-harness's
/// rolling windows (`get_rolling_token_windows` with `context_len = 1`): windows predict
/// `seq_len` tokens each from the tokens before them, and the last, shorter window reads the
/// `seq_len` tokens before its end (full context) and scores only its new tokens. Windows of
/// equal shape run `batch` per forward.
pub fn perplexity(
    model: &AnyModel,
    tokens: &[u32],
    seq_len: usize,
    batch: usize,
) -> Result<Perplexity> {
    if seq_len == 0 || seq_len > model.context() {
        return Err(Error::Invalid(format!(
            "seq_len {seq_len} must be in 1..={} (the model's context)",
            model.context()
        )));
    }
    if tokens.len() < 2 {
        return Err(Error::Invalid("need at least two tokens to score".into()));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= model.vocab_size()) {
        return Err(Error::Invalid(format!(
            "token id {bad} is outside the model's vocabulary of {}: the tokenizer does not \
             match the model",
            model.vocab_size()
        )));
    }
    // Window k predicts tokens[a..b]; it reads tokens[b − 1 − len..b − 1] and scores the
    // last b − a positions.
    let windows: Vec<(usize, usize, usize)> = (1..tokens.len())
        .step_by(seq_len)
        .map(|a| {
            let b = (a + seq_len).min(tokens.len());
            let len = seq_len.min(b - 1);
            (b - 1 - len, len, b - a) // (input start, input length, scored)
        })
        .collect();
    let dev = model.device().clone();
    let (mut sum, mut n) = (0f64, 0usize);
    let mut i = 0;
    while i < windows.len() {
        let (_, len, m) = windows[i];
        let group: Vec<usize> = windows[i..]
            .iter()
            .take(batch.max(1))
            .take_while(|w| w.1 == len && w.2 == m)
            .map(|w| w.0)
            .collect();
        let mut x = Vec::with_capacity(group.len() * len);
        let mut y = Vec::with_capacity(group.len() * m);
        for &s in &group {
            x.extend_from_slice(&tokens[s..s + len]);
            y.extend_from_slice(&tokens[s + 1 + len - m..s + 1 + len]);
        }
        let x = Tensor::from_vec(x, (group.len(), len), &dev)?;
        let y = Tensor::from_vec(y, group.len() * m, &dev)?;
        let logits = model.logits(&x)?.narrow(1, len - m, m)?; // [G, m, V]
        let v = logits.dim(2)?;
        let l = cross_entropy(&logits.reshape(((), v))?, &y)?.to_scalar::<f32>()? as f64;
        sum += l * (group.len() * m) as f64;
        n += group.len() * m;
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
