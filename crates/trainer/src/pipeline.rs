//! The main job: corpus → teacher → SAE → label cache → NTP / KD / CoCoMix students →
//! evaluation and a side-by-side report. Every stage reuses what an earlier run left.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelChoice};
use cocomix_data::{Dataset, PrepareOptions, Tokenizer};
use cocomix_model::{ConceptConfig, Gpt2, Gpt2Config, StudentConfig};
use cocomix_sae::{Sae, SaeTrainConfig, SaeTrainer};

use crate::report::{write_comparison, write_run_report};
use crate::run::{train, Labels, TrainOutcome, TrainSpec};
use crate::{Error, LabelSource, Objective, Result, RunConfig, Source};

/// Options of the main job beyond the config.
#[derive(Clone, Debug, Default)]
pub struct JobOptions {
    /// Continue interrupted student runs from their checkpoints.
    pub resume: bool,
}

fn stage(n: usize, what: &str) {
    tracing::info!("[{n}/6] {what}");
}

/// Errors unless a finished run folder was made with the same config text (reusing a run
/// trained with other settings would silently mix results).
fn check_same_config(run_dir: &Path, config_text: &str) -> Result<()> {
    let p = run_dir.join("config.toml");
    match std::fs::read_to_string(&p) {
        Ok(old) if old != config_text => Err(Error::file(
            &p,
            "this run was made with another config: change run.name (or remove the folder) to train anew",
        )),
        _ => Ok(()),
    }
}

/// Stage 1: the prepared data folder (and its tokenizer).
pub fn prepare_data(cfg: &RunConfig) -> Result<(Dataset, Tokenizer)> {
    let d = &cfg.data;
    let tok = if d.tokenizer == "train" {
        // Reuse the tokenizer of an earlier preparation of the same sources.
        let reusable = Dataset::open(&d.dir).ok().and_then(|ds| {
            let same = cocomix_data::source_hashes(&d.inputs).ok()?
                == ds
                    .meta()
                    .sources
                    .iter()
                    .map(|s| s.sha256.clone())
                    .collect::<Vec<_>>();
            let tok = ds.tokenizer().ok()?;
            (same && Some(tok.vocab_size()) == d.vocab_size).then_some(tok)
        });
        match reusable {
            Some(t) => t,
            None => {
                let vocab = d.vocab_size.expect("validated");
                tracing::info!("training a {vocab}-token byte-level BPE tokenizer on the corpus");
                let docs = cocomix_data::read_documents(&d.inputs)?;
                Tokenizer::train_bpe(docs.iter(), vocab)?
            }
        }
    } else {
        Tokenizer::load(&d.tokenizer)?
    };
    let opts = PrepareOptions {
        val_fraction: d.val_fraction,
        seed: d.split_seed,
        ..PrepareOptions::new(d.inputs.clone(), d.dir.clone())
    };
    cocomix_data::prepare(&opts, &tok)?;
    let ds = Dataset::open(&d.dir)?;
    ds.check_tokenizer(&tok)?;
    Ok((ds, tok))
}

/// The student `cfg` trains for `objective`, on a vocabulary of `vocab_size` ids with EOT
/// `eot_id`, with `n_latents` concepts (the SAE's) for CoCoMix.
pub fn student_config(
    cfg: &RunConfig,
    objective: Objective,
    vocab_size: usize,
    eot_id: u32,
    n_latents: usize,
) -> StudentConfig {
    let m = &cfg.model;
    let d = if objective == Objective::Cocomix {
        m.d_model
    } else {
        m.d_model_ntp
    };
    StudentConfig {
        gpt2: Gpt2Config::new(vocab_size, m.context, d, m.n_layer, m.n_head)
            .with_dropout(m.dropout)
            .with_eot(eot_id),
        concept: (objective == Objective::Cocomix).then_some(ConceptConfig {
            concept_dim: n_latents,
            concept_num: cfg.concept.concept_num,
            insert_layer_index: cfg.concept.insert_layer,
        }),
    }
}

/// The frozen teacher, its weights file (for hashing) and a name for metadata.
pub struct Teacher {
    pub model: Gpt2,
    pub weights: PathBuf,
    pub name: String,
}

/// Stage 2: the config's teacher, or a small one trained on the corpus.
pub fn load_or_train_teacher(
    cfg: &RunConfig,
    data: &Dataset,
    tok: &Tokenizer,
    device: &Device,
) -> Result<Teacher> {
    let root = cfg.run.out_dir.join(&cfg.run.name);
    let dir = if cfg.teacher.source == Source::Train {
        let dir = root.join("teacher");
        let t = cfg.teacher.train.as_ref().expect("validated");
        let mut optim = cfg.optim.clone();
        optim.steps = t.steps;
        optim.lr = t.lr;
        optim.min_lr = t.lr / 10.0;
        optim.warmup = optim.warmup.min(t.steps / 10);
        let student = StudentConfig {
            gpt2: Gpt2Config::new(
                tok.vocab_size(),
                cfg.model.context,
                t.d_model,
                t.n_layer,
                t.n_head,
            )
            .with_dropout(cfg.model.dropout)
            .with_eot(tok.eot_id()),
            concept: None,
        };
        // What the teacher depends on (its config.toml): reused only when all of it is unchanged.
        #[derive(serde::Serialize)]
        struct TeacherRun<'a> {
            seed: u64,
            data: &'a Path,
            tokenizer: &'a str,
            model: &'a StudentConfig,
            optim: &'a crate::OptimSection,
        }
        let identity = toml::to_string_pretty(&TeacherRun {
            seed: cfg.run.seed,
            data: &cfg.data.dir,
            tokenizer: tok.identity(),
            model: &student,
            optim: &optim,
        })
        .map_err(|e| Error::Other(e.to_string()))?;
        if dir.join("final/model.safetensors").is_file() {
            check_same_config(&dir, &identity)?;
            tracing::info!(
                "reusing the small teacher trained earlier in {}",
                dir.display()
            );
        } else {
            tracing::info!("no teacher given: training a small {}-layer, d={} teacher on the corpus (NOT GPT-2)", t.n_layer, t.d_model);
            let mut spec = base_spec(
                cfg,
                Objective::Ntp,
                student,
                optim,
                data,
                dir.clone(),
                device,
                None,
                None,
                true,
            );
            spec.config_text = identity;
            let out = train(&spec)?;
            write_run_report(&dir, &out)?;
        }
        dir.join("final")
    } else {
        PathBuf::from(cfg.teacher.source.to_string())
    };
    let spec = dir.to_string_lossy().to_string();
    let model = Gpt2::load(&spec, device)?;
    if cfg.teacher.layer >= model.cfg.n_layer {
        return Err(Error::Config(format!(
            "teacher.layer {} is out of range: the teacher has {} blocks",
            cfg.teacher.layer, model.cfg.n_layer
        )));
    }
    // The teacher must read the data's tokens.
    let teacher_tok = if dir.is_dir() {
        Tokenizer::from_dir(&dir)?
    } else {
        None
    };
    let teacher_tok = match teacher_tok {
        Some(t) => t,
        None if cfg.teacher.source.to_string().contains("gpt2") => Tokenizer::gpt2()?,
        None => Tokenizer::load(&cfg.teacher.source.to_string())?,
    };
    if teacher_tok.identity() != tok.identity() {
        return Err(Error::Config(format!(
            "the teacher {} uses another tokenizer ({} tokens) than the data in {} ({} tokens)",
            cfg.teacher.source,
            teacher_tok.vocab_size(),
            cfg.data.dir.display(),
            tok.vocab_size()
        )));
    }
    let (_, weights) = cocomix_model::gpt2::resolve_model_files(&spec)?;
    Ok(Teacher {
        model,
        weights,
        name: cfg.teacher.source.to_string(),
    })
}

/// What [`train_sae`] trains: the SAE's own settings and where its activations come from.
#[derive(Clone, Debug)]
pub struct SaeJob {
    pub sae: SaeTrainConfig,
    /// The teacher block whose output the SAE reads.
    pub layer: usize,
    pub steps: u64,
    /// Activations (tokens) per step.
    pub batch_tokens: usize,
    /// Length of the windows the activations are taken from.
    pub context: usize,
}

/// Trains a TopK SAE on the teacher's residual after block `job.layer`, streaming batches of
/// `job.batch_tokens` activations from the training shard; saves it to `out` with its
/// metrics (`out` with the extension `.jsonl`) and `extra_meta`.
pub fn train_sae(
    teacher: &Gpt2,
    data: &Dataset,
    job: SaeJob,
    out: &Path,
    extra_meta: &[(&str, String)],
) -> Result<Sae> {
    let SaeJob {
        sae: tcfg,
        layer,
        steps,
        batch_tokens,
        context,
    } = job;
    let rows = (batch_tokens / context).max(1);
    let d = teacher.cfg.n_embd;
    let seed = tcfg.seed ^ 0x5AE;
    let acts = |i: u64| -> Result<Tensor> {
        let ids = data.train_batch(rows, context, seed, i)?;
        let ids =
            Tensor::from_vec(ids, (rows, context + 1), teacher.device())?.narrow(1, 0, context)?;
        Ok(teacher.hidden_state(&ids, layer)?.reshape(((), d))?)
    };
    let mut tr = SaeTrainer::new(tcfg, &acts(u64::MAX)?)?;
    let bar = cocomix_data::progress_bar(steps, "sae");
    let log_path = out.with_extension("jsonl");
    let mut log = String::new();
    let mut last = None;
    for i in 0..steps {
        let s = tr.step(&acts(i)?)?;
        bar.inc(1);
        bar.set_message(format!(
            "FVU {:.3} L0 {:.1} dead {:.1}%",
            s.fvu,
            s.l0,
            100.0 * s.dead_fraction
        ));
        log += &format!(
            "{}\n",
            serde_json::json!({"step": i + 1, "fvu": s.fvu, "aux_loss": s.aux_loss, "l0": s.l0, "dead_fraction": s.dead_fraction})
        );
        last = Some(s);
    }
    bar.finish_and_clear();
    let last = last.ok_or_else(|| Error::Config("sae.steps must be positive".into()))?;
    tracing::info!(
        "SAE trained: FVU {:.4}, L0 {:.1}, dead latents {:.1}%",
        last.fvu,
        last.l0,
        100.0 * last.dead_fraction
    );
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::file(p, e))?;
    }
    cocomix_data::write_atomic(&log_path, log.as_bytes())?;
    let mut meta: Vec<(&str, String)> = vec![
        ("fvu", last.fvu.to_string()),
        ("l0", last.l0.to_string()),
        ("dead_fraction", last.dead_fraction.to_string()),
        ("layer", layer.to_string()),
    ];
    meta.extend(extra_meta.iter().cloned());
    let sae = tr.sae()?;
    sae.save(out, &meta)?;
    Ok(Sae::load_file(out, teacher.device())?)
}

/// Stage 3: the config's SAE, or one trained on the teacher's layer. Returns it and its file.
pub fn load_or_train_sae(
    cfg: &RunConfig,
    teacher: &Teacher,
    data: &Dataset,
    device: &Device,
) -> Result<(Sae, PathBuf)> {
    let (sae, path) = if cfg.sae.source == Source::Train {
        let teacher_sha = cocomix_data::file_sha256(&teacher.weights)?;
        let path = cfg.run.out_dir.join(&cfg.run.name).join(format!(
            "sae/L{}-{}x{}-k{}.safetensors",
            cfg.teacher.layer, teacher.model.cfg.n_embd, cfg.sae.n_latents, cfg.sae.k
        ));
        let reusable = Sae::load_file(&path, device).ok().filter(|_| {
            safetensors_meta(&path).is_some_and(|m| {
                m.get("teacher_sha256") == Some(&teacher_sha)
                    && m.get("steps") == Some(&cfg.sae.steps.to_string())
            })
        });
        match reusable {
            Some(s) => {
                tracing::info!("reusing the SAE trained earlier: {}", path.display());
                (s, path)
            }
            None => {
                tracing::info!(
                    "training a TopK SAE ({} latents, k = {}) on the teacher's layer {}",
                    cfg.sae.n_latents,
                    cfg.sae.k,
                    cfg.teacher.layer
                );
                let mut tcfg =
                    SaeTrainConfig::new(teacher.model.cfg.n_embd, cfg.sae.n_latents, cfg.sae.k);
                tcfg.lr = cfg.sae.lr;
                tcfg.seed = cfg.run.seed;
                tcfg.dead_after_tokens = tcfg
                    .dead_after_tokens
                    .min(cfg.sae.steps * cfg.sae.batch_tokens as u64 / 4);
                let meta = [
                    ("teacher_sha256", teacher_sha),
                    ("steps", cfg.sae.steps.to_string()),
                ];
                let job = SaeJob {
                    sae: tcfg,
                    layer: cfg.teacher.layer,
                    steps: cfg.sae.steps,
                    batch_tokens: cfg.sae.batch_tokens,
                    context: cfg.model.context,
                };
                let s = train_sae(&teacher.model, data, job, &path, &meta)?;
                (s, path)
            }
        }
    } else {
        let spec = cfg.sae.source.to_string();
        (Sae::load(&spec, device)?, PathBuf::from(spec))
    };
    sae.check_input_width(
        teacher.model.cfg.n_embd,
        &format!("teacher {} at layer {}", teacher.name, cfg.teacher.layer),
    )?;
    if sae.n_latents() != cfg.sae.n_latents {
        return Err(Error::file(
            &path,
            format!(
                "the SAE has {} latents but sae.n_latents is {}",
                sae.n_latents(),
                cfg.sae.n_latents
            ),
        ));
    }
    Ok((sae, path))
}

fn safetensors_meta(path: &Path) -> Option<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).ok()?;
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    serde_json::from_value(header.get("__metadata__")?.clone()).ok()
}

/// The label-cache spec of a run.
pub fn cache_spec(
    cfg: &RunConfig,
    teacher: &Teacher,
    sae_path: &Path,
    sae: &Sae,
    data: &Dataset,
) -> Result<LabelCacheSpec> {
    Ok(LabelCacheSpec::new(
        &teacher.name,
        &teacher.weights,
        sae_path,
        sae.n_latents(),
        data.meta(),
        LabelChoice {
            layer: cfg.teacher.layer,
            k_attr: cfg.concept.k_attr,
            window: cfg.model.context,
            mode: cfg.concept.label_mode,
            max_windows: cfg.concept.cache_windows,
        },
    )?)
}

#[allow(clippy::too_many_arguments)]
fn base_spec<'a>(
    cfg: &RunConfig,
    objective: Objective,
    student: StudentConfig,
    optim: crate::OptimSection,
    data: &'a Dataset,
    run_dir: PathBuf,
    device: &Device,
    teacher: Option<&'a Gpt2>,
    labels: Option<Labels<'a>>,
    resume: bool,
) -> TrainSpec<'a> {
    TrainSpec {
        objective,
        student,
        optim,
        data,
        run_dir,
        seed: cfg.run.seed,
        teacher,
        labels,
        concept: cfg.concept.clone(),
        kd: cfg.kd.clone(),
        eval_every: cfg.eval.every,
        max_val_blocks: cfg.eval.max_val_blocks,
        checkpoint_every: cfg.checkpoint.every,
        keep_last: cfg.checkpoint.keep_last,
        resume,
        stop_after: None,
        aligned_windows: None,
        device: device.clone(),
        config_text: cfg.to_toml(),
    }
}

/// Runs the whole method as the config says and returns the folder of the comparison report.
pub fn run_main_job(cfg: &RunConfig, opts: &JobOptions, device: &Device) -> Result<PathBuf> {
    let root = cfg.run.out_dir.join(&cfg.run.name);
    std::fs::create_dir_all(&root).map_err(|e| Error::file(&root, e))?;
    cocomix_data::write_atomic(&root.join("config.toml"), cfg.to_toml().as_bytes())?;
    stage(1, "data");
    let (data, tok) = prepare_data(cfg)?;
    let needs_teacher = cfg.run.objectives.iter().any(|o| *o != Objective::Ntp);
    let mut outcomes: Vec<(TrainOutcome, PathBuf)> = Vec::new();
    let (teacher, sae) = if needs_teacher {
        stage(2, "teacher");
        let teacher = load_or_train_teacher(cfg, &data, &tok, device)?;
        let sae = if cfg.run.objectives.contains(&Objective::Cocomix) {
            stage(3, "SAE");
            Some(load_or_train_sae(cfg, &teacher, &data, device)?)
        } else {
            None
        };
        (Some(teacher), sae)
    } else {
        (None, None)
    };
    let cache = match (&teacher, &sae) {
        (Some(t), Some((s, p))) if cfg.concept.labels == LabelSource::Cache => {
            stage(4, "label cache");
            let spec = cache_spec(cfg, t, p, s, &data)?;
            let dir = LabelCache::path_for(&cfg.data.dir, &spec);
            Some(LabelCache::build(
                &t.model,
                s,
                &spec,
                &data.train,
                &dir,
                (cfg.optim.batch_size / cfg.optim.grad_accum).max(1),
            )?)
        }
        _ => None,
    };
    stage(5, "students");
    let n_latents = sae.as_ref().map_or(cfg.sae.n_latents, |s| s.0.n_latents());
    for &objective in &cfg.run.objectives {
        let run_dir = root.join(objective.to_string());
        if let Ok(text) = std::fs::read_to_string(run_dir.join("report.json")) {
            if let Ok(o) = serde_json::from_str::<TrainOutcome>(&text) {
                if !o.stopped_early && run_dir.join("final/model.safetensors").is_file() {
                    check_same_config(&run_dir, &cfg.to_toml())?;
                    tracing::info!(
                        "{objective}: reusing the finished run in {}",
                        run_dir.display()
                    );
                    outcomes.push((o, run_dir));
                    continue;
                }
            }
        }
        let labels = match (objective, &cache, &sae) {
            (Objective::Cocomix, Some(c), _) => Some(Labels::Cache(c)),
            (Objective::Cocomix, None, Some((s, _))) => Some(Labels::Online {
                sae: s,
                layer: cfg.teacher.layer,
                mode: cfg.concept.label_mode,
            }),
            _ => None,
        };
        let student = student_config(cfg, objective, tok.vocab_size(), tok.eot_id(), n_latents);
        let resume = opts.resume || run_dir.join("checkpoints").is_dir();
        let mut spec = base_spec(
            cfg,
            objective,
            student,
            cfg.optim.clone(),
            &data,
            run_dir.clone(),
            device,
            teacher.as_ref().map(|t| &t.model),
            labels,
            resume,
        );
        // With a label cache, every student samples its windows: the same batches for all.
        spec.aligned_windows = cache.as_ref().map(|c| c.n_windows());
        let out = train(&spec)?;
        write_run_report(&run_dir, &out)?;
        tracing::info!(
            "{objective}: val loss {:.4} (PPL {:.2}), {:.0} tokens/s",
            out.val_loss,
            out.val_ppl,
            out.tokens_per_s
        );
        outcomes.push((out, run_dir));
    }
    stage(6, "report");
    let notes = format!(
        "Same data ({}), token budget ({} steps × {} sequences × {} tokens) and seed ({}) for every student. Teacher: {}; SAE: {}.",
        cfg.data.dir.display(),
        cfg.optim.steps,
        cfg.optim.batch_size,
        cfg.model.context,
        cfg.run.seed,
        teacher.as_ref().map_or("none".into(), |t| if cfg.teacher.source == Source::Train { "a small teacher trained on the corpus (not GPT-2)".to_string() } else { t.name.clone() }),
        sae.as_ref().map_or("none".into(), |s| s.1.display().to_string()),
    );
    write_comparison(
        &root,
        &format!(
            "{}: {}",
            cfg.run.name,
            cfg.run
                .objectives
                .iter()
                .map(|o| o.to_string())
                .collect::<Vec<_>>()
                .join(" vs ")
        ),
        &outcomes,
        &notes,
    )?;
    Ok(root)
}
