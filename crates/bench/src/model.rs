//! `bench model`: student forward + backward, teacher residual gradient.
use candle_core::Tensor;
use cocomix_model::ops::{concept_loss, cross_entropy};
use cocomix_model::{Dropout, Student};
use cocomix_trainer::Objective;
use serde_json::{json, Value};

use crate::common::{device, random_gpt2, random_ids, timed};
use crate::configs::BenchConfig;
use crate::Result;

/// Forward + backward of the student's loss (NTP, plus λ·concept loss for CoCoMix) for
/// `tiny-{ntp,cocomix}` (configs/default.toml, 16 sequences) and `69m-{ntp,cocomix}`
/// (configs/gpt2-69m.toml, 1 sequence).
pub fn student_step(case: &str) -> Result<Value> {
    let (size, objective) = case.split_once('-').unwrap_or((case, ""));
    let (bc, batch) = if size == "tiny" {
        (BenchConfig::default_toml()?, 16)
    } else {
        (BenchConfig::gpt2_69m()?, 1)
    };
    let objective = if objective == "cocomix" {
        Objective::Cocomix
    } else {
        Objective::Ntp
    };
    let cfg = bc.student(objective)?;
    let s = Student::new(&cfg, 0, &device()?)?;
    let t = cfg.gpt2.n_positions;
    let ids = random_ids(batch, t + 1, cfg.gpt2.vocab_size)?;
    let (x, y) = (ids.narrow(1, 0, t)?, ids.narrow(1, 1, t)?.flatten_all()?);
    let k_attr = bc.run.concept.k_attr;
    let labels = cfg
        .concept
        .as_ref()
        .map(|c| -> Result<Tensor> {
            Ok(random_ids(batch * t, k_attr, c.concept_dim)?.reshape((batch, t, k_attr))?)
        })
        .transpose()?;
    let lambda = bc.run.concept.lambda;
    let step = |i: u64| -> Result<()> {
        let out = s.forward(&x, &mut Dropout::seeded(i))?;
        let v = out.logits.dim(2)?;
        let mut loss = cross_entropy(&out.logits.reshape(((), v))?, &y)?;
        if let (Some(cl), Some(l)) = (&out.concept_logits, &labels) {
            loss = (loss + (concept_loss(cl, l)? * lambda)?)?;
        }
        loss.backward()?;
        Ok(())
    };
    step(0)?; // warm-up
    let (n, secs) = timed(step)?;
    let params: usize = s.vars().iter().map(|(_, v)| v.elem_count()).sum();
    Ok(json!({
        "case": case, "config": bc.file, "params": params, "batch": batch, "seq_len": t,
        "fwd_bwd_tokens_per_s": (n * batch * t) as f64 / secs, "steps_timed": n,
    }))
}

/// The teacher's residual gradient at `teacher.layer` of configs/gpt2-69m.toml (GPT-2
/// 124M shape, T = 1024).
pub fn residual_grad_124m() -> Result<Value> {
    let bc = BenchConfig::gpt2_69m()?;
    let cfg = bc.teacher()?;
    let layer = bc.run.teacher.layer;
    let g = random_gpt2(&cfg, 0)?;
    let t = cfg.n_positions;
    let ids = random_ids(1, t, cfg.vocab_size)?;
    g.residual_grad(&ids, layer)?;
    let (n, secs) = timed(|_| {
        g.residual_grad(&ids, layer)?;
        Ok(())
    })?;
    Ok(json!({
        "case": "residual-grad-124m", "config": bc.file, "layer": layer, "seq_len": t,
        "tokens_per_s": (n * t) as f64 / secs, "calls_timed": n,
    }))
}
