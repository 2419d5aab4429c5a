//! Training a TopK SAE with the recipe of Gao et al. 2024 ("Scaling and evaluating sparse
//! autoencoders"), which OpenAI's GPT-2 SAEs were trained with: per-token normalised inputs,
//! unit-norm decoder columns (gradient parallel to them removed), encoder initialised as
//! the decoder's transpose, `pre_bias` from the data mean, the AuxK loss on dead latents,
//! and Adam. Activations arrive batch by batch, so nothing holds the corpus in memory.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use cocomix_ops::{topk, unbiased_layer_norm};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Activation, Error, InputNorm, Result, Sae, SaeParts, LN_EPS};

/// Hyper-parameters of SAE training.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SaeTrainConfig {
    /// Number of latents C.
    pub n_latents: usize,
    /// Latents kept per token.
    pub k: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Latents the AuxK loss may use per token (Gao et al.: d/2).
    pub aux_k: usize,
    /// Weight of the AuxK loss (Gao et al.: 1/32).
    pub aux_coef: f64,
    /// A latent that has not fired for this many tokens is dead (Gao et al.: 10M).
    pub dead_after_tokens: u64,
    /// Seed of the decoder initialisation.
    pub seed: u64,
}

impl SaeTrainConfig {
    /// Gao et al.'s defaults for inputs of width `d`, scaled to `n_latents`.
    pub fn new(d: usize, n_latents: usize, k: usize) -> Self {
        Self {
            n_latents,
            k,
            // Gao et al.: lr = 2e-4 / sqrt(n / 2^14); small SAEs tolerate more.
            lr: (2e-4 / (n_latents as f64 / 16384.0).sqrt()).min(2e-3),
            aux_k: (d / 2).max(1),
            aux_coef: 1.0 / 32.0,
            dead_after_tokens: 10_000_000,
            seed: 0,
        }
    }
}

/// Metrics of one training step.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepStats {
    /// Fraction of variance unexplained of the normalised inputs (the main loss).
    pub fvu: f32,
    /// AuxK loss (0 when no latent is dead).
    pub aux_loss: f32,
    /// Mean number of non-zero latents per token.
    pub l0: f32,
    /// Fraction of latents dead after this step.
    pub dead_fraction: f32,
}

/// An SAE under training (weights in [`Sae`]'s internal layout, `W_enc` and `W_dec` `[C, d]`).
pub struct SaeTrainer {
    cfg: SaeTrainConfig,
    pre_bias: Var,
    encoder: Var,
    latent_bias: Var,
    decoder: Var,
    opt: AdamW,
    tokens_since_fired: Vec<u64>,
}

fn normalize_rows(w: &Tensor) -> Result<Tensor> {
    // w [C, d]: each latent's direction to unit L2 norm.
    Ok(w.broadcast_div(&(w.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?)?)
}

impl SaeTrainer {
    /// A fresh SAE for inputs of width `d`; `first_batch [N, d]` (raw activations) sets
    /// `pre_bias` to the mean of the normalised data.
    pub fn new(cfg: SaeTrainConfig, first_batch: &Tensor) -> Result<Self> {
        let (_, d) = first_batch.dims2()?;
        let dev = first_batch.device().clone();
        if cfg.k == 0 || cfg.k > cfg.n_latents {
            return Err(Error::Other(format!(
                "k = {} must be in 1..={}",
                cfg.k, cfg.n_latents
            )));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let data: Vec<f32> = StandardNormal
            .sample_iter(&mut rng)
            .take(cfg.n_latents * d)
            .collect();
        let dec = normalize_rows(&Tensor::from_vec(data, (cfg.n_latents, d), &dev)?)?;
        let (xn, _, _) = unbiased_layer_norm(&first_batch.to_dtype(DType::F32)?, LN_EPS)?;
        let pre_bias = Var::from_tensor(&xn.mean(0)?)?;
        let encoder = Var::from_tensor(&dec)?;
        let latent_bias = Var::from_tensor(&Tensor::zeros(cfg.n_latents, DType::F32, &dev)?)?;
        let decoder = Var::from_tensor(&dec)?;
        let params = ParamsAdamW {
            lr: cfg.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 6.25e-10,
            weight_decay: 0.0,
        };
        let opt = AdamW::new(
            vec![
                pre_bias.clone(),
                encoder.clone(),
                latent_bias.clone(),
                decoder.clone(),
            ],
            params,
        )?;
        let tokens_since_fired = vec![0; cfg.n_latents];
        Ok(Self {
            cfg,
            pre_bias,
            encoder,
            latent_bias,
            decoder,
            opt,
            tokens_since_fired,
        })
    }

    /// The current SAE (a snapshot of the weights).
    pub fn sae(&self) -> Result<Sae> {
        self.sae_of(|v| v.as_tensor().detach())
    }

    /// The SAE of the weights `f` gives for each variable (OpenAI's rule).
    fn sae_of(&self, f: impl Fn(&Var) -> Tensor) -> Result<Sae> {
        let parts = SaeParts {
            w_enc: f(&self.encoder),
            b_enc: f(&self.latent_bias),
            w_dec: f(&self.decoder),
            b_dec: f(&self.pre_bias),
            activation: Activation::TopK { k: self.cfg.k },
            input_norm: InputNorm::LayerNorm,
            b_dec_on_input: true,
        };
        Sae::from_parts(parts, "<training>".into())
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.encoder.device()
    }

    /// One Adam step on a batch of raw activations `x [N, d]`.
    pub fn step(&mut self, x: &Tensor) -> Result<StepStats> {
        let n = x.dim(0)?;
        let (c, k) = (self.cfg.n_latents, self.cfg.k);
        let (xn, _, _) = unbiased_layer_norm(&x.to_dtype(DType::F32)?, LN_EPS)?;
        let sae = self.sae_of(|v| v.as_tensor().clone())?; // on the graph
        let pre = sae.pre_activations(&xn)?; // [N, C]
        let (idx, _) = topk(&pre.detach(), k)?;
        let vals = pre.gather(&idx, 1)?.relu()?; // [N, k]
        let recon = sae.decode_normalized(&idx, &vals)?; // [N, d]
        let err = (&xn - &recon)?;
        let total_var = xn.broadcast_sub(&xn.mean_keepdim(0)?)?.sqr()?.sum_all()?;
        let fvu = (err.sqr()?.sum_all()? / &total_var)?;

        // Bookkeeping of which latents fired, on the host.
        let idx_v: Vec<u32> = idx.flatten_all()?.to_vec1()?;
        let val_v: Vec<f32> = vals.flatten_all()?.to_vec1()?;
        let mut fired = vec![false; c];
        let mut l0 = 0usize;
        for (&i, &v) in idx_v.iter().zip(&val_v) {
            if v > 0.0 {
                fired[i as usize] = true;
                l0 += 1;
            }
        }
        for (t, f) in self.tokens_since_fired.iter_mut().zip(&fired) {
            *t = if *f { 0 } else { *t + n as u64 };
        }
        let dead: Vec<f32> = self
            .tokens_since_fired
            .iter()
            .map(|&t| {
                if t >= self.cfg.dead_after_tokens {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let n_dead = dead.iter().filter(|&&d| d > 0.0).count();

        let mut loss = fvu.clone();
        let mut aux_value = 0f32;
        if n_dead > 0 {
            // AuxK: the top aux_k dead latents model the residual error e.
            let ka = self.cfg.aux_k.min(n_dead);
            let mask = Tensor::from_vec(
                dead.iter()
                    .map(|&d| if d > 0.0 { 0f32 } else { f32::NEG_INFINITY })
                    .collect::<Vec<_>>(),
                c,
                x.device(),
            )?;
            let dead_pre = pre.broadcast_add(&mask)?;
            let (aidx, _) = topk(&dead_pre.detach(), ka)?;
            let avals = pre.gather(&aidx, 1)?.relu()?;
            let e_hat = sae
                .decode_normalized(&aidx, &avals)?
                .broadcast_sub(&sae.parts().b_dec)?;
            let e = err.detach();
            let e_var = e.broadcast_sub(&e.mean_keepdim(0)?)?.sqr()?.sum_all()?;
            let aux = ((&e - &e_hat)?.sqr()?.sum_all()? / (e_var + 1e-12)?)?;
            aux_value = aux.to_scalar::<f32>()?;
            loss = (loss + (aux * self.cfg.aux_coef)?)?;
        }
        let mut grads = loss.backward()?;
        // Remove the decoder gradient's component along each (unit) row, so the step moves
        // rows tangentially; renormalising after the step finishes the job.
        if let Some(g) = grads.remove(self.decoder.as_tensor()) {
            let w = self.decoder.as_tensor();
            let along = (&g * w)?.sum_keepdim(1)?; // [C, 1]
            grads.insert(w, (g - w.broadcast_mul(&along)?)?);
        }
        self.opt.step(&grads)?;
        self.decoder
            .set(&normalize_rows(self.decoder.as_tensor())?)?;
        if !self.is_finite(&fvu)? {
            return Err(Error::Other(
                "SAE training diverged (non-finite loss); lower the learning rate".into(),
            ));
        }
        Ok(StepStats {
            fvu: fvu.to_scalar()?,
            aux_loss: aux_value,
            l0: l0 as f32 / n as f32,
            dead_fraction: n_dead as f32 / c as f32,
        })
    }

    fn is_finite(&self, t: &Tensor) -> Result<bool> {
        Ok(t.to_scalar::<f32>()?.is_finite())
    }

    /// The config this trainer runs with.
    pub fn config(&self) -> &SaeTrainConfig {
        &self.cfg
    }
}
