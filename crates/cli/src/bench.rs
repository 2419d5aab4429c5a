//! `cocomix bench`: throughput and peak memory, printed as JSON with `--json`.
//!
//! Each case runs in a child process (the same binary with `--case`), so the peak resident
//! memory reported is that case's alone.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use cocomix_model::{ConceptConfig, Dropout, Gpt2, Gpt2Config, Params, Student, StudentConfig};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    what: What,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Corpus to measure tokenization on (bench data).
    #[arg(long, default_value = "assets/corpus/default.jsonl.gz")]
    corpus: PathBuf,
    /// Skip the large (paper-sized) cases.
    #[arg(long)]
    small: bool,
    /// Sequences per step of the 69M `train` cases (default 1).
    #[arg(long)]
    batch: Option<usize>,
    /// Matmul precision of the `train` cases: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Run one case in this process (used internally).
    #[arg(long, hide = true)]
    case: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    /// Tokenization MB/s and tokens/s, shard read tokens/s.
    Data,
    /// Student forward+backward and teacher residual_grad tokens/s.
    Model,
    /// SAE encode and training tokens/s (d = 768, C = 32768, k = 32).
    Sae,
    /// Online labels/s (GPT-2 124M shapes, T = 1024) and a cached epoch versus online.
    Attribution,
    /// One optimizer step per objective, and the CoCoMix/NTP time and FLOP ratios.
    Train,
    /// HellaSwag requests/s (4 alternatives per document) with a GPT-2 124M-shaped model.
    Eval,
    /// SmolLM2-135M as a teacher (the GGUF of scripts/fetch-smollm2.sh; skipped when
    /// absent): forward tokens/s at T = 128 and 1024, residual gradient at its middle layer,
    /// label-cache build.
    Smollm2,
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn cases(what: What, small: bool) -> Vec<&'static str> {
    let big: &[&str] = match what {
        What::Data => &[],
        What::Model => &["69m-ntp", "69m-cocomix", "residual-grad-124m"],
        What::Sae => &["sae-train-768x32768"],
        What::Attribution => &["labels-online-124m", "labels-cached-vs-online-124m"],
        What::Train => &[
            "train-69m-ntp",
            "train-69m-kd",
            "train-69m-cocomix-cached",
            "train-69m-cocomix-online",
        ],
        What::Eval | What::Smollm2 => &[],
    };
    let base: &[&str] = match what {
        What::Data => &["data"],
        What::Model => &["tiny-ntp", "tiny-cocomix"],
        What::Sae => &["sae-encode-768x32768"],
        What::Attribution => &[],
        What::Train => &[
            "train-default-ntp",
            "train-default-kd",
            "train-default-cocomix-cached",
            "train-default-cocomix-online",
        ],
        What::Eval => &["eval-hellaswag-124m"],
        What::Smollm2 => &[
            "smollm2-forward-128",
            "smollm2-forward-1024",
            "smollm2-residual-grad",
            "smollm2-labels",
        ],
    };
    base.iter()
        .chain(if small { &[][..] } else { big })
        .copied()
        .collect()
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(case) = &args.case {
        let mut v = run_case(case, &args)?;
        v["peak_rss_mib"] = peak_rss_mib().into();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the cocomix binary")?;
    let mut results = Vec::new();
    for case in cases(args.what, args.small) {
        eprintln!("bench: {case} …");
        let out = std::process::Command::new(&exe)
            .args([
                "bench",
                what_name(args.what),
                "--case",
                case,
                "--precision",
                &args.precision,
                "--corpus",
            ])
            .arg(&args.corpus)
            .args(
                args.batch
                    .map(|b| vec!["--batch".to_string(), b.to_string()])
                    .unwrap_or_default(),
            )
            .output()
            .with_context(|| format!("running bench case {case}"))?;
        if !out.status.success() {
            anyhow::bail!(
                "bench case {case} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        results.push(
            serde_json::from_str::<serde_json::Value>(line.trim())
                .with_context(|| format!("case {case} printed {line:?}"))?,
        );
    }
    let mut report = serde_json::json!({ "bench": what_name(args.what), "device": format!("{:?}", dev()?), "threads": threads(), "results": results });
    if matches!(args.what, What::Train) {
        report["ratios"] = train_ratios(&results);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    }
    Ok(())
}

fn what_name(w: What) -> &'static str {
    match w {
        What::Data => "data",
        What::Model => "model",
        What::Sae => "sae",
        What::Attribution => "attribution",
        What::Train => "train",
        What::Eval => "eval",
        What::Smollm2 => "smollm2",
    }
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn run_case(case: &str, args: &BenchArgs) -> Result<serde_json::Value> {
    match case {
        "data" => data(&args.corpus),
        "tiny-ntp" => student_step(case, tiny(false), 16),
        "tiny-cocomix" => student_step(case, tiny(true), 16),
        "69m-ntp" => student_step(case, paper_69m(false), 1),
        "69m-cocomix" => student_step(case, paper_69m(true), 1),
        "residual-grad-124m" => residual_grad_124m(),
        "sae-encode-768x32768" => sae_encode(),
        "sae-train-768x32768" => sae_train(),
        "labels-online-124m" => labels_online(),
        "labels-cached-vs-online-124m" => labels_cached_vs_online(),
        c if c.starts_with("train-") => crate::bench_train::run(c, args.batch, &args.precision),
        "eval-hellaswag-124m" => eval_hellaswag(),
        c if c.starts_with("smollm2-") => smollm2(c),
        other => anyhow::bail!("unknown bench case {other}"),
    }
}

/// The default config's students (vocab 2048, T = 128, C = 1024, K_c = 16).
pub fn tiny(cocomix: bool) -> StudentConfig {
    let d = if cocomix { 96 } else { 112 };
    StudentConfig {
        gpt2: Gpt2Config::new(2048, 128, d, 4, 4),
        concept: cocomix.then_some(ConceptConfig {
            concept_dim: 1024,
            concept_num: 16,
            insert_layer_index: 1,
        }),
    }
}

/// The paper's 69M setting (the reference release's 69M config): CoCoMix d = 512, NTP d = 624, 8 layers, 8 heads,
/// insert layer 3, C = 32768, K_c = 32, T = 1024, GPT-2 vocabulary.
pub fn paper_69m(cocomix: bool) -> StudentConfig {
    let d = if cocomix { 512 } else { 624 };
    StudentConfig {
        gpt2: Gpt2Config::new(50257, 1024, d, 8, 8),
        concept: cocomix.then_some(ConceptConfig {
            concept_dim: 32768,
            concept_num: 32,
            insert_layer_index: 3,
        }),
    }
}

/// The device of this build (CUDA / Metal with those features, else the CPU).
pub fn dev() -> Result<Device> {
    Ok(cocomix_trainer::default_device()?)
}

fn random_ids(b: usize, t: usize, vocab: usize) -> Result<Tensor> {
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32)
        .collect();
    Ok(Tensor::from_vec(ids, (b, t), &dev()?)?)
}

/// Forward + backward of the student's loss (NTP, plus the concept loss for CoCoMix).
fn student_step(case: &str, cfg: StudentConfig, batch: usize) -> Result<serde_json::Value> {
    let s = Student::new(&cfg, 0, &dev()?)?;
    let t = cfg.gpt2.n_positions;
    let ids = random_ids(batch, t + 1, cfg.gpt2.vocab_size)?;
    let (x, y) = (ids.narrow(1, 0, t)?, ids.narrow(1, 1, t)?.flatten_all()?);
    let labels = cfg
        .concept
        .as_ref()
        .map(|c| {
            random_ids(batch * t, 4, c.concept_dim).and_then(|l| Ok(l.reshape((batch, t, 4))?))
        })
        .transpose()?;
    let step = |i: u64| -> Result<()> {
        let out = s.forward(&x, &mut Dropout::seeded(i))?;
        let v = out.logits.dim(2)?;
        let mut loss = cocomix_model::ops::cross_entropy(&out.logits.reshape(((), v))?, &y)?;
        if let (Some(cl), Some(l)) = (&out.concept_logits, &labels) {
            loss = (loss + (cocomix_model::ops::concept_loss(cl, l)? * 0.1)?)?;
        }
        loss.backward()?;
        Ok(())
    };
    step(0)?; // warm-up
    let (n, secs) = timed(step)?;
    let params: usize = s.vars().iter().map(|(_, v)| v.elem_count()).sum();
    Ok(serde_json::json!({
        "case": case, "params": params, "batch": batch, "seq_len": t,
        "fwd_bwd_tokens_per_s": (n * batch * t) as f64 / secs, "steps_timed": n,
    }))
}

/// Repeats `f` for about 3 s (at least twice, at most 20 times); returns (runs, seconds).
/// Waits for the device after each run (GPU ops return before they finish).
fn timed(mut f: impl FnMut(u64) -> Result<()>) -> Result<(usize, f64)> {
    let device = dev()?;
    let t0 = Instant::now();
    let mut n = 0;
    while n < 2 || (t0.elapsed().as_secs_f64() < 3.0 && n < 20) {
        f(n as u64 + 1)?;
        device.synchronize()?;
        n += 1;
    }
    Ok((n, t0.elapsed().as_secs_f64()))
}

fn residual_grad_124m() -> Result<serde_json::Value> {
    let cfg = Gpt2Config::gpt2_small().with_dropout(0.0);
    let g = Gpt2::new(&cfg, &mut Params::random(0, &dev()?, false))?;
    let ids = random_ids(1, 1024, cfg.vocab_size)?;
    g.residual_grad(&ids, 5)?;
    let (n, secs) = timed(|_| g.residual_grad(&ids, 5).map(|_| ()).map_err(Into::into))?;
    Ok(
        serde_json::json!({ "case": "residual-grad-124m", "layer": 5, "seq_len": 1024, "tokens_per_s": (n * 1024) as f64 / secs, "calls_timed": n }),
    )
}

fn data(corpus: &std::path::Path) -> Result<serde_json::Value> {
    let tok = cocomix_data::Tokenizer::gpt2()?;
    let docs = cocomix_data::read_documents(&[corpus.to_path_buf()])?;
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    let dir = std::env::temp_dir().join(format!("cocomix-bench-{}", std::process::id()));
    let opts = cocomix_data::PrepareOptions::new(vec![corpus.to_path_buf()], dir.join("data"));
    let t = Instant::now();
    let meta = cocomix_data::prepare(&opts, &tok)?;
    let prep_s = t.elapsed().as_secs_f64();
    let tokens = meta.train_tokens + meta.val_tokens;
    let data = cocomix_data::Dataset::open(dir.join("data"))?;
    let (b, t_len) = (16usize, 1024usize);
    let t = Instant::now();
    let (mut read, mut i) = (0usize, 0u64);
    while t.elapsed().as_secs_f64() < 1.0 {
        read += data.train_batch(b, t_len, 22, i)?.len();
        i += 1;
    }
    let read_s = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir).ok();
    Ok(serde_json::json!({
        "case": "data", "corpus": corpus.display().to_string(), "corpus_mb": bytes as f64 / 1e6,
        "tokenize_mb_per_s": bytes as f64 / 1e6 / prep_s, "tokenize_tokens_per_s": tokens as f64 / prep_s,
        "shard_read_tokens_per_s": read as f64 / read_s,
    }))
}

fn random_sae(d: usize, c: usize, k: usize) -> Result<cocomix_sae::Sae> {
    let dev = dev()?;
    Ok(cocomix_sae::Sae::new(
        Tensor::zeros(d, candle_core::DType::F32, &dev)?,
        (Tensor::randn(0f32, 1.0, (c, d), &dev)? / (d as f64).sqrt())?,
        Tensor::zeros(c, candle_core::DType::F32, &dev)?,
        (Tensor::randn(0f32, 1.0, (d, c), &dev)? / (d as f64).sqrt())?,
        k,
        "random".into(),
    )?)
}

fn sae_encode() -> Result<serde_json::Value> {
    let sae = random_sae(768, 32768, 32)?;
    let x = Tensor::randn(0f32, 1.0, (1024, 768), &dev()?)?;
    sae.encode(&x)?;
    let (n, secs) = timed(|_| sae.encode(&x).map(|_| ()).map_err(Into::into))?;
    Ok(
        serde_json::json!({ "case": "sae-encode-768x32768", "tokens_per_call": 1024, "encode_tokens_per_s": (n * 1024) as f64 / secs }),
    )
}

fn sae_train() -> Result<serde_json::Value> {
    let x = Tensor::randn(0f32, 1.0, (1024, 768), &dev()?)?;
    let mut tr =
        cocomix_sae::SaeTrainer::new(cocomix_sae::SaeTrainConfig::new(768, 32768, 32), &x)?;
    tr.step(&x)?;
    let (n, secs) = timed(|_| tr.step(&x).map(|_| ()).map_err(Into::into))?;
    Ok(
        serde_json::json!({ "case": "sae-train-768x32768", "tokens_per_step": 1024, "train_tokens_per_s": (n * 1024) as f64 / secs }),
    )
}

fn teacher_124m() -> Result<Gpt2> {
    Ok(Gpt2::new(
        &Gpt2Config::gpt2_small().with_dropout(0.0),
        &mut Params::random(0, &dev()?, false),
    )?)
}

fn labels_online() -> Result<serde_json::Value> {
    let t = teacher_124m()?;
    let sae = random_sae(768, 32768, 32)?;
    let ids = random_ids(1, 1024, 50257)?;
    let once = || -> Result<()> {
        let att = cocomix_attribution::attribute(&t, &sae, &ids, 5)?;
        cocomix_attribution::labels(&att, 32768, 4, cocomix_attribution::LabelMode::Faithful)?;
        Ok(())
    };
    once()?;
    let (n, secs) = timed(|_| once())?;
    Ok(
        serde_json::json!({ "case": "labels-online-124m", "seq_len": 1024, "labelled_tokens_per_s": (n * 1024) as f64 / secs }),
    )
}

fn labels_cached_vs_online() -> Result<serde_json::Value> {
    use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelMode};
    let t = teacher_124m()?;
    let sae = random_sae(768, 32768, 32)?;
    let dir = std::env::temp_dir().join(format!("cocomix-bench-labels-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let windows = 3usize;
    let toks: Vec<u8> = (0..windows * 1024 + 1)
        .flat_map(|i| (((i * 2_654_435_761) % 50257) as u16).to_le_bytes())
        .collect();
    std::fs::write(dir.join("train.bin"), toks)?;
    let shard = cocomix_data::TokenShard::open(
        &dir.join("train.bin"),
        cocomix_data::TokenDtype::U16,
        (windows * 1024 + 1) as u64,
    )?;
    let spec = LabelCacheSpec {
        teacher: "random-124m".into(),
        teacher_sha256: "-".into(),
        sae_sha256: "-".into(),
        layer: 5,
        k_attr: 4,
        window: 1024,
        mode: LabelMode::Faithful,
        n_latents: 32768,
        data: "bench".into(),
        max_windows: 0,
    };
    let t0 = Instant::now();
    let cache = LabelCache::build(&t, &sae, &spec, &shard, &dir.join("cache"), 1)?;
    let online_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut sum = 0u64;
    for _ in 0..100 {
        for w in 0..windows {
            sum += cache
                .window_labels(w)
                .iter()
                .map(|&l| l as u64)
                .sum::<u64>();
        }
    }
    let cached_s = t0.elapsed().as_secs_f64() / 100.0;
    std::fs::remove_dir_all(&dir).ok();
    Ok(serde_json::json!({
        "case": "labels-cached-vs-online-124m", "windows": windows, "seq_len": 1024,
        "online_epoch_s": online_s, "cached_epoch_s": cached_s, "speedup": online_s / cached_s, "checksum": sum,
    }))
}

fn train_ratios(results: &[serde_json::Value]) -> serde_json::Value {
    let find = |c: &str| results.iter().find(|r| r["case"] == c);
    let mut out = serde_json::Map::new();
    for size in ["default", "69m"] {
        if let (Some(n), Some(c)) = (
            find(&format!("train-{size}-ntp")),
            find(&format!("train-{size}-cocomix-cached")),
        ) {
            let time = n["tokens_per_s"].as_f64().unwrap_or(0.0)
                / c["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            let floor = c["flops_per_token"].as_f64().unwrap_or(0.0)
                / n["flops_per_token"].as_f64().unwrap_or(f64::NAN);
            out.insert(size.into(), serde_json::json!({ "cocomix_over_ntp_time": time, "flop_floor": floor, "within": time / floor - 1.0 }));
        }
    }
    out.into()
}

/// HellaSwag-shaped requests: ~40-token contexts, 4 endings of ~20 tokens.
fn eval_hellaswag() -> Result<serde_json::Value> {
    use cocomix_trainer::tasks::{evaluate, Choice, Doc, ModelScorer, Task};
    let model = cocomix_model::AnyModel::Gpt2(teacher_124m()?);
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
            choices: endings
                .iter()
                .map(|e| Choice {
                    context: ctx.into(),
                    continuation: e.to_string(),
                })
                .collect(),
            gold: 0,
        })
        .collect();
    let task = Task {
        name: "hellaswag".into(),
        docs,
    };
    let scorer = ModelScorer {
        model: &model,
        max_len: 1024,
    };
    evaluate(&task, &tok, &scorer, Some(1))?;
    let t0 = Instant::now();
    evaluate(&task, &tok, &scorer, None)?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(
        serde_json::json!({ "case": "eval-hellaswag-124m", "documents": 8, "requests": 32, "requests_per_s": 32.0 / secs }),
    )
}

/// Where scripts/fetch-smollm2.sh puts SmolLM2-135M-Instruct (Q4_1 GGUF).
const SMOLLM2: &str = "data/models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// SmolLM2-135M as a teacher, dequantized to f32 once at load (not timed; `load_s`).
fn smollm2(case: &str) -> Result<serde_json::Value> {
    if !std::path::Path::new(SMOLLM2).is_file() {
        eprintln!("bench: {SMOLLM2} is absent (run scripts/fetch-smollm2.sh): {case} skipped");
        return Ok(serde_json::json!({ "case": case, "skipped": format!("{SMOLLM2} is absent") }));
    }
    let t0 = Instant::now();
    let m = cocomix_model::Llama::load(SMOLLM2, &dev()?)?;
    let load_s = t0.elapsed().as_secs_f64();
    let (layer, vocab, d) = (
        m.cfg.num_hidden_layers / 2,
        m.cfg.vocab_size,
        m.cfg.hidden_size,
    );
    let mut v = match case {
        "smollm2-forward-128" | "smollm2-forward-1024" => {
            let t = if case.ends_with("-128") { 128 } else { 1024 };
            let ids = random_ids(1, t, vocab)?;
            m.forward(&ids)?;
            let (n, secs) = timed(|_| m.forward(&ids).map(|_| ()).map_err(Into::into))?;
            serde_json::json!({ "seq_len": t, "tokens_per_s": (n * t) as f64 / secs, "calls_timed": n })
        }
        "smollm2-residual-grad" => {
            let ids = random_ids(1, 1024, vocab)?;
            m.residual_grad(&ids, layer)?;
            let (n, secs) =
                timed(|_| m.residual_grad(&ids, layer).map(|_| ()).map_err(Into::into))?;
            serde_json::json!({ "layer": layer, "seq_len": 1024, "tokens_per_s": (n * 1024) as f64 / secs, "calls_timed": n })
        }
        "smollm2-labels" => {
            use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelMode};
            let sae = random_sae(d, 32768, 32)?;
            let dir =
                std::env::temp_dir().join(format!("cocomix-bench-smollm2-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let (windows, t) = (3usize, 1024usize);
            let toks: Vec<u8> = (0..windows * t + 1)
                .flat_map(|i| (((i * 2_654_435_761) % vocab) as u16).to_le_bytes())
                .collect();
            std::fs::write(dir.join("train.bin"), toks)?;
            let shard = cocomix_data::TokenShard::open(
                &dir.join("train.bin"),
                cocomix_data::TokenDtype::U16,
                (windows * t + 1) as u64,
            )?;
            let spec = LabelCacheSpec {
                teacher: SMOLLM2.into(),
                teacher_sha256: "-".into(),
                sae_sha256: "-".into(),
                layer,
                k_attr: 4,
                window: t,
                mode: LabelMode::Faithful,
                n_latents: 32768,
                data: "bench".into(),
                max_windows: 0,
            };
            let t0 = Instant::now();
            LabelCache::build(&m, &sae, &spec, &shard, &dir.join("cache"), 1)?;
            let secs = t0.elapsed().as_secs_f64();
            std::fs::remove_dir_all(&dir).ok();
            serde_json::json!({ "layer": layer, "seq_len": t, "windows": windows, "sae_latents": 32768, "labelled_tokens_per_s": (windows * t) as f64 / secs })
        }
        other => anyhow::bail!("unknown bench case {other}"),
    };
    v["case"] = case.into();
    v["load_s"] = load_s.into();
    Ok(v)
}
