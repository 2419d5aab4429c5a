//! `cargo xtask`: builds the `cocomix` binary in release mode and runs the project's jobs.
//!
//! ```text
//! cargo xtask train [--features cuda|metal|mpi|nccl] ...  the main job: cocomix train ARGS
//! cargo xtask compare [ARGS...]                          objectives over seeds: cocomix compare ARGS
//! cargo xtask eval RUN_DIR...                            comparison table of finished runs
//! cargo xtask bench WHAT [--json]                        benchmarks: cocomix bench WHAT
//!                                                        (`dist` builds with --features mpi)
//! cargo xtask bench train --vs-pytorch [--small]         the train cases against PyTorch eager
//! cargo xtask run [ARGS...]                              any cocomix subcommand
//! ```
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

mod vs_pytorch;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo xtask <train|compare|eval|bench|run> [--features cuda|metal|mpi|nccl] [ARGS...]\n\n\
         train   the main job: cocomix train [--config FILE] [--set k=v]\n\
         compare cocomix compare --config FILE [--seeds N] [--objectives a,b] [--lambdas x,y]\n\
         eval    cocomix eval runs RUN_DIR... (default: runs/default)\n\
         bench   cocomix bench WHAT [--json]  (WHAT: data, model, sae, attribution, train, eval, smollm2, dist)\n\
         \x20       bench train --vs-pytorch [--small] [--python PY] [--threads N]: each train\n\
         \x20       case, then the same step in PyTorch eager (scripts/bench-pytorch.py)\n\
         run     run any cocomix subcommand with the release binary"
    );
    exit(2)
}

/// Builds the release binary with the requested backend features and returns its path.
fn build(features: &[String]) -> PathBuf {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args([
        "build",
        "--release",
        "--package",
        "cocomix-cli",
        "--bin",
        "cocomix",
    ]);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let status = cmd.status().unwrap_or_else(|e| {
        eprintln!("xtask: could not run cargo: {e}");
        exit(1)
    });
    if !status.success() {
        exit(status.code().unwrap_or(1));
    }
    root().join("target/release/cocomix")
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args[0] == "-h" || args[0] == "--help" {
        usage();
    }
    let task = args.remove(0);
    let mut features = Vec::new();
    while let Some(i) = args.iter().position(|a| a == "--features") {
        if i + 1 >= args.len() {
            usage();
        }
        let f = args.remove(i + 1);
        args.remove(i);
        for f in f.split(',') {
            if !["cuda", "metal", "mpi", "nccl"].contains(&f) {
                eprintln!("xtask: unknown feature {f:?} (cuda, metal, mpi or nccl)");
                exit(2);
            }
            features.push(f.to_string());
        }
    }
    let sub: Vec<String> = match task.as_str() {
        "train" | "compare" => std::iter::once(task.clone()).chain(args).collect(),
        "eval" => {
            let runs = if args.is_empty() {
                vec!["runs/default".to_string()]
            } else {
                args
            };
            ["eval", "runs"]
                .iter()
                .map(|s| s.to_string())
                .chain(runs)
                .collect()
        }
        "bench" => {
            // The data-parallel bench runs MPI ranks of the binary.
            if args.first().is_some_and(|a| a == "dist") && !features.iter().any(|f| f == "mpi") {
                features.push("mpi".to_string());
            }
            std::iter::once("bench".to_string()).chain(args).collect()
        }
        "run" => args,
        _ => usage(),
    };
    let bin = build(&features);
    if sub.len() > 1 && sub[1] == "train" && sub.iter().any(|a| a == "--vs-pytorch") {
        vs_pytorch::run(&root(), &bin, &sub[2..]);
    }
    let status = Command::new(&bin)
        .current_dir(root())
        .args(&sub)
        .status()
        .unwrap_or_else(|e| {
            eprintln!("xtask: could not run {}: {e}", bin.display());
            exit(1)
        });
    exit(status.code().unwrap_or(1));
}
