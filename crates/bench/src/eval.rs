//! `bench eval`: HellaSwag-shaped requests with a GPT-2 124M-shaped model
//! (configs/gpt2-69m.toml's teacher, random weights).
use std::time::Instant;

use cocomix_eval::tasks::{evaluate, Choice, Doc, ModelScorer, Task};
use cocomix_model::AnyModel;
use serde_json::{json, Value};

use crate::common::random_gpt2;
use crate::configs::BenchConfig;
use crate::Result;

/// ~40-token contexts, 4 endings of ~20 tokens, 8 documents.
pub fn hellaswag() -> Result<Value> {
    let bc = BenchConfig::gpt2_69m()?;
    let cfg = bc.teacher()?;
    let model = AnyModel::Gpt2(random_gpt2(&cfg, 0)?);
    let tok = cocomix_data::Tokenizer::gpt2()?;
    let ctx = "A man is standing on a ladder next to a house. He is holding a paint roller and a bucket of paint. He";
    let endings = [
        " starts painting the wall with long even strokes from the top down.",
        " drops the bucket and the paint spills all over the grass below him.",
        " climbs down and walks away to get a cup of coffee from the kitchen.",
        " waves at a neighbour who is walking a dog along the street outside.",
    ];
    let docs: Vec<Doc> = (0..8)
        .map(|_| Doc {
            choices: endings.iter().map(|e| Choice::new(ctx, *e)).collect(),
            gold: 0,
        })
        .collect();
    let requests = docs.len() * endings.len();
    let task = Task {
        name: "hellaswag".into(),
        docs,
    };
    let scorer = ModelScorer {
        model: &model,
        max_len: cfg.n_positions,
    };
    evaluate(&task, &tok, &scorer, Some(1))?; // warm-up
    let t0 = Instant::now();
    evaluate(&task, &tok, &scorer, None)?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(json!({
        "case": "eval-hellaswag-124m", "config": bc.file, "documents": task.docs.len(),
        "requests": requests, "requests_per_s": requests as f64 / secs,
    }))
}
