//! Autoregressive sampling over any model that can extend a [`KvCache`].
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::gpt2::KvCache;
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p (nucleus).
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Stop after emitting this token (e.g. EOT).
    pub stop: Option<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop: None,
        }
    }
}

/// Picks a token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v as f64 / s.temperature))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = s.top_k {
        cand.truncate(k.max(1));
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if let Some(p) = s.top_p {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&q| {
            acc += q;
            acc >= p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        cand.truncate(keep);
        probs.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let mut u: f64 = rng.random();
    for (c, p) in cand.iter().zip(&probs) {
        if u < *p {
            return c.0;
        }
        u -= p;
    }
    cand.last().map_or_else(argmax, |c| c.0)
}

/// Generates up to `s.max_new_tokens` after `prompt`. `step(ids [1, t], cache)` returns the
/// logits `[1, t, V]` of new tokens and extends the cache; the prompt is fed once, then one
/// token per step. Stops at `context` tokens in all.
pub fn generate(
    prompt: &[u32],
    context: usize,
    device: &Device,
    cache: &mut KvCache,
    s: &Sampling,
    mut step: impl FnMut(&Tensor, &mut KvCache) -> Result<Tensor>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Other("the prompt is empty".into()));
    }
    if prompt.len() >= context {
        return Err(Error::Other(format!(
            "the prompt has {} tokens; the context is {context}",
            prompt.len()
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    while out.len() < s.max_new_tokens && prompt.len() + out.len() < context {
        let ids = Tensor::from_vec(input.clone(), (1, input.len()), device)?;
        let logits = step(&ids, cache)?; // [1, t, V]
        let t = logits.dim(1)?;
        let last: Vec<f32> = logits
            .narrow(1, t - 1, 1)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let next = sample(&last, s, &mut rng);
        out.push(next);
        if Some(next) == s.stop {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}
