//! SAELens SAE folders: `cfg.json` + `sae_weights.safetensors` (`W_enc [d, C]`, `b_enc`,
//! `W_dec [C, d]`, `b_dec`, and `threshold [C]` for JumpReLU), as SAELens 6 saves them, and
//! the older configs SAELens converts when it loads them (`handle_pre_6_0_config`).
//! The encode rule is SAELens' inference rule (`SAE.process_sae_in`, the architectures'
//! `encode`/`decode`, `_setup_activation_normalization`).
use std::path::Path;

use crate::load::{CfgJson, FolderFiles, Weights};
use crate::sae::{Activation, InputNorm, SaeParts};
use crate::{Error, Result, Sae};

/// The weights file of a SAELens folder.
pub(crate) const WEIGHTS: &str = "sae_weights.safetensors";

/// Where a SAELens training checkpoint keeps the `expected_average_only_in` factor.
pub(crate) const SCALER: &str = "activation_scaler.json";

const ARCHITECTURES: &str = "standard, topk, jumprelu";

/// The architectures read here.
enum Arch {
    Standard,
    TopK { k: usize },
    JumpRelu,
}

fn architecture(cfg: &CfgJson) -> Result<Arch> {
    // SAELens < 6 named the activation in `activation_fn_str` / `activation_fn` (with `k` in
    // `activation_fn_kwargs`) and had no `architecture` ("standard").
    let legacy_fn = match cfg.opt_str("activation_fn")? {
        Some(f) => Some(f),
        None => cfg.opt_str("activation_fn_str")?,
    };
    if let Some(f) = legacy_fn.filter(|f| !["relu", "topk"].contains(f)) {
        return Err(cfg.err(format!("activation_fn {f:?} is not supported (relu, topk)")));
    }
    let arch = cfg.opt_str("architecture")?.unwrap_or("standard");
    let k = || -> Result<usize> {
        if let Some(k) = cfg.opt_usize("k")? {
            return Ok(k);
        }
        cfg.get("activation_fn_kwargs")
            .and_then(|kw| kw.get("k"))
            .and_then(|k| k.as_u64())
            .map(|k| k as usize)
            .ok_or_else(|| cfg.err("a topk SAE needs `k` (or `activation_fn_kwargs.k`)"))
    };
    match (arch, legacy_fn) {
        ("topk", _) | ("standard", Some("topk")) => Ok(Arch::TopK { k: k()? }),
        ("standard", _) => Ok(Arch::Standard),
        ("jumprelu", _) => Ok(Arch::JumpRelu),
        (other, _) => Err(cfg.err(format!(
            "architecture {other:?} is not supported ({ARCHITECTURES})"
        ))),
    }
}

/// Whether the config needs the scaling factor of `activation_scaler.json`.
pub(crate) fn needs_scaler(cfg: &CfgJson) -> bool {
    let scaled = match cfg.get("normalize_activations") {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(v) => v.as_str() == Some("expected_average_only_in"),
        None => false,
    };
    scaled && cfg.get("norm_scaling_factor").is_none()
}

/// SAELens' `normalize_activations` as it runs at inference.
fn input_norm(cfg: &CfgJson, scaler: Option<&Path>) -> Result<InputNorm> {
    let mode = match cfg.get("normalize_activations") {
        None => "none",
        // SAELens < 6: a boolean, true meaning expected_average_only_in.
        Some(serde_json::Value::Bool(false)) => "none",
        Some(serde_json::Value::Bool(true)) => "expected_average_only_in",
        Some(_) => cfg.opt_str("normalize_activations")?.unwrap_or("none"),
    };
    match mode {
        "none" => Ok(InputNorm::None),
        "layer_norm" => Ok(InputNorm::LayerNorm),
        "constant_norm_rescale" => Ok(InputNorm::ConstantNormRescale),
        "expected_average_only_in" => Ok(InputNorm::Scale(scaling_factor(cfg, scaler)?)),
        "covariance_whitening" => Err(cfg.err(
            "normalize_activations \"covariance_whitening\" is not supported: the whitening \
             lives outside the SAE weights; fold it into them with SAELens' \
             fold_activation_whitening (as SAELens does when training ends) and save the SAE",
        )),
        other => Err(cfg.err(format!(
            "normalize_activations {other:?} is unknown (none, expected_average_only_in, \
             constant_norm_rescale, layer_norm)"
        ))),
    }
}

/// The `expected_average_only_in` factor: a training checkpoint's `activation_scaler.json`,
/// else `norm_scaling_factor` in `cfg.json` (SAELens lists it per release in its
/// `pretrained_saes.yaml` under that name and folds it into the weights on loading).
fn scaling_factor(cfg: &CfgJson, scaler: Option<&Path>) -> Result<f64> {
    if let Some(path) = scaler {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        // null: the factor was folded into the weights already, or never estimated.
        if let Some(s) = v.get("scaling_factor").filter(|s| !s.is_null()) {
            return s.as_f64().ok_or_else(|| {
                Error::file(path, format!("`scaling_factor` = {s} is not a number"))
            });
        }
    }
    cfg.opt_f64("norm_scaling_factor")?.ok_or_else(|| {
        cfg.err(format!(
            "normalize_activations \"expected_average_only_in\" needs the input scaling \
             factor, which SAELens keeps outside cfg.json (a training checkpoint's {SCALER}, \
             or the release's `norm_scaling_factor` in SAELens' pretrained_saes.yaml); add it \
             to cfg.json as \"norm_scaling_factor\""
        ))
    })
}

/// Loads a SAELens folder (on the CPU).
pub(crate) fn load(files: &FolderFiles) -> Result<Sae> {
    let cfg = &files.cfg;
    let (d, c) = (cfg.usize("d_in")?, cfg.usize("d_sae")?);
    let arch = architecture(cfg)?;
    let input_norm = input_norm(cfg, files.scaler.as_deref())?;
    // SAELens < 6 reshaped hook_z inputs whenever the hook name said so.
    let hook = cfg
        .opt_str("hook_name")?
        .or(cfg.opt_str("hook_point")?)
        .unwrap_or("");
    let hook_z = match cfg.opt_str("reshape_activations")? {
        Some("hook_z") => true,
        Some("none") => false,
        None => hook.contains("hook_z"),
        Some(other) => {
            return Err(cfg.err(format!(
                "reshape_activations {other:?} is unknown (none, hook_z)"
            )))
        }
    };
    if hook_z {
        return Err(cfg.err(
            "an SAE on attention hook_z reads per-head vectors, not the residual stream; not supported",
        ));
    }
    let b_dec_on_input = cfg.opt_bool("apply_b_dec_to_input")?.unwrap_or(true);
    let mut w = Weights::read(
        &files.weights,
        format!("d_in = {d}, d_sae = {c} in {}", cfg.path.display()),
    )?;
    let mut w_enc = w.take("W_enc", &[d, c])?; // SAELens layout [d, C]
    let mut b_enc = w.take("b_enc", &[c])?;
    let mut w_dec = w.take("W_dec", &[c, d])?;
    let b_dec = w.take("b_dec", &[d])?;
    let (activation, what) = match arch {
        Arch::Standard => (Activation::Relu, "a SAELens standard SAE"),
        Arch::TopK { k } => (Activation::TopK { k }, "a SAELens topk SAE"),
        Arch::JumpRelu => {
            // Older JumpReLU checkpoints store log θ (SAELens converts it on loading).
            let threshold = if w.has("log_threshold") && !w.has("threshold") {
                w.take("log_threshold", &[c])?.exp()?
            } else {
                w.take("threshold", &[c])?
            };
            (Activation::JumpRelu { threshold }, "a SAELens jumprelu SAE")
        }
    };
    // SAELens drops an all-ones `scaling_factor` (older files carry one) and cannot use
    // another at inference.
    if w.has("scaling_factor") {
        let s = w.take("scaling_factor", &[c])?;
        if s.ne(1f64)?
            .sum_all()?
            .to_dtype(candle_core::DType::U32)?
            .to_scalar::<u32>()?
            > 0
        {
            return Err(Error::file(
                &files.weights,
                "tensor `scaling_factor` is not all ones: a finetuning scaling factor, not supported",
            ));
        }
    }
    w.finish(what)?;
    if let Activation::TopK { .. } = activation {
        if cfg
            .opt_bool("rescale_acts_by_decoder_norm")?
            .unwrap_or(false)
        {
            // SAELens multiplies the pre-activations by ‖W_dec[c]‖ and divides the latents
            // by it before decoding; folding the norms into the weights (as SAELens does
            // when it saves an inference model) gives the same latents and decode.
            let norms = w_dec
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-8, f64::INFINITY)?; // [C, 1]
            w_enc = w_enc.broadcast_mul(&norms.t()?)?;
            b_enc = (b_enc * norms.squeeze(1)?)?;
            w_dec = w_dec.broadcast_div(&norms)?;
        }
    }
    let parts = SaeParts {
        w_enc: w_enc.t()?,
        b_enc,
        w_dec,
        b_dec,
        activation,
        input_norm,
        b_dec_on_input,
    };
    let source = cfg.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    Sae::from_parts(parts, source)
}
