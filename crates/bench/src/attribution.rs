//! `bench attribution`: online labels against a label cache, at the paper's shapes
//! (configs/gpt2-69m.toml: GPT-2 124M teacher, its SAE layer, K_attr, C).
use std::time::Instant;

use cocomix_attribution::{LabelCache, LabelCacheSpec};
use serde_json::{json, Value};

use crate::common::{random_gpt2, random_ids, random_sae, synthetic_data, timed};
use crate::configs::BenchConfig;
use crate::Result;

/// `labels-online-124m`: attribution + labels of one window of the teacher's context.
pub fn labels_online() -> Result<Value> {
    let bc = BenchConfig::gpt2_69m()?;
    let (cfg, r) = (bc.teacher()?, &bc.run);
    let t = random_gpt2(&cfg, 0)?;
    let sae = random_sae(cfg.n_embd, r.sae.n_latents, r.sae.k)?;
    let ids = random_ids(1, cfg.n_positions, cfg.vocab_size)?;
    let once = || -> Result<()> {
        let att = cocomix_attribution::attribute(&t, &sae, &ids, r.teacher.layer)?;
        cocomix_attribution::labels(
            &att,
            r.sae.n_latents,
            r.concept.k_attr,
            r.concept.label_mode,
        )?;
        Ok(())
    };
    once()?;
    let (n, secs) = timed(|_| once())?;
    Ok(json!({
        "case": "labels-online-124m", "config": bc.file, "seq_len": cfg.n_positions,
        "labelled_tokens_per_s": (n * cfg.n_positions) as f64 / secs,
    }))
}

/// `labels-cached-vs-online-124m`: one epoch of 3 windows labelled online (building the
/// cache), then read back from the cache.
pub fn labels_cached_vs_online() -> Result<Value> {
    let bc = BenchConfig::gpt2_69m()?;
    let (cfg, r) = (bc.teacher()?, &bc.run);
    let t = random_gpt2(&cfg, 0)?;
    let sae = random_sae(cfg.n_embd, r.sae.n_latents, r.sae.k)?;
    let dir = tempfile::tempdir()?;
    let (windows, window) = (3usize, cfg.n_positions);
    let data = synthetic_data(
        &dir.path().join("data"),
        cfg.vocab_size,
        windows * window + 1,
        window + 1,
    )?;
    let spec = LabelCacheSpec {
        teacher: "random-124m".into(),
        teacher_sha256: "-".into(),
        sae_sha256: "-".into(),
        layer: r.teacher.layer,
        k_attr: r.concept.k_attr,
        window,
        mode: r.concept.label_mode,
        n_latents: r.sae.n_latents,
        data: "bench".into(),
        max_windows: 0,
    };
    let t0 = Instant::now();
    let cache = LabelCache::build(&t, &sae, &spec, &data.train, &dir.path().join("cache"), 1)?;
    let online_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut checksum = 0u64;
    for _ in 0..100 {
        for w in 0..windows {
            checksum += cache
                .window_labels(w)
                .iter()
                .map(|&l| l as u64)
                .sum::<u64>();
        }
    }
    let cached_s = t0.elapsed().as_secs_f64() / 100.0;
    Ok(json!({
        "case": "labels-cached-vs-online-124m", "config": bc.file, "windows": windows,
        "seq_len": window, "online_epoch_s": online_s, "cached_epoch_s": cached_s,
        "speedup": online_s / cached_s, "checksum": checksum,
    }))
}
