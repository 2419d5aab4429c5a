//! The comparison harness and the paper's ablations: the interval maths on hand-made
//! numbers, each ablation doing what it claims, and a tiny job over two seeds.
mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelMode};
use cocomix_data::{Dataset, Tokenizer};
use cocomix_model::{Gpt2, Gpt2Config, Params, Student};
use cocomix_trainer::compare::{mean_std, t975, tokens_to_reach, PairedDiff};
use cocomix_trainer::pipeline::student_config;
use cocomix_trainer::{
    label_permutation, read_metrics, train, window_shuffle, Arm, Labels, Objective, Relabel,
    RunConfig, TrainSpec,
};
use common::*;

const DEV: Device = Device::Cpu;
const DEFAULT: &str = include_str!("../../../configs/default.toml");

#[test]
fn interval_maths_on_hand_made_numbers() {
    // mean 2.5; sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
    let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(m, 2.5);
    assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    assert_eq!(
        (t975(1), t975(2), t975(30), t975(100)),
        (12.706, 4.303, 2.042, 1.96)
    );
    // Paired differences (−0.1, 0.1, 0.3): mean 0.1, sd 0.2, half-width 4.303·0.2/√3.
    let d = PairedDiff::of(&[5.0, 5.2, 5.4], &[5.1, 5.1, 5.1]);
    assert!((d.mean - 0.1).abs() < 1e-12);
    assert!((d.half_width - 4.303 * 0.2 / 3f64.sqrt()).abs() < 1e-9);
    assert!(!d.significant(), "0 lies in [−0.40, 0.60]");
    // (−0.31, −0.29, −0.30): mean −0.30, sd 0.01 → ±0.0248: excludes 0.
    let d = PairedDiff::of(&[4.69, 4.71, 4.70], &[5.0, 5.0, 5.0]);
    assert!((d.mean + 0.3).abs() < 1e-9 && d.significant());
    // One seed: no interval.
    assert!(PairedDiff::of(&[1.0], &[2.0]).half_width.is_nan());
    // First crossing of 4.5 between (200, 4.6) and (300, 4.4): 250 tokens.
    let curve = [(100.0, 5.0), (200.0, 4.6), (300.0, 4.4), (400.0, 4.3)];
    assert_eq!(tokens_to_reach(&curve, 4.5), Some(250.0));
    assert_eq!(tokens_to_reach(&curve, 5.5), Some(100.0));
    assert_eq!(tokens_to_reach(&curve, 4.0), None);
}

#[test]
fn arms_parse_and_bad_ones_are_refused() {
    let a: Arm = "cocomix[lambda=0.3, labels=negative]".parse().unwrap();
    assert_eq!(
        (a.objective, a.lambda, a.label_mode, a.to_string()),
        (
            Objective::Cocomix,
            Some(0.3),
            Some(cocomix_attribution::LabelMode::Negative),
            "cocomix[lambda=0.3,labels=negative]".into()
        )
    );
    assert_eq!(a.to_string().parse::<Arm>().unwrap(), a, "round trip");
    let arms = cocomix_trainer::parse_arms("ntp, cocomix[lambda=1,labels=magnitude],kd").unwrap();
    assert_eq!(
        arms.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        ["ntp", "cocomix[lambda=1,labels=magnitude]", "kd"]
    );
    for o in Objective::ALL {
        assert_eq!(o.name().parse::<Objective>().unwrap(), o);
    }
    let e = |s: &str| s.parse::<Arm>().unwrap_err().to_string();
    assert!(e("ntp[lambda=0.1]").contains("only objectives trained on concept labels"));
    assert!(e("cocomix[lambda=x]").contains("number"));
    assert!(e("cocomix[lambda=-1]").contains("≥ 0"));
    assert!(e("cocomix[labels=best]").contains("label mode"));
    assert!(e("cocomix[lambda=1").contains("brackets"));
    assert!(e("cocomix[depth=3]").contains("options are"));
    assert!(e("nope").contains("unknown objective"));
    let cfg = |o: &[&str]| {
        RunConfig::from_toml(
            DEFAULT,
            &o.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    assert!(cfg(&["run.objectives=[\"ntp\", \"ntp\"]"])
        .unwrap_err()
        .to_string()
        .contains("twice"));
    assert!(cfg(&["run.seeds=0"])
        .unwrap_err()
        .to_string()
        .contains("seeds"));
}

fn tiny_data(dir: &Path) -> (Dataset, Tokenizer) {
    let text = toy_text(400, &["red", "blue", "old", "quick"], 17);
    prepare_toy(dir, &text, two_docs(dir, &text, 500), 0.3)
}

/// A run of 4 steps of 4 sequences, evaluated and checkpointed every 2.
const TINY_RUN: [&str; 6] = [
    "optim.steps=4",
    "optim.warmup=1",
    "optim.batch_size=4",
    "eval.every=2",
    "eval.max_val_blocks=2",
    "checkpoint.every=2",
];

fn tiny_cfg(out: &Path) -> RunConfig {
    let o: Vec<String> = TINY_STUDENT
        .iter()
        .chain(&["sae.n_latents=24", "sae.k=4"])
        .chain(&TINY_RUN)
        .map(|s| s.to_string())
        .chain([format!("run.out_dir=\"{}\"", out.display())])
        .collect();
    RunConfig::from_toml(DEFAULT, &o).unwrap()
}

fn tiny_teacher_and_sae(vocab: usize) -> (Gpt2, cocomix_sae::Sae) {
    let teacher = Gpt2::new(
        &Gpt2Config::new(vocab, 16, 8, 2, 2).with_dropout(0.0),
        &mut Params::random(2, &DEV, false),
    )
    .unwrap();
    let sae = cocomix_sae::Sae::new(
        Tensor::zeros(8, candle_core::DType::F32, &DEV).unwrap(),
        Tensor::randn(0f32, 1.0, (24, 8), &DEV).unwrap(),
        Tensor::zeros(24, candle_core::DType::F32, &DEV).unwrap(),
        Tensor::randn(0f32, 1.0, (8, 24), &DEV).unwrap(),
        4,
        "test".into(),
    )
    .unwrap();
    (teacher, sae)
}

/// The tiny data, config and a random teacher + SAE for online labels.
struct Fixture {
    cfg: RunConfig,
    data: Dataset,
    tok: Tokenizer,
    teacher: Gpt2,
    sae: cocomix_sae::Sae,
}

impl Fixture {
    fn new(dir: &Path) -> Self {
        let (data, tok) = tiny_data(dir);
        let (teacher, sae) = tiny_teacher_and_sae(tok.vocab_size());
        Fixture {
            cfg: tiny_cfg(dir),
            data,
            tok,
            teacher,
            sae,
        }
    }
}

/// Trains `objective` for 4 steps on the tiny data with labels from `cache`, or online from a
/// random teacher.
fn run_with(
    f: &Fixture,
    objective: Objective,
    lambda: f64,
    dir: &Path,
    cache: Option<&LabelCache>,
) -> Vec<cocomix_trainer::StepMetrics> {
    let Fixture {
        cfg,
        data,
        tok,
        teacher,
        sae,
    } = f;
    let mut concept = cfg.concept.clone();
    concept.lambda = lambda;
    let spec = TrainSpec {
        objective,
        student: student_config(cfg, objective, tok.vocab_size(), tok.eot_id(), 24),
        optim: cfg.optim.clone(),
        data,
        run_dir: dir.to_path_buf(),
        seed: 9,
        teacher: Some(teacher),
        labels: Some(cache.map(Labels::Cache).unwrap_or(Labels::Online {
            sae,
            layer: 0,
            mode: LabelMode::Faithful,
        })),
        aligned_windows: None,
        overlap_teacher: true,
        concept,
        kd: cfg.kd.clone(),
        eval_every: 2,
        max_val_blocks: 2,
        checkpoint_every: 2,
        keep_last: 1,
        resume: false,
        stop_after: None,
        device: DEV,
        config_text: String::new(),
    };
    train(&spec).unwrap();
    read_metrics(dir).unwrap()
}

fn run(
    f: &Fixture,
    objective: Objective,
    lambda: f64,
    dir: &Path,
) -> Vec<cocomix_trainer::StepMetrics> {
    run_with(f, objective, lambda, dir, None)
}

#[test]
fn shuffled_labels_read_another_windows_labels() {
    // The window map: one cycle, so a permutation where no window keeps its own labels,
    // the same in every run.
    for n in [2usize, 3, 10, 257] {
        let p = window_shuffle(n);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n as u32).collect::<Vec<u32>>(), "a permutation");
        assert!(p.iter().enumerate().all(|(w, &v)| w as u32 != v), "{p:?}");
        assert_eq!(p, window_shuffle(n), "fixed across runs");
    }
    let r = Relabel::of(Objective::ShuffledLabels, 24, Some(10)).unwrap();
    assert_eq!(r, Relabel::Windows(window_shuffle(10)));
    assert_eq!(r.window(3), window_shuffle(10)[3] as usize);
    assert_eq!(
        Relabel::of(Objective::Cocomix, 24, Some(10)).unwrap(),
        Relabel::None
    );
    // Online labels have no windows to exchange: refused, in the config and in the trainer.
    assert!(Relabel::of(Objective::ShuffledLabels, 24, None).is_err());
    let online = RunConfig::from_toml(
        DEFAULT,
        &[
            "run.objectives=[\"ntp\", \"shuffled-labels\"]".to_string(),
            "concept.labels=\"online\"".to_string(),
        ],
    );
    assert!(
        format!("{}", online.unwrap_err()).contains("shuffled-labels"),
        "refused by name"
    );

    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::new(dir.path());
    let spec = LabelCacheSpec {
        teacher: "random".into(),
        teacher_sha256: "t".into(),
        sae_sha256: "s".into(),
        layer: 0,
        k_attr: 2,
        window: 16,
        mode: LabelMode::Faithful,
        n_latents: 24,
        data: format!("{}", fx.data.train.len()),
        max_windows: 0,
    };
    let cache = LabelCache::build(
        &fx.teacher,
        &fx.sae,
        &spec,
        &fx.data.train,
        &dir.path().join("c"),
        4,
    )
    .unwrap();
    assert!(cache.n_windows() >= 2);
    // Windows do carry different labels, so reading another window's changes the target.
    assert!((1..cache.n_windows()).any(|w| cache.window_labels(w) != cache.window_labels(0)));
    let go = |o: Objective, name: &str| run_with(&fx, o, 0.1, &dir.path().join(name), Some(&cache));
    // At step 1 the students are the same (same init, same tokens): equal NTP loss, another
    // concept loss; the same batches throughout.
    let cocomix = go(Objective::Cocomix, "cocomix");
    let shuffled = go(Objective::ShuffledLabels, "shuffled");
    assert_eq!(shuffled[0].loss_ntp, cocomix[0].loss_ntp);
    assert_ne!(shuffled[0].loss_concept, cocomix[0].loss_concept);
    let h = |m: &[cocomix_trainer::StepMetrics]| -> Vec<Option<String>> {
        m.iter().map(|r| r.batch_hash.clone()).collect()
    };
    assert_eq!(h(&shuffled), h(&cocomix));
}

#[test]
fn each_ablation_does_what_it_claims() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::new(dir.path());
    let go = |o: Objective, lambda: f64, name: &str| run(&fx, o, lambda, &dir.path().join(name));
    let losses =
        |m: &[cocomix_trainer::StepMetrics]| -> Vec<f64> { m.iter().map(|r| r.loss).collect() };

    // mix-only: no concept loss at all. Its run equals CoCoMix at λ = 0 step for step, so the
    // concept loss contributes exactly zero gradient.
    let mix = go(Objective::MixOnly, 0.1, "mix");
    assert!(mix
        .iter()
        .all(|m| m.loss_concept.is_none() && m.loss == m.loss_ntp));
    let lambda0 = go(Objective::Cocomix, 0.0, "cocomix-l0");
    assert_eq!(losses(&mix), losses(&lambda0));
    let cocomix = go(Objective::Cocomix, 0.1, "cocomix");
    assert_ne!(losses(&cocomix), losses(&mix), "λ = 0.1 changes training");

    // random-labels: at step 1 the student is the same as CoCoMix's (same init, same batch),
    // so the NTP loss is equal while the concept loss differs (other labels); the labels are
    // the real ones through a bijection of concept ids.
    let random = go(Objective::RandomLabels, 0.1, "random");
    assert_eq!(random[0].loss_ntp, cocomix[0].loss_ntp);
    assert_ne!(random[0].loss_concept, cocomix[0].loss_concept);
    let p = label_permutation(24);
    let mut sorted = p.clone();
    sorted.sort();
    assert_eq!(sorted, (0..24).collect::<Vec<u32>>(), "a permutation");
    assert_ne!(p, sorted, "not the identity");
    assert_eq!(p, label_permutation(24), "fixed across runs");

    // predict-only: a concept loss, blocks on T positions (tested in the model crate); its
    // NTP logits do not depend on the concept path, unlike CoCoMix's.
    let predict = go(Objective::PredictOnly, 0.1, "predict");
    assert!(predict.iter().all(|m| m.loss_concept.is_some()));

    // pause: its vector is trained.
    go(Objective::Pause, 0.1, "pause");
    let trained = Student::load(&dir.path().join("pause/final"), &DEV).unwrap();
    let fresh = Student::new(&trained.cfg, 9, &DEV).unwrap();
    let diff = (trained.pause.as_ref().unwrap() - fresh.pause.as_ref().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.0, "the pause vector moved");

    // Every objective of one seed saw the same batches.
    for other in [&mix, &cocomix, &random, &predict] {
        let h = |m: &[cocomix_trainer::StepMetrics]| -> Vec<Option<String>> {
            m.iter().map(|r| r.batch_hash.clone()).collect()
        };
        assert_eq!(h(other), h(&mix));
    }
}

#[test]
fn a_tiny_job_over_two_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text: String = (0..300)
        .map(|i| {
            format!(
                "A {} dog ran to park {}. ",
                ["big", "small", "red"][i % 3],
                i % 13
            )
        })
        .collect();
    std::fs::write(&corpus, &text).unwrap();
    std::fs::write(dir.path().join("corpus2.txt"), &text[400..]).unwrap();
    let mut o: Vec<String> = TINY_STUDENT
        .iter()
        .chain(&[
            "concept.cache_windows=40",
            "sae.n_latents=24",
            "sae.k=4",
            "sae.steps=3",
            "sae.batch_tokens=64",
            "teacher.source=\"train\"",
            "sae.source=\"train\"",
            "data.tokenizer=\"train\"",
            "teacher.layer=0",
            "teacher.train.n_layer=2",
            "teacher.train.d_model=16",
            "teacher.train.n_head=2",
            "teacher.train.steps=3",
            "data.vocab_size=300",
            "data.val_fraction=0.3",
            "run.seeds=2",
            "run.objectives=[\"ntp\", \"cocomix\", \"mix-only\"]",
        ])
        .chain(&TINY_RUN)
        .map(|s| s.to_string())
        .collect();
    o.push(format!("run.out_dir=\"{}\"", dir.path().display()));
    o.push(format!(
        "data.dir=\"{}\"",
        dir.path().join("data").display()
    ));
    o.push(format!(
        "data.inputs=[\"{}\", \"{}\"]",
        corpus.display(),
        dir.path().join("corpus2.txt").display()
    ));
    let cfg = RunConfig::from_toml(DEFAULT, &o).unwrap();
    let root =
        cocomix_trainer::pipeline::run_main_job(&cfg, &DEV, &cocomix_trainer::Comm::single())
            .unwrap();
    let metrics =
        |arm: &str, seed: u64| read_metrics(&root.join(arm).join(format!("seed-{seed}"))).unwrap();
    let hashes = |arm: &str, seed: u64| -> Vec<Option<String>> {
        metrics(arm, seed)
            .iter()
            .map(|m| m.batch_hash.clone())
            .collect()
    };
    // Seeds give different runs; the objectives of one seed see identical batches.
    assert_ne!(hashes("ntp", 22), hashes("ntp", 23));
    assert_ne!(
        metrics("ntp", 22).last().unwrap().loss,
        metrics("ntp", 23).last().unwrap().loss
    );
    for seed in [22, 23] {
        assert_eq!(hashes("cocomix", seed), hashes("ntp", seed));
        assert_eq!(hashes("mix-only", seed), hashes("ntp", seed));
    }
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("compare.json")).unwrap()).unwrap();
    let arms = c["arms"].as_array().unwrap();
    assert_eq!(arms.len(), 3);
    assert_eq!(arms[1]["seeds"], serde_json::json!([22, 23]));
    assert!(arms[1]["vs_ntp"]["half_width"]
        .as_f64()
        .unwrap()
        .is_finite());
    assert_eq!(c["runs"].as_array().unwrap().len(), 6);
    let md = std::fs::read_to_string(root.join("compare.md")).unwrap();
    assert!(md.contains("Verdict") && md.contains("± "), "{md}");
    assert!(root.join("compare.png").is_file());
}
