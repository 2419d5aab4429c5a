//! `bench train`: one optimizer step per objective, through the trainer itself, at the
//! shapes of configs/default.toml (`default`) and configs/gpt2-69m.toml (`69m`).
use std::time::Instant;

use candle_core::{DType, Tensor};
use cocomix_attribution::{LabelCache, LabelCacheSpec};
use cocomix_model::{Gpt2Config, StudentConfig};
use cocomix_sae::Sae;
use cocomix_trainer::{Labels, Objective, Precision, RunConfig, TrainSpec};
use serde_json::{json, Value};

use crate::common::{bench_spec, device, random_gpt2, run_tokens_per_s, synthetic_data};
use crate::configs::BenchConfig;
use crate::{Error, Result};

/// Matmul + attention FLOPs of one training step per token (forward + backward = 3×
/// forward), counting the doubled positions after the insert layer and the concept path.
pub fn train_flops_per_token(cfg: &StudentConfig) -> f64 {
    let g = &cfg.gpt2;
    let (d, t, v) = (g.n_embd as f64, g.n_positions as f64, g.vocab_size as f64);
    let block = 2.0 * 12.0 * d * d; // qkv, proj, mlp (per position)
    let attn = |len: f64| 2.0 * 2.0 * len * d; // q·k and att·v per position (causal: halved below)
                                               // Blocks from the interleave layer on read 2T positions (CoCoMix, pause).
    let insert = cfg.interleave_layer().unwrap_or(g.n_layer) as f64;
    let upper = g.n_layer as f64 - insert;
    let mut fwd = insert * (block + attn(t) / 2.0)
        + upper * 2.0 * (block + attn(2.0 * t) / 2.0)
        + 2.0 * d * v;
    if let Some(c) = &cfg.concept {
        fwd += 2.0 * d * c.concept_dim as f64; // predictor
        if c.interleave {
            fwd += 2.0 * c.concept_num as f64 * d; // sparse compress
        }
    }
    3.0 * fwd
}

/// `train-<size>-<objective>`: size `default` (16 sequences) or `69m` (`batch_69m`,
/// default 1); objective `ntp`, `kd`, `cocomix-cached` or `cocomix-online`. A teacher of the
/// config's shape and an SAE of its `n_latents` / `k` with random weights; synthetic data.
pub fn train_case(case: &str, batch_69m: Option<usize>, precision: Precision) -> Result<Value> {
    let bad = || Error::Other(format!("unknown bench case {case}"));
    let (size, objective) = case
        .strip_prefix("train-")
        .and_then(|r| r.split_once('-'))
        .ok_or_else(bad)?;
    let (bc, batch, steps) = match size {
        "default" => (BenchConfig::default_toml()?, 16, 6),
        // Four steps: the two in the middle are timed (see `run_tokens_per_s`).
        "69m" => (BenchConfig::gpt2_69m()?, batch_69m.unwrap_or(1), 4),
        _ => return Err(bad()),
    };
    let kind = match objective {
        "ntp" => Objective::Ntp,
        "kd" => Objective::Kd,
        "cocomix-cached" | "cocomix-online" => Objective::Cocomix,
        _ => return Err(bad()),
    };
    let r = &bc.run;
    let student = bc.student(kind)?;
    let t = student.gpt2.n_positions;
    let dir = tempfile::tempdir()?;
    // Enough windows for every step's batch (and a few more).
    let data = synthetic_data(
        &dir.path().join("data"),
        student.gpt2.vocab_size,
        (batch * 4 + 1) * t + 1,
        t + 1,
    )?;
    let dev = device()?;
    let teacher = random_gpt2(&bc.teacher()?, 1)?;
    let (d, c) = (teacher.cfg.n_embd, r.sae.n_latents);
    let w = |shape: (usize, usize)| Tensor::randn(0f32, 0.05, shape, &dev);
    let sae = Sae::new(
        Tensor::zeros(d, DType::F32, &dev)?,
        w((c, d))?,
        Tensor::zeros(c, DType::F32, &dev)?,
        w((d, c))?,
        r.sae.k,
        "random".into(),
    )?;
    let cache;
    let labels = match objective {
        "cocomix-online" => Some(Labels::Online {
            sae: &sae,
            layer: r.teacher.layer,
            mode: r.concept.label_mode,
        }),
        "cocomix-cached" => {
            let spec = LabelCacheSpec {
                teacher: "random".into(),
                teacher_sha256: "-".into(),
                sae_sha256: "-".into(),
                layer: r.teacher.layer,
                k_attr: r.concept.k_attr,
                window: t,
                mode: r.concept.label_mode,
                n_latents: c,
                data: "bench".into(),
                max_windows: 0,
            };
            cache = LabelCache::build(
                &teacher,
                &sae,
                &spec,
                &data.train,
                &dir.path().join("cache"),
                batch,
            )?;
            Some(Labels::Cache(&cache))
        }
        _ => None,
    };
    let mut spec = TrainSpec {
        objective: kind,
        teacher: Some(&teacher),
        labels,
        device: dev.clone(),
        ..bench_spec(
            r,
            student.clone(),
            &data,
            dir.path().join("run"),
            steps,
            batch,
        )
    };
    spec.optim.precision = precision;
    let t0 = Instant::now();
    cocomix_trainer::train(&spec)?;
    let wall = t0.elapsed().as_secs_f64();
    let tps = run_tokens_per_s(&dir.path().join("run"))?;
    Ok(json!({
        "case": case, "config": bc.file, "objective": objective, "size": size, "batch": batch,
        "seq_len": t, "precision": precision, "tokens_per_s": tps, "step_s": (batch * t) as f64 / tps,
        "flops_per_token": train_flops_per_token(&student), "wall_s": wall,
        "shapes": shapes(&student, &teacher.cfg, r, batch),
    }))
}

/// The shapes a case trains at, for `scripts/bench-pytorch.py --shapes` (so that the
/// PyTorch side cannot drift from the configs).
fn shapes(student: &StudentConfig, teacher: &Gpt2Config, r: &RunConfig, batch: usize) -> Value {
    let gpt2 = |g: &Gpt2Config| {
        json!({ "vocab": g.vocab_size, "ctx": g.n_positions, "d": g.n_embd,
                "layers": g.n_layer, "heads": g.n_head })
    };
    let mut t = gpt2(teacher);
    t["layer"] = r.teacher.layer.into();
    json!({
        "student": gpt2(&student.gpt2),
        "concept": student.concept.as_ref().map(|c| json!({
            "c": c.concept_dim, "kc": c.concept_num, "insert": c.insert_layer_index,
            "k_attr": r.concept.k_attr,
        })),
        "teacher": t,
        "sae": { "n_latents": r.sae.n_latents, "k": r.sae.k },
        "batch": batch,
    })
}

/// CoCoMix (cached labels) / NTP step time per size, against the FLOP ratio.
pub fn ratios(results: &[Value]) -> Value {
    let find = |c: &str| results.iter().find(|r| r["case"] == c);
    let mut out = serde_json::Map::new();
    for size in ["default", "69m"] {
        if let (Some(n), Some(c)) = (
            find(&format!("train-{size}-ntp")),
            find(&format!("train-{size}-cocomix-cached")),
        ) {
            let time = n["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
                / c["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            let floor = c["flops_per_token"].as_f64().unwrap_or(f64::NAN)
                / n["flops_per_token"].as_f64().unwrap_or(f64::NAN);
            out.insert(
                size.into(),
                json!({ "cocomix_over_ntp_time": time, "flop_floor": floor, "within": time / floor - 1.0 }),
            );
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocomix_model::ConceptConfig;

    #[test]
    fn flops_per_token_by_hand() {
        // NTP: d = 2, T = 4, V = 10, 1 layer: block 2·12·4 = 96, attention 2·2·4·2 / 2 = 16,
        // head 2·2·10 = 40; forward 152, step 3× = 456.
        let ntp = StudentConfig::gpt2(Gpt2Config::new(10, 4, 2, 1, 1));
        assert_eq!(train_flops_per_token(&ntp), 456.0);
        // CoCoMix, 2 layers, insert 1, C = 6, K_c = 3: lower block 96 + 16; upper block on
        // 2T positions: 2·(96 + 2·2·8·2 / 2) = 256; head 40; predictor 2·2·6 = 24,
        // compress 2·3·2 = 12. Forward 444, step 1332.
        let cc = StudentConfig {
            gpt2: Gpt2Config::new(10, 4, 2, 2, 1),
            concept: Some(ConceptConfig {
                concept_dim: 6,
                concept_num: 3,
                insert_layer_index: 1,
                interleave: true,
            }),
            pause: None,
        };
        assert_eq!(train_flops_per_token(&cc), 1332.0);
    }
}
