//! EleutherAI sparsify hookpoint folders: `cfg.json` + `sae.safetensors`
//! (`encoder.weight [C, d]`, `encoder.bias [C]`, `W_dec [C, d]`, `b_dec [d]`), as
//! `SparseCoder.save_to_disk` writes them. Encode rule (`SparseCoder.encode`): encoder on
//! `x − b_dec`, ReLU, top k; decode `Σ z_i W_dec[i] + b_dec`. A repository holds one such
//! folder per hookpoint (e.g. `layers.10`).
use std::path::Path;

use crate::load::{FolderFiles, Weights};
use crate::sae::{Activation, InputNorm, SaeParts};
use crate::{Result, Sae};

/// The weights file of a sparsify hookpoint folder.
pub(crate) const WEIGHTS: &str = "sae.safetensors";

/// Loads a sparsify hookpoint folder (on the CPU).
pub(crate) fn load(files: &FolderFiles) -> Result<Sae> {
    let cfg = &files.cfg;
    let (d, k) = (cfg.usize("d_in")?, cfg.usize("k")?);
    match cfg.opt_str("activation")?.unwrap_or("topk") {
        "topk" => {}
        "groupmax" => return Err(cfg.err(
            "activation \"groupmax\" (the max of each of k latent groups) is not supported (topk)",
        )),
        other => return Err(cfg.err(format!("activation {other:?} is unknown (topk)"))),
    }
    if cfg.opt_bool("transcode")?.unwrap_or(false) {
        return Err(cfg.err(
            "a transcoder (transcode = true) predicts another module's output; only autoencoders are supported",
        ));
    }
    if cfg.opt_bool("skip_connection")?.unwrap_or(false) {
        return Err(cfg.err(
            "skip_connection = true (a linear skip term W_skip in the output) is not supported",
        ));
    }
    // `SparseCoder`: num_latents, or d_in · expansion_factor when it is 0.
    let c = match cfg.opt_usize("num_latents")? {
        Some(n) if n > 0 => n,
        _ => d * cfg.opt_usize("expansion_factor")?.unwrap_or(32),
    };
    let mut w = Weights::read(
        &files.weights,
        format!("d_in = {d}, {c} latents by {}", cfg.path.display()),
    )?;
    let parts = SaeParts {
        w_enc: w.take("encoder.weight", &[c, d])?,
        b_enc: w.take("encoder.bias", &[c])?,
        w_dec: w.take("W_dec", &[c, d])?,
        b_dec: w.take("b_dec", &[d])?,
        // ReLU then top k keeps the same values as top k then ReLU (OpenAI's order).
        activation: Activation::TopK { k },
        input_norm: InputNorm::None,
        b_dec_on_input: true,
    };
    w.finish("a sparsify SAE")?;
    let source = cfg.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    Sae::from_parts(parts, source)
}
