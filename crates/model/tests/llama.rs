//! Llama-family teachers against references written by `transformers`, PyTorch and llama.cpp's
//! gguf-py (scripts/make-llama-fixtures.py): a tiny random LlamaForCausalLM (GQA, untied
//! head) in the Hugging Face layout and as GGUF files of every supported type.
#[path = "../../../testdata/testutil.rs"]
mod testutil;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use cocomix_model::gguf::GgufFile;
use cocomix_model::{AnyModel, CausalLm, KvCache, Llama, LlamaConfig, Params};
use testutil::assert_close;

const DEV: Device = Device::Cpu;
/// The block whose output the fixtures record.
const LAYER: usize = 1;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn fixture(name: &str) -> String {
    fixtures().join(name).to_string_lossy().into_owned()
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &DEV).unwrap()
}

fn ids(r: &HashMap<String, Tensor>) -> Tensor {
    r["input_ids"].to_dtype(DType::U32).unwrap()
}

fn err_text<T>(r: cocomix_model::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hf_logits_hidden_state_and_residual_grad_match_pytorch() {
    let r = reference();
    let m = Llama::load(&fixture("hf"), &DEV).unwrap();
    assert_eq!(m.cfg.n_kv_heads(), 2);
    assert_eq!(m.cfg.num_attention_heads, 4);
    assert!(!m.cfg.tie_word_embeddings);
    let x = ids(&r);
    assert_close(&m.forward(&x).unwrap(), &r["logits"], 1e-4, 1e-4, "logits");
    assert_close(
        &m.hidden_state(&x, LAYER).unwrap(),
        &r["hidden"],
        1e-4,
        1e-4,
        "hidden state",
    );
    let rg = m.residual_grad(&x, LAYER).unwrap();
    assert_close(&rg.hidden, &r["hidden"], 1e-4, 1e-4, "x_L");
    // ∂L/∂x is O(1/(B·T)): compare relative to its scale.
    let scale = r["residual_grad"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_close(&rg.grad, &r["residual_grad"], 1e-4, 1e-4 * scale, "∂L/∂x_L");
    let loss = r["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((rg.loss - loss).abs() < 1e-5, "loss {} vs {loss}", rg.loss);
    // Through the teacher interface too.
    let t: &dyn CausalLm = &m;
    assert_eq!(
        (t.d_model(), t.n_layer(), t.vocab_size(), t.context()),
        (32, 3, 272, 64)
    );
    assert_close(
        &t.logits(&x).unwrap(),
        &r["logits"],
        1e-4,
        1e-4,
        "CausalLm::logits",
    );
}

#[test]
fn sharded_folder_and_any_model_load_the_same_model() {
    let r = reference();
    let x = ids(&r);
    let sharded = Llama::load(&fixture("hf-sharded"), &DEV).unwrap();
    assert_close(
        &sharded.forward(&x).unwrap(),
        &r["logits"],
        1e-4,
        1e-4,
        "sharded logits",
    );
    for spec in [fixture("hf"), fixture("tiny-q8_0.gguf")] {
        let m = AnyModel::load(&spec, &DEV).unwrap();
        assert!(matches!(m, AnyModel::Llama(_)), "{spec}");
        assert!(m.teacher().is_some());
        assert_eq!((m.context(), m.vocab_size(), m.d_model()), (64, 272, 32));
    }
    // A GPT-2 config with `"architectures": null` (as transformers writes some) stays GPT-2.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/teacher");
    let m = AnyModel::load(&golden.display().to_string(), &DEV).unwrap();
    assert!(matches!(m, AnyModel::Gpt2(_)));
}

#[test]
fn kv_cache_steps_match_the_full_forward() {
    let r = reference();
    let m = Llama::load(&fixture("hf"), &DEV).unwrap();
    let x = ids(&r).narrow(0, 0, 1).unwrap(); // [1, T]
    let full = m.forward(&x).unwrap();
    let t = x.dim(1).unwrap();
    let mut cache = KvCache::new(3);
    let first = m
        .forward_with(&x.narrow(1, 0, 3).unwrap(), Some(&mut cache), None)
        .unwrap();
    let mut parts = vec![first];
    for i in 3..t {
        parts.push(
            m.step(&x.narrow(1, i, 1).unwrap(), &mut cache, None)
                .unwrap(),
        );
    }
    assert_eq!(cache.tokens(), t);
    let stepped = Tensor::cat(&parts, 1).unwrap();
    assert_close(&stepped, &full, 1e-5, 1e-5, "cached logits");
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let mut cfg = LlamaConfig::from_file(&fixtures().join("hf/config.json")).unwrap();
    cfg.attention_bias = true;
    cfg.mlp_bias = true;
    let mut p = Params::random(7, &DEV, true);
    let m = Llama::new(&cfg, &mut p).unwrap();
    let vars = p.into_vars();
    // 3 layers × (4 attention + 3 MLP projections, each with a bias, + 2 norms), embedding,
    // final norm, untied head.
    assert_eq!(vars.len(), 3 * (7 * 2 + 2) + 3);
    let x = ids(&reference());
    let loss = cocomix_model::next_token_loss(&m.forward(&x).unwrap(), &x).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn residual_grad_matches_finite_differences() {
    // An independent check of the backward through RoPE, GQA, RMSNorm and SwiGLU: perturb
    // x_L along the returned gradient and compare the loss change.
    let r = reference();
    let m = Llama::load(&fixture("hf"), &DEV).unwrap();
    let x = ids(&r);
    let rg = m.residual_grad(&x, 0).unwrap();
    let norm = rg.grad.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    let dir = (&rg.grad / norm.to_scalar::<f32>().unwrap() as f64).unwrap();
    let loss_at = |h: &Tensor| -> f64 {
        let out = m.run_blocks(h.clone(), 1..3, 0, None, None).unwrap();
        cocomix_model::next_token_loss(&m.head(&out).unwrap(), &x)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-2;
    let up = loss_at(&(&rg.hidden + (&dir * eps).unwrap()).unwrap());
    let down = loss_at(&(&rg.hidden - (&dir * eps).unwrap()).unwrap());
    let numeric = (up - down) / (2.0 * eps);
    let analytic = (&rg.grad * &dir)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        (numeric - analytic).abs() < 2e-3 * analytic.abs().max(1e-3),
        "directional derivative: finite differences {numeric}, backward {analytic}"
    );
}

#[derive(serde::Deserialize)]
struct Dequant {
    #[serde(rename = "type")]
    kind: String,
    shape: Vec<usize>,
    sha256: String,
}

fn sha256_f32(t: &Tensor) -> String {
    use sha2::Digest;
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn dequantized_tensors_equal_gguf_py_exactly() {
    let text = std::fs::read_to_string(fixtures().join("dequant.json")).unwrap();
    let files: HashMap<String, HashMap<String, Dequant>> = serde_json::from_str(&text).unwrap();
    let mut types = std::collections::BTreeSet::new();
    for (file, tensors) in &files {
        let mut f = GgufFile::open(&fixtures().join(file)).unwrap();
        assert_eq!(f.tensor_names().len(), tensors.len(), "{file}");
        for (name, want) in tensors {
            let (kind, shape) = f.tensor_info(name).unwrap();
            assert_eq!(
                cocomix_model::gguf::type_name(kind),
                want.kind,
                "{file} {name}"
            );
            assert_eq!(shape, want.shape, "{file} {name}");
            let t = f.dequantize(name).unwrap();
            assert_eq!(t.dims(), want.shape.as_slice(), "{file} {name}");
            assert_eq!(
                sha256_f32(&t),
                want.sha256,
                "{file} {name}: dequantization differs"
            );
            types.insert(want.kind.clone());
        }
    }
    let all: Vec<&str> = cocomix_model::gguf::SUPPORTED_TYPES
        .iter()
        .map(|t| cocomix_model::gguf::type_name(*t))
        .collect();
    for t in all {
        assert!(types.contains(t), "no fixture of type {t}");
    }
}

#[test]
fn gguf_logits_match_transformers_for_every_type() {
    let r = reference();
    let x = ids(&r);
    let hf = LlamaConfig::from_file(&fixtures().join("hf/config.json")).unwrap();
    // Max |Δ logit| against the unquantized model that each type must stay within
    // (a wrong un-permutation or scale is far outside these).
    for (ty, key, budget) in [
        ("f32", "logits", 0.0),
        ("f16", "logits", 0.0),
        ("bf16", "logits_bf16", 0.2),
        ("q8_0", "logits_q8_0", 0.3),
        ("q5_1", "logits_q5_1", 2.0),
        ("q5_0", "logits_q5_0", 3.0),
        ("q4_1", "logits_q4_1", 5.0),
        ("q4_0", "logits_q4_0", 6.0),
    ] {
        let m = Llama::load(&fixture(&format!("tiny-{ty}.gguf")), &DEV).unwrap();
        let c = &m.cfg;
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers
            ),
            (
                hf.vocab_size,
                hf.hidden_size,
                hf.intermediate_size,
                hf.num_hidden_layers
            )
        );
        assert_eq!(
            (c.n_kv_heads(), c.head_dim(), c.max_position_embeddings),
            (2, 8, 64)
        );
        assert!(!c.tie_word_embeddings, "output.weight is present: untied");
        let logits = m.forward(&x).unwrap();
        assert_close(
            &logits,
            &r[key],
            1e-4,
            1e-4,
            &format!("{ty} logits vs transformers"),
        );
        let drift = (&logits - &r["logits"])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(drift <= budget + 1e-4, "{ty}: max |Δ| {drift} vs f32");
    }
}

/// A copy of the HF fixture with `config.json` replaced by `config`.
fn hf_with_config(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("hf/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    dir
}

fn spec(dir: &Path) -> String {
    dir.to_string_lossy().into_owned()
}

#[test]
fn rope_scaling_matches_pytorch() {
    let r = reference();
    let x = ids(&r);
    for kind in ["llama3", "linear"] {
        let cfg = std::fs::read_to_string(fixtures().join(format!("config-{kind}.json"))).unwrap();
        let dir = hf_with_config(&cfg);
        let m = Llama::load(&spec(dir.path()), &DEV).unwrap();
        let logits = m.forward(&x).unwrap();
        assert_close(&logits, &r[&format!("logits_{kind}")], 1e-4, 1e-4, kind);
    }
    // llama.cpp carries Llama 3 scaling as per-frequency factors (rope_freqs.weight).
    let m = Llama::load(&fixture("tiny-llama3-q8_0.gguf"), &DEV).unwrap();
    let hf3 =
        hf_with_config(&std::fs::read_to_string(fixtures().join("config-llama3.json")).unwrap());
    let h = Llama::load(&spec(hf3.path()), &DEV).unwrap();
    for (a, b) in m.rope().inv_freq().iter().zip(h.rope().inv_freq()) {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "rope frequencies {a} vs {b}"
        );
    }
    assert_close(
        &m.forward(&x).unwrap(),
        &r["logits_llama3_q8_0"],
        1e-4,
        1e-4,
        "llama3 GGUF",
    );
}

#[test]
fn mistral_configs_load_with_their_window_as_the_context() {
    // Mistral's modeling is Llama's plus a sliding window; within the window the full causal
    // mask is exact, so the model refuses longer sequences instead of masking differently.
    let r = reference();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("hf/config.json")).unwrap())
            .unwrap();
    cfg["model_type"] = "mistral".into();
    cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    cfg["sliding_window"] = 6.into();
    let dir = hf_with_config(&cfg.to_string());
    let m = AnyModel::load(&spec(dir.path()), &DEV).unwrap();
    assert_eq!(m.context(), 6);
    let x = ids(&r);
    let want = r["logits"].narrow(1, 0, 6).unwrap();
    assert_close(
        &m.logits(&x.narrow(1, 0, 6).unwrap()).unwrap(),
        &want,
        1e-4,
        1e-4,
        "mistral",
    );
    let e = err_text(m.logits(&x));
    assert!(
        e.contains("8 positions exceed the model's context of 6"),
        "{e}"
    );
}

#[test]
fn bad_gguf_files_are_refused_by_name() {
    let e = err_text(Llama::load(&fixture("bad-iq4_nl.gguf"), &DEV));
    assert!(e.contains("bad-iq4_nl.gguf") && e.contains("IQ4_NL"), "{e}");
    let e = err_text(Llama::load(&fixture("bad-q8_1.gguf"), &DEV));
    assert!(e.contains("token_embd.weight") && e.contains("Q8_1"), "{e}");
    let e = err_text(Llama::load(&fixture("bad-arch.gguf"), &DEV));
    assert!(e.contains("architecture `mamba`"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("tiny-q8_0.gguf")).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_text(Llama::load(&spec(&cut), &DEV));
    assert!(
        e.contains("cut.gguf") && e.contains("truncated: tensor `"),
        "{e}"
    );
    std::fs::write(&cut, &bytes[..200]).unwrap();
    let e = err_text(Llama::load(&spec(&cut), &DEV));
    assert!(
        e.contains("cut.gguf") && e.contains("not a readable GGUF file"),
        "{e}"
    );
    let e = err_text(GgufFile::open(&dir.path().join("absent.gguf")));
    assert!(e.contains("absent.gguf"), "{e}");
}

#[test]
fn bad_configs_and_weights_are_refused_with_the_file_and_field() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("hf/config.json")).unwrap())
            .unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut v = base.clone();
        edit(v.as_object_mut().unwrap());
        hf_with_config(&v.to_string())
    };
    let dir = with(&|o| {
        o.remove("hidden_size");
    });
    let e = err_text(Llama::load(&spec(dir.path()), &DEV));
    assert!(
        e.contains("config.json") && e.contains("missing field `hidden_size`"),
        "{e}"
    );

    let dir = with(&|o| {
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
    });
    let e = err_text(Llama::load(&spec(dir.path()), &DEV));
    assert!(
        e.contains("config.json") && e.contains("\"yarn\" is not supported"),
        "{e}"
    );

    let dir = with(&|o| {
        o.insert("num_key_value_heads".into(), 3.into());
    });
    let e = err_text(Llama::load(&spec(dir.path()), &DEV));
    assert!(e.contains("not a multiple of num_key_value_heads 3"), "{e}");

    let dir = with(&|o| {
        o.insert("intermediate_size".into(), 48.into());
    });
    let e = err_text(Llama::load(&spec(dir.path()), &DEV));
    assert!(
        e.contains("model.safetensors") && e.contains("model.layers.0.mlp.gate_proj.weight"),
        "{e}"
    );

    let dir = with(&|o| {
        o.insert("model_type".into(), "qwen2".into());
    });
    let e = err_text(AnyModel::load(&spec(dir.path()), &DEV));
    assert!(e.contains("\"qwen2\" is not supported"), "{e}");

    // An untied model without its head.
    let dir = with(&|_| {});
    let all = candle_core::safetensors::load(dir.path().join("model.safetensors"), &DEV).unwrap();
    let kept: HashMap<String, Tensor> = all
        .into_iter()
        .filter(|(k, _)| k != "lm_head.weight")
        .collect();
    candle_core::safetensors::save(&kept, dir.path().join("model.safetensors")).unwrap();
    let e = err_text(Llama::load(&spec(dir.path()), &DEV));
    assert!(e.contains("tensor `lm_head.weight` is missing"), "{e}");
}

/// The SmolLM2-135M-Instruct GGUF fetched by scripts/fetch-smollm2.sh (absent in CI).
fn smollm2() -> Option<String> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p.to_string_lossy().into_owned())
    } else {
        eprintln!(
            "skipped: {} is absent (run scripts/fetch-smollm2.sh)",
            p.display()
        );
        None
    }
}

#[test]
fn smollm2_loads_and_knows_the_capital_of_france() {
    let Some(path) = smollm2() else { return };
    let m = Llama::load(&path, &DEV).unwrap();
    let c = &m.cfg;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.n_kv_heads()
        ),
        (30, 576, 9, 3)
    );
    assert_eq!((c.intermediate_size, c.vocab_size), (1536, 49152));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope().unwrap().0, 100_000.0);
    // "The capital of France is" → " Paris" (ids from transformers' tokenizer of this file).
    let prompt = Tensor::new(&[[504u32, 3575, 282, 4649, 314]], &DEV).unwrap();
    let logits = m.forward(&prompt).unwrap();
    let next = logits
        .narrow(1, 4, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .argmax(0)
        .unwrap();
    assert_eq!(next.to_scalar::<u32>().unwrap(), 7042);
    let rg = m.residual_grad(&prompt, 15).unwrap();
    assert!(rg.loss.is_finite());
    let g = rg
        .grad
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(g > 0.0);
}
