#[path = "../../../testdata/testutil.rs"]
mod testutil;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use cocomix_sae::{Activation, Sae, SaeTrainConfig, SaeTrainer};
use testutil::*;

const DEV: Device = Device::Cpu;

fn top_k(sae: &Sae) -> usize {
    match sae.activation() {
        Activation::TopK { k } => *k,
        other => panic!("{other}"),
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn golden_pt_and_safetensors_encode_and_decode() {
    let exp = expected();
    let x = exp["teacher_hidden"].reshape((32, 48)).unwrap();
    for file in ["sae.pt", "sae.safetensors"] {
        let sae = Sae::load(golden_dir().join(file).to_str().unwrap(), &DEV).unwrap();
        assert_eq!(sae.files(), [golden_dir().join(file)]);
        assert_eq!(
            (sae.d_model(), sae.n_latents(), top_k(&sae)),
            (48, 256, 8),
            "{file}"
        );
        let codes = sae.encode(&x).unwrap();
        let z = sae.dense(&codes).unwrap();
        assert_close(
            &z,
            &exp["sae_z"].reshape((32, 256)).unwrap(),
            1e-4,
            1e-5,
            &format!("{file}: sae_z"),
        );
        assert_close(
            &sae.decode(&codes).unwrap(),
            &exp["sae_recon"].reshape((32, 48)).unwrap(),
            1e-4,
            1e-5,
            &format!("{file}: sae_recon"),
        );
        // Sparse and dense decoders agree.
        let dense = sae.decode_dense(&z, &codes.mean, &codes.std).unwrap();
        assert_close(
            &sae.decode(&codes).unwrap(),
            &dense,
            1e-5,
            1e-5,
            "sparse vs dense decode",
        );
        // Rows are sorted by value, descending.
        for row in codes.values.to_vec2::<f32>().unwrap() {
            assert!(row.windows(2).all(|w| w[0] >= w[1]), "{row:?}");
        }
    }
}

/// A 4-wide, 5-latent SAE whose pre-activations are easy to work out by hand.
fn hand_sae(k: usize) -> Sae {
    let enc = Tensor::new(
        &[
            [0f32, 0., 0., 1.],
            [-1., 0., 0., 0.],
            [1., 0., 0., 0.],
            [-1., 0., 0., 0.],
            [0., 0., 0., 0.],
        ],
        &DEV,
    )
    .unwrap();
    let dec = enc.t().unwrap().contiguous().unwrap(); // col0 = e3, col1 = −e0, …
    let zeros = |n| Tensor::zeros(n, DType::F32, &DEV).unwrap();
    Sae::new(zeros(4), enc, zeros(5), dec, k, "hand".into()).unwrap()
}

#[test]
fn hand_worked_encode_decode_with_a_tie_at_the_kth_place() {
    // x = [1, 2, 3, 6]: mean 3, centred [−2, −1, 0, 3], squared sum 14, unbiased std √(14/3).
    let x = Tensor::new(&[[1f32, 2., 3., 6.]], &DEV).unwrap();
    let std = (14f64 / 3.0).sqrt();
    let xn = |c: f64| c / (std + 1e-5);
    // Pre-activations: [xn3, −xn0, xn0, −xn0, 0] = [1.389, 0.926, −0.926, 0.926, 0].
    // k = 2: latent 0, then latents 1 and 3 tie at the cut: the lower index (1) is kept.
    let sae = hand_sae(2);
    let codes = sae.encode(&x).unwrap();
    assert_eq!(codes.indices.to_vec2::<u32>().unwrap(), vec![vec![0, 1]]);
    let v = codes.values.to_vec2::<f32>().unwrap()[0].clone();
    assert!(
        (v[0] as f64 - xn(3.0)).abs() < 1e-5 && (v[1] as f64 - xn(2.0)).abs() < 1e-5,
        "{v:?}"
    );
    assert!(
        (scalar(&codes.std) as f64 - std).abs() < 1e-5 && (scalar(&codes.mean) - 3.0).abs() < 1e-6
    );
    // Decode: xn3·e3 + xn0·e0 (col1 = −e0, value −xn0), then ·std + mean.
    let recon = sae.decode(&codes).unwrap();
    let want = [xn(-2.0) * std + 3.0, 3.0, 3.0, xn(3.0) * std + 3.0];
    let want = Tensor::new(&[want.map(|w| w as f32)], &DEV).unwrap();
    assert_close(&recon, &want, 1e-5, 1e-5, "hand decode");
    // k = 5 keeps the negative pre-activation; ReLU makes it 0.
    let codes = hand_sae(5).encode(&x).unwrap();
    assert_eq!(
        codes.indices.to_vec2::<u32>().unwrap(),
        vec![vec![0, 1, 3, 4, 2]]
    );
    let v = codes.values.to_vec2::<f32>().unwrap()[0].clone();
    assert_eq!((v[3], v[4]), (0.0, 0.0));
}

#[test]
fn fixture_pt_files_load_in_every_dtype() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny.json")).unwrap()).unwrap();
    let vals = |n: &str| -> Vec<f32> {
        want[n]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    for (file, tol) in [
        ("tiny.pt", 0.0),
        ("tiny-f16.pt", 2e-3),
        ("tiny-bf16.pt", 1e-2),
    ] {
        let sae = Sae::load(fixture(file).to_str().unwrap(), &DEV).unwrap();
        assert_eq!(
            (sae.d_model(), sae.n_latents(), top_k(&sae)),
            (6, 10, 3),
            "{file}"
        );
        let p = sae.parts();
        for (name, t) in [
            ("pre_bias", p.b_dec.clone()),
            ("encoder.weight", p.w_enc.clone()),
            // OpenAI's layout is [d, C]; the SAE keeps W_dec as [C, d].
            ("decoder.weight", p.w_dec.t().unwrap()),
        ] {
            let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            for (g, w) in got.iter().zip(vals(name)) {
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "{file} {name}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn bad_files_are_named_with_their_problem() {
    let err = |f: &str| {
        Sae::load(fixture(f).to_str().unwrap(), &DEV)
            .err()
            .unwrap()
            .to_string()
    };
    let e = err("missing-decoder.pt");
    assert!(
        e.contains("missing-decoder.pt") && e.contains("decoder.weight") && e.contains("missing"),
        "{e}"
    );
    let e = err("relu-activation.pt");
    assert!(
        e.contains("relu-activation.pt") && e.contains("\"ReLU\"") && e.contains("TopK"),
        "{e}"
    );
    let e = err("bad-shape.pt");
    assert!(
        e.contains("bad-shape.pt") && e.contains("latent_bias") && e.contains("[11]"),
        "{e}"
    );
    let e = err("no-k.pt");
    assert!(e.contains("no-k.pt") && e.contains("`k`"), "{e}");
    let e = Sae::load("/no/such/sae.pt", &DEV)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/no/such/sae.pt"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, b"PK\x03\x04 this is not a zip").unwrap();
    assert!(Sae::load(junk.to_str().unwrap(), &DEV)
        .err()
        .unwrap()
        .to_string()
        .contains("junk.pt"));
    // Input width that differs from the teacher's d_model.
    let sae = Sae::load(fixture("tiny.pt").to_str().unwrap(), &DEV).unwrap();
    let e = sae
        .check_input_width(768, "teacher gpt2 at layer 5")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tiny.pt") && e.contains("768") && e.contains("width 6"),
        "{e}"
    );
}

#[test]
fn safetensors_round_trip_keeps_k() {
    let dir = tempfile::tempdir().unwrap();
    let sae = Sae::load(golden_dir().join("sae.pt").to_str().unwrap(), &DEV).unwrap();
    let p = dir.path().join("sae.safetensors");
    sae.save(&p, &[("layer", "1".into())]).unwrap();
    let back = Sae::load(p.to_str().unwrap(), &DEV).unwrap();
    assert_eq!(top_k(&back), 8);
    assert_close(back.w_dec(), sae.w_dec(), 0.0, 0.0, "decoder");
    assert_close(&back.parts().w_enc, &sae.parts().w_enc, 0.0, 0.0, "encoder");
    assert_close(
        &back.parts().b_dec,
        &sae.parts().b_dec,
        0.0,
        0.0,
        "pre_bias",
    );
    assert_close(
        &back.parts().b_enc,
        &sae.parts().b_enc,
        0.0,
        0.0,
        "latent_bias",
    );
}

/// Data made from a known sparse dictionary: x = Σ a_i D_i over 3 random atoms.
fn synthetic(dict: &[Vec<f32>], n: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let d = dict[0].len();
    let mut data = vec![0f32; n * d];
    for row in data.chunks_mut(d) {
        for _ in 0..3 {
            let atom = &dict[rng.random_range(0..dict.len())];
            let a: f32 = rng.random_range(1.0..3.0);
            row.iter_mut().zip(atom).for_each(|(x, v)| *x += a * v);
        }
    }
    Tensor::from_vec(data, (n, d), &DEV).unwrap()
}

#[test]
fn training_recovers_a_known_sparse_dictionary() {
    use rand::{Rng, SeedableRng};
    let (d, m) = (32usize, 48usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let dict: Vec<Vec<f32>> = (0..m)
        .map(|_| {
            let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        })
        .collect();
    let mut cfg = SaeTrainConfig::new(d, 96, 3);
    cfg.lr = 3e-3;
    cfg.dead_after_tokens = 256 * 40;
    let mut tr = SaeTrainer::new(cfg, &synthetic(&dict, 512, 100)).unwrap();
    let mut last = None;
    for step in 0..1500u64 {
        last = Some(tr.step(&synthetic(&dict, 256, step)).unwrap());
    }
    let last = last.unwrap();
    let sae = tr.sae().unwrap();
    // Held-out FVU in the normalised space.
    let x = synthetic(&dict, 2048, 99_999);
    let (xn, _, _) = cocomix_ops::unbiased_layer_norm(&x, 1e-5).unwrap();
    let codes = sae.encode(&x).unwrap();
    let rec = sae
        .decode_normalized(&codes.indices, &codes.values)
        .unwrap();
    let var = xn
        .broadcast_sub(&xn.mean_keepdim(0).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let fvu = scalar(&((&xn - &rec).unwrap().sqr().unwrap().sum_all().unwrap() / var).unwrap());
    assert!(fvu < 0.1, "held-out FVU {fvu} (last step {last:?})");
    // Each atom, centred (the LayerNorm removes the mean) and unit-normed, should have a
    // decoder column with cosine > 0.9.
    let dec: Vec<Vec<f32>> = sae.w_dec().to_vec2().unwrap(); // [C][d]
    let recovered = dict
        .iter()
        .filter(|atom| {
            let mu = atom.iter().sum::<f32>() / d as f32;
            let c: Vec<f32> = atom.iter().map(|v| v - mu).collect();
            let n = c.iter().map(|x| x * x).sum::<f32>().sqrt();
            dec.iter()
                .any(|col| col.iter().zip(&c).map(|(a, b)| a * b).sum::<f32>() / n > 0.9)
        })
        .count();
    eprintln!("held-out FVU {fvu:.4}, recovered {recovered}/{m}, last step {last:?}");
    assert!(
        recovered as f32 >= 0.8 * m as f32,
        "recovered {recovered}/{m} atoms (FVU {fvu})"
    );
    // 96 latents for 48 atoms: about half the latents have nothing to encode and stay dead.
    assert!(last.l0 <= 3.0 && last.dead_fraction < 0.7, "{last:?}");
}
