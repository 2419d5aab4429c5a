//! One SAE type for OpenAI's TopK SAEs, SAELens' `standard` / `topk` / `jumprelu` SAEs and
//! EleutherAI sparsify's TopK SAEs. They share the affine encoder and decoder and differ in
//! three choices, kept as data: the input normalisation ([`InputNorm`]), whether `b_dec` is
//! subtracted from the input, and the activation ([`Activation`]).
//!
//! ```text
//! x̂, mean, std = norm(x)                         // per token
//! pre = (x̂ − [b_dec]) · W_encᵀ + b_enc            // [N, C]
//! z   = activation(pre)                           // sparse
//! x'  = (z · W_dec + b_dec) · std + mean          // [N, d]
//! ```
//!
//! Internal layout, whatever the file's: `W_enc [C, d]` and `W_dec [C, d]`, so row c of
//! `W_dec` is latent c's direction in the input space (OpenAI's `decoder.weight [d, C]` and
//! SAELens' `W_enc [d, C]` are transposed on load). Row gathers of `W_dec` are contiguous.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use cocomix_ops::{linear, topk, unbiased_layer_norm, WeightLayout};

use crate::{Error, Result};

/// eps added to the unbiased std of the input LayerNorm (OpenAI; SAELens `layer_norm`).
pub const LN_EPS: f64 = 1e-5;

/// Rows encoded per matrix product, bounding the `[rows, C]` pre-activation buffer.
const ENCODE_ROWS: usize = 1024;

/// Floats a decode or decoder-dot step may hold at once (128 MiB of f32): sparse codes are
/// processed in row chunks of this budget.
const STEP_FLOATS: usize = 1 << 25;

/// Codes at most `C / GATHER_RATIO` wide gather decoder rows; wider codes go through the
/// dense product, which is faster there and needs `[rows, C]` instead of `[rows, w, d]`.
const GATHER_RATIO: usize = 16;

/// Codes wider than this trigger a (one-time) warning: the SAE is not sparse on this input.
const WIDE_CODES: usize = 1024;

/// Which latents fire, given the pre-activations.
#[derive(Clone, Debug)]
pub enum Activation {
    /// The `k` largest pre-activations, then ReLU on them; ties go to the lower index
    /// (OpenAI `TopK`, SAELens `topk`, sparsify `topk`).
    TopK {
        /// Latents kept per token.
        k: usize,
    },
    /// ReLU on every latent (SAELens `standard`).
    Relu,
    /// `z_c = pre_c · [pre_c > θ_c]` after ReLU (SAELens `jumprelu`).
    JumpRelu {
        /// `θ [C]`
        threshold: Tensor,
    },
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Activation::TopK { k } => write!(f, "TopK (k = {k})"),
            Activation::Relu => write!(f, "ReLU"),
            Activation::JumpRelu { .. } => write!(f, "JumpReLU"),
        }
    }
}

/// How an input vector is normalised before encoding; decoding undoes it. Each token gets
/// a `mean` and a `std` with `x ≈ x̂·std + mean` (see [`InputNorm::apply`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InputNorm {
    /// Raw inputs (SAELens `none`, sparsify).
    None,
    /// Subtract the token's mean, divide by its unbiased std + [`LN_EPS`]; decoding
    /// multiplies by the std (without eps) and adds the mean (OpenAI; SAELens `layer_norm`).
    LayerNorm,
    /// Multiply by a fixed factor `s`, decoding divides by it (SAELens
    /// `expected_average_only_in`, `s = √d / E‖x‖` estimated during training).
    Scale(f64),
    /// Multiply each token by `√d / ‖x‖`, decoding divides by it (SAELens
    /// `constant_norm_rescale`).
    ConstantNormRescale,
}

impl std::fmt::Display for InputNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InputNorm::None => write!(f, "raw inputs"),
            InputNorm::LayerNorm => write!(f, "LayerNorm inputs"),
            InputNorm::Scale(s) => write!(f, "inputs scaled by {s}"),
            InputNorm::ConstantNormRescale => write!(f, "inputs rescaled to norm √d"),
        }
    }
}

impl InputNorm {
    /// `(x̂ [N, d], mean [N, 1], std [N, 1])` of `x [N, d]`: the normalised input, and what
    /// decoding multiplies by (`std`) and then adds (`mean`).
    pub fn apply(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, d) = x.dims2()?;
        let dev = x.device();
        let zeros = || Tensor::zeros((n, 1), DType::F32, dev);
        Ok(match *self {
            InputNorm::None => (x.clone(), zeros()?, Tensor::ones((n, 1), DType::F32, dev)?),
            InputNorm::LayerNorm => unbiased_layer_norm(x, LN_EPS)?,
            InputNorm::Scale(s) => (
                (x * s)?,
                zeros()?,
                Tensor::full((1.0 / s) as f32, (n, 1), dev)?,
            ),
            InputNorm::ConstantNormRescale => {
                let root_d = (d as f64).sqrt();
                let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?; // [N, 1]
                let coeff = (norm.recip()? * root_d)?; // √d / ‖x‖, as SAELens computes it
                (x.broadcast_mul(&coeff)?, zeros()?, (norm / root_d)?)
            }
        })
    }
}

/// The parts of an SAE in the internal layout (see the module docs), for [`Sae::from_parts`].
#[derive(Clone, Debug)]
pub struct SaeParts {
    /// Encoder `W_enc [C, d]` (OpenAI / sparsify `encoder.weight`; SAELens `W_enc` transposed).
    pub w_enc: Tensor,
    /// Encoder bias `b_enc [C]` (OpenAI `latent_bias`, sparsify `encoder.bias`).
    pub b_enc: Tensor,
    /// Decoder `W_dec [C, d]`, row c = latent c's direction (SAELens / sparsify `W_dec`;
    /// OpenAI `decoder.weight` transposed).
    pub w_dec: Tensor,
    /// Decoder bias `b_dec [d]`, added by the decoder (OpenAI `pre_bias`).
    pub b_dec: Tensor,
    /// Which latents fire.
    pub activation: Activation,
    /// The input normalisation.
    pub input_norm: InputNorm,
    /// Subtract `b_dec` from the normalised input before the encoder (OpenAI and sparsify:
    /// always; SAELens: `apply_b_dec_to_input`).
    pub b_dec_on_input: bool,
}

/// A sparse autoencoder (see the module docs for the rule and the layout).
pub struct Sae {
    parts: SaeParts,
    source: PathBuf,
    files: Vec<PathBuf>,
}

/// Sparse latents of `N` tokens, plus each token's normalisation for decoding.
///
/// Each row holds `w` (index, value) pairs sorted by value, descending (ties: lower index
/// first), with distinct indices. For a TopK SAE `w = k`. For ReLU and JumpReLU SAEs, whose
/// number of active latents varies per token, `w` is the largest number of active latents
/// of any token in the batch (at least 1, at most C), and shorter rows are padded with
/// value-0 entries at the lowest inactive indices: a zero value adds nothing to a decode
/// and scores 0 in attribution. At `w = C` the codes hold every latent of every token, as
/// large as the dense latents (plus the indices); that stays correct, and decoding and
/// attribution switch to the dense product for wide codes.
pub struct SparseCodes {
    /// `[N, w]` u32
    pub indices: Tensor,
    /// `[N, w]`, after the activation (a kept latent can be 0)
    pub values: Tensor,
    /// `[N, 1]` what decoding adds back per token (the LayerNorm mean; else 0)
    pub mean: Tensor,
    /// `[N, 1]` what decoding multiplies by per token (the LayerNorm's unbiased std, `1/s`,
    /// `‖x‖/√d`; else 1)
    pub std: Tensor,
}

fn expect_shape(source: &Path, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(Error::file(
            source,
            format!("{name} has shape {:?}, expected {want:?}", t.dims()),
        ));
    }
    Ok(())
}

impl Sae {
    /// An OpenAI TopK SAE from its four tensors in OpenAI's layout (`encoder.weight [C, d]`,
    /// `decoder.weight [d, C]`), with OpenAI's rule: LayerNorm inputs, `pre_bias`
    /// subtracted from the input and added by the decoder, top k then ReLU.
    pub fn new(
        pre_bias: Tensor,
        encoder: Tensor,
        latent_bias: Tensor,
        decoder: Tensor,
        k: usize,
        source: PathBuf,
    ) -> Result<Self> {
        let (c, d) = encoder.dims2().map_err(|_| {
            Error::file(
                &source,
                format!("encoder.weight must be 2-D, is {:?}", encoder.dims()),
            )
        })?;
        expect_shape(&source, "pre_bias", &pre_bias, &[d])?;
        expect_shape(&source, "latent_bias", &latent_bias, &[c])?;
        expect_shape(&source, "decoder.weight", &decoder, &[d, c])?;
        let parts = SaeParts {
            w_enc: encoder,
            b_enc: latent_bias,
            w_dec: decoder.t()?.contiguous()?,
            b_dec: pre_bias,
            activation: Activation::TopK { k },
            input_norm: InputNorm::LayerNorm,
            b_dec_on_input: true,
        };
        Self::from_parts(parts, source)
    }

    /// An SAE from its parts, checking that their shapes agree; `source` names it in errors.
    pub fn from_parts(mut parts: SaeParts, source: PathBuf) -> Result<Self> {
        let (c, d) = parts.w_enc.dims2().map_err(|_| {
            Error::file(
                &source,
                format!("W_enc must be 2-D, is {:?}", parts.w_enc.dims()),
            )
        })?;
        expect_shape(&source, "b_enc", &parts.b_enc, &[c])?;
        expect_shape(&source, "W_dec", &parts.w_dec, &[c, d])?;
        expect_shape(&source, "b_dec", &parts.b_dec, &[d])?;
        match &parts.activation {
            Activation::TopK { k } if *k == 0 || *k > c => {
                return Err(Error::file(&source, format!("k = {k} must be in 1..={c}")))
            }
            Activation::JumpRelu { threshold } => {
                expect_shape(&source, "threshold", threshold, &[c])?
            }
            _ => {}
        }
        if let InputNorm::Scale(s) = parts.input_norm {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::file(
                    &source,
                    format!("the input scaling factor {s} must be finite and positive"),
                ));
            }
        }
        let f32c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
        parts.w_enc = f32c(&parts.w_enc)?;
        parts.b_enc = f32c(&parts.b_enc)?;
        parts.w_dec = f32c(&parts.w_dec)?;
        parts.b_dec = f32c(&parts.b_dec)?;
        if let Activation::JumpRelu { threshold } = &mut parts.activation {
            *threshold = f32c(threshold)?;
        }
        Ok(Self {
            parts,
            files: Vec::new(),
            source,
        })
    }

    /// Input width d.
    pub fn d_model(&self) -> usize {
        self.parts.b_dec.dims()[0]
    }

    /// Number of latents C.
    pub fn n_latents(&self) -> usize {
        self.parts.b_enc.dims()[0]
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.parts.w_enc.device()
    }

    /// The parts (weights in the internal layout, activation, normalisation).
    pub fn parts(&self) -> &SaeParts {
        &self.parts
    }

    /// The activation.
    pub fn activation(&self) -> &Activation {
        &self.parts.activation
    }

    /// The input normalisation.
    pub fn input_norm(&self) -> InputNorm {
        self.parts.input_norm
    }

    /// The decoder `W_dec [C, d]`: row c is latent c's direction in the input space.
    pub fn w_dec(&self) -> &Tensor {
        &self.parts.w_dec
    }

    /// Latent `i`'s decoder direction `[d]`, in the (normalised) input space, whatever the
    /// file's layout.
    pub fn decoder_column(&self, i: usize) -> Result<Tensor> {
        let c = self.n_latents();
        if i >= c {
            return Err(Error::Other(format!("latent {i} out of range (C = {c})")));
        }
        Ok(self.parts.w_dec.get(i)?)
    }

    /// Where it was loaded from (a file or an SAE folder).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The local files it was loaded from, weights first (a folder SAE adds its `cfg.json`
    /// and, when present, SAELens' `activation_scaler.json`): what identifies it, e.g. for
    /// hashing. Empty for an SAE built in memory.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub(crate) fn with_files(mut self, files: Vec<PathBuf>) -> Self {
        self.files = files;
        self
    }

    /// Errors (naming the file) unless the SAE reads vectors of width `d_model`.
    pub fn check_input_width(&self, d_model: usize, what: &str) -> Result<()> {
        if self.d_model() != d_model {
            return Err(Error::file(
                &self.source,
                format!(
                    "the SAE reads vectors of width {}, but {what} has d_model {d_model}",
                    self.d_model()
                ),
            ));
        }
        Ok(())
    }

    /// Pre-activations `[N, C]` of normalised inputs `xn [N, d]`.
    pub fn pre_activations(&self, xn: &Tensor) -> Result<Tensor> {
        let p = &self.parts;
        let xin = if p.b_dec_on_input {
            xn.broadcast_sub(&p.b_dec)?
        } else {
            xn.clone()
        };
        // One fused node on the CPU: W_enc [C, d] read as stored, the bias in the output.
        Ok(linear(&xin, &p.w_enc, Some(&p.b_enc), WeightLayout::OutIn)?)
    }

    /// The kept latents of pre-activations `pre [n, C]`: `(indices, values)`, `[n, w]`.
    fn activate(&self, pre: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = match &self.parts.activation {
            Activation::TopK { k } => {
                let (i, v) = topk(pre, *k)?;
                return Ok((i, v.relu()?));
            }
            Activation::Relu => pre.relu()?,
            Activation::JumpRelu { threshold } => {
                let keep = pre.broadcast_gt(threshold)?.to_dtype(DType::F32)?;
                (pre.relu()? * keep)?
            }
        };
        let active = z.gt(0f64)?.to_dtype(DType::U32)?.sum(1)?.max(0)?;
        let w = (active.to_scalar::<u32>()? as usize).max(1);
        Ok(topk(&z, w)?)
    }

    /// Encodes `x [.., d]` (flattened to `N` tokens): normalise, subtract `b_dec` if the
    /// format does, encoder, activation. See [`SparseCodes`] for the width of the codes.
    pub fn encode(&self, x: &Tensor) -> Result<SparseCodes> {
        let d = self.d_model();
        if x.dim(D::Minus1)? != d {
            return Err(Error::Other(format!(
                "SAE input has width {}, expected {d}",
                x.dim(D::Minus1)?
            )));
        }
        let x = x.to_dtype(DType::F32)?.reshape(((), d))?;
        let n = x.dim(0)?;
        let (mut kept, mut mus, mut stds) = (Vec::new(), Vec::new(), Vec::new());
        for start in (0..n).step_by(ENCODE_ROWS) {
            let rows = x.narrow(0, start, ENCODE_ROWS.min(n - start))?;
            let (xn, mu, std) = self.parts.input_norm.apply(&rows)?;
            kept.push(self.activate(&self.pre_activations(&xn)?)?);
            mus.push(mu);
            stds.push(std);
        }
        let dev = x.device();
        if n == 0 {
            let w = match self.parts.activation {
                Activation::TopK { k } => k,
                _ => 1,
            };
            return Ok(SparseCodes {
                indices: Tensor::zeros((0, w), DType::U32, dev)?,
                values: Tensor::zeros((0, w), DType::F32, dev)?,
                mean: Tensor::zeros((0, 1), DType::F32, dev)?,
                std: Tensor::zeros((0, 1), DType::F32, dev)?,
            });
        }
        let w = kept.iter().map(|(i, _)| i.dims()[1]).max().unwrap_or(1);
        if w > WIDE_CODES {
            static WARN: std::sync::Once = std::sync::Once::new();
            WARN.call_once(|| {
                tracing::warn!(
                    "{}: up to {w} of {} latents active per token; is it reading the layer it was trained on?",
                    self.source.display(),
                    self.n_latents()
                )
            });
        }
        let (mut idx, mut val) = (Vec::new(), Vec::new());
        for (i, v) in kept {
            let (i, v) = pad_codes(i, v, w)?;
            idx.push(i);
            val.push(v);
        }
        Ok(SparseCodes {
            indices: Tensor::cat(&idx, 0)?,
            values: Tensor::cat(&val, 0)?,
            mean: Tensor::cat(&mus, 0)?,
            std: Tensor::cat(&stds, 0)?,
        })
    }

    /// The dense latents `z [N, C]` of sparse codes.
    pub fn dense(&self, codes: &SparseCodes) -> Result<Tensor> {
        let (n, _) = codes.indices.dims2()?;
        let z = Tensor::zeros((n, self.n_latents()), DType::F32, codes.values.device())?;
        Ok(z.scatter(&codes.indices, &codes.values, 1)?)
    }

    /// Whether codes `w` wide gather decoder rows (else they take the dense product).
    fn gathers(&self, w: usize) -> bool {
        w * GATHER_RATIO <= self.n_latents()
    }

    /// Runs `f(first_row, rows)` on row chunks of `[N, w]` codes whose step holds at most
    /// `step_floats` floats, concatenating the results along rows.
    fn by_rows(
        &self,
        indices: &Tensor,
        step_floats: usize,
        f: impl Fn(usize, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (n, w) = indices.dims2()?;
        let per_row = if self.gathers(w) {
            w * self.d_model()
        } else {
            self.n_latents()
        };
        let rows = (step_floats / per_row.max(1)).max(1);
        if rows >= n {
            return f(0, n);
        }
        let parts = (0..n)
            .step_by(rows)
            .map(|s| f(s, rows.min(n - s)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Decoder rows of `[r, w]` indices, `[r, w, d]`.
    fn gather_rows(&self, indices: &Tensor) -> Result<Tensor> {
        let (r, w) = indices.dims2()?;
        Ok(self
            .parts
            .w_dec
            .index_select(&indices.flatten_all()?, 0)?
            .reshape((r, w, self.d_model()))?)
    }

    /// `⟨W_dec[i_nj], g_n⟩` for codes `indices [N, w]` and vectors `g [N, d]`, `[N, w]`:
    /// how much each kept latent's direction points along `g` (attribution's dot products).
    pub fn decoder_dots(&self, indices: &Tensor, g: &Tensor) -> Result<Tensor> {
        self.decoder_dots_in(indices, g, STEP_FLOATS)
    }

    fn decoder_dots_in(&self, indices: &Tensor, g: &Tensor, step_floats: usize) -> Result<Tensor> {
        let w = indices.dim(1)?;
        self.by_rows(indices, step_floats, |s, r| {
            let (idx, g) = (indices.narrow(0, s, r)?, g.narrow(0, s, r)?);
            Ok(if self.gathers(w) {
                self.gather_rows(&idx)?
                    .broadcast_mul(&g.unsqueeze(1)?)?
                    .sum(2)? // [r, w]
            } else {
                g.matmul(&self.parts.w_dec.t()?)?.gather(&idx, 1)? // [r, C] → [r, w]
            })
        })
    }

    /// Decodes in the normalised space: `Σ_j v_j · W_dec[i_j] + b_dec`, `[N, d]`. Narrow
    /// codes touch only their decoder rows; differentiable in `values` and the weights.
    pub fn decode_normalized(&self, indices: &Tensor, values: &Tensor) -> Result<Tensor> {
        self.decode_normalized_in(indices, values, STEP_FLOATS)
    }

    fn decode_normalized_in(
        &self,
        indices: &Tensor,
        values: &Tensor,
        step_floats: usize,
    ) -> Result<Tensor> {
        let w = indices.dim(1)?;
        let c = self.n_latents();
        let xn = self.by_rows(indices, step_floats, |s, r| {
            let (idx, val) = (indices.narrow(0, s, r)?, values.narrow(0, s, r)?);
            Ok(if self.gathers(w) {
                val.unsqueeze(2)?
                    .broadcast_mul(&self.gather_rows(&idx)?)?
                    .sum(1)? // [r, d]
            } else {
                Tensor::zeros((r, c), DType::F32, val.device())?
                    .scatter(&idx, &val, 1)?
                    .matmul(&self.parts.w_dec)?
            })
        })?;
        Ok(xn.broadcast_add(&self.parts.b_dec)?)
    }

    /// Reconstruction `(z · W_dec + b_dec) · std + mean`, `[N, d]`.
    pub fn decode(&self, codes: &SparseCodes) -> Result<Tensor> {
        let xn = self.decode_normalized(&codes.indices, &codes.values)?;
        Ok(xn.broadcast_mul(&codes.std)?.broadcast_add(&codes.mean)?)
    }

    /// The same decode from dense latents `z [N, C]` (the reference formula, for tests and
    /// for steering edits that change which latents are active).
    pub fn decode_dense(&self, z: &Tensor, mean: &Tensor, std: &Tensor) -> Result<Tensor> {
        let xn = z
            .matmul(&self.parts.w_dec)?
            .broadcast_add(&self.parts.b_dec)?;
        Ok(xn.broadcast_mul(std)?.broadcast_add(mean)?)
    }

    /// Moves the weights to `device`.
    pub fn to_device(self, device: &Device) -> Result<Self> {
        let p = self.parts;
        let activation = match p.activation {
            Activation::JumpRelu { threshold } => Activation::JumpRelu {
                threshold: threshold.to_device(device)?,
            },
            a => a,
        };
        Ok(Self {
            parts: SaeParts {
                w_enc: p.w_enc.to_device(device)?,
                b_enc: p.b_enc.to_device(device)?,
                w_dec: p.w_dec.to_device(device)?,
                b_dec: p.b_dec.to_device(device)?,
                activation,
                ..p
            },
            ..self
        })
    }

    /// Loads an SAE from a spec: a local path (an OpenAI `.pt` file, a `.safetensors` file
    /// with `k` in its metadata, a SAELens folder with `cfg.json` + `sae_weights.safetensors`,
    /// a sparsify hookpoint folder with `cfg.json` + `sae.safetensors`), an `https://` URL of
    /// a file, or `hf://owner/repo/path`: a file when the path ends in `.pt`/`.safetensors`,
    /// else a folder of the repository (a SAELens `sae_id` folder, a sparsify hookpoint;
    /// `hf://owner/repo` is the repository's root).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let found = crate::load::resolve(spec)?;
        crate::load::load_resolved(&found)?.to_device(device)
    }

    /// Loads a local file or SAE folder (see [`Sae::load`]).
    pub fn load_file(path: &Path, device: &Device) -> Result<Self> {
        crate::load::load_resolved(&crate::load::local(path)?)?.to_device(device)
    }

    /// Saves an OpenAI-rule TopK SAE as safetensors (OpenAI's four tensors; `k` and
    /// `activation = TopK` in the metadata), atomically. Other SAEs are refused: their own
    /// folders already hold them.
    pub fn save(&self, path: &Path, extra_meta: &[(&str, String)]) -> Result<()> {
        crate::load::save_safetensors(self, path, extra_meta)
    }
}

/// Pads `[n, w0]` codes to `w` columns with value-0 entries at each row's lowest indices not
/// yet in it: exactly the extra columns a top-w selection would have picked after the
/// top-w0, since every latent outside the top-w0 of such a row is 0.
fn pad_codes(indices: Tensor, values: Tensor, w: usize) -> Result<(Tensor, Tensor)> {
    let (n, w0) = indices.dims2()?;
    if w0 == w {
        return Ok((indices, values));
    }
    let dev = indices.device().clone();
    let rows: Vec<Vec<u32>> = indices.to_vec2()?;
    let mut out = Vec::with_capacity(n * w);
    for row in rows {
        let mut taken = row.clone();
        taken.sort_unstable();
        let mut taken = taken.into_iter().peekable();
        out.extend_from_slice(&row);
        let mut next = 0u32;
        for _ in w0..w {
            while taken.peek() == Some(&next) {
                taken.next();
                next += 1;
            }
            out.push(next);
            next += 1;
        }
    }
    let pad = Tensor::zeros((n, w - w0), values.dtype(), &dev)?;
    Ok((
        Tensor::from_vec(out, (n, w), &dev)?,
        Tensor::cat(&[&values, &pad], 1)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Sparse decode and decoder dots equal their dense references whether the codes
    /// gather rows (narrow) or take the dense product (wide), in one step or one row at a
    /// time.
    #[test]
    fn decode_and_dots_match_dense_on_both_paths_and_any_row_chunking() {
        let (c, d, n) = (64, 8, 7);
        for (k, gathers) in [(3, true), (20, false)] {
            let sae = Sae::from_parts(
                SaeParts {
                    w_enc: random(&[c, d], 1),
                    b_enc: random(&[c], 2),
                    w_dec: random(&[c, d], 3),
                    b_dec: random(&[d], 4),
                    activation: Activation::TopK { k },
                    input_norm: InputNorm::None,
                    b_dec_on_input: true,
                },
                "test".into(),
            )
            .unwrap();
            assert_eq!(sae.gathers(k), gathers);
            let codes = sae.encode(&random(&[n, d], 5)).unwrap();
            let z = sae.dense(&codes).unwrap();
            let g = random(&[n, d], 6);
            let dense_xn = z
                .matmul(sae.w_dec())
                .unwrap()
                .broadcast_add(&sae.parts.b_dec)
                .unwrap();
            let dense_dots = g
                .matmul(&sae.w_dec().t().unwrap())
                .unwrap()
                .gather(&codes.indices, 1)
                .unwrap();
            for step in [STEP_FLOATS, 1] {
                let xn = sae
                    .decode_normalized_in(&codes.indices, &codes.values, step)
                    .unwrap();
                assert!(max_diff(&xn, &dense_xn) < 1e-5, "k {k} step {step}");
                let dots = sae.decoder_dots_in(&codes.indices, &g, step).unwrap();
                assert!(max_diff(&dots, &dense_dots) < 1e-5, "k {k} step {step}");
            }
        }
    }

    #[test]
    fn padding_adds_the_lowest_indices_not_in_a_row() {
        let dev = Device::Cpu;
        let idx = Tensor::new(&[[3u32, 0], [1, 2]], &dev).unwrap();
        let val = Tensor::new(&[[2f32, 1.], [5., 4.]], &dev).unwrap();
        let (i, v) = pad_codes(idx, val, 5).unwrap();
        assert_eq!(
            i.to_vec2::<u32>().unwrap(),
            vec![vec![3, 0, 1, 2, 4], vec![1, 2, 0, 3, 4]]
        );
        assert_eq!(
            v.to_vec2::<f32>().unwrap(),
            vec![vec![2., 1., 0., 0., 0.], vec![5., 4., 0., 0., 0.]]
        );
    }
}
