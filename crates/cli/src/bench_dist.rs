//! `cocomix bench dist`: what data parallelism costs. Each case runs as MPI ranks of this
//! binary (`mpirun -np N cocomix bench dist --case …`, built with `--features mpi`).
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use cocomix_dist::{Backend, Comm, DistConfig, ReduceOp};

use crate::bench::{paper_69m, tiny};

/// Ranks a case runs on.
pub fn ranks(case: &str) -> usize {
    match case {
        "train-default-ntp-1rank" => 1,
        _ => 2,
    }
}

/// Runs `case` as one rank; every rank returns the same figures.
pub fn run(case: &str) -> Result<serde_json::Value> {
    let comm = Comm::init(&DistConfig {
        backend: Backend::Mpi,
        ..Default::default()
    })
    .context("bench dist runs under mpirun with a binary built with --features mpi")?;
    let v = match case {
        "allreduce-69m" => allreduce_69m(&comm)?,
        c => train_throughput(c, &comm)?,
    };
    comm.finish();
    Ok(v)
}

/// The gradient all-reduce of one optimizer step at the paper's 69M shapes (NTP and
/// CoCoMix students): bytes per rank, time with the host copies (what a step pays) and
/// MPI's part, bus bandwidth as nccl-tests defines it (2(N − 1)/N · bytes / time).
fn allreduce_69m(comm: &Comm) -> Result<serde_json::Value> {
    const REPS: u32 = 5;
    let mut out = serde_json::Map::new();
    for (name, cocomix) in [("ntp", false), ("cocomix", true)] {
        let s = cocomix_model::Student::new(&paper_69m(cocomix), 0, &Device::Cpu)?;
        let grads: Vec<Tensor> = s
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        let params: usize = grads.iter().map(|g| g.elem_count()).sum();
        comm.all_reduce_tensors(&grads, ReduceOp::Sum)?; // warm-up
        let before = comm.stats();
        let t0 = Instant::now();
        for _ in 0..REPS {
            comm.all_reduce_tensors(&grads, ReduceOp::Sum)?;
        }
        let step_s = t0.elapsed().as_secs_f64() / REPS as f64;
        let after = comm.stats();
        let mpi_s = (after.seconds - before.seconds) / REPS as f64;
        let bytes = (after.bytes - before.bytes) / REPS as u64;
        let n = comm.world() as f64;
        out.insert(
            name.into(),
            serde_json::json!({
                "params": params,
                "bytes_per_step": bytes,
                "buckets_per_step": (after.calls - before.calls) / REPS as u64,
                "allreduce_s_per_step": step_s,
                "mpi_s_per_step": mpi_s,
                "bus_gb_per_s": 2.0 * (n - 1.0) / n * bytes as f64 / mpi_s / 1e9,
            }),
        );
    }
    Ok(
        serde_json::json!({"case": "allreduce-69m", "ranks": comm.world(), "bucket_mb": comm.bucket_bytes() as f64 / (1 << 20) as f64, "results": out}),
    )
}

/// NTP training steps of the default config's student (B = 16, T = 128) on `world` ranks.
fn train_throughput(case: &str, comm: &Comm) -> Result<serde_json::Value> {
    let student = tiny(false);
    let batch = 16;
    // Rank 0 makes the folder and the data; the others use them.
    let dir = if comm.is_root() {
        let d = std::env::temp_dir().join(format!("cocomix-bench-dist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        crate::bench_train::synthetic_data(&d.join("data"), &student, batch)?;
        d.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    let dir =
        std::path::PathBuf::from(String::from_utf8(comm.broadcast_bytes(dir.as_bytes(), 0)?)?);
    comm.barrier()?;
    let data = cocomix_data::Dataset::open(dir.join("data"))?;
    let c = crate::bench_train::cfg_for(&student, batch)?;
    let steps = 8;
    let mut optim = c.optim.clone();
    optim.steps = steps;
    optim.warmup = 0;
    let spec = cocomix_trainer::TrainSpec {
        objective: cocomix_trainer::Objective::Ntp,
        student,
        optim,
        data: &data,
        run_dir: dir.join("run"),
        seed: 0,
        teacher: None,
        labels: None,
        concept: c.concept.clone(),
        kd: c.kd.clone(),
        eval_every: 1_000_000,
        max_val_blocks: 1,
        checkpoint_every: 1_000_000,
        keep_last: 1,
        resume: false,
        stop_after: None,
        aligned_windows: None,
        device: Device::Cpu,
        config_text: String::new(),
    };
    let before = comm.stats();
    cocomix_trainer::train_dist(&spec, comm)?;
    let stats = comm.stats();
    // Rank 0 reads the step times; all ranks report them.
    let tps = if comm.is_root() {
        let m = cocomix_trainer::read_metrics(&dir.join("run"))?;
        // Skip the first step (allocation warm-up): harmonic mean of the rest.
        let rest: Vec<f64> = m.iter().skip(1).map(|r| r.tokens_per_s).collect();
        rest.len() as f64 / rest.iter().map(|x| 1.0 / x).sum::<f64>()
    } else {
        0.0
    };
    let mut tps = [tps];
    comm.all_reduce_f64(&mut tps, ReduceOp::Sum)?;
    comm.barrier()?;
    if comm.is_root() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let grad_bytes = (stats.bytes - before.bytes) as f64 / steps as f64;
    Ok(serde_json::json!({
        "case": case, "ranks": comm.world(), "batch": batch, "seq_len": 128,
        "threads_per_rank": rayon_threads(), "tokens_per_s": tps[0],
        "allreduce_bytes_per_step": grad_bytes,
        "allreduce_s_per_step": (stats.seconds - before.seconds) / steps as f64,
    }))
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
