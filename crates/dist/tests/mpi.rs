//! The MPI backend across two processes: this test binary runs itself under
//! `mpirun -np 2` (skipped, with a message, without the `mpi` feature or `mpirun`).
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use cocomix_dist::{Backend, Comm, DistConfig, Error, ReduceOp};
use half::bf16;

const CHILD: &str = "COCOMIX_DIST_TEST_CHILD";

/// Runs test `name` of this binary as 2 MPI ranks; `None` when skipped.
fn under_mpirun(name: &str) -> Option<std::process::Output> {
    if cfg!(not(feature = "mpi")) {
        eprintln!("skipped {name}: built without the `mpi` feature (cargo test --features mpi)");
        return None;
    }
    let Some(mut cmd) = cocomix_dist::mpirun_command(2) else {
        eprintln!("skipped {name}: no mpirun on PATH (apt-get install openmpi-bin libopenmpi-dev)");
        return None;
    };
    let out = cmd
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    Some(out)
}

fn mpi(timeout_s: f64) -> Comm {
    Comm::init(&DistConfig {
        backend: Backend::Mpi,
        timeout_s,
        bucket_mb: 16.0 / (1 << 20) as f64, // 16-byte buckets: several per call
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn collectives_combine_the_values_of_both_ranks() {
    if std::env::var_os(CHILD).is_some() {
        let c = mpi(60.0);
        assert_eq!(c.world(), 2);
        let r = c.rank() as f32;
        let mut x = vec![1.0 + r, 10.0 * r, -3.0];
        c.all_reduce_f32(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x, [3.0, 10.0, -6.0]);
        c.all_reduce_f32(&mut x, ReduceOp::Mean).unwrap();
        assert_eq!(x, [3.0, 10.0, -6.0]);
        let mut d = vec![0.25 + r as f64];
        c.all_reduce_f64(&mut d, ReduceOp::Mean).unwrap();
        assert_eq!(d, [0.75]);
        let mut h = vec![bf16::from_f32(1.5), bf16::from_f32(r)];
        c.all_reduce_bf16(&mut h, ReduceOp::Sum).unwrap();
        assert_eq!(h, [bf16::from_f32(3.0), bf16::from_f32(1.0)]);
        // Tensors of several shapes in several buckets, f32 and bf16.
        let ts = vec![
            Tensor::new(&[[1f32 + r, 2.], [3., 4.]], &Device::Cpu).unwrap(),
            Tensor::new(&[5f32 * r], &Device::Cpu).unwrap(),
            Tensor::new(&[1f32, 2., 3., 4., 5., 6.], &Device::Cpu).unwrap(),
            Tensor::new(&[2f32 * r], &Device::Cpu)
                .unwrap()
                .to_dtype(candle_core::DType::BF16)
                .unwrap(),
        ];
        let s = c.all_reduce_tensors(&ts, ReduceOp::Mean).unwrap();
        assert_eq!(s[0].to_vec2::<f32>().unwrap(), [[1.5, 2.], [3., 4.]]);
        assert_eq!(s[1].to_vec1::<f32>().unwrap(), [2.5]);
        assert_eq!(s[2].to_vec1::<f32>().unwrap(), [1., 2., 3., 4., 5., 6.]);
        assert_eq!(s[3].to_vec1::<bf16>().unwrap(), [bf16::from_f32(1.0)]);
        let stats = c.stats();
        assert!(stats.calls >= 7 && stats.bytes > 0, "{stats:?}");
        // Broadcast from rank 1, of a length only rank 1 knows.
        let msg = format!("hello from rank {}", c.rank());
        assert_eq!(
            c.broadcast_bytes(msg.as_bytes(), 1).unwrap(),
            b"hello from rank 1"
        );
        c.barrier().unwrap();
        // A fingerprint that differs on rank 1 fails on both ranks, naming rank 1.
        c.check_same("config", "same").unwrap();
        let e = c
            .check_same("config", &format!("cfg-{}", c.rank()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1") && e.contains("config"), "{e}");
        // A failure on rank 1 alone reaches rank 0 with its message.
        let local: Result<(), Error> = if c.rank() == 1 {
            Err(Error::Other("the disk is full".into()))
        } else {
            Ok(())
        };
        let e = c.agree(local).unwrap_err().to_string();
        assert!(e.contains("the disk is full"), "{e}");
        if c.rank() == 0 {
            assert!(e.starts_with("rank 1 failed"), "{e}");
        }
        println!("rank {} ok", c.rank());
        c.finish();
        return;
    }
    let Some(out) = under_mpirun("collectives_combine_the_values_of_both_ranks") else {
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("rank 0 ok") && text.contains("rank 1 ok"),
        "{text}"
    );
}

#[test]
fn a_rank_that_stops_answering_ends_the_job_after_the_timeout() {
    if std::env::var_os(CHILD).is_some() {
        let c = mpi(2.0);
        c.set_phase("step 7");
        if c.rank() == 1 {
            // Hangs (as a deadlocked or stopped rank would) far past rank 0's deadline.
            std::thread::sleep(Duration::from_secs(120));
        }
        let mut x = vec![1f32];
        c.all_reduce_f32(&mut x, ReduceOp::Sum).unwrap();
        unreachable!("rank 0's all-reduce cannot complete");
    }
    let t0 = Instant::now();
    let Some(out) = under_mpirun("a_rank_that_stops_answering_ends_the_job_after_the_timeout")
    else {
        return;
    };
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("rank 0: all-reduce during step 7 has waited 2 s"),
        "{text}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
}
