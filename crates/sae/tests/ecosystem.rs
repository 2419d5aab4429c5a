//! SAELens and sparsify SAEs, written by those libraries (scripts/make-sae-ecosystem-fixtures.py),
//! against the libraries' own encode/decode of the same inputs.
#[path = "../../../testdata/testutil.rs"]
mod testutil;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use cocomix_sae::{Activation, InputNorm, Sae, SparseCodes};
use testutil::*;

const DEV: Device = Device::Cpu;

fn eco(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ecosystem")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(eco(&format!("reference/{name}.safetensors")), &DEV).unwrap()
}

fn load(path: &Path) -> Sae {
    Sae::load(path.to_str().unwrap(), &DEV).unwrap()
}

/// Each fixture: its folder, its reference file, and what its config says.
const CASES: [(&str, &str, &str, &str, bool); 7] = [
    // folder, reference, activation, normalisation, b_dec subtracted from the input
    (
        "saelens-topk",
        "saelens-topk",
        "TopK (k = 5)",
        "raw inputs",
        false,
    ),
    (
        "saelens-topk-layernorm",
        "saelens-topk-layernorm",
        "TopK (k = 6)",
        "LayerNorm inputs",
        true,
    ),
    ("saelens-relu", "saelens-relu", "ReLU", "raw inputs", true),
    (
        "saelens-relu-scaled",
        "saelens-relu-scaled",
        "ReLU",
        "inputs scaled by 0.37",
        false,
    ),
    (
        "saelens-jumprelu",
        "saelens-jumprelu",
        "JumpReLU",
        "inputs rescaled to norm √d",
        false,
    ),
    (
        "saelens-legacy-topk",
        "saelens-legacy-topk",
        "TopK (k = 4)",
        "raw inputs",
        true,
    ),
    (
        "sparsify/layers.1",
        "sparsify",
        "TopK (k = 6)",
        "raw inputs",
        true,
    ),
];

fn active_per_row(z: &Tensor) -> Vec<usize> {
    z.to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().filter(|&&v| v > 0.0).count())
        .collect()
}

/// Rows of distinct indices, sorted by value (descending), zero values only after the
/// positive ones.
fn check_code_rows(codes: &SparseCodes, what: &str) {
    let idx: Vec<Vec<u32>> = codes.indices.to_vec2().unwrap();
    let val: Vec<Vec<f32>> = codes.values.to_vec2().unwrap();
    for (i, v) in idx.iter().zip(&val) {
        let mut s = i.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), i.len(), "{what}: repeated index in {i:?}");
        assert!(v.windows(2).all(|w| w[0] >= w[1]), "{what}: {v:?}");
        assert!(v.iter().all(|&x| x >= 0.0), "{what}: {v:?}");
    }
}

#[test]
fn every_library_fixture_encodes_and_decodes_like_the_library() {
    for (folder, refname, act, norm, on_input) in CASES {
        let sae = load(&eco(folder));
        assert_eq!(
            (sae.d_model(), sae.n_latents()),
            (16, 64),
            "{folder}: shape"
        );
        assert_eq!(sae.activation().to_string(), act, "{folder}: activation");
        assert_eq!(
            sae.input_norm().to_string(),
            norm,
            "{folder}: normalisation"
        );
        assert_eq!(
            sae.parts().b_dec_on_input,
            on_input,
            "{folder}: b_dec on input"
        );
        let r = reference(refname);
        let codes = sae.encode(&r["x"]).unwrap();
        check_code_rows(&codes, folder);
        let z = sae.dense(&codes).unwrap();
        assert_close(&z, &r["z"], 1e-5, 1e-5, &format!("{folder}: z"));
        let recon = sae.decode(&codes).unwrap();
        assert_close(&recon, &r["recon"], 1e-5, 1e-5, &format!("{folder}: recon"));
        // The dense decode (steering's) agrees with the sparse one.
        let dense = sae.decode_dense(&z, &codes.mean, &codes.std).unwrap();
        assert_close(
            &dense,
            &recon,
            1e-5,
            1e-5,
            &format!("{folder}: dense decode"),
        );
        // Codes are exactly as wide as the most active token needs.
        let most = *active_per_row(&r["z"]).iter().max().unwrap();
        let w = codes.indices.dim(1).unwrap();
        match sae.activation() {
            Activation::TopK { k } => assert_eq!(w, *k, "{folder}"),
            _ => assert_eq!(w, most, "{folder}: width"),
        }
    }
}

#[test]
fn variable_width_codes_are_padded_with_zeros_that_change_nothing() {
    for folder in ["saelens-relu", "saelens-jumprelu"] {
        let sae = load(&eco(folder));
        let r = reference(folder);
        let codes = sae.encode(&r["x"]).unwrap();
        let active = active_per_row(&r["z"]);
        assert!(
            active.iter().min() < active.iter().max(),
            "{folder}: the fixture should have rows of different widths"
        );
        // Each row: its active latents, then value-0 padding.
        let val: Vec<Vec<f32>> = codes.values.to_vec2().unwrap();
        for (row, n_active) in val.iter().zip(&active) {
            assert!(row[..*n_active].iter().all(|&v| v > 0.0), "{row:?}");
            assert!(row[*n_active..].iter().all(|&v| v == 0.0), "{row:?}");
        }
        // Padding the codes further (to the dense width, which also switches decoding to
        // the dense product) changes neither the decode nor the decoder dot products of
        // the real entries, and the padded entries score 0.
        let (n, w) = codes.indices.dims2().unwrap();
        let c = sae.n_latents();
        let z = sae.dense(&codes).unwrap();
        let (all_idx, all_val) = cocomix_ops::topk(&z, c).unwrap();
        let wide = SparseCodes {
            indices: all_idx,
            values: all_val,
            mean: codes.mean.clone(),
            std: codes.std.clone(),
        };
        assert_close(
            &sae.decode(&wide).unwrap(),
            &sae.decode(&codes).unwrap(),
            1e-5,
            1e-5,
            &format!("{folder}: padded decode"),
        );
        let g = Tensor::randn(0f32, 1.0, (n, sae.d_model()), &DEV).unwrap();
        let narrow = (sae.decoder_dots(&codes.indices, &g).unwrap() * &codes.values).unwrap();
        let padded = (sae.decoder_dots(&wide.indices, &g).unwrap() * &wide.values).unwrap();
        assert_close(
            &padded.narrow(1, 0, w).unwrap(),
            &narrow,
            1e-5,
            1e-6,
            &format!("{folder}: scores of the real entries"),
        );
        let tail: Vec<f32> = padded
            .narrow(1, w, c - w)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(tail.iter().all(|&s| s == 0.0), "{folder}: padded scores");
    }
}

#[test]
fn codes_do_not_depend_on_how_the_batch_is_chunked() {
    // 2500 tokens span three internal encode chunks whose widths differ; every row must
    // decode as if it had been encoded alone.
    let sae = load(&eco("saelens-relu"));
    let x = (Tensor::randn(0f32, 1.5, (2500, 16), &DEV).unwrap() + 0.3).unwrap();
    let codes = sae.encode(&x).unwrap();
    check_code_rows(&codes, "2500 rows");
    let z = sae.dense(&codes).unwrap();
    let mut parts = Vec::new();
    for s in (0..2500).step_by(100) {
        parts.push(
            sae.dense(&sae.encode(&x.narrow(0, s, 100).unwrap()).unwrap())
                .unwrap(),
        );
    }
    assert_close(&z, &Tensor::cat(&parts, 0).unwrap(), 0.0, 0.0, "chunked z");
    let most = *active_per_row(&z).iter().max().unwrap();
    assert_eq!(codes.indices.dim(1).unwrap(), most);
}

#[test]
fn an_sae_with_every_latent_active_stays_correct() {
    // A ReLU SAE whose encoder bias switches every latent on: the codes are C wide (the
    // dense latents), and decoding and the decoder dots still match the dense formulas.
    let src = reference("saelens-relu");
    let base = load(&eco("saelens-relu"));
    let mut parts = base.parts().clone();
    parts.b_enc = (parts.b_enc + 100.0).unwrap();
    let sae = Sae::from_parts(parts, "all-on".into()).unwrap();
    let codes = sae.encode(&src["x"]).unwrap();
    assert_eq!(codes.indices.dims2().unwrap(), (12, 64));
    let z = sae.dense(&codes).unwrap();
    let dense = sae.decode_dense(&z, &codes.mean, &codes.std).unwrap();
    assert_close(&sae.decode(&codes).unwrap(), &dense, 1e-5, 1e-4, "decode");
    let g = Tensor::randn(0f32, 1.0, (12, 16), &DEV).unwrap();
    let want = g
        .matmul(&sae.w_dec().t().unwrap())
        .unwrap()
        .gather(&codes.indices, 1)
        .unwrap();
    assert_close(
        &sae.decoder_dots(&codes.indices, &g).unwrap(),
        &want,
        1e-5,
        1e-5,
        "dots",
    );
}

#[test]
fn decoder_columns_are_directions_in_the_input_space() {
    // SAELens stores W_dec [C, d], OpenAI decoder.weight [d, C]: either way column i is
    // what latent i adds to the (normalised) reconstruction.
    for path in [
        eco("saelens-relu"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/sae.pt"),
    ] {
        let sae = load(&path);
        let (c, d) = (sae.n_latents(), sae.d_model());
        let i = c / 3;
        let mut onehot = vec![0f32; c];
        onehot[i] = 1.0;
        let z = Tensor::from_vec(onehot, (1, c), &DEV).unwrap();
        let zero = Tensor::zeros((1, 1), DType::F32, &DEV).unwrap();
        let one = Tensor::ones((1, 1), DType::F32, &DEV).unwrap();
        let out = sae.decode_dense(&z, &zero, &one).unwrap();
        let base = sae
            .decode_dense(&z.zeros_like().unwrap(), &zero, &one)
            .unwrap();
        let col = sae.decoder_column(i).unwrap().reshape((1, d)).unwrap();
        assert_close(&(out - base).unwrap(), &col, 1e-6, 1e-6, "column");
    }
}

#[test]
fn a_weights_file_inside_an_sae_folder_loads_the_folder() {
    let r = reference("sparsify");
    for path in [
        eco("sparsify/layers.1/sae.safetensors"),
        eco("sparsify/layers.1/cfg.json"),
    ] {
        let sae = load(&path);
        let z = sae.dense(&sae.encode(&r["x"]).unwrap()).unwrap();
        assert_close(&z, &r["z"], 1e-5, 1e-5, "z");
        assert_eq!(sae.files().len(), 2);
    }
    let sae = load(&eco("saelens-relu-scaled"));
    let names: Vec<String> = sae
        .files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "sae_weights.safetensors",
            "cfg.json",
            "activation_scaler.json"
        ]
    );
}

// ---- bad folders: each error names the file and the problem ----

/// A copy of fixture `folder` in a temporary folder, for editing.
fn copy(folder: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(folder.replace('/', "-"));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(eco(folder)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

fn edit_cfg(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("cfg.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

fn edit_weights(file: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = candle_core::safetensors::load(file, &DEV).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, file).unwrap();
}

fn error(dir: &Path) -> String {
    match Sae::load(dir.to_str().unwrap(), &DEV) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_says(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "{e:?} should mention {p:?}");
    }
}

#[test]
fn bad_saelens_configs_are_refused_by_name() {
    let cases: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        (
            "d_in",
            serde_json::Value::Null,
            vec!["cfg.json", "`d_in`", "missing"],
        ),
        (
            "architecture",
            "gated".into(),
            vec!["cfg.json", "\"gated\"", "standard, topk, jumprelu"],
        ),
        (
            "normalize_activations",
            "covariance_whitening".into(),
            vec![
                "cfg.json",
                "covariance_whitening",
                "fold_activation_whitening",
            ],
        ),
        (
            "normalize_activations",
            "bogus".into(),
            vec!["cfg.json", "\"bogus\"", "unknown"],
        ),
        (
            "reshape_activations",
            "hook_z".into(),
            vec!["cfg.json", "hook_z", "not supported"],
        ),
        ("d_sae", "64".into(), vec!["cfg.json", "`d_sae`", "integer"]),
    ];
    for (key, value, want) in cases {
        let (_tmp, dir) = copy("saelens-relu");
        edit_cfg(&dir, |m| {
            if value.is_null() {
                m.remove(key);
            } else {
                m.insert(key.into(), value.clone());
            }
        });
        assert_says(&error(&dir), &want);
    }
    // A topk config without k.
    let (_tmp, dir) = copy("saelens-topk");
    edit_cfg(&dir, |m| {
        m.remove("k");
    });
    assert_says(&error(&dir), &["cfg.json", "`k`"]);
    // A legacy activation SAELens would not run as written.
    let (_tmp, dir) = copy("saelens-legacy-topk");
    edit_cfg(&dir, |m| {
        m.insert("activation_fn_str".into(), "tanh-relu".into());
    });
    assert_says(&error(&dir), &["cfg.json", "\"tanh-relu\"", "relu, topk"]);
}

#[test]
fn expected_average_only_in_needs_its_factor() {
    // Without activation_scaler.json the factor is missing: refused, saying where it lives.
    let (_tmp, dir) = copy("saelens-relu-scaled");
    std::fs::remove_file(dir.join("activation_scaler.json")).unwrap();
    assert_says(
        &error(&dir),
        &[
            "cfg.json",
            "expected_average_only_in",
            "norm_scaling_factor",
        ],
    );
    // The same factor in cfg.json gives the library's values.
    edit_cfg(&dir, |m| {
        m.insert("norm_scaling_factor".into(), 0.37.into());
    });
    let sae = load(&dir);
    assert_eq!(sae.input_norm(), InputNorm::Scale(0.37));
    let r = reference("saelens-relu-scaled");
    let codes = sae.encode(&r["x"]).unwrap();
    assert_close(&sae.dense(&codes).unwrap(), &r["z"], 1e-5, 1e-5, "z");
    assert_close(
        &sae.decode(&codes).unwrap(),
        &r["recon"],
        1e-5,
        1e-5,
        "recon",
    );
}

#[test]
fn bad_saelens_weights_are_refused_by_name() {
    let weights = |dir: &Path| dir.join("sae_weights.safetensors");
    // A decoder in the wrong layout.
    let (_tmp, dir) = copy("saelens-relu");
    edit_weights(&weights(&dir), |t| {
        let w = t["W_dec"].t().unwrap().contiguous().unwrap();
        t.insert("W_dec".into(), w);
    });
    assert_says(
        &error(&dir),
        &[
            "sae_weights.safetensors",
            "`W_dec`",
            "[16, 64]",
            "expected [64, 16]",
            "d_sae = 64",
        ],
    );
    // JumpReLU without its thresholds.
    let (_tmp, dir) = copy("saelens-jumprelu");
    edit_weights(&weights(&dir), |t| {
        t.remove("threshold");
    });
    assert_says(
        &error(&dir),
        &["sae_weights.safetensors", "`threshold`", "missing"],
    );
    // A tensor of another architecture.
    let (_tmp, dir) = copy("saelens-relu");
    edit_weights(&weights(&dir), |t| {
        t.insert(
            "b_gate".into(),
            Tensor::zeros(64, DType::F32, &DEV).unwrap(),
        );
    });
    assert_says(
        &error(&dir),
        &["sae_weights.safetensors", "`b_gate`", "standard SAE"],
    );
    // A finetuning scaling factor other than ones.
    let (_tmp, dir) = copy("saelens-relu");
    edit_weights(&weights(&dir), |t| {
        t.insert(
            "scaling_factor".into(),
            Tensor::full(2f32, 64, &DEV).unwrap(),
        );
    });
    assert_says(&error(&dir), &["`scaling_factor`", "not all ones"]);
    // No weights file at all.
    let (_tmp, dir) = copy("saelens-relu");
    std::fs::remove_file(weights(&dir)).unwrap();
    assert_says(&error(&dir), &["sae_weights.safetensors", "missing"]);
    // Not a safetensors file.
    let (_tmp, dir) = copy("saelens-relu");
    std::fs::write(weights(&dir), b"garbage").unwrap();
    assert_says(
        &error(&dir),
        &["sae_weights.safetensors", "not a safetensors file"],
    );
}

#[test]
fn bad_sparsify_folders_are_refused_by_name() {
    for (key, value, want) in [
        (
            "activation",
            serde_json::Value::from("groupmax"),
            vec!["cfg.json", "groupmax", "not supported"],
        ),
        ("transcode", true.into(), vec!["cfg.json", "transcoder"]),
        ("skip_connection", true.into(), vec!["cfg.json", "skip"]),
        (
            "num_latents",
            32.into(),
            vec![
                "sae.safetensors",
                "`encoder.weight`",
                "[64, 16]",
                "expected [32, 16]",
            ],
        ),
    ] {
        let (_tmp, dir) = copy("sparsify/layers.1");
        edit_cfg(&dir, |m| {
            m.insert(key.into(), value.clone());
        });
        assert_says(&error(&dir), &want);
    }
    // A coder saved without its decoder (sparsify's `decoder=False`).
    let (_tmp, dir) = copy("sparsify/layers.1");
    edit_weights(&dir.join("sae.safetensors"), |t| {
        t.remove("W_dec");
    });
    assert_says(&error(&dir), &["sae.safetensors", "`W_dec`", "missing"]);
    // A repository root of hookpoint folders: pick one.
    assert_says(
        &error(&eco("sparsify")),
        &["sparsify", "no cfg.json", "layers.1"],
    );
    // A folder whose cfg.json is neither library's.
    let (_tmp, dir) = copy("sparsify/layers.1");
    std::fs::write(dir.join("cfg.json"), r#"{"d_in": 16}"#).unwrap();
    assert_says(
        &error(&dir),
        &["cfg.json", "neither a SAELens", "nor a sparsify"],
    );
    std::fs::write(dir.join("cfg.json"), "{not json").unwrap();
    assert_says(&error(&dir), &["cfg.json", "not valid JSON"]);
}

#[test]
fn width_mismatch_and_unsavable_formats_are_named() {
    let sae = load(&eco("saelens-jumprelu"));
    let e = sae
        .check_input_width(768, "teacher gpt2 at layer 5")
        .err()
        .unwrap()
        .to_string();
    assert_says(&e, &["saelens-jumprelu", "width 16", "768"]);
    let tmp = tempfile::tempdir().unwrap();
    let e = sae
        .save(&tmp.path().join("x.safetensors"), &[])
        .err()
        .unwrap()
        .to_string();
    assert_says(&e, &["saelens-jumprelu", "JumpReLU", "OpenAI-rule"]);
    let e = Sae::load("/no/such/folder", &DEV)
        .err()
        .unwrap()
        .to_string();
    assert_says(&e, &["/no/such/folder", "no such file or folder"]);
}
