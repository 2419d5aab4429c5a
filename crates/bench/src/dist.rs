//! `bench dist`: what data parallelism costs. Each case runs as MPI ranks of the caller's
//! binary (`mpirun -np N cocomix bench dist --case …`, built with `--features mpi`), at the
//! shapes of configs/default.toml and configs/gpt2-69m.toml.
use std::time::Instant;

use candle_core::{Device, Tensor};
use cocomix_dist::{Backend, Comm, DistConfig, ReduceOp};
use cocomix_trainer::Objective;
use serde_json::{json, Value};

use crate::common::{bench_spec, run_tokens_per_s, synthetic_data};
use crate::configs::BenchConfig;
use crate::{Error, Result};

/// The cases of `bench dist`.
pub const CASES: [&str; 3] = [
    "train-default-ntp-1rank",
    "train-default-ntp-2rank",
    "allreduce-69m",
];

/// Ranks a case runs on.
pub fn ranks(case: &str) -> usize {
    match case {
        "train-default-ntp-1rank" => 1,
        _ => 2,
    }
}

/// Runs `case` as one rank; every rank returns the same figures.
pub fn run(case: &str) -> Result<Value> {
    let comm = Comm::init(&DistConfig {
        backend: Backend::Mpi,
        ..Default::default()
    })
    .map_err(|e| {
        Error::Other(format!(
            "bench dist runs under mpirun with a binary built with --features mpi: {e}"
        ))
    })?;
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
fn allreduce_69m(comm: &Comm) -> Result<Value> {
    const REPS: u32 = 5;
    let bc = BenchConfig::gpt2_69m()?;
    let mut out = serde_json::Map::new();
    for (name, objective) in [("ntp", Objective::Ntp), ("cocomix", Objective::Cocomix)] {
        let s = cocomix_model::Student::new(&bc.student(objective)?, 0, &Device::Cpu)?;
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
            json!({
                "params": params,
                "bytes_per_step": bytes,
                "buckets_per_step": (after.calls - before.calls) / REPS as u64,
                "allreduce_s_per_step": step_s,
                "mpi_s_per_step": mpi_s,
                "bus_gb_per_s": 2.0 * (n - 1.0) / n * bytes as f64 / mpi_s / 1e9,
            }),
        );
    }
    Ok(json!({
        "case": "allreduce-69m", "config": bc.file, "ranks": comm.world(),
        "bucket_mb": comm.bucket_bytes() as f64 / (1 << 20) as f64, "results": out,
    }))
}

/// NTP training steps of the default config's student (B = 16) on the world's ranks.
fn train_throughput(case: &str, comm: &Comm) -> Result<Value> {
    let bc = BenchConfig::default_toml()?;
    let student = bc.student(Objective::Ntp)?;
    let (batch, t) = (16, student.gpt2.n_positions);
    // Rank 0 makes the folder and the data; the others use them.
    let dir = if comm.is_root() {
        let d = std::env::temp_dir().join(format!("cocomix-bench-dist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let vocab = student.gpt2.vocab_size;
        synthetic_data(&d.join("data"), vocab, (batch * 4 + 1) * t + 1, t + 1)?;
        d.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    let dir = comm.broadcast_bytes(dir.as_bytes(), 0)?;
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&dir).into_owned());
    comm.barrier()?;
    let data = cocomix_data::Dataset::open(dir.join("data"))?;
    let steps = 8;
    let spec = bench_spec(&bc.run, student, &data, dir.join("run"), steps, batch);
    let before = comm.stats();
    cocomix_trainer::train_dist(&spec, comm)?;
    let stats = comm.stats();
    // Rank 0 reads the step times; all ranks report them.
    let tps = if comm.is_root() {
        run_tokens_per_s(&dir.join("run"))?
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
    Ok(json!({
        "case": case, "config": bc.file, "ranks": comm.world(), "batch": batch, "seq_len": t,
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
