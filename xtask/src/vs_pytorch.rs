//! `cargo xtask bench train --vs-pytorch`: each `cocomix bench train` case, then the same
//! step in PyTorch eager (`scripts/bench-pytorch.py`), back to back per case so that both
//! sides see the same machine load; prints tokens/s of both, the ratio and peak memory.
//!
//! Options: `--small` (default shape only), `--case CASE` (repeatable; a subset of the
//! cases), `--threads N` (both sides; default: all cores), `--batch N` (69M cases),
//! `--precision f32|bf16` (bf16: our bf16 matmuls against PyTorch's bf16 autocast),
//! `--python PY` (default `$COCOMIX_PYTHON`, else `python3`), `--json`.
use std::path::Path;
use std::process::{exit, Command};

use serde_json::{json, Value};

const DEFAULT_CASES: [&str; 4] = [
    "train-default-ntp",
    "train-default-kd",
    "train-default-cocomix-cached",
    "train-default-cocomix-online",
];
const BIG_CASES: [&str; 4] = [
    "train-69m-ntp",
    "train-69m-kd",
    "train-69m-cocomix-cached",
    "train-69m-cocomix-online",
];

struct Opts {
    cases: Vec<String>,
    threads: usize,
    batch: Option<String>,
    precision: String,
    python: String,
    json: bool,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("xtask: {msg}");
    exit(2)
}

fn parse(args: &[String]) -> Opts {
    let mut small = false;
    let mut o = Opts {
        cases: Vec::new(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        batch: None,
        precision: "f32".into(),
        python: std::env::var("COCOMIX_PYTHON").unwrap_or_else(|_| "python3".into()),
        json: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| fail(format!("{a} needs a value")))
        };
        match a.as_str() {
            "--vs-pytorch" => {}
            "--small" => small = true,
            "--json" => o.json = true,
            "--case" => o.cases.push(value()),
            "--threads" => {
                let v = value();
                o.threads = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| fail(format!("--threads {v:?}: a positive integer")));
            }
            "--batch" => o.batch = Some(value()),
            "--precision" => {
                o.precision = value();
                if o.precision != "f32" && o.precision != "bf16" {
                    fail(format!(
                        "--precision {:?}: f32 or bf16 (PyTorch has no f16 CPU autocast)",
                        o.precision
                    ));
                }
            }
            "--python" => o.python = value(),
            other => fail(format!(
                "bench train --vs-pytorch: unknown argument {other:?}"
            )),
        }
    }
    if o.cases.is_empty() {
        let big: &[&str] = if small { &[] } else { &BIG_CASES };
        o.cases = DEFAULT_CASES
            .iter()
            .chain(big)
            .map(|s| s.to_string())
            .collect();
    }
    o
}

/// Runs `cmd`, returns the JSON object on the last line of its stdout.
fn run_json(mut cmd: Command, what: &str) -> Value {
    let out = cmd
        .output()
        .unwrap_or_else(|e| fail(format!("could not run {what}: {e}")));
    if !out.status.success() {
        fail(format!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| fail(format!("{what} printed {line:?}, not JSON: {e}")))
}

/// The whole comparison; `bin` is the release `cocomix` binary.
pub fn run(root: &Path, bin: &Path, args: &[String]) -> ! {
    let o = parse(args);
    let script = root.join("scripts/bench-pytorch.py");
    let probe = Command::new(&o.python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output();
    let torch = match probe {
        Ok(p) if p.status.success() => String::from_utf8_lossy(&p.stdout).trim().to_string(),
        _ => fail(format!(
            "{} cannot import torch. Install it (the CPU wheel is enough):\n  \
             python3 -m venv venv && venv/bin/pip install torch --index-url \
             https://download.pytorch.org/whl/cpu\nthen pass --python venv/bin/python \
             (or set COCOMIX_PYTHON).",
            o.python
        )),
    };
    let threads = o.threads.to_string();
    let mut rows = Vec::new();
    for case in &o.cases {
        eprintln!("xtask: {case}: cocomix …");
        let mut ours = Command::new(bin);
        ours.current_dir(root)
            .env("RAYON_NUM_THREADS", &threads)
            .args([
                "bench",
                "train",
                "--case",
                case,
                "--precision",
                &o.precision,
            ]);
        if let Some(b) = &o.batch {
            ours.args(["--batch", b]);
        }
        let ours = run_json(ours, &format!("cocomix bench train --case {case}"));
        eprintln!("xtask: {case}: PyTorch …");
        // PyTorch trains at exactly the shapes our case reports (model, teacher, SAE, batch).
        let mut theirs = Command::new(&o.python);
        theirs.current_dir(root).arg(&script).args([
            "--case",
            case,
            "--threads",
            &threads,
            "--precision",
            &o.precision,
            "--shapes",
            &ours["shapes"].to_string(),
        ]);
        let theirs = run_json(theirs, &format!("bench-pytorch.py --case {case}"));
        if theirs["shapes"] != ours["shapes"] {
            fail(format!(
                "{case}: PyTorch ran at {} but cocomix at {}",
                theirs["shapes"], ours["shapes"]
            ));
        }
        let tps = |v: &Value| v["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        rows.push(json!({
            "case": case,
            "cocomix_tokens_per_s": tps(&ours),
            "pytorch_tokens_per_s": tps(&theirs),
            "ratio": tps(&ours) / tps(&theirs),
            "cocomix_peak_rss_mib": ours["peak_rss_mib"],
            "pytorch_peak_rss_mib": theirs["peak_rss_mib"],
            "cocomix": ours,
            "pytorch": theirs,
        }));
    }
    if o.json {
        let report = json!({
            "bench": "train-vs-pytorch", "torch": torch, "threads": o.threads,
            "precision": o.precision, "results": rows,
        });
        println!("{report}");
    } else {
        println!(
            "{} threads, {}, torch {torch}\n{:<30} {:>13} {:>13} {:>7} {:>11} {:>11}",
            o.threads,
            o.precision,
            "case",
            "cocomix tok/s",
            "PyTorch tok/s",
            "ratio",
            "cocomix MiB",
            "PyTorch MiB"
        );
        for r in &rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:<30} {:>13.0} {:>13.0} {:>6.2}x {:>11.0} {:>11.0}",
                r["case"].as_str().unwrap_or_default(),
                f("cocomix_tokens_per_s"),
                f("pytorch_tokens_per_s"),
                f("ratio"),
                f("cocomix_peak_rss_mib"),
                f("pytorch_peak_rss_mib")
            );
        }
    }
    exit(0)
}
