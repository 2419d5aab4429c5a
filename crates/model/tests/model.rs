//! Numeric tests of the model crate against independent references.
#[path = "../../../testdata/testutil.rs"]
mod testutil;

use candle_core::{DType, Device, Tensor, Var};
use cocomix_model::ops::{concept_loss, kd_kl, topk, topk_two_stage, unbiased_layer_norm};
use cocomix_model::{
    next_token_loss, ConceptConfig, Dropout, Gpt2, Gpt2Config, Params, Student, StudentConfig,
};
use testutil::*;

const DEV: Device = Device::Cpu;

fn tiny_gpt(vocab: usize, d: usize, layers: usize, heads: usize, seed: u64) -> Gpt2 {
    let cfg = Gpt2Config::new(vocab, 16, d, layers, heads).with_dropout(0.0);
    Gpt2::new(&cfg, &mut Params::random(seed, &DEV, false)).unwrap()
}

fn student_cfg(concept: bool) -> StudentConfig {
    StudentConfig {
        gpt2: Gpt2Config::new(40, 16, 16, 3, 2).with_dropout(0.0),
        concept: concept.then_some(ConceptConfig {
            concept_dim: 24,
            concept_num: 4,
            insert_layer_index: 1,
            interleave: true,
        }),
        pause: None,
    }
}

fn v(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// GPT-2 written out with scalar loops in f64: an implementation independent of the crate's
/// tensor code, used as the hand-computed reference.
fn reference_logits(m: &Gpt2, ids: &[u32]) -> Vec<Vec<f64>> {
    let cfg = &m.cfg;
    let (d, hds, t) = (cfg.n_embd, cfg.n_head, ids.len());
    let hd = d / hds;
    let wte = v(&m.wte);
    let wpe = v(&m.wpe);
    let ln = |x: &[f64], w: &[f64], b: &[f64]| -> Vec<f64> {
        let mu = x.iter().sum::<f64>() / d as f64;
        let var = x.iter().map(|a| (a - mu) * (a - mu)).sum::<f64>() / d as f64;
        (0..d)
            .map(|i| (x[i] - mu) / (var + 1e-5).sqrt() * w[i] + b[i])
            .collect()
    };
    let lin = |x: &[f64], w: &[f64], b: &[f64], dout: usize| -> Vec<f64> {
        (0..dout)
            .map(|o| {
                b[o] + x
                    .iter()
                    .enumerate()
                    .map(|(i, a)| a * w[i * dout + o])
                    .sum::<f64>()
            })
            .collect()
    };
    let gelu = |x: f64| {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
    };
    let mut h: Vec<Vec<f64>> = (0..t)
        .map(|p| {
            (0..d)
                .map(|i| wte[ids[p] as usize * d + i] + wpe[p * d + i])
                .collect()
        })
        .collect();
    for blk in &m.blocks {
        let a = h
            .iter()
            .map(|x| ln(x, &v(&blk.ln_1.weight), &v(&blk.ln_1.bias)))
            .collect::<Vec<_>>();
        let qkv: Vec<Vec<f64>> = a
            .iter()
            .map(|x| {
                lin(
                    x,
                    &v(&blk.attn.c_attn.weight),
                    &v(&blk.attn.c_attn.bias),
                    3 * d,
                )
            })
            .collect();
        let mut y = vec![vec![0.0; d]; t];
        for head in 0..hds {
            for i in 0..t {
                let q = &qkv[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        q.iter()
                            .zip(&qkv[j][d + head * hd..d + (head + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for c in 0..hd {
                        y[i][head * hd + c] += w / z * qkv[j][2 * d + head * hd + c];
                    }
                }
            }
        }
        for i in 0..t {
            let o = lin(
                &y[i],
                &v(&blk.attn.c_proj.weight),
                &v(&blk.attn.c_proj.bias),
                d,
            );
            for c in 0..d {
                h[i][c] += o[c];
            }
            let a2 = ln(&h[i], &v(&blk.ln_2.weight), &v(&blk.ln_2.bias));
            let f: Vec<f64> = lin(&a2, &v(&blk.mlp.c_fc.weight), &v(&blk.mlp.c_fc.bias), 4 * d)
                .into_iter()
                .map(gelu)
                .collect();
            let o = lin(&f, &v(&blk.mlp.c_proj.weight), &v(&blk.mlp.c_proj.bias), d);
            for c in 0..d {
                h[i][c] += o[c];
            }
        }
    }
    h.iter()
        .map(|x| {
            let x = ln(x, &v(&m.ln_f.weight), &v(&m.ln_f.bias));
            (0..cfg.vocab_size)
                .map(|tok| (0..d).map(|i| x[i] * wte[tok * d + i]).sum())
                .collect()
        })
        .collect()
}

#[test]
fn one_layer_forward_matches_scalar_reference() {
    let m = tiny_gpt(7, 4, 1, 2, 3);
    let ids = [3u32, 1, 6, 0, 2];
    let got = m.forward(&Tensor::new(&[ids], &DEV).unwrap()).unwrap();
    let want = reference_logits(&m, &ids);
    let want = Tensor::new(want, &DEV).unwrap().unsqueeze(0).unwrap();
    assert_close(&got, &want, 1e-4, 1e-5, "one-layer logits");
    // A two-layer model, to cover the residual path between blocks.
    let m = tiny_gpt(9, 8, 2, 2, 4);
    let ids = [1u32, 8, 8, 2];
    let want = Tensor::new(reference_logits(&m, &ids), &DEV)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_close(
        &m.forward(&Tensor::new(&[ids], &DEV).unwrap()).unwrap(),
        &want,
        1e-4,
        1e-5,
        "two-layer logits",
    );
}

#[test]
fn residual_grad_matches_central_finite_differences() {
    let m = tiny_gpt(11, 8, 3, 2, 5);
    let ids = Tensor::new(&[[1u32, 4, 9, 2, 7], [3, 3, 10, 0, 5]], &DEV).unwrap();
    let layer = 0;
    let rg = m.residual_grad(&ids, layer).unwrap();
    let loss_at = |x: &Tensor| -> f64 {
        let h = m
            .run_blocks(x.clone(), layer + 1..3, None, None, &mut Dropout::off())
            .unwrap();
        scalar(&next_token_loss(&m.head(&h).unwrap(), &ids).unwrap()) as f64
    };
    let base: Vec<f32> = rg.hidden.flatten_all().unwrap().to_vec1().unwrap();
    let g: Vec<f32> = rg.grad.flatten_all().unwrap().to_vec1().unwrap();
    // The residual's entries are O(0.05) (N(0, 0.02) init): a small step keeps the central
    // difference in its linear range, and f32 loss rounding (~3e-7) stays below 1e-4.
    let eps = 2e-3f32;
    for &i in &[0usize, 5, 17, 30, 41, 63, 70] {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let f = |x: Vec<f32>| loss_at(&Tensor::from_vec(x, rg.hidden.shape(), &DEV).unwrap());
        let fd = (f(plus) - f(minus)) / (2.0 * eps as f64);
        assert!(
            (fd - g[i] as f64).abs() < 2e-4 + 2e-2 * fd.abs(),
            "coord {i}: fd {fd} vs grad {}",
            g[i]
        );
    }
    // The last position (index 4 of each row) has no gradient.
    let last: Vec<f32> = rg
        .grad
        .narrow(1, 4, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(last.iter().all(|&x| x == 0.0));
}

#[test]
fn frozen_matmul_gives_input_grads_and_no_weight_grads() {
    let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &DEV).unwrap();
    let x = Var::new(&[[0.5f32, -1.0], [2.0, 0.25]], &DEV).unwrap();
    let y = cocomix_model::ops::frozen_matmul(x.as_tensor(), &w).unwrap();
    assert_close(&y, &x.as_tensor().matmul(&w).unwrap(), 0.0, 0.0, "forward");
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let w_var = Var::from_tensor(&w).unwrap();
    let g_ref = x
        .as_tensor()
        .matmul(w_var.as_tensor())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        g.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
        1e-6,
        0.0,
        "dx",
    );
    assert!(
        g.get(&w).is_none(),
        "no gradient is computed for the frozen weight"
    );
}

fn assert_causal(logits_a: &Tensor, logits_b: &Tensor, upto: usize) {
    assert_close(
        &logits_a.narrow(1, 0, upto + 1).unwrap(),
        &logits_b.narrow(1, 0, upto + 1).unwrap(),
        0.0,
        1e-6,
        "prefix",
    );
    let diff = (logits_a.narrow(1, upto + 1, 1).unwrap()
        - logits_b.narrow(1, upto + 1, 1).unwrap())
    .unwrap();
    assert!(
        scalar(&diff.abs().unwrap().sum_all().unwrap()) > 0.0,
        "the changed position does change"
    );
}

#[test]
fn causal_in_gpt2_and_in_the_interleaved_student() {
    let a = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &DEV).unwrap();
    let b = Tensor::new(&[[1u32, 2, 3, 9, 5, 6]], &DEV).unwrap();
    let m = tiny_gpt(11, 8, 2, 2, 1);
    assert_causal(&m.forward(&a).unwrap(), &m.forward(&b).unwrap(), 2);
    let s = Student::new(&student_cfg(true), 1, &DEV).unwrap();
    let (oa, ob) = (
        s.forward(&a, &mut Dropout::off()).unwrap(),
        s.forward(&b, &mut Dropout::off()).unwrap(),
    );
    assert_causal(&oa.logits, &ob.logits, 2);
    assert_causal(&oa.concept_logits.unwrap(), &ob.concept_logits.unwrap(), 2);
}

#[test]
fn kv_cache_matches_full_recompute() {
    let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let full_ids = Tensor::new(ids.as_slice(), &DEV)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    // Student (interleaved) and NTP student: prompt of 3, then one token at a time.
    for concept in [true, false] {
        let s = Student::new(&student_cfg(concept), 2, &DEV).unwrap();
        let full = s.forward(&full_ids, &mut Dropout::off()).unwrap().logits;
        let mut cache = s.new_cache();
        let mut parts = vec![s
            .forward_cached(&full_ids.narrow(1, 0, 3).unwrap(), &mut cache, &[])
            .unwrap()];
        for p in 3..ids.len() {
            parts.push(
                s.forward_cached(&full_ids.narrow(1, p, 1).unwrap(), &mut cache, &[])
                    .unwrap(),
            );
        }
        assert_close(
            &Tensor::cat(&parts, 1).unwrap(),
            &full,
            1e-4,
            1e-5,
            &format!("student cache (concept={concept})"),
        );
    }
    let m = tiny_gpt(11, 8, 2, 2, 1);
    let full = m.forward(&full_ids).unwrap();
    let mut cache = cocomix_model::KvCache::new(2);
    let mut parts = Vec::new();
    for (start, len) in [(0, 2), (2, 1), (3, 4), (7, 1)] {
        parts.push(
            m.forward_with(
                &full_ids.narrow(1, start, len).unwrap(),
                Some(&mut cache),
                None,
                &mut Dropout::off(),
            )
            .unwrap(),
        );
    }
    assert_close(
        &Tensor::cat(&parts, 1).unwrap(),
        &full,
        1e-4,
        1e-5,
        "gpt2 cache",
    );
}

#[test]
fn hugging_face_layout_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ids = Tensor::new(&[[1u32, 5, 7, 3]], &DEV).unwrap();
    for concept in [false, true] {
        let s = Student::new(&student_cfg(concept), 9, &DEV).unwrap();
        let path = dir.path().join(format!("s{concept}"));
        s.save(&path).unwrap();
        let back = Student::load(&path, &DEV).unwrap();
        let (a, b) = (
            s.forward(&ids, &mut Dropout::off()).unwrap(),
            back.forward(&ids, &mut Dropout::off()).unwrap(),
        );
        assert_close(&a.logits, &b.logits, 0.0, 0.0, "reloaded logits");
        let st = candle_core::safetensors::load(path.join("model.safetensors"), &DEV).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "gpt2");
        assert_eq!(cfg["n_embd"], 16);
        if !concept {
            // Exactly the keys (and Conv1D [in, out] shapes) of a hub GPT-2 checkpoint.
            let mut keys: Vec<_> = st.keys().cloned().collect();
            keys.sort();
            let golden = candle_core::safetensors::load(
                golden_dir().join("teacher/model.safetensors"),
                &DEV,
            )
            .unwrap();
            let mut want: Vec<String> = golden
                .keys()
                .filter(|k| !k.starts_with("h.3."))
                .cloned()
                .collect();
            want.sort();
            assert_eq!(keys, want);
            assert_eq!(st["h.0.mlp.c_fc.weight"].dims(), &[16, 64]);
            assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
            // And the loaded NTP student is an ordinary GPT-2.
            let g = Gpt2::load(path.to_str().unwrap(), &DEV).unwrap();
            assert_close(&g.forward(&ids).unwrap(), &a.logits, 1e-6, 1e-6, "as GPT-2");
        } else {
            assert_eq!(st["concept_predictor.weight"].dims(), &[24, 16]);
            assert_eq!(st["compress_layer.weight"].dims(), &[16, 24]);
            assert_eq!(cfg["insert_layer_index"], 1);
        }
    }
}

#[test]
fn bad_weights_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let s = Student::new(&student_cfg(false), 9, &DEV).unwrap();
    s.save(dir.path()).unwrap();
    let file = dir.path().join("model.safetensors");
    let mut st = candle_core::safetensors::load(&file, &DEV).unwrap();
    // Saves the edited tensors, loads, and returns the error (or "" when it loads).
    let load_with = |st: &std::collections::HashMap<String, Tensor>| {
        candle_core::safetensors::save(st, &file).unwrap();
        Gpt2::load(dir.path().to_str().unwrap(), &DEV)
            .err()
            .map_or(String::new(), |e| e.to_string())
    };
    st.remove("h.1.ln_2.bias");
    let e = load_with(&st);
    assert!(
        e.contains("h.1.ln_2.bias") && e.contains("missing") && e.contains("model.safetensors"),
        "{e}"
    );
    st.insert(
        "h.1.ln_2.bias".into(),
        Tensor::zeros(17, DType::F32, &DEV).unwrap(),
    );
    let e = load_with(&st);
    assert!(
        e.contains("h.1.ln_2.bias") && e.contains("[17]") && e.contains("[16]"),
        "{e}"
    );
    st.insert(
        "h.1.ln_2.bias".into(),
        Tensor::zeros(16, DType::I64, &DEV).unwrap(),
    );
    let e = load_with(&st);
    assert!(e.contains("h.1.ln_2.bias") && e.contains("dtype"), "{e}");
    // bf16 / f16 weights are accepted.
    st.insert(
        "h.1.ln_2.bias".into(),
        Tensor::zeros(16, DType::BF16, &DEV).unwrap(),
    );
    assert_eq!(load_with(&st), "");
    std::fs::write(dir.path().join("config.json"), r#"{"n_layer": 2}"#).unwrap();
    let e = Gpt2::load(dir.path().to_str().unwrap(), &DEV)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    let e = Gpt2::load("/nonexistent/model", &DEV)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/model"), "{e}");
}

#[test]
fn unbiased_layer_norm_matches_its_formula() {
    let x = Tensor::new(&[[1f32, 2., 4., 9.]], &DEV).unwrap();
    let (xn, mu, std) = unbiased_layer_norm(&x, 1e-5).unwrap();
    // mean 4, squared deviations 9+4+0+25 = 38, unbiased var 38/3.
    let s = (38f64 / 3.0).sqrt();
    assert!((scalar(&mu) - 4.0).abs() < 1e-6);
    assert!((scalar(&std) as f64 - s).abs() < 1e-5);
    let want: Vec<f32> = [1., 2., 4., 9.]
        .iter()
        .map(|a: &f64| ((a - 4.0) / (s + 1e-5)) as f32)
        .collect();
    assert_close(
        &xn,
        &Tensor::from_vec(want, (1, 4), &DEV).unwrap(),
        1e-6,
        1e-6,
        "x̂",
    );
}

#[test]
fn topk_is_exact_with_a_deterministic_tie_rule() {
    let x = Tensor::new(
        &[
            [0.5f32, 2.0, -1.0, 2.0, 7.0, 2.0],
            [f32::NAN, 1.0, 1.0, 0.0, -3.0, 1.0],
        ],
        &DEV,
    )
    .unwrap();
    let (i, val) = topk(&x, 3).unwrap();
    assert_eq!(
        i.to_vec2::<u32>().unwrap(),
        vec![vec![4, 1, 3], vec![1, 2, 5]]
    );
    assert_eq!(
        val.to_vec2::<f32>().unwrap(),
        vec![vec![7.0, 2.0, 2.0], vec![1.0, 1.0, 1.0]]
    );
    assert!(topk(&x, 0).is_err() && topk(&x, 7).is_err());
    // The device-agnostic two-stage path agrees with the CPU select on wide rows.
    let wide: Vec<f32> = (0..3 * 10_000)
        .map(|i| ((i * 7919 % 10_007) as f32).sin())
        .collect();
    let wide = Tensor::from_vec(wide, (3, 10_000), &DEV).unwrap();
    let (a, av) = topk(&wide, 32).unwrap();
    let (b, bv) = topk_two_stage(&wide, 32).unwrap();
    assert_eq!(a.to_vec2::<u32>().unwrap(), b.to_vec2::<u32>().unwrap());
    assert_eq!(av.to_vec2::<f32>().unwrap(), bv.to_vec2::<f32>().unwrap());
    // And with a full sort.
    let row: Vec<f32> = wide.get(1).unwrap().to_vec1().unwrap();
    let mut sorted: Vec<(usize, f32)> = row.into_iter().enumerate().collect();
    sorted.sort_by(|p, q| q.1.total_cmp(&p.1).then(p.0.cmp(&q.0)));
    let want: Vec<u32> = sorted.iter().take(32).map(|p| p.0 as u32).collect();
    assert_eq!(a.get(1).unwrap().to_vec1::<u32>().unwrap(), want);
    // Many ties, signed zeros, infinities and NaNs, for the one-pass scan (small k) and the
    // quickselect (large k), against a full sort under the same rule.
    let special = [0.0f32, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let rows: [Vec<f32>; 2] = [
        (0..3000)
            .map(|i| match i % 97 {
                0 => special[i / 97 % 5],
                _ => ((i * 31 % 11) as f32 - 5.0) * 0.5,
            })
            .collect(),
        // The top of this row is the +0s: -0 ranks below them whatever its index.
        (0..3000)
            .map(|i| match (i % 101, i % 3) {
                (0, _) => f32::NAN,
                (_, 0) => -0.0,
                (_, 1) => 0.0,
                _ => -1.0,
            })
            .collect(),
    ];
    let rank = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    for row in rows {
        let mut sorted: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
        sorted.sort_by(|p, q| rank(q.1).total_cmp(&rank(p.1)).then(p.0.cmp(&q.0)));
        let t = Tensor::from_vec(row, (1, 3000), &DEV).unwrap();
        for k in [1, 16, 64, 65, 500, 3000] {
            let (i, _) = topk(&t, k).unwrap();
            let want: Vec<u32> = sorted.iter().take(k).map(|p| p.0 as u32).collect();
            assert_eq!(i.get(0).unwrap().to_vec1::<u32>().unwrap(), want, "k = {k}");
        }
    }
}

#[test]
fn topk_passes_gradient_only_to_kept_logits_and_sparse_equals_dense() {
    let s = Student::new(&student_cfg(true), 4, &DEV).unwrap();
    let cp = s.concept.as_ref().unwrap();
    let z = Var::new(
        &[[
            0.3f32, -2.0, 1.5, 0.1, 0.9, -0.4, 2.2, 0.0, 0.05, -1.0, 0.7, 0.2, 1.1, -0.3, 0.6, 0.8,
            -0.9, 1.9, 0.4, -0.1, 0.33, 1.2, -2.5, 0.01,
        ]],
        &DEV,
    )
    .unwrap();
    let (idx, _) = topk(z.as_tensor(), 4).unwrap();
    assert_eq!(idx.to_vec2::<u32>().unwrap(), vec![vec![6, 17, 2, 21]]);
    let sparse = cp.compress_sparse(z.as_tensor(), &idx).unwrap();
    let dense = cp.compress_dense(z.as_tensor(), &idx).unwrap();
    assert_close(&sparse, &dense, 1e-5, 1e-6, "sparse vs dense compress");
    let gs = sparse.sum_all().unwrap().backward().unwrap();
    let gd = dense.sum_all().unwrap().backward().unwrap();
    let g = gs.get(z.as_tensor()).unwrap();
    assert_close(g, gd.get(z.as_tensor()).unwrap(), 1e-5, 1e-7, "dz");
    let (w, _) = cp.compress.as_ref().unwrap();
    assert_close(gs.get(w).unwrap(), gd.get(w).unwrap(), 1e-5, 1e-7, "dW");
    let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    for (i, gi) in g.iter().enumerate() {
        assert_eq!(
            *gi != 0.0,
            [6, 17, 2, 21].contains(&i),
            "gradient at {i}: {gi}"
        );
    }
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let ids = Tensor::new(&[[1u32, 5, 7, 3, 9, 2], [4, 4, 0, 11, 3, 8]], &DEV).unwrap();
    // NTP, CoCoMix, and the predict-only and pause ablations.
    let variants: Vec<(&str, StudentConfig, usize)> = vec![
        ("ntp", student_cfg(false), 0),
        ("cocomix", student_cfg(true), 5),
        ("predict-only", predict_only_cfg(), 3),
        ("pause", pause_cfg(), 1),
    ];
    for (what, mut cfg, extra) in variants {
        cfg.gpt2 = cfg.gpt2.with_dropout(0.1);
        let s = Student::new(&cfg, 3, &DEV).unwrap();
        let out = s.forward(&ids, &mut Dropout::seeded(7)).unwrap();
        let mut loss = next_token_loss(&out.logits, &ids).unwrap();
        if let Some(cl) = &out.concept_logits {
            let labels = Tensor::new(
                &[[[1u32, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]; 2],
                &DEV,
            )
            .unwrap();
            loss = (loss + (concept_loss(cl, &labels).unwrap() * 0.1).unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        assert_eq!(s.vars().len(), 4 + 12 * 3 + extra, "{what}");
        for (name, var) in s.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient ({what})"));
            let norm = scalar(&g.abs().unwrap().sum_all().unwrap());
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{what} {name}: gradient norm {norm}"
            );
        }
    }
}

fn predict_only_cfg() -> StudentConfig {
    let mut c = student_cfg(true);
    c.concept.as_mut().unwrap().interleave = false;
    c
}

fn pause_cfg() -> StudentConfig {
    let mut c = student_cfg(false);
    c.pause = Some(cocomix_model::PauseConfig {
        pause_insert_layer_index: 1,
    });
    c
}

#[test]
fn predict_only_runs_every_block_on_t_positions_and_pause_on_2t() {
    let ids = Tensor::new(&[[1u32, 5, 7, 3, 9, 2], [4, 4, 0, 11, 3, 8]], &DEV).unwrap();
    // Predict-only: the concept never feeds back, so the next-token logits are exactly the
    // backbone's plain GPT-2 forward over T positions; its KV cache holds T entries per block.
    let s = Student::new(&predict_only_cfg(), 3, &DEV).unwrap();
    let out = s.forward(&ids, &mut Dropout::off()).unwrap();
    assert_eq!(
        v(&out.logits),
        v(&s.gpt.forward(&ids).unwrap()),
        "predict-only = plain GPT-2"
    );
    assert_eq!(out.concept_logits.unwrap().dims(), [2, 6, 24]);
    let kv_len = |s: &Student| {
        let mut cache = s.new_cache();
        s.forward_cached(&ids.narrow(0, 0, 1).unwrap(), &mut cache, &[])
            .unwrap();
        cache.layer_len(2)
    };
    assert_eq!(kv_len(&s), 6);
    // Pause and CoCoMix interleave: blocks from the insert layer on hold 2T positions, and
    // the output differs from the plain backbone.
    for cfg in [pause_cfg(), student_cfg(true)] {
        let p = Student::new(&cfg, 3, &DEV).unwrap();
        assert_eq!(kv_len(&p), 12);
        let out = p.forward(&ids, &mut Dropout::off()).unwrap();
        assert_ne!(v(&out.logits), v(&p.gpt.forward(&ids).unwrap()));
    }
}

#[test]
fn fused_kernels_match_the_composed_model_with_dropout() {
    // The whole student (and the NTP baseline), forward and backward with dropout on, once
    // with the fused CPU kernels and once composed from Candle ops (the path of other
    // devices): the counter-based dropout draws the same masks in both.
    let ids = Tensor::new(&[[1u32, 5, 7, 3, 9, 2], [4, 4, 0, 11, 3, 8]], &DEV).unwrap();
    let labels = Tensor::new(
        &[[[1u32, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]; 2],
        &DEV,
    )
    .unwrap();
    for concept in [true, false] {
        let mut cfg = student_cfg(concept);
        cfg.gpt2 = cfg.gpt2.with_dropout(0.2);
        let s = Student::new(&cfg, 3, &DEV).unwrap();
        let run = |fused: bool| {
            cocomix_model::ops::fused::with_fused(fused, || {
                let out = s.forward(&ids, &mut Dropout::seeded(11)).unwrap();
                let mut loss = next_token_loss(&out.logits, &ids).unwrap();
                if let Some(cl) = &out.concept_logits {
                    loss = (loss + (concept_loss(cl, &labels).unwrap() * 0.1).unwrap()).unwrap();
                }
                let grads = loss.backward().unwrap();
                let gs: Vec<Tensor> = s
                    .vars()
                    .iter()
                    .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
                    .collect();
                (out.logits, loss, gs)
            })
        };
        let (la, lossa, ga) = run(true);
        let (lb, lossb, gb) = run(false);
        assert_close(&la, &lb, 1e-5, 1e-5, "logits");
        assert_close(&lossa, &lossb, 1e-5, 1e-6, "loss");
        for ((name, _), (a, b)) in s.vars().iter().zip(ga.iter().zip(&gb)) {
            assert_close(a, b, 1e-3, 1e-5, &format!("gradient of {name}"));
        }
    }
}

#[test]
fn dropout_is_keyed_by_the_global_row_through_the_whole_student() {
    // A data-parallel rank holding rows 1..3 of a batch, with the row offset, computes the
    // logits the whole batch gives those rows: every dropout site (embedding, attention
    // weights inside the fused kernel, residuals) draws the global row's mask. Fused and
    // composed paths alike.
    let ids = Tensor::new(
        &[
            [1u32, 5, 7, 3, 9, 2],
            [4, 4, 0, 11, 3, 8],
            [2, 6, 1, 0, 7, 5],
        ],
        &DEV,
    )
    .unwrap();
    for concept in [true, false] {
        let mut cfg = student_cfg(concept);
        cfg.gpt2 = cfg.gpt2.with_dropout(0.3);
        let s = Student::new(&cfg, 3, &DEV).unwrap();
        for fused in [true, false] {
            cocomix_model::ops::fused::with_fused(fused, || {
                let full = s.forward(&ids, &mut Dropout::seeded(5)).unwrap().logits;
                let part = ids.narrow(0, 1, 2).unwrap();
                let rank = s
                    .forward(&part, &mut Dropout::seeded(5).with_row_offset(1))
                    .unwrap()
                    .logits;
                let want = full.narrow(0, 1, 2).unwrap();
                assert_close(&rank, &want, 1e-5, 1e-6, "rows 1..3 with offset 1");
                let shifted = s.forward(&part, &mut Dropout::seeded(5)).unwrap().logits;
                let diff = scalar(&(shifted - &want).unwrap().abs().unwrap().max_all().unwrap());
                assert!(diff > 1e-3, "without the offset the slice draws rows 0..2");
            });
        }
    }
}

#[test]
fn losses_match_their_formulas() {
    // Concept loss: mean over labels of −log softmax(z)[label].
    let z = Tensor::new(&[[[1f32, 2., 3.], [0., 0., 0.]]], &DEV).unwrap();
    let labels = Tensor::new(&[[[2u32, 0], [1, 1]]], &DEV).unwrap();
    let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    let want = ((lse - 3.0) + (lse - 1.0) + 2.0 * 3f64.ln()) / 4.0;
    assert!((scalar(&concept_loss(&z, &labels).unwrap()) as f64 - want).abs() < 1e-6);
    // KL(p‖q) at τ = 1 at one position.
    let s = Tensor::new(&[[[0f32, 1.0]]], &DEV).unwrap();
    let t = Tensor::new(&[[[1f32, 0.0]]], &DEV).unwrap();
    let p = [1f64.exp() / (1.0 + 1f64.exp()), 1.0 / (1.0 + 1f64.exp())];
    let q = [p[1], p[0]];
    let kl: f64 = (0..2).map(|i| p[i] * (p[i] / q[i]).ln()).sum();
    assert!((scalar(&kd_kl(&s, &t, 1.0).unwrap()) as f64 - kl).abs() < 1e-6);
    // At τ = 2 the logits are halved.
    let p2 = [
        0.5f64.exp() / (1.0 + 0.5f64.exp()),
        1.0 / (1.0 + 0.5f64.exp()),
    ];
    let kl2: f64 = (0..2).map(|i| p2[i] * (p2[i] / p2[1 - i]).ln()).sum();
    assert!((scalar(&kd_kl(&s, &t, 2.0).unwrap()) as f64 - kl2).abs() < 1e-6);
}

#[test]
fn bf16_autocast_stays_close_to_f32_and_reaches_every_weight() {
    let ids = Tensor::new(&[[1u32, 5, 7, 3, 9, 2]], &DEV).unwrap();
    let mut s = Student::new(&student_cfg(true), 3, &DEV).unwrap();
    let f32_out = s.forward(&ids, &mut Dropout::off()).unwrap();
    s.set_compute_dtype(DType::BF16);
    let bf = s.forward(&ids, &mut Dropout::off()).unwrap();
    assert_eq!(bf.logits.dtype(), DType::F32);
    assert_close(&bf.logits, &f32_out.logits, 5e-2, 5e-2, "bf16 logits");
    let labels = Tensor::new(
        &[[[1u32, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]],
        &DEV,
    )
    .unwrap();
    let loss = (next_token_loss(&bf.logits, &ids).unwrap()
        + concept_loss(bf.concept_logits.as_ref().unwrap(), &labels).unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in s.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient under bf16"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        assert!(scalar(&g.abs().unwrap().sum_all().unwrap()) > 0.0, "{name}");
    }
}

#[test]
fn dropout_masks_depend_on_the_global_row_not_on_the_batch_slice() {
    let x = Tensor::ones((6, 3, 40), DType::F32, &DEV).unwrap();
    let masks = |d: &mut Dropout, x: &Tensor| -> Vec<Vec<f32>> {
        // Two calls: the second call site draws other masks than the first.
        let a = d.apply(x, 0.25).unwrap();
        let b = d.apply(x, 0.25).unwrap();
        [a, b]
            .iter()
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let full = masks(&mut Dropout::seeded(11), &x);
    let tail = masks(
        &mut Dropout::seeded(11).with_row_offset(4),
        &x.narrow(0, 4, 2).unwrap(),
    );
    // Rows 4 and 5 of the whole batch, seen as rows 0 and 1 of a slice starting at row 4.
    assert_eq!(tail[0], full[0][4 * 120..]);
    assert_eq!(tail[1], full[1][4 * 120..]);
    assert_ne!(full[0], full[1], "call sites draw independent masks");
    let other_seed = masks(&mut Dropout::seeded(12), &x);
    assert_ne!(full[0], other_seed[0]);
    // Inverted dropout: zeros at rate p, survivors scaled by 1 / (1 - p).
    let big = Tensor::ones((50, 1000), DType::F32, &DEV).unwrap();
    let m: Vec<f32> = Dropout::seeded(3)
        .apply(&big, 0.25)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let zeros = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
    assert!((zeros - 0.25).abs() < 0.01, "drop rate {zeros}");
    assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    let mean = m.iter().map(|&v| v as f64).sum::<f64>() / m.len() as f64;
    assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
}
