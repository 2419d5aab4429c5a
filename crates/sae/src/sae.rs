//! The TopK SAE and its exact encode/decode (OpenAI's `sparse_autoencoder` `Autoencoder`, docs/design.md).
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use cocomix_ops::{topk, unbiased_layer_norm};

use crate::{Error, Result};

/// eps added to the unbiased std of the input LayerNorm.
pub const LN_EPS: f64 = 1e-5;

/// Rows encoded per matrix product, bounding the `[rows, n_latents]` pre-activation buffer.
const ENCODE_ROWS: usize = 1024;

/// A TopK sparse autoencoder with normalised inputs (OpenAI's `Autoencoder` with
/// `activation = TopK`, `normalize = True`).
pub struct Sae {
    /// `pre_bias [d]`
    pub pre_bias: Tensor,
    /// `encoder.weight [C, d]`
    pub encoder: Tensor,
    /// `latent_bias [C]`
    pub latent_bias: Tensor,
    /// `decoder.weight [d, C]` (untied)
    pub decoder: Tensor,
    /// Latents kept per token.
    pub k: usize,
    /// Where it was loaded from (for error messages and metadata).
    pub source: PathBuf,
}

/// Sparse latents of `N` tokens: each row's `k` kept latents sorted by value, descending
/// (ties: lower index first), plus each token's LayerNorm statistics for decoding.
pub struct SparseCodes {
    /// `[N, k]` u32
    pub indices: Tensor,
    /// `[N, k]`, ReLU applied (a kept latent can be 0)
    pub values: Tensor,
    /// `[N, 1]` per-token mean of the input
    pub mean: Tensor,
    /// `[N, 1]` per-token unbiased std of the centred input
    pub std: Tensor,
}

impl Sae {
    /// Builds an SAE from its four tensors, checking that their shapes agree.
    pub fn new(
        pre_bias: Tensor,
        encoder: Tensor,
        latent_bias: Tensor,
        decoder: Tensor,
        k: usize,
        source: PathBuf,
    ) -> Result<Self> {
        let bad = |m: String| Err(Error::file(&source, m));
        let (c, d) = encoder.dims2().map_err(|_| {
            Error::file(
                &source,
                format!("encoder.weight must be 2-D, is {:?}", encoder.dims()),
            )
        })?;
        if pre_bias.dims() != [d] {
            return bad(format!(
                "pre_bias has shape {:?}, expected [{d}] (encoder.weight is [{c}, {d}])",
                pre_bias.dims()
            ));
        }
        if latent_bias.dims() != [c] {
            return bad(format!(
                "latent_bias has shape {:?}, expected [{c}]",
                latent_bias.dims()
            ));
        }
        if decoder.dims() != [d, c] {
            return bad(format!(
                "decoder.weight has shape {:?}, expected [{d}, {c}]",
                decoder.dims()
            ));
        }
        if k == 0 || k > c {
            return bad(format!("k = {k} must be in 1..={c}"));
        }
        Ok(Self {
            pre_bias,
            encoder,
            latent_bias,
            decoder,
            k,
            source,
        })
    }

    /// Input width d.
    pub fn d_model(&self) -> usize {
        self.pre_bias.dims()[0]
    }

    /// Number of latents C.
    pub fn n_latents(&self) -> usize {
        self.latent_bias.dims()[0]
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.encoder.device()
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
        Ok(xn
            .broadcast_sub(&self.pre_bias)?
            .matmul(&self.encoder.t()?)?
            .broadcast_add(&self.latent_bias)?)
    }

    /// Encodes `x [.., d]` (flattened to `N` tokens): mean-centre, divide by (unbiased std
    /// + 1e-5), subtract `pre_bias`, encoder, + `latent_bias`, keep the top k, ReLU on them.
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
        let (mut idx, mut val, mut mus, mut stds) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for start in (0..n).step_by(ENCODE_ROWS) {
            let rows = x.narrow(0, start, ENCODE_ROWS.min(n - start))?;
            let (xn, mu, std) = unbiased_layer_norm(&rows, LN_EPS)?;
            let (i, v) = topk(&self.pre_activations(&xn)?, self.k)?;
            idx.push(i);
            val.push(v.relu()?);
            mus.push(mu);
            stds.push(std);
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

    /// Decodes in the normalised space: `Σ_j v_j · W_dec[:, i_j] + pre_bias`, `[N, d]`,
    /// touching only the k kept decoder columns.
    pub fn decode_normalized(&self, indices: &Tensor, values: &Tensor) -> Result<Tensor> {
        let (n, k) = indices.dims2()?;
        let d = self.d_model();
        let cols = self
            .decoder
            .index_select(&indices.flatten_all()?, 1)?
            .t()?
            .reshape((n, k, d))?; // [N, k, d]
        Ok(values
            .unsqueeze(2)?
            .broadcast_mul(&cols)?
            .sum(1)?
            .broadcast_add(&self.pre_bias)?)
    }

    /// Reconstruction `(z · W_decᵀ + pre_bias) · std + mean`, `[N, d]`.
    pub fn decode(&self, codes: &SparseCodes) -> Result<Tensor> {
        let xn = self.decode_normalized(&codes.indices, &codes.values)?;
        Ok(xn.broadcast_mul(&codes.std)?.broadcast_add(&codes.mean)?)
    }

    /// The same decode from dense latents `z [N, C]` (the reference formula, for tests and
    /// for steering edits that change which latents are active).
    pub fn decode_dense(&self, z: &Tensor, mean: &Tensor, std: &Tensor) -> Result<Tensor> {
        let xn = z
            .matmul(&self.decoder.t()?)?
            .broadcast_add(&self.pre_bias)?;
        Ok(xn.broadcast_mul(std)?.broadcast_add(mean)?)
    }

    /// Moves the weights to `device`.
    pub fn to_device(self, device: &Device) -> Result<Self> {
        Ok(Self {
            pre_bias: self.pre_bias.to_device(device)?,
            encoder: self.encoder.to_device(device)?,
            latent_bias: self.latent_bias.to_device(device)?,
            decoder: self.decoder.to_device(device)?,
            ..self
        })
    }

    /// Loads an SAE: a `.pt` file in OpenAI's `torch.save` format, a `.safetensors` file
    /// (same tensor names, `k` in the metadata), an `https://` URL, or `hf://owner/repo/path`.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let path = crate::load::resolve(spec)?;
        crate::load::load_file(&path)?.to_device(device)
    }

    /// Loads a local file (see [`Sae::load`]).
    pub fn load_file(path: &Path, device: &Device) -> Result<Self> {
        crate::load::load_file(path)?.to_device(device)
    }

    /// Saves as safetensors (the four tensors; `k` and `activation = TopK` in the
    /// metadata), atomically.
    pub fn save(&self, path: &Path, extra_meta: &[(&str, String)]) -> Result<()> {
        crate::load::save_safetensors(self, path, extra_meta)
    }
}
