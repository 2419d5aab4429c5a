//! Steering a residual stream through an SAE's latents.
use candle_core::{Tensor, D};
use cocomix_ops::{apply_steer, Steer};

use crate::{Error, Result, Sae};

impl Sae {
    /// The residual `x [.., d]` with its SAE latents edited by `steer`: encode, apply the
    /// edits to the dense latents `z`, and add the decoded change,
    /// `x + ((z' − z) · W_decᵀ) ⊙ std` (the decoder is linear in `z`, so this equals
    /// `x + decode(z') − decode(z)`). The SAE's reconstruction error stays in the residual,
    /// so an empty edit returns `x` unchanged. Edits apply at every position; `force` is
    /// ignored (the latents are edited after their TopK).
    pub fn steer_residual(&self, x: &Tensor, steer: &[Steer]) -> Result<Tensor> {
        if steer.is_empty() {
            return Ok(x.clone());
        }
        let c = self.n_latents();
        if let Some(s) = steer.iter().find(|s| s.index >= c) {
            return Err(Error::file(
                self.source(),
                format!("steering latent {} is out of range ({c} latents)", s.index),
            ));
        }
        let d = x.dim(D::Minus1)?;
        let codes = self.encode(x)?; // checks the width
        let z = self.dense(&codes)?; // [N, C]
        let dz = (apply_steer(&z, steer)? - &z)?; // [N, C], non-zero only in steered columns
        let dx = dz.matmul(self.w_dec())?.broadcast_mul(&codes.std)?; // [N, d]
        let flat = x.reshape(((), d))?;
        Ok((&flat + dx.to_dtype(flat.dtype())?)?.reshape(x.shape())?)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::{DType, Device};
    use cocomix_ops::SteerMode;

    use super::*;

    fn golden() -> (Sae, Tensor) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden");
        let sae = Sae::load_file(&dir.join("sae.safetensors"), &Device::Cpu).unwrap();
        let exp =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        (sae, exp["teacher_hidden"].clone()) // [2, 16, 48]: the residual the SAE reads
    }

    fn steer(index: usize, value: f32, mode: SteerMode) -> Steer {
        Steer {
            index,
            value,
            mode,
            force: false,
        }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn no_edit_and_a_zero_edit_leave_the_residual_unchanged() {
        let (sae, x) = golden();
        assert_eq!(flat(&sae.steer_residual(&x, &[]).unwrap()), flat(&x));
        let zero = sae
            .steer_residual(&x, &[steer(5, 0.0, SteerMode::Add)])
            .unwrap();
        assert_eq!(zero.dims(), x.dims());
        assert_eq!(flat(&zero), flat(&x));
    }

    #[test]
    fn adding_to_a_latent_moves_each_token_along_its_decoder_column() {
        let (sae, x) = golden();
        let (i, v) = (17usize, 3.0f32);
        let out = sae
            .steer_residual(&x, &[steer(i, v, SteerMode::Add)])
            .unwrap();
        // By hand: Δx_n = v · W_dec[:, i] · std_n, std_n the token's unbiased std + nothing
        // else (mean and pre_bias cancel).
        let xs: Vec<Vec<f32>> = x.reshape((32, 48)).unwrap().to_vec2().unwrap();
        let col: Vec<f32> = flat(&sae.decoder_column(i).unwrap());
        let got: Vec<Vec<f32>> = out.reshape((32, 48)).unwrap().to_vec2().unwrap();
        for (n, row) in xs.iter().enumerate() {
            let mean = row.iter().sum::<f32>() / 48.0;
            let std = (row.iter().map(|a| (a - mean).powi(2)).sum::<f32>() / 47.0).sqrt();
            for j in 0..48 {
                let want = row[j] + v * col[j] * std;
                assert!(
                    (got[n][j] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "token {n}, dim {j}: {} vs {want}",
                    got[n][j]
                );
            }
        }
    }

    #[test]
    fn setting_a_latent_equals_the_change_of_the_dense_decode() {
        let (sae, x) = golden();
        let edits = [
            steer(3, 10.0, SteerMode::Set),
            steer(200, -1.5, SteerMode::Add),
        ];
        let out = sae.steer_residual(&x, &edits).unwrap();
        let x2 = x.reshape((32, 48)).unwrap();
        let codes = sae.encode(&x2).unwrap();
        let z = sae.dense(&codes).unwrap();
        let mut zv: Vec<Vec<f32>> = z.to_vec2().unwrap();
        for row in zv.iter_mut() {
            row[3] = 10.0;
            row[200] -= 1.5;
        }
        let z2 = Tensor::new(zv, &Device::Cpu).unwrap();
        let before = sae.decode_dense(&z, &codes.mean, &codes.std).unwrap();
        let after = sae.decode_dense(&z2, &codes.mean, &codes.std).unwrap();
        let want = flat(&((&x2 + after).unwrap() - before).unwrap());
        let got = flat(&out);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert_ne!(got, flat(&x), "the edit changed the residual");
    }

    #[test]
    fn an_out_of_range_latent_names_the_sae_file() {
        let (sae, x) = golden();
        let err = sae
            .steer_residual(&x, &[steer(256, 1.0, SteerMode::Add)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sae.safetensors") && err.contains("out of range"),
            "{err}"
        );
    }
}
