//! `bench smollm2`: SmolLM2-135M-Instruct as a teacher (the Q4_1 GGUF of
//! scripts/fetch-smollm2.sh, dequantized to f32 once at load; the load is not timed). Each
//! case is skipped with a message when the file is absent.
use std::path::Path;
use std::time::Instant;

use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelMode};
use cocomix_model::{CausalLm, Llama};
use serde_json::{json, Value};

use crate::common::{device, random_ids, random_sae, synthetic_data, timed};
use crate::Result;

/// Where scripts/fetch-smollm2.sh puts the model.
pub const SMOLLM2: &str = "data/models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `smollm2-forward-128`, `smollm2-forward-1024`, `smollm2-residual-grad` (its middle layer,
/// T = 1024) and `smollm2-labels` (a label cache of 3 windows of 1024 with a random TopK SAE
/// of 32768 latents, k = 32, K_attr = 4).
pub fn case(case: &str) -> Result<Value> {
    if !Path::new(SMOLLM2).is_file() {
        eprintln!("bench: {SMOLLM2} is absent (run scripts/fetch-smollm2.sh): {case} skipped");
        return Ok(json!({ "case": case, "skipped": format!("{SMOLLM2} is absent") }));
    }
    let t0 = Instant::now();
    let m = Llama::load(SMOLLM2, &device()?)?;
    let load_s = t0.elapsed().as_secs_f64();
    let (layer, vocab) = (m.n_layer() / 2, m.vocab_size());
    let mut v = match case {
        "smollm2-forward-128" | "smollm2-forward-1024" => {
            let t = if case.ends_with("-128") { 128 } else { 1024 };
            let ids = random_ids(1, t, vocab)?;
            m.logits(&ids)?;
            let (n, secs) = timed(|_| Ok(m.logits(&ids).map(|_| ())?))?;
            json!({ "seq_len": t, "tokens_per_s": (n * t) as f64 / secs, "calls_timed": n })
        }
        "smollm2-residual-grad" => {
            let ids = random_ids(1, 1024, vocab)?;
            m.residual_grad(&ids, layer)?;
            let (n, secs) = timed(|_| Ok(m.residual_grad(&ids, layer).map(|_| ())?))?;
            json!({ "layer": layer, "seq_len": 1024, "tokens_per_s": (n * 1024) as f64 / secs, "calls_timed": n })
        }
        "smollm2-labels" => {
            let (windows, t, c) = (3usize, 1024usize, 32768usize);
            let sae = random_sae(m.d_model(), c, 32)?;
            let dir = tempfile::tempdir()?;
            let data = synthetic_data(&dir.path().join("data"), vocab, windows * t + 1, t + 1)?;
            let spec = LabelCacheSpec {
                teacher: SMOLLM2.into(),
                teacher_sha256: "-".into(),
                sae_sha256: "-".into(),
                layer,
                k_attr: 4,
                window: t,
                mode: LabelMode::Faithful,
                n_latents: c,
                data: "bench".into(),
                max_windows: 0,
            };
            let t0 = Instant::now();
            LabelCache::build(&m, &sae, &spec, &data.train, &dir.path().join("cache"), 1)?;
            let secs = t0.elapsed().as_secs_f64();
            json!({ "layer": layer, "seq_len": t, "windows": windows, "sae_latents": c, "labelled_tokens_per_s": (windows * t) as f64 / secs })
        }
        other => return Err(crate::Error::Other(format!("unknown bench case {other}"))),
    };
    v["case"] = case.into();
    v["load_s"] = load_s.into();
    Ok(v)
}
