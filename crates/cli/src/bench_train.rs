//! `cocomix bench train`: one optimizer step per objective, through the trainer itself.
use std::time::Instant;

use anyhow::Result;
use cocomix_model::StudentConfig;

use crate::bench::{paper_69m, peak_rss_mib, tiny};

/// Matmul + attention FLOPs of one training step per token (forward + backward = 3×
/// forward), counting the doubled positions after the insert layer and the concept path.
pub fn train_flops_per_token(cfg: &StudentConfig) -> f64 {
    let g = &cfg.gpt2;
    let (d, t, v) = (g.n_embd as f64, g.n_positions as f64, g.vocab_size as f64);
    let block = 2.0 * 12.0 * d * d; // qkv, proj, mlp (per position)
    let attn = |len: f64| 2.0 * 2.0 * len * d; // q·k and att·v per position, causal ≈ half of 2·len·d·2
    let insert = cfg
        .concept
        .as_ref()
        .map_or(g.n_layer, |c| c.insert_layer_index) as f64;
    let upper = g.n_layer as f64 - insert;
    let mult = if cfg.concept.is_some() { 2.0 } else { 1.0 };
    let mut fwd = insert * (block + attn(t) / 2.0)
        + upper * mult * (block + attn(mult * t) / 2.0)
        + 2.0 * d * v;
    if let Some(c) = &cfg.concept {
        fwd += 2.0 * d * c.concept_dim as f64 + 2.0 * c.concept_num as f64 * d; // predictor + sparse compress
    }
    3.0 * fwd
}

pub fn run(case: &str, batch_69m: Option<usize>, precision: &str) -> Result<serde_json::Value> {
    let rest = case.strip_prefix("train-").expect("train case");
    let (size, objective) = rest
        .split_once('-')
        .ok_or_else(|| anyhow::anyhow!("bad case {case}"))?;
    let cocomix = objective.starts_with("cocomix");
    let student = match size {
        "default" => tiny(cocomix),
        "69m" => paper_69m(cocomix),
        _ => anyhow::bail!("bad size in {case}"),
    };
    let teacher_cfg = match size {
        "default" => cocomix_model::Gpt2Config::new(2048, 128, 128, 4, 4),
        _ => cocomix_model::Gpt2Config::gpt2_small(),
    };
    let batch = if size == "default" {
        16
    } else {
        batch_69m.unwrap_or(1)
    };
    let t = student.gpt2.n_positions;
    let dir = std::env::temp_dir().join(format!("cocomix-bench-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let data = synthetic_data(&dir.join("data"), &student, batch)?;
    let dev = crate::bench::dev()?;
    let teacher = cocomix_model::Gpt2::new(
        &teacher_cfg.with_dropout(0.0),
        &mut cocomix_model::Params::random(1, &dev, false),
    )?;
    let c = cfg_for(&student, batch)?;
    let sae = cocomix_sae::Sae::new(
        candle_core::Tensor::zeros(teacher.cfg.n_embd, candle_core::DType::F32, &dev)?,
        candle_core::Tensor::randn(0f32, 0.05, (c.sae.n_latents, teacher.cfg.n_embd), &dev)?,
        candle_core::Tensor::zeros(c.sae.n_latents, candle_core::DType::F32, &dev)?,
        candle_core::Tensor::randn(0f32, 0.05, (teacher.cfg.n_embd, c.sae.n_latents), &dev)?,
        c.sae.k,
        "random".into(),
    )?;
    let cache;
    let labels = match objective {
        "cocomix-online" => Some(cocomix_trainer::Labels::Online {
            sae: &sae,
            layer: 2,
            mode: cocomix_attribution::LabelMode::Faithful,
        }),
        "cocomix-cached" => {
            let spec = cocomix_attribution::LabelCacheSpec {
                teacher: "random".into(),
                teacher_sha256: "-".into(),
                sae_sha256: "-".into(),
                layer: 2,
                k_attr: 4,
                window: t,
                mode: cocomix_attribution::LabelMode::Faithful,
                n_latents: c.sae.n_latents,
                data: "bench".into(),
                max_windows: 0,
            };
            cache = cocomix_attribution::LabelCache::build(
                &teacher,
                &sae,
                &spec,
                &data.train,
                &dir.join("cache"),
                batch,
            )?;
            Some(cocomix_trainer::Labels::Cache(&cache))
        }
        _ => None,
    };
    let objective_kind = match objective {
        "ntp" => cocomix_trainer::Objective::Ntp,
        "kd" => cocomix_trainer::Objective::Kd,
        _ => cocomix_trainer::Objective::Cocomix,
    };
    let steps = if size == "default" { 6 } else { 2 };
    let mut optim = c.optim.clone();
    optim.steps = steps;
    optim.warmup = 0;
    optim.precision = precision.parse()?;
    let spec = cocomix_trainer::TrainSpec {
        objective: objective_kind,
        student: student.clone(),
        optim,
        data: &data,
        run_dir: dir.join("run"),
        seed: 0,
        teacher: Some(&teacher),
        labels,
        concept: c.concept.clone(),
        kd: c.kd.clone(),
        eval_every: 1_000_000,
        max_val_blocks: 1,
        checkpoint_every: 1_000_000,
        keep_last: 1,
        resume: false,
        stop_after: None,
        aligned_windows: None,
        device: dev.clone(),
        config_text: String::new(),
    };
    let t0 = Instant::now();
    cocomix_trainer::train(&spec)?;
    let wall = t0.elapsed().as_secs_f64();
    let m = cocomix_trainer::read_metrics(&dir.join("run"))?;
    // Skip the first step (allocation warm-up) when there are several.
    let timed: Vec<f64> = m
        .iter()
        .skip(if m.len() > 2 { 1 } else { 0 })
        .map(|r| r.tokens_per_s)
        .collect();
    let tps = timed.len() as f64 / timed.iter().map(|x| 1.0 / x).sum::<f64>();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(serde_json::json!({
        "case": case, "objective": objective, "size": size, "batch": batch, "seq_len": t, "precision": precision,
        "tokens_per_s": tps, "step_s": (batch * t) as f64 / tps, "flops_per_token": train_flops_per_token(&student),
        "wall_s": wall, "peak_rss_mib": peak_rss_mib(),
    }))
}

/// A prepared data folder at `data_dir` with a synthetic shard of a few windows of `batch`
/// rows for `student` (its vocabulary and context).
pub fn synthetic_data(
    data_dir: &std::path::Path,
    student: &StudentConfig,
    batch: usize,
) -> Result<cocomix_data::Dataset> {
    let t = student.gpt2.n_positions;
    let n_tok = (batch * 4 + 1) * t + 1;
    let toks: Vec<u8> = (0..n_tok)
        .flat_map(|i| (((i * 2_654_435_761) % student.gpt2.vocab_size) as u16).to_le_bytes())
        .collect();
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(data_dir.join("train.bin"), &toks)?;
    std::fs::write(data_dir.join("val.bin"), &toks[..(t + 1) * 2])?;
    let meta = serde_json::json!({"format_version": 1, "dtype": "u16", "vocab_size": student.gpt2.vocab_size, "eot_id": 0,
        "tokenizer_identity": "bench", "train_tokens": n_tok, "val_tokens": t + 1, "train_documents": 1, "val_documents": 1,
        "val_fraction": 0.0, "seed": 0, "sources": [], "replaced_invalid_utf8": 0});
    std::fs::write(data_dir.join("meta.json"), meta.to_string())?;
    Ok(cocomix_data::Dataset::open(data_dir)?)
}

pub fn cfg_for(student: &StudentConfig, batch: usize) -> Result<cocomix_trainer::RunConfig> {
    let n_latents = student.concept.as_ref().map_or(
        if student.gpt2.vocab_size > 4096 {
            32768
        } else {
            1024
        },
        |c| c.concept_dim,
    );
    let k = if n_latents > 4096 { 32 } else { 16 };
    Ok(cocomix_trainer::RunConfig::from_toml(
        include_str!("../../../configs/default.toml"),
        &[
            format!("sae.n_latents={n_latents}"),
            format!("sae.k={k}"),
            format!("concept.concept_num={k}"),
            format!("optim.batch_size={batch}"),
        ],
    )?)
}
