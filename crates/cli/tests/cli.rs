//! The `cocomix` binary from the outside.
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use cocomix_data::Tokenizer;
use cocomix_model::{ConceptConfig, Gpt2Config, Student, StudentConfig};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cocomix"));
    c.env("RUST_LOG", "warn").env("RAYON_NUM_THREADS", "1");
    c
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().expect("runs");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        c,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

const TEXT: &str =
    "the cat sat on the mat and the dog sat on the log while the bird sang in the tree. ";

/// A folder with the golden teacher's weights and a small tokenizer whose ids fit its vocabulary.
fn teacher_with_tokenizer(dir: &Path) -> PathBuf {
    let t = dir.join("teacher");
    std::fs::create_dir_all(&t).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden().join("teacher").join(f), t.join(f)).unwrap();
    }
    Tokenizer::train_bpe([TEXT.repeat(20)].iter(), 300)
        .unwrap()
        .save(&t)
        .unwrap();
    t
}

#[test]
fn eval_ppl_json_matches_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher_with_tokenizer(dir.path());
    let text = dir.path().join("t.txt");
    std::fs::write(&text, TEXT.repeat(3)).unwrap();
    let out = run_ok(
        bin()
            .args(["eval", "ppl", "--model"])
            .arg(&t)
            .arg("--text")
            .arg(&text)
            .args(["--seq-len", "16", "--json"]),
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tok = Tokenizer::from_dir(&t).unwrap().unwrap();
    let ids = tok.encode(&TEXT.repeat(3)).unwrap();
    assert_eq!(
        v["tokens"].as_u64().unwrap() as usize,
        ids.len(),
        "every token scored"
    );
    // Independent: lm-eval's rolling windows of 16 (the first token predicted from EOT, the
    // last window reading a full context), mean CE via the library's model directly.
    let g = cocomix_model::Gpt2::load(t.to_str().unwrap(), &Device::Cpu).unwrap();
    let all: Vec<u32> = std::iter::once(tok.eot_id()).chain(ids.clone()).collect();
    let (mut sum, mut n) = (0f64, 0usize);
    let mut predicted = 0;
    while predicted < ids.len() {
        let m = 16.min(ids.len() - predicted); // tokens this window predicts
        let end = predicted + m + 1; // in `all`, exclusive
        let start = end.saturating_sub(17);
        let input = &all[start..end - 1];
        let x = Tensor::new(input, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = g
            .forward(&x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for p in input.len() - m..input.len() {
            let row = &logits[p];
            let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = mx + row.iter().map(|&z| (z as f64 - mx).exp()).sum::<f64>().ln();
            sum += lse - row[all[start + p + 1] as usize] as f64;
            n += 1;
        }
        predicted += m;
    }
    assert_eq!(n, ids.len());
    let nll = sum / n as f64;
    assert!(
        (v["nll"].as_f64().unwrap() - nll).abs() < 1e-4,
        "{v} vs {nll}"
    );
    assert!((v["ppl"].as_f64().unwrap() - nll.exp()).abs() < 1e-3 * nll.exp());
    // Word perplexity over lm-eval's word count (whitespace runs + 1; TEXT ends in a space).
    let words = TEXT.repeat(3).split(' ').count();
    assert_eq!(v["words"].as_u64().unwrap() as usize, words);
    let wp = (sum / words as f64).exp();
    assert!((v["word_perplexity"].as_f64().unwrap() - wp).abs() < 1e-3 * wp);
}

#[test]
fn eval_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher_with_tokenizer(dir.path());
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = bin()
        .args(["eval", "ppl", "--model"])
        .arg(&t)
        .arg("--text")
        .arg(&empty)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{}: need at least two tokens to score",
            empty.display()
        )),
        "{err}"
    );
    // A missing task file names the folder and the files looked for, before any work.
    let out = bin()
        .args(["eval", "tasks", "--model"])
        .arg(&t)
        .args(["--tasks", "piqa,winogrande", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            &dir.path()
                .join("piqa")
                .join("requests.jsonl.gz")
                .display()
                .to_string()
        ),
        "{err}"
    );
    // Unknown task names are refused by the argument parser.
    let out = bin()
        .args(["eval", "tasks", "--model"])
        .arg(&t)
        .args(["--tasks", "piqa,bogus"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    // A run folder without a report names the report.
    let out = bin()
        .args(["eval", "runs"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&dir.path().join("report.json").display().to_string()),
        "{err}"
    );
}

#[test]
fn sae_encode_and_attribute_print_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher_with_tokenizer(dir.path());
    let text = dir.path().join("t.txt");
    std::fs::write(&text, TEXT).unwrap();
    let sae = golden().join("sae.pt");
    let out = run_ok(
        bin()
            .args(["sae", "encode", "--sae"])
            .arg(&sae)
            .arg("--model")
            .arg(&t)
            .args(["--layer", "1", "--text"])
            .arg(&text)
            .arg("--json"),
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let n = v["tokens"].as_array().unwrap().len();
    assert_eq!(v["indices"].as_array().unwrap().len(), n);
    for row in v["values"].as_array().unwrap() {
        let r: Vec<f64> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(r.len(), 8);
        assert!(
            r.windows(2).all(|w| w[0] >= w[1]),
            "sorted descending: {r:?}"
        );
    }
    let out = run_ok(
        bin()
            .args(["attribute", "--teacher"])
            .arg(&t)
            .arg("--sae")
            .arg(&sae)
            .args(["--layer", "1", "--k-attr", "4", "--text"])
            .arg(&text)
            .arg("--json"),
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["labels"].as_array().unwrap().len(), n);
    assert_eq!(v["scores"][0].as_array().unwrap().len(), 4);
    // A tokenizer that does not fit the model is a clear error.
    let gpt2_dir = dir.path().join("gpt2tok");
    std::fs::create_dir_all(&gpt2_dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden().join("teacher").join(f), gpt2_dir.join(f)).unwrap();
    }
    std::fs::write(
        &text,
        "Hello world, this text uses GPT-2 ids far above 512.",
    )
    .unwrap();
    let out = bin()
        .args(["sae", "encode", "--sae"])
        .arg(&sae)
        .arg("--model")
        .arg(&gpt2_dir)
        .args(["--layer", "1", "--text"])
        .arg(&text)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the model's vocabulary"));
}

#[test]
fn generate_with_and_without_steering() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::train_bpe([TEXT.repeat(20)].iter(), 300).unwrap();
    let cfg = StudentConfig {
        gpt2: Gpt2Config::new(tok.vocab_size(), 32, 16, 2, 2).with_dropout(0.0),
        concept: Some(ConceptConfig {
            concept_dim: 24,
            concept_num: 4,
            insert_layer_index: 1,
            interleave: true,
        }),
        pause: None,
    };
    let m = dir.path().join("student");
    Student::new(&cfg, 1, &Device::Cpu)
        .unwrap()
        .save(&m)
        .unwrap();
    tok.save(&m).unwrap();
    let gen = |extra: &[&str]| {
        run_ok(
            bin()
                .args(["generate", "--model"])
                .arg(&m)
                .args(["--prompt", "the cat", "--max-new-tokens", "6"])
                .args(extra),
        )
    };
    let plain = gen(&[]);
    assert!(plain.starts_with("the cat"));
    assert_eq!(plain, gen(&[]), "greedy decoding is deterministic");
    let steered = gen(&["--steer", "3=50", "--steer", "7=-50", "--force-topk"]);
    assert!(steered.starts_with("the cat"));
    assert_ne!(steered, plain, "steering changes the generated text");
    assert_eq!(gen(&["--steer", "3=0"]), plain, "adding 0 changes nothing");
    assert_ne!(
        gen(&["--steer", "3=400", "--steer-mode", "set", "--force-topk"]),
        plain
    );
    let out = bin()
        .args(["generate", "--model"])
        .arg(&m)
        .args(["--prompt", "x", "--steer", "99=1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"));
}

#[test]
fn generate_steers_a_gpt2_through_its_sae_latents() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher_with_tokenizer(dir.path());
    let sae = golden().join("sae.pt");
    let gen = |extra: &[&str]| {
        run_ok(
            bin()
                .args(["generate", "--model"])
                .arg(&t)
                .args(["--prompt", "the cat sat", "--max-new-tokens", "12"])
                .arg("--sae")
                .arg(&sae)
                .args(["--layer", "1"])
                .args(extra),
        )
    };
    let plain = gen(&[]);
    assert_eq!(gen(&["--steer", "5=0"]), plain, "adding 0 changes nothing");
    let steered = gen(&[
        "--steer",
        "3=60",
        "--steer",
        "100=60",
        "--steer-mode",
        "set",
    ]);
    assert_ne!(
        steered, plain,
        "a strong SAE steer changes the generated text"
    );
}

const TINY: &str = r#"
[run]
name = "tiny"
out_dir = "OUT"
seed = 3
objectives = ["ntp", "cocomix"]
[data]
inputs = ["CORPUS"]
dir = "OUT/data"
tokenizer = "train"
vocab_size = 300
val_fraction = 0.2
split_seed = 1
[teacher]
source = "train"
layer = 0
[teacher.train]
n_layer = 2
d_model = 16
n_head = 2
steps = 4
lr = 1e-3
[sae]
source = "train"
n_latents = 32
k = 4
steps = 4
batch_tokens = 64
lr = 1e-3
[concept]
k_attr = 2
lambda = 0.1
concept_num = 4
insert_layer = 1
labels = "cache"
label_mode = "faithful"
cache_windows = 64
[model]
n_layer = 2
d_model = 16
d_model_ntp = 16
n_head = 2
context = 16
dropout = 0.1
[optim]
lr = 1e-3
min_lr = 1e-4
warmup = 2
steps = 200
batch_size = 4
grad_accum = 1
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
clip = 1.0
[kd]
alpha = 1.0
tau = 1.0
[eval]
every = 50
max_val_blocks = 4
[checkpoint]
every = 2
keep_last = 2
"#;

fn tiny_config(dir: &Path, out: &str) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, TEXT.repeat(40)).unwrap();
    std::fs::write(dir.join("corpus2.txt"), TEXT.repeat(10)).unwrap();
    let cfg = TINY
        .replace("OUT", &dir.join(out).display().to_string())
        .replace(
            "\"CORPUS\"",
            &format!(
                "\"{}\", \"{}\"",
                corpus.display(),
                dir.join("corpus2.txt").display()
            ),
        );
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(&p, cfg).unwrap();
    p
}

fn metric_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn a_sigkilled_run_resumes_to_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let full_cfg = tiny_config(dir.path(), "full");
    run_ok(bin().args(["train", "--config"]).arg(&full_cfg));
    let full = dir.path().join("full/tiny/cocomix/seed-3");
    for f in ["compare.md", "compare.json", "compare.png"] {
        assert!(dir.path().join("full/tiny").join(f).is_file(), "{f}");
    }

    let cfg = tiny_config(dir.path(), "killed");
    let mut child = bin().args(["train", "--config"]).arg(&cfg).spawn().unwrap();
    let run = dir.path().join("killed/tiny/cocomix/seed-3");
    let t0 = std::time::Instant::now();
    // Kill -9 once the CoCoMix student has checkpointed step 10 or later.
    let newest = |run: &Path| -> u64 {
        std::fs::read_dir(run.join("checkpoints"))
            .map(|rd| {
                rd.filter_map(|e| {
                    e.ok()?
                        .file_name()
                        .to_str()?
                        .strip_prefix("step-")?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    while newest(&run) < 10 {
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint appeared");
        if let Some(s) = child.try_wait().unwrap() {
            panic!("finished before it could be killed: {s}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(!run.join("final").exists(), "killed before the end");
    let at_kill = newest(&run);
    // The same command again continues the interrupted job.
    run_ok(bin().args(["train", "--config"]).arg(&cfg));
    assert_eq!(metric_losses(&run), metric_losses(&full));
    // The run continued from the newest checkpoint the killed process left, not from step 0.
    let resumed: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["resumed_from"].as_u64()
        })
        .collect();
    assert!(
        resumed == [at_kill],
        "resumed_from {resumed:?}, newest checkpoint at the kill {at_kill}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["resumed_from"].as_u64(), Some(resumed[0]));
    // A second call reuses every stage.
    let out = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("reusing the finished run")
            && log.contains("reusing the SAE")
            && log.contains("reusing the small teacher"),
        "{log}"
    );
}

#[test]
fn prepare_only_builds_the_shared_stages_and_trains_no_student() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path(), "prep");
    // `compare` with its arm list and a λ sweep: the shared stages only.
    let out = run_ok(
        bin()
            .args(["compare", "--prepare-only", "--config"])
            .arg(&cfg)
            .args(["--objectives", "ntp,cocomix,cocomix[lambda=0.3]"])
            .args(["--lambdas", "0.03"]),
    );
    assert!(out.contains("Teacher:"), "{out}");
    let root = dir.path().join("prep/tiny");
    assert!(root.join("teacher/final/model.safetensors").is_file());
    let saes: Vec<_> = std::fs::read_dir(root.join("sae")).unwrap().collect();
    assert!(!saes.is_empty(), "no SAE in {}", root.display());
    let labels = std::fs::read_dir(dir.path().join("prep/data"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("labels-")
        })
        .count();
    assert_eq!(labels, 1, "one label cache");
    for student in ["ntp", "cocomix"] {
        assert!(!root.join(student).exists(), "{student} was trained");
    }
    assert!(!root.join("compare.md").exists());
    // An unknown arm is an error naming it, before any work.
    let bad = bin()
        .args(["compare", "--config"])
        .arg(&cfg)
        .args(["--objectives", "ntp,bogus"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("bogus") && !err.contains("panicked"), "{err}");
}

#[test]
fn bad_configs_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path(), "bad");
    let out = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .args(["--set", "concept.insert_layer=5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("insert_layer") && err.contains("bad.toml"),
        "{err}"
    );
    assert!(!dir.path().join("bad").exists(), "nothing was written");
}

#[test]
fn parity_compares_every_golden_tensor() {
    let out = run_ok(bin().args(["parity", "--json", "--golden"]).arg(golden()));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["failed"].as_array().unwrap().len(), 0, "{v}");
    let checked = |against: &str| -> Vec<String> {
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["against"] == against && t["ok"] == true)
            .map(|t| t["tensor"].as_str().unwrap().to_string())
            .collect()
    };
    let exp = candle_core::safetensors::load(golden().join("expected.safetensors"), &Device::Cpu)
        .unwrap();
    for name in exp.keys().filter(|n| *n != "input_ids") {
        assert!(
            checked("golden").contains(name),
            "{name} compared with the golden file"
        );
        assert!(
            checked("cpu").contains(name),
            "{name} compared with the CPU"
        );
    }
    for n in [
        "grad.wte.weight",
        "grad.h.1.attn.c_proj.weight",
        "grad.ln_f.bias",
    ] {
        assert!(checked("cpu").contains(&n.to_string()), "{n} compared");
    }
}

#[test]
fn parity_fails_loudly_naming_the_tensor() {
    // A golden folder whose expected loss_total is off by 0.5 and whose labels hold a NaN.
    let dir = tempfile::tempdir().unwrap();
    for sub in ["teacher", "student"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(golden().join(sub).join(f), dir.path().join(sub).join(f)).unwrap();
        }
    }
    std::fs::copy(
        golden().join("sae.safetensors"),
        dir.path().join("sae.safetensors"),
    )
    .unwrap();
    let mut exp =
        candle_core::safetensors::load(golden().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let total = (exp["loss_total"].clone() + 0.5).unwrap();
    exp.insert("loss_total".into(), total);
    let mut scores: Vec<f32> = exp["label_scores"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    scores[5] = f32::NAN;
    exp.insert(
        "label_scores".into(),
        Tensor::from_vec(scores, exp["label_scores"].shape(), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&exp, dir.path().join("expected.safetensors")).unwrap();
    let out = bin()
        .args(["parity", "--json", "--golden"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "parity must exit non-zero");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loss_total (vs golden): beyond tolerance")
            && err.contains("label_scores (vs golden): 1 NaN/Inf value(s) in the reference"),
        "{err}"
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["failed"].as_array().unwrap().len(), 2, "{v}");
}

#[test]
fn bench_report_keeps_its_json_shape() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.jsonl");
    let doc = serde_json::json!({ "text": TEXT.repeat(20) }).to_string();
    std::fs::write(&corpus, vec![doc; 20].join("\n")).unwrap();
    let out = run_ok(
        bin()
            .args(["bench", "data", "--json", "--corpus"])
            .arg(&corpus),
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["bench"], "data");
    assert!(v["device"].is_string() && v["threads"].as_u64().unwrap() >= 1);
    let r = &v["results"][0];
    assert_eq!(r["case"], "data");
    assert!(r["peak_rss_mib"].as_f64().unwrap() > 0.0);
    assert!(r["tokenize_tokens_per_s"].as_f64().unwrap() > 0.0);
}

fn llama_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/llama")
        .join(name)
}

#[test]
fn eval_and_generate_take_a_llama_with_its_own_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT.repeat(3)).unwrap();
    // A GGUF: the model and its tokenizer from the one file.
    let out = run_ok(
        bin()
            .args(["eval", "ppl", "--model"])
            .arg(llama_fixture("tiny-q8_0.gguf"))
            .arg("--text")
            .arg(&text)
            .args(["--seq-len", "32", "--json"]),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let n = Tokenizer::load(&llama_fixture("tiny-q8_0.gguf").display().to_string())
        .unwrap()
        .encode(&TEXT.repeat(3))
        .unwrap()
        .len();
    assert_eq!(v["tokens"], n, "every token predicted once: {v}");
    assert!(v["ppl"].as_f64().unwrap().is_finite(), "{v}");

    // An HF folder, steered through a width-32 SAE at its block 1 of 3.
    let dev = Device::Cpu;
    let sae = dir.path().join("sae.safetensors");
    cocomix_sae::Sae::new(
        Tensor::zeros(32, candle_core::DType::F32, &dev).unwrap(),
        Tensor::randn(0f32, 1.0, (64, 32), &dev).unwrap(),
        Tensor::zeros(64, candle_core::DType::F32, &dev).unwrap(),
        Tensor::randn(0f32, 1.0, (32, 64), &dev).unwrap(),
        8,
        "test".into(),
    )
    .unwrap()
    .save(&sae, &[])
    .unwrap();
    let gen = |layer: &str, extra: &[&str]| {
        bin()
            .args(["generate", "--model"])
            .arg(llama_fixture("hf"))
            .args(["--prompt", "the cat sat", "--max-new-tokens", "12"])
            .arg("--sae")
            .arg(&sae)
            .args(["--layer", layer])
            .args(extra)
            .output()
            .unwrap()
    };
    let text_of = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let plain = text_of(gen("1", &[]));
    assert!(plain.starts_with("the cat sat"), "{plain}");
    assert_eq!(text_of(gen("1", &["--steer", "5=0"])), plain);
    let steered = text_of(gen(
        "1",
        &["--steer", "3=80", "--steer", "9=80", "--steer-mode", "set"],
    ));
    assert_ne!(
        steered, plain,
        "a strong SAE steer changes the generated text"
    );
    let e = gen("3", &["--steer", "5=1"]);
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("--layer 3")
            && String::from_utf8_lossy(&e.stderr).contains("has 3 blocks"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
}
