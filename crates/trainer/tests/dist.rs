//! Data-parallel training over MPI: this test binary runs itself under `mpirun -np 2` and
//! compares with one process. Skipped, with a message, without the `mpi` feature or
//! `mpirun` (`cargo test -p cocomix-trainer --features mpi` runs them; CI does).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelMode};
use cocomix_data::Dataset;
use cocomix_model::{ConceptConfig, Gpt2, Gpt2Config, Params, StudentConfig};
use cocomix_sae::Sae;
use cocomix_trainer::{train_dist, Comm, DistConfig, Labels, Objective, RunConfig, TrainSpec};
use common::*;

const DEV: Device = Device::Cpu;
const DEFAULT: &str = include_str!("../../../configs/default.toml");
/// Set in the children: the folder with the shared data.
const CHILD: &str = "COCOMIX_DIST_TEST_DIR";
/// Losses of 2 ranks and of 1 process agree to this (float summation order only).
const LOSS_TOL: f64 = 1e-5;
/// Final weights and AdamW moments agree to this (absolute, per element).
const WEIGHT_TOL: f32 = 1e-5;

fn mpirun(np: usize, test: &str, dir: &Path, env: &[(&str, &str)]) -> Option<Command> {
    if cfg!(not(feature = "mpi")) {
        eprintln!("skipped {test}: built without the `mpi` feature (cargo test --features mpi)");
        return None;
    }
    let Some(mut cmd) = cocomix_dist::mpirun_command(np) else {
        eprintln!("skipped {test}: no mpirun on PATH (apt-get install openmpi-bin libopenmpi-dev)");
        return None;
    };
    cmd.arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, dir)
        .env("RAYON_NUM_THREADS", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Some(cmd)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn mpi_comm() -> Comm {
    Comm::init(&DistConfig {
        backend: cocomix_dist::Backend::Mpi,
        timeout_s: 60.0,
        ..Default::default()
    })
    .unwrap()
}

/// The data, a random frozen teacher, a deterministic SAE over its 8-wide layer 0, and the
/// device they live on.
struct Fixture {
    device: Device,
    data: Dataset,
    vocab: usize,
    teacher: Gpt2,
    sae: Sae,
}

fn make_data(dir: &Path) {
    let text = toy_text(600, &["red", "blue", "old", "quick", "lazy"], 23);
    prepare_toy(dir, &text, six_docs(dir, &text), 0.2);
}

fn fixture(dir: &Path) -> Fixture {
    fixture_on(dir, &DEV)
}

fn fixture_on(dir: &Path, dev: &Device) -> Fixture {
    let data = Dataset::open(dir.join("data")).unwrap();
    let vocab = data.tokenizer().unwrap().vocab_size();
    let teacher = Gpt2::new(
        &Gpt2Config::new(vocab, 16, 8, 2, 2).with_dropout(0.0),
        &mut Params::random(2, dev, false),
    )
    .unwrap();
    let wave = |n: usize, phase: f32| -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.7 + phase).sin()).collect()
    };
    let sae = Sae::new(
        Tensor::zeros(8, DType::F32, dev).unwrap(),
        Tensor::from_vec(wave(24 * 8, 0.3), (24, 8), dev).unwrap(),
        Tensor::zeros(24, DType::F32, dev).unwrap(),
        Tensor::from_vec(wave(8 * 24, 1.1), (8, 24), dev).unwrap(),
        4,
        "test".into(),
    )
    .unwrap();
    Fixture {
        device: dev.clone(),
        data,
        vocab,
        teacher,
        sae,
    }
}

fn cache_spec(f: &Fixture) -> LabelCacheSpec {
    LabelCacheSpec {
        teacher: "random".into(),
        teacher_sha256: "t".into(),
        sae_sha256: "s".into(),
        layer: 0,
        k_attr: 4,
        window: 16,
        mode: LabelMode::Faithful,
        n_latents: 24,
        data: format!("{}", f.data.train.len()),
        max_windows: 0,
    }
}

fn spec<'a>(
    f: &'a Fixture,
    run: PathBuf,
    objective: Objective,
    labels: Option<Labels<'a>>,
    steps: u64,
) -> TrainSpec<'a> {
    let c = RunConfig::from_toml(
        DEFAULT,
        &[
            format!("optim.steps={steps}"),
            "optim.warmup=2".into(),
            "optim.batch_size=6".into(),
            "optim.grad_accum=2".into(),
            "optim.lr=1e-3".into(),
        ],
    )
    .unwrap();
    let concept = objective.needs_labels().then_some(ConceptConfig {
        concept_dim: 24,
        concept_num: 4,
        insert_layer_index: 1,
        interleave: true,
    });
    TrainSpec {
        objective,
        student: StudentConfig {
            gpt2: Gpt2Config::new(f.vocab, 16, 16, 2, 2).with_dropout(0.1),
            concept,
            pause: None,
        },
        optim: c.optim.clone(),
        data: &f.data,
        run_dir: run,
        seed: 5,
        teacher: Some(&f.teacher),
        labels,
        aligned_windows: None,
        overlap_teacher: true,
        concept: c.concept.clone(),
        kd: c.kd.clone(),
        eval_every: 3,
        max_val_blocks: 5,
        checkpoint_every: 2,
        keep_last: 2,
        resume: false,
        stop_after: None,
        device: f.device.clone(),
        config_text: c.to_toml(),
    }
}

/// The runs compared: NTP, KD, and CoCoMix with cached and with online labels.
const RUNS: [(&str, Objective); 4] = [
    ("ntp", Objective::Ntp),
    ("kd", Objective::Kd),
    ("cocomix-cached", Objective::Cocomix),
    ("cocomix-online", Objective::Cocomix),
];

/// Trains every run of [`RUNS`] into `root/<name>` with `comm`, the label cache built by
/// all ranks of `comm` into `root/cache`.
fn train_all(f: &Fixture, root: &Path, comm: &Comm) {
    // One window per teacher forward: the same computation per window on any world size.
    let cache = LabelCache::build_dist(
        &f.teacher,
        &f.sae,
        &cache_spec(f),
        &f.data.train,
        &root.join("cache"),
        1,
        comm,
    )
    .unwrap();
    for (name, objective) in RUNS {
        let labels = match name {
            "cocomix-cached" => Some(Labels::Cache(&cache)),
            "cocomix-online" => Some(Labels::Online {
                sae: &f.sae,
                layer: 0,
                mode: LabelMode::Faithful,
            }),
            _ => None,
        };
        let out = train_dist(&spec(f, root.join(name), objective, labels, 6), comm).unwrap();
        assert_eq!(out.steps, 6);
    }
}

/// Every run of [`RUNS`] under `one` (one process) and under `two` (`what`) logged the same
/// global batches and losses (within [`LOSS_TOL`]), kept the same checkpoints (rank 0 alone
/// wrote) and ended with the same weights and AdamW moments (within [`WEIGHT_TOL`]).
fn assert_same_runs(one_root: &Path, two_root: &Path, what: &str) {
    for (name, _) in RUNS {
        let (one, two) = (one_root.join(name), two_root.join(name));
        let (m1, m2) = (metrics(&one), metrics(&two));
        assert_eq!(m1.len(), 6, "{name}");
        assert_eq!(m1.len(), m2.len(), "{name}");
        for (a, b) in m1.iter().zip(&m2) {
            assert_eq!(a.batch_hash, b.batch_hash, "{name}: same global batches");
            for (field, x, y) in [
                ("loss", Some(a.loss), Some(b.loss)),
                ("loss_ntp", Some(a.loss_ntp), Some(b.loss_ntp)),
                ("loss_concept", a.loss_concept, b.loss_concept),
                ("loss_kd", a.loss_kd, b.loss_kd),
                ("grad_norm", Some(a.grad_norm), Some(b.grad_norm)),
                ("val_loss", a.val_loss, b.val_loss),
            ] {
                match (x, y) {
                    (Some(x), Some(y)) => assert!(
                        (x - y).abs() <= LOSS_TOL,
                        "{name} step {}: {field} {x} (1 process) vs {y} ({what})",
                        a.step
                    ),
                    (x, y) => assert_eq!(x, y, "{name} step {}: {field}", a.step),
                }
            }
        }
        // Only rank 0 wrote: one metrics line per step, checkpoints 4 and 6, final/.
        let ck = |d: &Path| -> Vec<u64> {
            cocomix_trainer::list_checkpoints(d)
                .iter()
                .map(|c| c.0)
                .collect()
        };
        assert_eq!(ck(&two), ck(&one));
        let step6 = |d: &Path| d.join("checkpoints/step-0000006");
        for file in ["model.safetensors", "optim.safetensors"] {
            let d = max_abs_diff(&step6(&one).join(file), &step6(&two).join(file));
            assert!(d <= WEIGHT_TOL, "{name} {file}: max |Δ| {d}");
        }
        let d = max_abs_diff(
            &one.join("final/model.safetensors"),
            &two.join("final/model.safetensors"),
        );
        assert!(d <= WEIGHT_TOL, "{name} final: max |Δ| {d}");
    }
}

fn metrics(run: &Path) -> Vec<cocomix_trainer::StepMetrics> {
    cocomix_trainer::read_metrics(run).unwrap()
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut t: Vec<_> = candle_core::safetensors::load(path, &DEV)
        .unwrap()
        .into_iter()
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len(), "{}", a.display());
    ta.iter()
        .zip(&tb)
        .map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn two_ranks_train_as_one_process_with_the_same_global_batch() {
    let test = "two_ranks_train_as_one_process_with_the_same_global_batch";
    if let Some(dir) = std::env::var_os(CHILD) {
        let dir = PathBuf::from(dir);
        let comm = mpi_comm();
        train_all(&fixture(&dir), &dir.join("ranks-2"), &comm);
        comm.finish();
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_data(dir);
    let Some(mut cmd) = mpirun(2, test, dir, &[]) else {
        return;
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let f = fixture(dir);
    train_all(&f, &dir.join("ranks-1"), &Comm::single());
    // The label cache labelled by two ranks (each its half of the windows) is the cache
    // of one process, byte for byte.
    let bin = |w: &str| std::fs::read(dir.join(w).join("cache/labels.bin")).unwrap();
    assert_eq!(bin("ranks-2"), bin("ranks-1"));
    assert_same_runs(&dir.join("ranks-1"), &dir.join("ranks-2"), "2 ranks");
}

#[test]
fn ranks_with_different_settings_are_refused_before_training() {
    let test = "ranks_with_different_settings_are_refused_before_training";
    if let Some(dir) = std::env::var_os(CHILD) {
        let dir = PathBuf::from(dir);
        let comm = mpi_comm();
        let f = fixture(&dir);
        let mut s = spec(&f, dir.join("refused"), Objective::Ntp, None, 4);
        if comm.rank() == 1 {
            s.optim.lr = 2e-3;
        }
        let e = train_dist(&s, &comm).unwrap_err().to_string();
        println!("rank {} refused: {e}", comm.rank());
        comm.finish();
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    make_data(tmp.path());
    let Some(mut cmd) = mpirun(2, test, tmp.path(), &[]) else {
        return;
    };
    let out = cmd.output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("rank 0 refused: rank 1 failed: rank 1: config differs from rank 0's")
            && t.contains("rank 1 refused: rank 1: config differs from rank 0's"),
        "{t}"
    );
    assert!(
        cocomix_trainer::list_checkpoints(&tmp.path().join("refused")).is_empty(),
        "nothing trained"
    );
}

/// Steps of the run that is killed: enough that it is still running when the kill comes.
const LONG: u64 = 400;

#[test]
fn a_killed_rank_ends_the_job_and_the_rerun_resumes_it_exactly() {
    let test = "a_killed_rank_ends_the_job_and_the_rerun_resumes_it_exactly";
    if let Some(dir) = std::env::var_os(CHILD) {
        let dir = PathBuf::from(dir);
        let comm = mpi_comm();
        std::fs::write(
            dir.join(format!("pid-{}", comm.rank())),
            std::process::id().to_string(),
        )
        .unwrap();
        let f = fixture(&dir);
        let run = std::env::var("RUN").unwrap();
        let mut s = spec(&f, dir.join(&run), Objective::Ntp, None, LONG);
        s.checkpoint_every = 5;
        s.eval_every = 50;
        s.resume = std::env::var_os("RESUME").is_some();
        train_dist(&s, &comm).unwrap();
        comm.finish();
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_data(dir);
    let Some(mut cmd) = mpirun(2, test, dir, &[("RUN", "killed")]) else {
        return;
    };
    let mut job = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once step 7 is logged (checkpoint 5 written), kill rank 1 with SIGKILL.
    let log = dir.join("killed/metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |m| m.lines().count()) < 7 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the job never reached step 7"
        );
        assert!(job.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = std::fs::read_to_string(dir.join("pid-1")).unwrap();
    let killed = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap()
        .success());
    let out = job.wait_with_output().unwrap();
    let took = killed.elapsed();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        took < Duration::from_secs(60),
        "the job took {took:?} to end"
    );
    assert!(
        t.contains("rank 1") && (t.contains("signal 9") || t.contains("Killed")),
        "the error names the lost rank: {t}"
    );
    let logged = metrics(&dir.join("killed")).len() as u64;
    assert!(logged < LONG, "the kill came before the end");
    // The same command again continues from the last checkpoint ...
    let out = mpirun(2, test, dir, &[("RUN", "killed"), ("RESUME", "1")])
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let resumed = metrics(&dir.join("killed"));
    let from = resumed.iter().find_map(|m| m.resumed_from).unwrap();
    assert!((5..LONG).contains(&from), "resumed from step {from}");
    // ... and matches the uninterrupted run, exactly (same ranks, same order of sums).
    let out = mpirun(2, test, dir, &[("RUN", "whole")])
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let whole = metrics(&dir.join("whole"));
    assert_eq!(resumed.len(), LONG as usize);
    for (a, b) in resumed.iter().zip(&whole) {
        assert_eq!((a.step, a.loss, a.val_loss), (b.step, b.loss, b.val_loss));
    }
    assert_eq!(
        std::fs::read(dir.join("killed/final/model.safetensors")).unwrap(),
        std::fs::read(dir.join("whole/final/model.safetensors")).unwrap()
    );
}

/// On a GPU, in a build with `nccl`: a world of one through NCCL, whose collectives do run
/// (on the device, for the gradients), trains as the plain run does.
#[test]
fn a_world_of_one_over_nccl_trains_as_the_plain_run() {
    if cfg!(not(feature = "nccl")) {
        eprintln!("skipped: built without the `nccl` feature (scripts/build-cuda.sh --nccl)");
        return;
    }
    if let Err(e) = Device::new_cuda(0) {
        eprintln!("skipped: no GPU here ({e})");
        return;
    }
    let comm = Comm::init(&DistConfig {
        backend: cocomix_dist::Backend::Nccl,
        timeout_s: 60.0,
        ..Default::default()
    })
    .unwrap();
    assert_eq!((comm.rank(), comm.world()), (0, 1));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_data(dir);
    let f = fixture_on(dir, &comm.device().expect("NCCL names its GPU"));
    train_all(&f, &dir.join("plain"), &Comm::single());
    train_all(&f, &dir.join("nccl"), &comm);
    assert!(comm.stats().calls > 0, "the NCCL collectives ran");
    assert_same_runs(&dir.join("plain"), &dir.join("nccl"), "NCCL");
    comm.finish();
}
