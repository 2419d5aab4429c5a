//! Parity with the independent PyTorch reference in `testdata/golden/`.
#[path = "../../../testdata/testutil.rs"]
mod testutil;

use candle_core::{Device, Tensor};
use cocomix_model::{next_token_loss, Dropout, Gpt2, Student};
use testutil::*;

fn teacher() -> Gpt2 {
    Gpt2::load(golden_dir().join("teacher").to_str().unwrap(), &Device::Cpu).unwrap()
}

#[test]
fn teacher_logits_hidden_loss_and_residual_grad() {
    let exp = expected();
    let ids = golden_ids(&exp);
    let t = teacher();
    assert_close(
        &t.forward(&ids).unwrap(),
        &exp["teacher_logits"],
        1e-4,
        1e-4,
        "teacher_logits",
    );
    assert_close(
        &t.hidden_state(&ids, 1).unwrap(),
        &exp["teacher_hidden"],
        1e-4,
        1e-5,
        "teacher_hidden",
    );
    let loss = next_token_loss(&t.forward(&ids).unwrap(), &ids).unwrap();
    assert!((scalar(&loss) - scalar(&exp["teacher_loss"])).abs() < 1e-4);
    let rg = t.residual_grad(&ids, 1).unwrap();
    assert!((rg.loss - scalar(&exp["teacher_loss"])).abs() < 1e-4);
    assert_close(
        &rg.hidden,
        &exp["teacher_hidden"],
        1e-4,
        1e-5,
        "residual_grad hidden",
    );
    assert_close(
        &rg.grad,
        &exp["teacher_resid_grad"],
        1e-3,
        1e-7,
        "teacher_resid_grad",
    );
    // The last position predicts nothing: its gradient is exactly zero.
    let last = rg
        .grad
        .narrow(1, 15, 1)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(scalar(&last), 0.0);
}

#[test]
fn student_logits_and_concept_logits() {
    let exp = expected();
    let ids = golden_ids(&exp);
    let s = Student::load(&golden_dir().join("student"), &Device::Cpu).unwrap();
    let out = s.forward(&ids, &mut Dropout::off()).unwrap();
    assert_close(
        &out.concept_logits.unwrap(),
        &exp["student_concept_logits"],
        1e-4,
        1e-5,
        "student_concept_logits",
    );
    assert_close(
        &out.logits,
        &exp["student_logits"],
        1e-4,
        1e-4,
        "student_logits",
    );
    let loss = next_token_loss(&out.logits, &ids).unwrap();
    assert!((scalar(&loss) - scalar(&exp["loss_ntp"])).abs() < 1e-4);
}

#[test]
fn both_key_prefixes_load() {
    // Re-save the golden teacher with `transformer.`-prefixed keys: same logits.
    let dir = tempfile::tempdir().unwrap();
    let src = candle_core::safetensors::load(
        golden_dir().join("teacher/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let prefixed: std::collections::HashMap<String, Tensor> = src
        .into_iter()
        .map(|(k, v)| (format!("transformer.{k}"), v))
        .collect();
    candle_core::safetensors::save(&prefixed, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        golden_dir().join("teacher/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let exp = expected();
    let ids = golden_ids(&exp);
    let t = Gpt2::load(dir.path().to_str().unwrap(), &Device::Cpu).unwrap();
    assert_close(
        &t.forward(&ids).unwrap(),
        &exp["teacher_logits"],
        1e-4,
        1e-4,
        "prefixed teacher",
    );
}

#[test]
fn losses_and_gradients_of_loss_total() {
    let exp = expected();
    let ids = golden_ids(&exp);
    let s = Student::load(&golden_dir().join("student"), &Device::Cpu).unwrap();
    let out = s.forward(&ids, &mut Dropout::off()).unwrap();
    let ntp = next_token_loss(&out.logits, &ids).unwrap();
    let concept =
        cocomix_model::ops::concept_loss(out.concept_logits.as_ref().unwrap(), &exp["labels"])
            .unwrap();
    assert!(
        (scalar(&concept) - scalar(&exp["loss_concept"])).abs() < 1e-4,
        "loss_concept"
    );
    let total = (ntp + (concept * 0.1).unwrap()).unwrap();
    assert!(
        (scalar(&total) - scalar(&exp["loss_total"])).abs() < 1e-4,
        "loss_total"
    );
    let teacher_logits = teacher().forward(&ids).unwrap();
    // The reference averages over the 30 predicting positions: drop each row's last one.
    let kd = cocomix_model::ops::kd_kl(
        &out.logits.narrow(1, 0, 15).unwrap(),
        &teacher_logits.narrow(1, 0, 15).unwrap(),
        1.0,
    )
    .unwrap();
    assert!(
        (scalar(&kd) - scalar(&exp["loss_kd"])).abs() < 1e-4,
        "loss_kd"
    );
    let grads = total.backward().unwrap();
    for (name, var) in s.vars() {
        if let Some(want) = exp.get(&format!("grad.{name}")) {
            assert_close(
                grads.get(var.as_tensor()).unwrap(),
                want,
                1e-3,
                1e-6,
                &format!("grad.{name}"),
            );
        }
    }
    let checked = s
        .vars()
        .iter()
        .filter(|(n, _)| exp.contains_key(&format!("grad.{n}")))
        .count();
    assert_eq!(checked, 6, "every listed gradient was compared");
}
