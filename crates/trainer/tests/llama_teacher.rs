//! A Llama-family teacher in the pipeline: the tiny Llama fixtures of the model crate (a
//! Hugging Face folder written by transformers, a GGUF written by gguf-py) as the teacher of a
//! tiny job, and data tokenized with another tokenizer refused before any work.
mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use cocomix_data::{prepare, Dataset, PrepareOptions, Tokenizer};
use cocomix_trainer::pipeline::{teacher_tokenizer, Shared};
use cocomix_trainer::{read_metrics, Arm, Comm, Objective, RunConfig};
use common::*;

const DEV: Device = Device::Cpu;
const DEFAULT: &str = include_str!("../../../configs/default.toml");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/llama")
        .join(name)
}

fn corpus(dir: &Path) -> Vec<PathBuf> {
    two_docs(
        dir,
        &toy_text(300, &["red", "blue", "old", "quick"], 17),
        400,
    )
}

/// A tiny job on `teacher` (its middle layer 1 of 3, d = 32) with `data.tokenizer`.
fn tiny_cfg(dir: &Path, teacher: &Path, tokenizer: &str, objectives: &str) -> RunConfig {
    let o: Vec<String> = TINY_STUDENT
        .iter()
        .chain(&[
            "concept.cache_windows=24",
            "sae.source=\"train\"",
            "sae.n_latents=24",
            "sae.k=4",
            "sae.steps=3",
            "sae.batch_tokens=64",
            "teacher.layer=1",
            "data.val_fraction=0.3",
            "optim.steps=3",
            "optim.warmup=1",
            "optim.batch_size=4",
            "eval.every=3",
            "eval.max_val_blocks=2",
            "checkpoint.every=3",
        ])
        .map(|s| s.to_string())
        .chain([
            format!("run.objectives={objectives}"),
            format!("teacher.source=\"{}\"", teacher.display()),
            format!("data.tokenizer=\"{tokenizer}\""),
            format!("data.dir=\"{}\"", dir.join("data").display()),
            format!("data.inputs={:?}", corpus(dir)),
            format!("run.out_dir=\"{}\"", dir.display()),
        ])
        .collect();
    RunConfig::from_toml(DEFAULT, &o).unwrap()
}

#[test]
fn a_tiny_hf_llama_teacher_trains_ntp_kd_and_cocomix_students() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = fixture("hf");
    let cfg = tiny_cfg(
        dir.path(),
        &teacher,
        "teacher",
        r#"["ntp", "kd", "cocomix"]"#,
    );
    let root = cocomix_trainer::pipeline::run_main_job(&cfg, &DEV, &Comm::single()).unwrap();
    // The data was tokenized with the teacher's own tokenizer (its tokenizer.json).
    let tok = Tokenizer::from_dir(&teacher).unwrap().unwrap();
    let data = Dataset::open(dir.path().join("data")).unwrap();
    assert_eq!(data.meta().tokenizer_identity, tok.identity());
    for arm in ["ntp", "kd", "cocomix"] {
        let run = root.join(arm).join("seed-22");
        let m = read_metrics(&run).unwrap();
        assert_eq!(m.len(), 3, "{arm}");
        assert!(m.iter().all(|s| s.loss.is_finite()), "{arm}");
        // Every student predicts the teacher's 272 ids (the KD targets).
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap())
                .unwrap();
        assert_eq!(config["vocab_size"], 272, "{arm}");
        match arm {
            "kd" => assert!(
                m.iter().all(|s| s.loss_kd.is_some_and(f64::is_finite)),
                "{arm}"
            ),
            "cocomix" => assert!(
                m.iter().all(|s| s.loss_concept.is_some_and(f64::is_finite)),
                "{arm}"
            ),
            _ => {}
        }
    }
    // The SAE was trained on the teacher's layer 1 (width 32, the config's latents).
    let sae = cocomix_sae::Sae::load_file(&root.join("sae/L1-32x24-k4.safetensors"), &DEV).unwrap();
    assert_eq!((sae.d_model(), sae.n_latents()), (32, 24));
}

#[test]
fn a_gguf_teacher_distils_with_its_own_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = fixture("tiny-q8_0.gguf");
    let cfg = tiny_cfg(dir.path(), &teacher, "teacher", r#"["kd"]"#);
    let root = cocomix_trainer::pipeline::run_main_job(&cfg, &DEV, &Comm::single()).unwrap();
    let tok = Tokenizer::load(&teacher.display().to_string()).unwrap();
    assert_eq!(
        Dataset::open(dir.path().join("data"))
            .unwrap()
            .meta()
            .tokenizer_identity,
        tok.identity()
    );
    let m = read_metrics(&root.join("kd/seed-22")).unwrap();
    assert!(m.iter().all(|s| s.loss_kd.is_some_and(f64::is_finite)));
}

#[test]
fn data_of_another_tokenizer_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = fixture("hf");
    let arms = [Arm::new(Objective::Kd)];
    // Another tokenizer named in the config: refused before the corpus is tokenized.
    let cfg = tiny_cfg(dir.path(), &teacher, "gpt2", r#"["kd"]"#);
    let e = Shared::prepare(&cfg, &arms, &DEV, &Comm::single())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("uses another tokenizer") && e.contains("data.tokenizer = \"teacher\""),
        "{e}"
    );
    assert!(
        !dir.path().join("data/meta.json").exists(),
        "nothing was prepared"
    );

    // A data folder prepared with another tokenizer is refused, naming its meta.json, and
    // left as it was (not re-tokenized over).
    let gpt2 = Tokenizer::gpt2().unwrap();
    let opts = PrepareOptions {
        val_fraction: 0.3,
        ..PrepareOptions::new(corpus(dir.path()), dir.path().join("data"))
    };
    prepare(&opts, &gpt2).unwrap();
    let meta = std::fs::read(dir.path().join("data/meta.json")).unwrap();
    let cfg = tiny_cfg(dir.path(), &teacher, "teacher", r#"["kd"]"#);
    let e = Shared::prepare(&cfg, &arms, &DEV, &Comm::single())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("meta.json") && e.contains("tokenized with tokenizer"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("data/meta.json")).unwrap(),
        meta
    );
    assert!(
        teacher_tokenizer(&teacher.display().to_string())
            .unwrap()
            .identity()
            != gpt2.identity()
    );
}

#[test]
fn data_tokenizer_teacher_needs_a_loaded_teacher() {
    let e = RunConfig::from_toml(
        DEFAULT,
        &[
            "teacher.source=\"train\"".into(),
            "data.tokenizer=\"teacher\"".into(),
        ],
    )
    .expect_err("refused")
    .to_string();
    assert!(e.contains("data.tokenizer = \"teacher\""), "{e}");
}
