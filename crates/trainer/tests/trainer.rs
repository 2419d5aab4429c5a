mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use cocomix_data::{Dataset, Tokenizer};
use cocomix_model::ops::{concept_loss, cross_entropy, kd_kl};
use cocomix_model::{ConceptConfig, Dropout, Gpt2, Gpt2Config, Params, Student, StudentConfig};
use cocomix_trainer::optim::{clip_grad_norm, lr_at, AdamW};
use cocomix_trainer::{train, Labels, Objective, RunConfig, TrainSpec};
use common::*;

const DEV: Device = Device::Cpu;
const DEFAULT: &str = include_str!("../../../configs/default.toml");

fn cfg(overrides: &[&str]) -> cocomix_trainer::Result<RunConfig> {
    RunConfig::from_toml(
        DEFAULT,
        &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
}

fn student(concept: bool, vocab: usize) -> StudentConfig {
    StudentConfig {
        gpt2: Gpt2Config::new(vocab, 16, 16, 2, 2).with_dropout(0.0),
        concept: concept.then_some(ConceptConfig {
            concept_dim: 24,
            concept_num: 4,
            insert_layer_index: 1,
            interleave: true,
        }),
        pause: None,
    }
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn log_softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::MIN, f64::max);
    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    row.iter().map(|x| x - lse).collect()
}

#[test]
fn the_three_losses_match_independent_formulas() {
    let s = Student::new(&student(true, 30), 1, &DEV).unwrap();
    let teacher = Gpt2::new(
        &Gpt2Config::new(30, 16, 8, 1, 2).with_dropout(0.0),
        &mut Params::random(2, &DEV, false),
    )
    .unwrap();
    let x = Tensor::new(&[[1u32, 5, 9, 2, 7, 3], [4, 4, 8, 29, 0, 1]], &DEV).unwrap();
    let y = Tensor::new(&[[5u32, 9, 2, 7, 3, 11], [4, 8, 29, 0, 1, 6]], &DEV).unwrap();
    let labels = Tensor::new(
        &[[[1u32, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]; 2],
        &DEV,
    )
    .unwrap();
    let out = s.forward(&x, &mut Dropout::off()).unwrap();
    let logits = vals(&out.logits);
    let tl = vals(&teacher.forward(&x).unwrap());
    let cl = vals(out.concept_logits.as_ref().unwrap());
    let (yv, lv) = (vals(&y), vals(&labels));
    let (mut ce, mut kl, mut conc) = (0.0, 0.0, 0.0);
    for p in 0..12 {
        let ls = log_softmax(&logits[p * 30..(p + 1) * 30]);
        let lt = log_softmax(&tl[p * 30..(p + 1) * 30]);
        ce -= ls[yv[p] as usize];
        kl += (0..30).map(|v| lt[v].exp() * (lt[v] - ls[v])).sum::<f64>();
        let lc = log_softmax(&cl[p * 24..(p + 1) * 24]);
        conc -= (lc[lv[2 * p] as usize] + lc[lv[2 * p + 1] as usize]) / 2.0;
    }
    let got_ce = cross_entropy(
        &out.logits.reshape((12, 30)).unwrap(),
        &y.flatten_all().unwrap(),
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap() as f64;
    let got_kl = kd_kl(&out.logits, &teacher.forward(&x).unwrap(), 1.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let got_c = concept_loss(out.concept_logits.as_ref().unwrap(), &labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        (got_ce - ce / 12.0).abs() < 1e-5,
        "ce {got_ce} vs {}",
        ce / 12.0
    );
    assert!(
        (got_kl - kl / 12.0).abs() < 1e-5,
        "kl {got_kl} vs {}",
        kl / 12.0
    );
    assert!(
        (got_c - conc / 12.0).abs() < 1e-5,
        "concept {got_c} vs {}",
        conc / 12.0
    );
}

#[test]
fn a_few_steps_of_each_objective_overfit_a_fixed_batch() {
    let teacher = Gpt2::new(
        &Gpt2Config::new(30, 16, 8, 1, 2).with_dropout(0.0),
        &mut Params::random(2, &DEV, false),
    )
    .unwrap();
    let x = Tensor::new(&[[1u32, 5, 9, 2, 7, 3], [4, 4, 8, 29, 0, 1]], &DEV).unwrap();
    let y = Tensor::new(&[[5u32, 9, 2, 7, 3, 11], [4, 8, 29, 0, 1, 6]], &DEV)
        .unwrap()
        .flatten_all()
        .unwrap();
    let labels = Tensor::new(
        &[[[1u32, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]; 2],
        &DEV,
    )
    .unwrap();
    let o = cfg(&["optim.lr=1e-2", "optim.warmup=0", "optim.weight_decay=0.0"])
        .unwrap()
        .optim;
    for objective in [Objective::Ntp, Objective::Kd, Objective::Cocomix] {
        let s = Student::new(&student(objective == Objective::Cocomix, 30), 3, &DEV).unwrap();
        let mut opt = AdamW::new(s.vars(), &o).unwrap();
        let loss = |s: &Student| {
            let out = s.forward(&x, &mut Dropout::off()).unwrap();
            let ce = cross_entropy(&out.logits.reshape((12, 30)).unwrap(), &y).unwrap();
            match objective {
                Objective::Ntp => ce,
                Objective::Kd => kd_kl(&out.logits, &teacher.forward(&x).unwrap(), 1.0).unwrap(),
                _ => (ce
                    + (concept_loss(out.concept_logits.as_ref().unwrap(), &labels).unwrap() * 0.1)
                        .unwrap())
                .unwrap(),
            }
        };
        let first = loss(&s).to_scalar::<f32>().unwrap();
        for _ in 0..15 {
            let l = loss(&s);
            let g = l.backward().unwrap();
            let mut grads: Vec<Tensor> = s
                .vars()
                .iter()
                .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
                .collect();
            clip_grad_norm(&mut grads, 1.0).unwrap();
            opt.update(&grads, 1e-2).unwrap();
        }
        let last = loss(&s).to_scalar::<f32>().unwrap();
        assert!(last < 0.7 * first, "{objective}: loss {first} → {last}");
    }
}

#[test]
fn schedule_and_clipping_match_hand_computed_values() {
    let o = cfg(&[
        "optim.lr=1e-3",
        "optim.min_lr=1e-4",
        "optim.warmup=10",
        "optim.steps=110",
    ])
    .unwrap()
    .optim;
    assert_eq!(lr_at(&o, 0), 0.0);
    assert!((lr_at(&o, 5) - 5e-4).abs() < 1e-15);
    assert!((lr_at(&o, 10) - 1e-3).abs() < 1e-15);
    // Halfway through the cosine: r + (1 − r)/2 with r = 0.1 → 0.55·lr.
    assert!((lr_at(&o, 60) - 5.5e-4).abs() < 1e-12);
    assert!((lr_at(&o, 110) - 1e-4).abs() < 1e-12);
    // Norm of [3, 4] and [12] is 13; clipped to 1: factor 1/(13 + 1e-6).
    let mut g = vec![
        Tensor::new(&[3f32, 4.0], &DEV).unwrap(),
        Tensor::new(&[12f32], &DEV).unwrap(),
    ];
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((n - 13.0).abs() < 1e-9);
    let c = 1.0 / (13.0 + 1e-6);
    assert!((vals(&g[0])[1] - 4.0 * c).abs() < 1e-6 && (vals(&g[1])[0] - 12.0 * c).abs() < 1e-6);
    let mut small = vec![Tensor::new(&[0.3f32], &DEV).unwrap()];
    clip_grad_norm(&mut small, 1.0).unwrap();
    assert_eq!(vals(&small[0])[0] as f32, 0.3);
}

#[test]
fn adamw_with_clipping_matches_three_torch_steps() {
    // testdata/adamw/torch-3-steps.json: torch.optim.AdamW + clip_grad_norm_ on two
    // parameters for three steps (scripts/make-adamw-fixture.py). Step 1 is clipped; the
    // later steps test the moments' betas and the bias corrections.
    let text = include_str!("../../../testdata/adamw/torch-3-steps.json");
    let fx: serde_json::Value = serde_json::from_str(text).unwrap();
    fn flat(v: &serde_json::Value) -> Vec<f32> {
        match v {
            serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
            x => vec![x.as_f64().unwrap() as f32],
        }
    }
    let shapes: [&[usize]; 2] = [&[3], &[2, 2]];
    // The fused CPU update after clip_grad_norm, with the clipping inside the update's pass,
    // and the composed update (other devices): each against torch.
    for (fused, in_pass) in [(true, false), (true, true), (false, false)] {
        cocomix_model::ops::fused::with_fused(fused, || {
            let vars: Vec<(String, candle_core::Var)> = (0..2)
                .map(|i| {
                    let t = Tensor::from_vec(flat(&fx["init"][i]), shapes[i], &DEV).unwrap();
                    (format!("p{i}"), candle_core::Var::from_tensor(&t).unwrap())
                })
                .collect();
            let mut o = cfg(&[]).unwrap().optim;
            (o.beta1, o.beta2, o.eps, o.weight_decay) = (0.9, 0.95, 1e-8, 0.1);
            let mut opt = AdamW::new(&vars, &o).unwrap();
            for (k, st) in fx["steps"].as_array().unwrap().iter().enumerate() {
                let mut grads: Vec<Tensor> = (0..2)
                    .map(|i| Tensor::from_vec(flat(&st["grads"][i]), shapes[i], &DEV).unwrap())
                    .collect();
                let lr = st["lr"].as_f64().unwrap();
                let norm = if in_pass {
                    opt.clip_and_update(&grads, lr, 1.0).unwrap()
                } else {
                    let n = clip_grad_norm(&mut grads, 1.0).unwrap();
                    opt.update(&grads, lr).unwrap();
                    n
                };
                assert!(
                    (norm - st["grad_norm"].as_f64().unwrap()).abs() < 1e-5,
                    "step {k}: norm {norm}"
                );
                for i in 0..2 {
                    let got = vals(vars[i].1.as_tensor());
                    for (g, w) in got.iter().zip(flat(&st["params"][i])) {
                        assert!(
                            (g - w as f64).abs() < 1e-6,
                            "step {k} p{i} (fused {fused}, clip in pass {in_pass}): {got:?} vs torch"
                        );
                    }
                }
            }
        });
    }
}

fn tiny_data(dir: &Path) -> (Dataset, Tokenizer) {
    let text = toy_text(400, &["red", "blue", "old", "quick"], 17);
    prepare_toy(dir, &text, six_docs(dir, &text), 0.2)
}

fn spec<'a>(
    data: &'a Dataset,
    vocab: usize,
    run: &Path,
    objective: Objective,
    teacher: Option<&'a dyn cocomix_model::CausalLm>,
    labels: Option<Labels<'a>>,
) -> TrainSpec<'a> {
    let c = cfg(&[
        "optim.steps=6",
        "optim.warmup=2",
        "optim.batch_size=4",
        "optim.grad_accum=2",
        "model.dropout=0.1",
    ])
    .unwrap();
    let mut sc = student(objective == Objective::Cocomix, vocab);
    sc.gpt2 = sc.gpt2.with_dropout(0.1);
    TrainSpec {
        objective,
        student: sc,
        optim: c.optim.clone(),
        data,
        run_dir: run.to_path_buf(),
        seed: 5,
        teacher,
        labels,
        concept: c.concept.clone(),
        kd: c.kd.clone(),
        eval_every: 3,
        max_val_blocks: 4,
        checkpoint_every: 2,
        keep_last: 2,
        resume: false,
        stop_after: None,
        aligned_windows: None,
        overlap_teacher: true,
        device: DEV,
        config_text: c.to_toml(),
    }
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    cocomix_trainer::read_metrics(run)
        .unwrap()
        .iter()
        .map(|m| (m.step, m.loss))
        .collect()
}

/// A random 2-block teacher of width 8 and a TopK SAE of 24 latents on its residual stream.
fn tiny_teacher(vocab: usize) -> (Gpt2, cocomix_sae::Sae) {
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

/// Online labels from `sae` when `objective` is CoCoMix.
fn online_labels(objective: Objective, sae: &cocomix_sae::Sae) -> Option<Labels<'_>> {
    (objective == Objective::Cocomix).then_some(Labels::Online {
        sae,
        layer: 0,
        mode: cocomix_attribution::LabelMode::Faithful,
    })
}

#[test]
fn overlapping_the_teachers_work_with_the_students_step_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = tiny_data(dir.path());
    let (teacher, sae) = tiny_teacher(tok.vocab_size());
    // Every logged number of every step (losses, gradient norm, batch hash), with the teacher's
    // batches built one ahead on their own thread and built in place.
    let run = |objective: Objective, overlap: bool| {
        let run_dir = dir.path().join(format!("{objective}-{overlap}"));
        let mut s = spec(
            &data,
            tok.vocab_size(),
            &run_dir,
            objective,
            Some(&teacher),
            online_labels(objective, &sae),
        );
        s.overlap_teacher = overlap;
        train(&s).unwrap();
        cocomix_trainer::read_metrics(&run_dir)
            .unwrap()
            .iter()
            .map(|m| {
                let n = |x: Option<f64>| x.map(f64::to_bits);
                (
                    (m.step, m.loss.to_bits(), m.loss_ntp.to_bits()),
                    (n(m.loss_kd), n(m.loss_concept), m.grad_norm.to_bits()),
                    (n(m.val_loss), m.batch_hash.clone()),
                )
            })
            .collect::<Vec<_>>()
    };
    for objective in [Objective::Kd, Objective::Cocomix] {
        let ahead = run(objective, true);
        assert_eq!(ahead.len(), 6);
        assert_eq!(ahead, run(objective, false), "{objective}");
    }
}

#[test]
fn resume_after_a_kill_reproduces_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = tiny_data(dir.path());
    let (teacher, sae) = tiny_teacher(tok.vocab_size());
    for objective in [Objective::Ntp, Objective::Kd, Objective::Cocomix] {
        let labels = || online_labels(objective, &sae);
        let full = dir.path().join(format!("full-{objective}"));
        let out = train(&spec(
            &data,
            tok.vocab_size(),
            &full,
            objective,
            Some(&teacher),
            labels(),
        ))
        .unwrap();
        assert_eq!(out.steps, 6);
        assert!(
            full.join("final/model.safetensors").is_file()
                && full.join("best/model.safetensors").is_file()
        );
        // Killed after step 5: only the checkpoint of step 4 survives (and metrics up to 5).
        let killed = dir.path().join(format!("killed-{objective}"));
        let mut s = spec(
            &data,
            tok.vocab_size(),
            &killed,
            objective,
            Some(&teacher),
            labels(),
        );
        s.stop_after = Some(5);
        let stopped = train(&s).unwrap();
        assert!(stopped.stopped_early && stopped.resumed_from.is_none());
        assert_eq!(cocomix_trainer::list_checkpoints(&killed)[0].0, 4);
        let before_kill = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
        let mut s = spec(
            &data,
            tok.vocab_size(),
            &killed,
            objective,
            Some(&teacher),
            labels(),
        );
        s.resume = true;
        let out = train(&s).unwrap();
        // It continued from step 4's checkpoint (a restart would report None), kept the
        // metrics lines of steps 1–4 byte for byte (their wall-clock fields included) and
        // marked step 5 as the first one of the resumed process.
        assert_eq!(out.resumed_from, Some(4), "{objective}");
        let after = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
        let prefix: Vec<&str> = before_kill.lines().take(4).collect();
        assert_eq!(after.lines().take(4).collect::<Vec<_>>(), prefix);
        let resumed: Vec<Option<u64>> = cocomix_trainer::read_metrics(&killed)
            .unwrap()
            .iter()
            .map(|m| m.resumed_from)
            .collect();
        assert_eq!(resumed, [None, None, None, None, Some(4), None]);
        assert_eq!(
            losses(&killed),
            losses(&full),
            "{objective}: resumed losses"
        );
    }
}

#[test]
fn a_corrupt_checkpoint_is_skipped_and_a_nan_loss_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = tiny_data(dir.path());
    let run = dir.path().join("run");
    train(&spec(
        &data,
        tok.vocab_size(),
        &run,
        Objective::Ntp,
        None,
        None,
    ))
    .unwrap();
    let ckpts = cocomix_trainer::list_checkpoints(&run);
    assert_eq!(
        ckpts.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![6, 4],
        "keep_last = 2"
    );
    // Truncate the newest checkpoint's weights: resuming falls back to step 4 and redoes 5–6.
    let w = ckpts[0].1.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let before = losses(&run);
    let mut s = spec(&data, tok.vocab_size(), &run, Objective::Ntp, None, None);
    s.resume = true;
    let out = train(&s).unwrap();
    assert_eq!(
        out.resumed_from,
        Some(4),
        "fell back to step 4, not to step 0"
    );
    assert_eq!(losses(&run), before);
    // An absurd learning rate makes the loss non-finite: a clear error, checkpoints kept.
    let nan_run = dir.path().join("nan");
    let mut s = spec(
        &data,
        tok.vocab_size(),
        &nan_run,
        Objective::Ntp,
        None,
        None,
    );
    s.optim.lr = 1e30;
    s.optim.min_lr = 1e29;
    s.optim.clip = 1e30;
    let e = train(&s).expect_err("diverges").to_string();
    assert!(e.contains("loss is") && e.contains("checkpoint"), "{e}");
}

#[test]
fn bad_configs_are_errors_before_any_work() {
    let e = |o: &[&str]| cfg(o).expect_err("invalid").to_string();
    assert!(e(&["optim.lrr=1"]).contains("lrr"));
    assert!(e(&["bogus.key=1"]).contains("bogus"));
    assert!(e(&["concept.insert_layer=4"]).contains("insert_layer"));
    assert!(e(&["concept.concept_num=5000"]).contains("K_c"));
    assert!(e(&["optim.batch_size=10", "optim.grad_accum=4"]).contains("grad_accum"));
    assert!(e(&["optim.lr=-1"]).contains("lr"));
    assert!(e(&["concept.labels=\"sometimes\""]).contains("labels"));
    assert!(e(&["teacher.source=\"train\"", "teacher.layer=9"]).contains("teacher.layer"));
    assert!(e(&["optim.lr"]).contains("section.key=value"));
    assert!(e(&["optim.precision=\"fp8\""]).contains("precision"));
    // Overrides of every type parse.
    let c = cfg(&[
        "optim.lr=3e-4",
        "run.name=x",
        "run.objectives=[\"ntp\"]",
        "concept.labels=online",
    ])
    .unwrap();
    assert_eq!(
        (c.optim.lr, c.run.name.as_str(), c.concept.labels),
        (3e-4, "x", cocomix_trainer::LabelSource::Online)
    );
    // Shipped configs parse.
    for f in [
        "default",
        "cpu-long",
        "cpu-teacher",
        "cpu-smollm2",
        "gpt2-69m",
        "gpt2-386m",
        "gpt2-1.38b",
    ] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../configs/{f}.toml"));
        RunConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

#[test]
fn mismatched_artifacts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = tiny_data(dir.path());
    // A teacher whose tokenizer differs from the data's.
    let teacher_dir = dir.path().join("teacher");
    let s = Student::new(&student(false, 50257), 1, &DEV).unwrap();
    s.save(&teacher_dir).unwrap();
    Tokenizer::gpt2().unwrap().save(&teacher_dir).unwrap();
    let c = cfg(&[
        &format!("teacher.source=\"{}\"", teacher_dir.display()),
        "teacher.layer=1",
        &format!("run.out_dir=\"{}\"", dir.path().display()),
    ])
    .unwrap();
    let e = cocomix_trainer::pipeline::load_or_train_teacher(&c, &data, &tok, &DEV)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("tokenizer"), "{e}");
    // An SAE whose width differs from the teacher's d_model.
    let t2 = dir.path().join("teacher2");
    Student::new(&student(false, tok.vocab_size()), 1, &DEV)
        .unwrap()
        .save(&t2)
        .unwrap();
    tok.save(&t2).unwrap();
    let sae_file = dir.path().join("sae.safetensors");
    let z = |n| Tensor::zeros(n, candle_core::DType::F32, &DEV).unwrap();
    cocomix_sae::Sae::new(
        z(12),
        Tensor::ones((1024, 12), candle_core::DType::F32, &DEV).unwrap(),
        z(1024),
        Tensor::ones((12, 1024), candle_core::DType::F32, &DEV).unwrap(),
        8,
        "x".into(),
    )
    .unwrap()
    .save(&sae_file, &[])
    .unwrap();
    let c = cfg(&[
        &format!("teacher.source=\"{}\"", t2.display()),
        "teacher.layer=1",
        "model.context=16",
        &format!("sae.source=\"{}\"", sae_file.display()),
    ])
    .unwrap();
    let teacher = cocomix_trainer::pipeline::load_or_train_teacher(&c, &data, &tok, &DEV).unwrap();
    let e = cocomix_trainer::pipeline::load_or_train_sae(&c, &teacher, &data, &DEV)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("sae.safetensors") && e.contains("width 12") && e.contains("16"),
        "{e}"
    );
}
