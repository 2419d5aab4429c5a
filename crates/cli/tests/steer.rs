//! GPT-2 + SAE steering as `cocomix generate --sae` builds it: a residual hook that calls
//! `Sae::steer_residual` after block LAYER.
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use cocomix_model::{generate, Dropout, Gpt2, Hook, Sampling, Steer, SteerMode};
use cocomix_sae::Sae;

const DEV: Device = Device::Cpu;
const LAYER: usize = 1;

fn golden() -> (Gpt2, Sae) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden");
    let t = Gpt2::load(dir.join("teacher").to_str().unwrap(), &DEV).unwrap();
    let s = Sae::load_file(&dir.join("sae.pt"), &DEV).unwrap();
    (t, s)
}

fn set(index: usize, value: f32) -> Steer {
    Steer {
        index,
        value,
        mode: SteerMode::Set,
        force: false,
    }
}

/// The hook `cocomix generate` installs.
fn hook_fn<'a>(
    sae: &'a Sae,
    steer: &'a [Steer],
) -> impl Fn(&Tensor) -> cocomix_model::Result<Tensor> + 'a {
    move |x: &Tensor| {
        sae.steer_residual(x, steer)
            .map_err(|e| cocomix_model::Error::Other(e.to_string()))
    }
}

fn greedy(t: &Gpt2, hook: Option<&Hook>) -> Vec<u32> {
    let sampling = Sampling {
        max_new_tokens: 16,
        ..Sampling::default()
    };
    let mut cache = cocomix_model::KvCache::new(t.cfg.n_layer);
    generate(
        &[5, 77, 301, 12],
        64,
        &DEV,
        &mut cache,
        &sampling,
        |ids, c| t.forward_with(ids, Some(c), hook, &mut Dropout::off()),
    )
    .unwrap()
}

fn flat(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_steered_sae_latent_changes_the_residual_and_the_greedy_ids() {
    let (t, sae) = golden();
    let ids = Tensor::new(&[[5u32, 77, 301, 12, 9, 400]], &DEV).unwrap();
    let x = t.hidden_state(&ids, LAYER).unwrap(); // [1, 6, 48] after block LAYER
    let strong = [set(3, 60.0), set(100, 60.0)];
    let h = hook_fn(&sae, &strong);
    let hooked = cocomix_model::ResidualHook::apply(&h, &x).unwrap();
    let moved = flat(&hooked)
        .iter()
        .zip(flat(&x))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1.0, "the hooked residual moved by {moved}");
    let plain = greedy(&t, None);
    let steered = greedy(
        &t,
        Some(&Hook {
            layer: LAYER,
            hook: &h,
        }),
    );
    assert_ne!(steered, plain, "a strong steer changes the generated ids");
}

#[test]
fn no_steer_leaves_the_residual_and_the_greedy_ids_unchanged() {
    let (t, sae) = golden();
    let ids = Tensor::new(&[[5u32, 77, 301, 12, 9, 400]], &DEV).unwrap();
    let x = t.hidden_state(&ids, LAYER).unwrap();
    let h = hook_fn(&sae, &[]);
    assert_eq!(
        flat(&cocomix_model::ResidualHook::apply(&h, &x).unwrap()),
        flat(&x)
    );
    let hook = Hook {
        layer: LAYER,
        hook: &h,
    };
    assert_eq!(greedy(&t, Some(&hook)), greedy(&t, None));
    let logits = |hook| {
        flat(
            &t.forward_with(&ids, None, hook, &mut Dropout::off())
                .unwrap(),
        )
    };
    assert_eq!(logits(Some(&hook)), logits(None));
}
