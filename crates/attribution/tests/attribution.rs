#[path = "../../../testdata/testutil.rs"]
mod testutil;

use candle_core::{DType, Device, Tensor};
use cocomix_attribution::{
    attribute, attribute_dense, labels, LabelCache, LabelCacheSpec, LabelMode,
};
use cocomix_data::{TokenDtype, TokenShard};
use cocomix_model::{Dropout, Gpt2, Gpt2Config, Params};
use cocomix_sae::Sae;
use rand::{Rng, SeedableRng};
use testutil::*;

const DEV: Device = Device::Cpu;

fn golden() -> (Gpt2, Sae) {
    let t = Gpt2::load(golden_dir().join("teacher").to_str().unwrap(), &DEV).unwrap();
    let s = Sae::load(golden_dir().join("sae.pt").to_str().unwrap(), &DEV).unwrap();
    (t, s)
}

/// A random 3-layer GPT-2 with d = 16.
fn tiny_teacher() -> Gpt2 {
    let cfg = Gpt2Config::new(50, 32, 16, 3, 2).with_dropout(0.0);
    Gpt2::new(&cfg, &mut Params::random(11, &DEV, false)).unwrap()
}

fn tiny() -> (Gpt2, Sae) {
    let t = tiny_teacher();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut r =
        |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-s..s)).collect() };
    let (d, c) = (16, 40);
    let sae = Sae::new(
        Tensor::from_vec(r(d, 0.1), d, &DEV).unwrap(),
        Tensor::from_vec(r(c * d, 0.5), (c, d), &DEV).unwrap(),
        Tensor::from_vec(r(c, 0.1), c, &DEV).unwrap(),
        Tensor::from_vec(r(d * c, 0.5), (d, c), &DEV).unwrap(),
        4,
        "tiny".into(),
    )
    .unwrap();
    (t, sae)
}

fn sparse_to_dense(att: &cocomix_attribution::Attribution, c: usize) -> Tensor {
    let n = att.scores.dim(0).unwrap();
    Tensor::zeros((n, c), DType::F32, &DEV)
        .unwrap()
        .scatter(&att.codes.indices, &att.scores, 1)
        .unwrap()
}

#[test]
fn golden_attribution_and_labels() {
    let exp = expected();
    let ids = golden_ids(&exp);
    let (t, sae) = golden();
    let want = exp["attribution"].reshape((32, 256)).unwrap();
    assert_close(
        &attribute_dense(&t, &sae, &ids, 1).unwrap(),
        &want,
        1e-3,
        1e-7,
        "dense attribution",
    );
    let att = attribute(&t, &sae, &ids, 1).unwrap();
    assert_close(
        &sparse_to_dense(&att, 256),
        &want,
        1e-3,
        1e-7,
        "sparse attribution",
    );
    let (lab, sc) = labels(&att, 256, 4, LabelMode::Faithful).unwrap();
    let lab: Vec<u32> = lab.flatten_all().unwrap().to_vec1().unwrap();
    let sc: Vec<f32> = sc.flatten_all().unwrap().to_vec1().unwrap();
    let gl: Vec<i64> = exp["labels"].flatten_all().unwrap().to_vec1().unwrap();
    let gs: Vec<f32> = exp["label_scores"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut compared = 0;
    for i in 0..gl.len() {
        if gs[i] > 0.0 {
            assert_eq!(lab[i] as i64, gl[i], "label slot {i}");
            assert!((sc[i] - gs[i]).abs() <= 1e-3 * gs[i].abs() + 1e-7);
            compared += 1;
        }
    }
    assert!(
        compared > 40,
        "only {compared} positive label slots compared"
    );
}

#[test]
fn attribution_is_the_first_order_change_of_the_teacher_loss() {
    let (t, sae) = tiny();
    let ids = Tensor::new(&[[3u32, 17, 42, 8, 25, 11]], &DEV).unwrap();
    let layer = 0;
    let att = attribute(&t, &sae, &ids, layer).unwrap();
    let x = t.hidden_state(&ids, layer).unwrap(); // [1, 6, 16]
    let mask = cocomix_model::ops::causal_mask(6, 6, 0, &DEV).unwrap();
    let loss = |x: &Tensor| -> f64 {
        let h = t
            .run_blocks(
                x.clone(),
                layer + 1..3,
                &mask,
                None,
                None,
                &mut Dropout::off(),
            )
            .unwrap();
        scalar(&cocomix_model::next_token_loss(&t.head(&h).unwrap(), &ids).unwrap()) as f64
    };
    let idx: Vec<Vec<u32>> = att.codes.indices.to_vec2().unwrap();
    let z: Vec<Vec<f32>> = att.codes.values.to_vec2().unwrap();
    let a: Vec<Vec<f32>> = att.scores.to_vec2().unwrap();
    let std: Vec<f32> = att.codes.std.flatten_all().unwrap().to_vec1().unwrap();
    let dec: Vec<Vec<f32>> = sae.w_dec().to_vec2().unwrap(); // [C][d]
    let mut checked = 0;
    for tok in 0..5 {
        for j in 0..4 {
            if z[tok][j] <= 0.0 {
                continue;
            }
            // Decoding maps z_c to x through W_dec[:, c]·std_t: perturb z_c by ±ε there. The
            // f32 loss resolves ~1.6e-6, i.e. ~z/std·1.6e-6/(2ε) ≈ 2e-4 on the estimate here.
            let eps = 1e-1f32;
            let col = &dec[idx[tok][j] as usize];
            let shift = |s: f32| {
                let mut dx = vec![0f32; 6 * 16];
                for (i, w) in col.iter().enumerate() {
                    dx[tok * 16 + i] = s * eps * w * std[tok];
                }
                loss(&(&x + Tensor::from_vec(dx, (1, 6, 16), &DEV).unwrap()).unwrap())
            };
            let dl_dz = (shift(1.0) - shift(-1.0)) / (2.0 * eps as f64);
            let first_order = z[tok][j] as f64 * dl_dz / std[tok] as f64;
            assert!(
                (first_order - a[tok][j] as f64).abs() < 5e-4 + 2e-2 * first_order.abs(),
                "token {tok} latent {}: {first_order} vs {}",
                idx[tok][j],
                a[tok][j]
            );
            checked += 1;
        }
    }
    assert!(checked >= 5);
}

#[test]
fn sparse_and_dense_paths_agree_and_labels_are_deterministic() {
    let (t, sae) = tiny();
    let ids = Tensor::new(
        &[[1u32, 2, 3, 4, 5, 6, 7, 8], [9, 9, 10, 11, 40, 41, 2, 0]],
        &DEV,
    )
    .unwrap();
    let att = attribute(&t, &sae, &ids, 1).unwrap();
    assert_close(
        &sparse_to_dense(&att, 40),
        &attribute_dense(&t, &sae, &ids, 1).unwrap(),
        1e-4,
        1e-7,
        "sparse vs dense",
    );
    for mode in [LabelMode::Faithful, LabelMode::ActiveOnly] {
        let (a, _) = labels(&att, 40, 4, mode).unwrap();
        let (b, _) = labels(&attribute(&t, &sae, &ids, 1).unwrap(), 40, 4, mode).unwrap();
        assert_eq!(a.to_vec2::<u32>().unwrap(), b.to_vec2::<u32>().unwrap());
    }
}

/// Codes `[N, w]` padded to `[N, C]`: each row's entries, then every other latent with value 0.
fn pad_to_every_latent(codes: &cocomix_sae::SparseCodes, c: usize) -> (Tensor, Tensor) {
    let idx: Vec<Vec<u32>> = codes.indices.to_vec2().unwrap();
    let val: Vec<Vec<f32>> = codes.values.to_vec2().unwrap();
    let (mut all_i, mut all_v) = (Vec::new(), Vec::new());
    for (i, v) in idx.iter().zip(&val) {
        all_i.extend(i);
        all_i.extend((0..c as u32).filter(|j| !i.contains(j)));
        all_v.extend(v);
        all_v.resize(all_i.len(), 0.0);
    }
    let n = idx.len();
    (
        Tensor::from_vec(all_i, (n, c), &DEV).unwrap(),
        Tensor::from_vec(all_v, (n, c), &DEV).unwrap(),
    )
}

/// The SAELens and sparsify SAEs of the SAE crate's fixtures (written by those libraries),
/// all with d = 16 like [`tiny_teacher`].
const ECOSYSTEM: [&str; 7] = [
    "saelens-topk",
    "saelens-topk-layernorm",
    "saelens-relu",
    "saelens-relu-scaled",
    "saelens-jumprelu",
    "saelens-legacy-topk",
    "sparsify/layers.1",
];

#[test]
fn attribution_is_z_times_decoder_dot_g_for_every_sae_type() {
    let t = tiny_teacher();
    let ids = Tensor::new(
        &[[1u32, 2, 3, 4, 5, 6, 7, 8], [9, 9, 10, 11, 40, 41, 2, 0]],
        &DEV,
    )
    .unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../sae/tests/fixtures/ecosystem");
    for name in ECOSYSTEM {
        let sae = Sae::load(root.join(name).to_str().unwrap(), &DEV).unwrap();
        let c = sae.n_latents();
        let att = attribute(&t, &sae, &ids, 1).unwrap();
        let dense = attribute_dense(&t, &sae, &ids, 1).unwrap();
        let nonzero = dense
            .ne(0f64)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(scalar(&nonzero) > 16.0, "{name}: too few non-zero scores");
        assert_close(
            &sparse_to_dense(&att, c),
            &dense,
            1e-4,
            1e-7,
            &format!("{name}: sparse vs dense attribution"),
        );
        // Padding entries (value 0) score exactly 0, and padding the codes to all C latents
        // changes no label.
        let z: Vec<f32> = att.codes.values.flatten_all().unwrap().to_vec1().unwrap();
        let a: Vec<f32> = att.scores.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            z.iter().zip(&a).all(|(z, a)| *z != 0.0 || *a == 0.0),
            "{name}"
        );
        let (all_idx, all_val) = pad_to_every_latent(&att.codes, c);
        let wide = cocomix_attribution::Attribution {
            scores: dense.gather(&all_idx, 1).unwrap(),
            codes: cocomix_sae::SparseCodes {
                indices: all_idx,
                values: all_val,
                mean: att.codes.mean.clone(),
                std: att.codes.std.clone(),
            },
            teacher_loss: att.teacher_loss,
        };
        for mode in [LabelMode::Faithful, LabelMode::ActiveOnly] {
            let (l1, _) = labels(&att, c, 4, mode).unwrap();
            let (l2, _) = labels(&wide, c, 4, mode).unwrap();
            assert_eq!(
                l1.to_vec2::<u32>().unwrap(),
                l2.to_vec2::<u32>().unwrap(),
                "{name}: {mode:?} labels with padded codes"
            );
        }
    }
}

fn shard(dir: &std::path::Path, n: usize) -> TokenShard {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let toks: Vec<u8> = (0..n)
        .flat_map(|_| (rng.random_range(0..50u16)).to_le_bytes())
        .collect();
    let p = dir.join("train.bin");
    std::fs::write(&p, toks).unwrap();
    TokenShard::open(&p, TokenDtype::U16, n as u64).unwrap()
}

fn spec(window: usize) -> LabelCacheSpec {
    LabelCacheSpec {
        teacher: "tiny".into(),
        teacher_sha256: "t".into(),
        sae_sha256: "s".into(),
        layer: 1,
        k_attr: 3,
        window,
        mode: LabelMode::Faithful,
        n_latents: 40,
        data: "test".into(),
        max_windows: 0,
    }
}

#[test]
fn cache_round_trip_resume_and_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let (t, sae) = tiny();
    let sh = shard(dir.path(), 8 * 5 + 3);
    let sp = spec(8);
    let a_dir = LabelCache::path_for(dir.path(), &sp);
    let cache = LabelCache::build(&t, &sae, &sp, &sh, &a_dir, 2).unwrap();
    assert_eq!(cache.n_windows(), 5);
    assert_eq!(cache.resumed_from(), None, "built from window 0");
    // Cached labels are the online labels of the aligned windows.
    for w in 0..5 {
        let ids = Tensor::from_vec(sh.window(w * 8, 8), (1, 8), &DEV).unwrap();
        let (online, _) = labels(
            &attribute(&t, &sae, &ids, 1).unwrap(),
            40,
            3,
            LabelMode::Faithful,
        )
        .unwrap();
        assert_eq!(
            cache.window_labels(w),
            online.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            "window {w}"
        );
    }
    // A mismatching run is refused, naming the field.
    let mut other = sp.clone();
    other.layer = 0;
    let e = LabelCache::open(&a_dir, &other).err().unwrap().to_string();
    assert!(e.contains("meta.json") && e.contains("layer"), "{e}");
    let mut other = sp.clone();
    other.mode = LabelMode::ActiveOnly;
    assert!(LabelCache::open(&a_dir, &other)
        .err()
        .unwrap()
        .to_string()
        .contains("mode"));
    // Resume after a kill: a partial file whose first two windows are done (and the rest
    // garbage) is finished, not restarted.
    let full = std::fs::read(a_dir.join("labels.bin")).unwrap();
    let per = 8 * 3 * 2;
    let resume = |name: &str, done_windows: &[u8]| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut partial = done_windows.to_vec();
        partial.extend(vec![0xAB; full.len() - 2 * per]);
        std::fs::write(d.join("labels.bin.partial"), &partial).unwrap();
        std::fs::write(
            d.join("progress.json"),
            serde_json::json!({"spec": sp, "done": 2}).to_string(),
        )
        .unwrap();
        let c = LabelCache::build(&t, &sae, &sp, &sh, &d, 2).unwrap();
        assert_eq!(c.resumed_from(), Some(2), "continued at window 2");
        assert!(!d.join("progress.json").exists());
        std::fs::read(d.join("labels.bin")).unwrap()
    };
    assert_eq!(resume("resumed", &full[..2 * per]), full);
    // Windows 0–1 are taken as done, not relabelled: sentinel labels there survive.
    let sentinel = vec![7u8; 2 * per];
    let out = resume("sentinel", &sentinel);
    assert_eq!(&out[..2 * per], &sentinel[..]);
    assert_eq!(&out[2 * per..], &full[2 * per..]);
    // A progress file of another spec is not trusted: the build restarts from window 0.
    let c_dir = dir.path().join("restarted");
    std::fs::create_dir_all(&c_dir).unwrap();
    std::fs::write(c_dir.join("labels.bin.partial"), vec![0xCD; full.len()]).unwrap();
    let mut stale = sp.clone();
    stale.sae_sha256 = "old".into();
    std::fs::write(
        c_dir.join("progress.json"),
        serde_json::json!({"spec": stale, "done": 4}).to_string(),
    )
    .unwrap();
    let restarted = LabelCache::build(&t, &sae, &sp, &sh, &c_dir, 3).unwrap();
    assert_eq!(restarted.resumed_from(), None);
    assert_eq!(std::fs::read(c_dir.join("labels.bin")).unwrap(), full);
    // A capped cache labels only the first windows, with the same labels.
    let mut capped = sp.clone();
    capped.max_windows = 3;
    let small = LabelCache::build(
        &t,
        &sae,
        &capped,
        &sh,
        &LabelCache::path_for(dir.path(), &capped),
        2,
    )
    .unwrap();
    assert_eq!(small.n_windows(), 3);
    assert_eq!(small.window_labels(2), cache.window_labels(2));
    // A truncated labels.bin is detected.
    std::fs::write(a_dir.join("labels.bin"), &full[..full.len() - 2]).unwrap();
    assert!(LabelCache::open(&a_dir, &sp)
        .err()
        .unwrap()
        .to_string()
        .contains("truncated"));
}
