//! Steering the CoCoMix student's predicted concepts changes what it computes, and no
//! steering (or a zero edit) changes nothing.
use candle_core::{Device, Tensor};
use cocomix_model::{
    generate, ConceptConfig, Gpt2Config, Sampling, Steer, SteerMode, Student, StudentConfig,
};

const DEV: Device = Device::Cpu;

fn student() -> Student {
    let cfg = StudentConfig {
        gpt2: Gpt2Config::new(40, 32, 16, 3, 2).with_dropout(0.0),
        concept: Some(ConceptConfig {
            concept_dim: 24,
            concept_num: 4,
            insert_layer_index: 1,
            interleave: true,
        }),
        pause: None,
    };
    Student::new(&cfg, 5, &DEV).unwrap()
}

fn steer(index: usize, value: f32, mode: SteerMode, force: bool) -> Steer {
    Steer {
        index,
        value,
        mode,
        force,
    }
}

/// Logits `[t, V]` of one cached forward of `ids` with `steer`.
fn logits(s: &Student, ids: &[u32], steer: &[Steer]) -> Vec<Vec<f32>> {
    let x = Tensor::new(ids, &DEV).unwrap().unsqueeze(0).unwrap();
    let mut cache = s.new_cache();
    s.forward_cached(&x, &mut cache, steer)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn greedy(s: &Student, steer: &[Steer]) -> Vec<u32> {
    let sampling = Sampling {
        max_new_tokens: 12,
        ..Sampling::default()
    };
    let mut cache = s.new_cache();
    generate(&[1, 7, 3], 32, &DEV, &mut cache, &sampling, |ids, c| {
        s.forward_cached(ids, c, steer)
    })
    .unwrap()
}

#[test]
fn steering_a_concept_changes_the_logits_and_no_edit_changes_nothing() {
    let s = student();
    let ids = [1u32, 7, 3, 9, 12, 30];
    let plain = logits(&s, &ids, &[]);
    // A zero Add leaves every concept logit, hence the TopK and the concept vector, as is.
    assert_eq!(
        logits(&s, &ids, &[steer(3, 0.0, SteerMode::Add, false)]),
        plain
    );
    for edit in [
        steer(3, 50.0, SteerMode::Set, true),
        steer(7, 80.0, SteerMode::Add, false),
    ] {
        let steered = logits(&s, &ids, &[edit]);
        let max_diff = plain
            .iter()
            .flatten()
            .zip(steered.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff > 1e-2,
            "{edit:?} moved the logits by only {max_diff}"
        );
    }
}

#[test]
fn greedy_generation_follows_a_strong_steer_and_ignores_an_empty_one() {
    let s = student();
    let plain = greedy(&s, &[]);
    assert_eq!(greedy(&s, &[]), plain, "greedy decoding is deterministic");
    assert_eq!(greedy(&s, &[steer(2, 0.0, SteerMode::Add, false)]), plain);
    let steered = greedy(
        &s,
        &[
            steer(3, 400.0, SteerMode::Set, true),
            steer(11, -400.0, SteerMode::Set, true),
        ],
    );
    assert_ne!(steered, plain, "a strong steer changes the generated ids");
}

#[test]
fn out_of_range_steering_is_an_error() {
    let s = student();
    let x = Tensor::new(&[[1u32, 2]], &DEV).unwrap();
    let err = s
        .forward_cached(
            &x,
            &mut s.new_cache(),
            &[steer(24, 1.0, SteerMode::Add, false)],
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("out of range"), "{err}");
}
