//! The main job: corpus → teacher → SAE → label cache → NTP / KD / CoCoMix students →
//! evaluation and a side-by-side report. Every stage reuses what an earlier run left.
//!
//! Under data parallelism every rank runs the job: rank 0 alone prepares the data and trains
//! the SAE while the others wait, then they reuse its files (so the output folders must be on
//! a filesystem all ranks share); the teacher, the label cache and the students are made by
//! all ranks together; rank 0 writes every report.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelChoice, LabelMode};
use cocomix_data::{Dataset, PrepareOptions, Tokenizer};
use cocomix_dist::Comm;
use cocomix_model::{AnyModel, CausalLm, ConceptConfig, Gpt2Config, PauseConfig, StudentConfig};
use cocomix_sae::{Sae, SaeTrainConfig, SaeTrainer};

use crate::prefetch::overlap_from_env;
use crate::report::write_run_report;
use crate::run::{train_dist, Labels, TrainOutcome, TrainSpec};
use crate::{Arm, Error, LabelSource, Objective, Result, RunConfig, Source};

fn stage(n: usize, what: &str, comm: &Comm) {
    comm.set_phase(format!("stage {n} ({what})"));
    if comm.is_root() {
        tracing::info!("[{n}/6] {what}");
    }
}

/// Runs `f` on rank 0 first (it writes the files), then, once it is done, on the other
/// ranks (which find and reuse them). An error on any rank stops all.
fn rank0_first<T>(comm: &Comm, f: impl Fn() -> Result<T>) -> Result<T> {
    let first = if comm.is_root() { Some(f()) } else { None };
    // Untimed: rank 0's work may take hours (a corpus, an SAE).
    comm.wait_for_all()?;
    let second = match comm.agree(first.transpose())? {
        Some(v) => Ok(v),
        None => f(),
    };
    comm.agree(second)
}

/// Rank 0's answer to `question`, on every rank (so all ranks take the same branch even
/// when a file appears in between).
fn root_decides(comm: &Comm, question: impl FnOnce() -> bool) -> Result<bool> {
    let mut b = [(comm.is_root() && question()) as u8];
    comm.broadcast(&mut b, 0)?;
    Ok(b[0] == 1)
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

/// The tokenizer a loaded teacher reads: its GGUF's own, its folder's or its hub repo's (the
/// bundled GPT-2 one for a GPT-2 folder without one).
pub fn teacher_tokenizer(source: &str) -> Result<Tokenizer> {
    let dir = Path::new(source);
    let own = if dir.is_dir() {
        Tokenizer::from_dir(dir)?
    } else {
        None
    };
    Ok(match own {
        Some(t) => t,
        None if dir.is_dir() && source.contains("gpt2") => Tokenizer::gpt2()?,
        None => Tokenizer::load(source)?,
    })
}

/// Errors unless the teacher reads the data's tokens.
fn check_teacher_tokenizer(cfg: &RunConfig, teacher: &Tokenizer, data: &Tokenizer) -> Result<()> {
    if teacher.identity() == data.identity() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "the teacher {} uses another tokenizer ({} tokens) than the data in {} ({} tokens): \
         set data.tokenizer = \"teacher\" (and a data.dir of its own)",
        cfg.teacher.source,
        teacher.vocab_size(),
        cfg.data.dir.display(),
        data.vocab_size()
    )))
}

/// Stage 1: the prepared data folder (and its tokenizer). `teacher_tok` is the tokenizer of
/// a loaded teacher, when the job uses one: `data.tokenizer = "teacher"` takes it, and any
/// other tokenizer must equal it. A data folder prepared with another tokenizer is refused
/// (naming its `meta.json`) before any tokenization.
pub fn prepare_data(
    cfg: &RunConfig,
    teacher_tok: Option<&Tokenizer>,
) -> Result<(Dataset, Tokenizer)> {
    let d = &cfg.data;
    let tok = if d.tokenizer == "teacher" {
        teacher_tok.cloned().ok_or_else(|| {
            Error::Config(
                "data.tokenizer = \"teacher\" needs a teacher loaded from teacher.source".into(),
            )
        })?
    } else if d.tokenizer == "train" {
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
    if let Some(t) = teacher_tok {
        check_teacher_tokenizer(cfg, t, &tok)?;
    }
    if let Ok(ds) = Dataset::open(&d.dir) {
        ds.check_tokenizer(&tok)?;
    }
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

/// The student an objective trains on a vocabulary of `vocab_size` ids with EOT `eot_id`:
/// a plain GPT-2 at the NTP width for NTP and KD; the concept path (with `n_latents`
/// concepts, the SAE's; interleaved or not) or the pause vector at `model.d_model` otherwise.
pub fn student_config(
    cfg: &RunConfig,
    objective: Objective,
    vocab_size: usize,
    eot_id: u32,
    n_latents: usize,
) -> StudentConfig {
    let m = &cfg.model;
    let d = if objective.is_plain() {
        m.d_model_ntp
    } else {
        m.d_model
    };
    let gpt2 = Gpt2Config::new(vocab_size, m.context, d, m.n_layer, m.n_head)
        .with_dropout(m.dropout)
        .with_eot(eot_id);
    let concept = |interleave| ConceptConfig {
        concept_dim: n_latents,
        concept_num: cfg.concept.concept_num,
        insert_layer_index: cfg.concept.insert_layer,
        interleave,
    };
    let mut s = StudentConfig::gpt2(gpt2);
    match objective {
        Objective::Ntp | Objective::Kd => {}
        Objective::Cocomix
        | Objective::MixOnly
        | Objective::RandomLabels
        | Objective::ShuffledLabels => s.concept = Some(concept(true)),
        Objective::PredictOnly => s.concept = Some(concept(false)),
        Objective::Pause => {
            s.pause = Some(PauseConfig {
                pause_insert_layer_index: cfg.concept.insert_layer,
            })
        }
    }
    s
}

/// The frozen teacher (GPT-2 or Llama-family), its weights file (for hashing) and a name for
/// metadata.
pub struct Teacher {
    pub model: Box<dyn CausalLm>,
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
    load_or_train_teacher_dist(cfg, data, tok, device, &Comm::single())
}

/// [`load_or_train_teacher`] by the ranks of `comm` (a teacher to train is trained by all).
pub fn load_or_train_teacher_dist(
    cfg: &RunConfig,
    data: &Dataset,
    tok: &Tokenizer,
    device: &Device,
    comm: &Comm,
) -> Result<Teacher> {
    let root = cfg.run.out_dir.join(&cfg.run.name);
    let dir = if cfg.teacher.source == Source::Train {
        let dir = root.join("teacher");
        let t = cfg.teacher.train.as_ref().expect("validated");
        let mut optim = cfg.optim.clone();
        optim.steps = t.steps;
        optim.lr = t.lr;
        if let Some(b) = t.batch_size {
            optim.batch_size = b;
            optim.grad_accum = 1;
        }
        optim.min_lr = t.lr / 10.0;
        optim.warmup = optim.warmup.min(t.steps / 10);
        let student = StudentConfig::gpt2(
            Gpt2Config::new(
                tok.vocab_size(),
                cfg.model.context,
                t.d_model,
                t.n_layer,
                t.n_head,
            )
            .with_dropout(cfg.model.dropout)
            .with_eot(tok.eot_id()),
        );
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
        if root_decides(comm, || dir.join("final/model.safetensors").is_file())? {
            comm.agree(check_same_config(&dir, &identity))?;
            if comm.is_root() {
                tracing::info!(
                    "reusing the small teacher trained earlier in {}",
                    dir.display()
                );
            }
        } else {
            if comm.is_root() {
                tracing::info!("no teacher given: training a small {}-layer, d={} teacher on the corpus (NOT GPT-2)", t.n_layer, t.d_model);
            }
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
            let out = train_dist(&spec, comm)?;
            if comm.is_root() {
                write_run_report(&dir, &out)?;
            }
        }
        dir.join("final")
    } else {
        PathBuf::from(cfg.teacher.source.to_string())
    };
    let spec = dir.to_string_lossy().to_string();
    // The teacher must read the data's tokens.
    check_teacher_tokenizer(cfg, &teacher_tokenizer(&spec)?, tok)?;
    let (model, weights) = load_teacher(&spec, device)?;
    if cfg.teacher.layer >= model.n_layer() {
        return Err(Error::Config(format!(
            "teacher.layer {} is out of range: the teacher has {} blocks",
            cfg.teacher.layer,
            model.n_layer()
        )));
    }
    if tok.vocab_size() > model.vocab_size() || cfg.model.context > model.context() {
        return Err(Error::Config(format!(
            "the teacher {} ({} ids, context {}) cannot read the data's {} ids in windows of \
             model.context = {}",
            cfg.teacher.source,
            model.vocab_size(),
            model.context(),
            tok.vocab_size(),
            cfg.model.context
        )));
    }
    Ok(Teacher {
        model,
        weights,
        name: cfg.teacher.source.to_string(),
    })
}

/// A frozen teacher from a folder, hub id or `.gguf` file (GPT-2 or Llama-family; a CoCoMix
/// student is refused) and the file that identifies its weights.
pub fn load_teacher(spec: &str, device: &Device) -> Result<(Box<dyn CausalLm>, PathBuf)> {
    let model = AnyModel::load(spec, device)?;
    let weights = model.weights_file(spec)?;
    Ok((model.into_teacher()?, weights))
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
    teacher: &dyn CausalLm,
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
    let d = teacher.d_model();
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
            cfg.teacher.layer,
            teacher.model.d_model(),
            cfg.sae.n_latents,
            cfg.sae.k
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
                    SaeTrainConfig::new(teacher.model.d_model(), cfg.sae.n_latents, cfg.sae.k);
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
                let s = train_sae(teacher.model.as_ref(), data, job, &path, &meta)?;
                (s, path)
            }
        }
    } else {
        let spec = cfg.sae.source.to_string();
        (Sae::load(&spec, device)?, PathBuf::from(spec))
    };
    sae.check_input_width(
        teacher.model.d_model(),
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
    sae: &Sae,
    data: &Dataset,
) -> Result<LabelCacheSpec> {
    Ok(LabelCacheSpec::new(
        &teacher.name,
        &teacher.weights,
        sae,
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
    teacher: Option<&'a dyn CausalLm>,
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
        overlap_teacher: overlap_from_env(),
        device: device.clone(),
        config_text: cfg.to_toml(),
    }
}

/// What every student of a job shares: the data and, when an objective needs them, the
/// teacher, its SAE and the label cache (stages 1–4).
pub struct Shared {
    pub data: Dataset,
    pub tok: Tokenizer,
    pub teacher: Option<Teacher>,
    /// The SAE and its file.
    pub sae: Option<(Sae, PathBuf)>,
    /// One label cache per label mode the arms use (with `concept.labels = "cache"`).
    pub caches: Vec<(LabelMode, LabelCache)>,
    /// The ranks that train the students.
    pub comm: Comm,
}

impl Shared {
    /// Prepares the data, then the teacher, SAE and label cache if any of `arms` needs them,
    /// with the ranks of `comm`.
    pub fn prepare(cfg: &RunConfig, arms: &[Arm], device: &Device, comm: &Comm) -> Result<Self> {
        let needs_teacher = arms.iter().any(|a| a.objective.needs_teacher());
        let needs_labels = arms.iter().any(|a| a.objective.needs_labels());
        // A loaded teacher's tokenizer is known before any work: the data must use it.
        let teacher_tok = match &cfg.teacher.source {
            Source::Load(s) if needs_teacher || cfg.data.tokenizer == "teacher" => {
                Some(teacher_tokenizer(s)?)
            }
            _ => None,
        };
        stage(1, "data", comm);
        let (data, tok) = rank0_first(comm, || prepare_data(cfg, teacher_tok.as_ref()))?;
        let teacher = if needs_teacher {
            stage(2, "teacher", comm);
            Some(load_or_train_teacher_dist(cfg, &data, &tok, device, comm)?)
        } else {
            None
        };
        let sae = match &teacher {
            Some(t) if needs_labels => {
                stage(3, "SAE", comm);
                Some(rank0_first(comm, || {
                    load_or_train_sae(cfg, t, &data, device)
                })?)
            }
            _ => None,
        };
        let mut caches = Vec::new();
        if let (Some(t), Some((s, _))) = (&teacher, &sae) {
            if cfg.concept.labels == LabelSource::Cache {
                stage(4, "label cache", comm);
                let mut modes: Vec<LabelMode> = arms
                    .iter()
                    .filter(|a| a.objective.needs_labels())
                    .map(|a| a.label_mode(&cfg.concept))
                    .collect();
                modes.sort();
                modes.dedup();
                for mode in modes {
                    let mut spec = cache_spec(cfg, t, s, &data)?;
                    spec.mode = mode;
                    let dir = LabelCache::path_for(&cfg.data.dir, &spec);
                    let cache = LabelCache::build_dist(
                        t.model.as_ref(),
                        s,
                        &spec,
                        &data.train,
                        &dir,
                        (cfg.optim.batch_size / cfg.optim.grad_accum).max(1),
                        comm,
                    )?;
                    caches.push((mode, cache));
                }
            }
        }
        Ok(Self {
            data,
            tok,
            teacher,
            sae,
            caches,
            comm: comm.clone(),
        })
    }

    /// The students' vocabulary: the teacher's (its logits are the KD targets; a Llama's may
    /// be padded beyond its tokenizer), else the tokenizer's.
    pub fn vocab_size(&self) -> usize {
        self.teacher
            .as_ref()
            .map_or(self.tok.vocab_size(), |t| t.model.vocab_size())
    }

    /// A sentence naming the teacher and SAE, for reports.
    pub fn describe(&self, cfg: &RunConfig) -> String {
        let teacher = match (&self.teacher, &cfg.teacher.source) {
            (None, _) => "none".to_string(),
            (Some(_), Source::Train) => {
                "a GPT-2 trained by this job on the corpus's training split".to_string()
            }
            (Some(t), _) => t.name.clone(),
        };
        let sae = self
            .sae
            .as_ref()
            .map_or("none".into(), |s| s.1.display().to_string());
        format!("Teacher: {teacher}; SAE: {sae}.")
    }
}

/// The folder of one run of a job: `out_dir/name/<arm>/seed-<seed>`.
pub fn run_dir(cfg: &RunConfig, arm: Arm, seed: u64) -> PathBuf {
    cfg.run
        .out_dir
        .join(&cfg.run.name)
        .join(arm.to_string())
        .join(format!("seed-{seed}"))
}

/// Trains one student of a job (stage 5), or reuses it when its folder holds a finished run
/// of the same config; an interrupted run continues from its last checkpoint.
pub fn train_student(
    cfg: &RunConfig,
    shared: &Shared,
    arm: Arm,
    seed: u64,
    device: &Device,
) -> Result<(TrainOutcome, PathBuf)> {
    let comm = &shared.comm;
    let rcfg = cfg.for_run(arm, seed);
    let dir = run_dir(cfg, arm, seed);
    // A run folder (finished or interrupted) is reused only for the very same config.
    comm.agree(check_same_config(&dir, &rcfg.to_toml()))?;
    let finished = || -> Option<TrainOutcome> {
        let text = std::fs::read_to_string(dir.join("report.json")).ok()?;
        let o = serde_json::from_str::<TrainOutcome>(&text).ok()?;
        (!o.stopped_early && dir.join("final/model.safetensors").is_file()).then_some(o)
    };
    if root_decides(comm, || finished().is_some())? {
        let o = comm.agree(finished().ok_or_else(|| {
            Error::file(
                dir.join("report.json"),
                "rank 0 reads a finished run here but this rank does not: \
                 the output folder must be on a filesystem all ranks share",
            )
        }))?;
        if comm.is_root() {
            tracing::info!(
                "{arm} seed {seed}: reusing the finished run in {}",
                dir.display()
            );
        }
        return Ok((o, dir));
    }
    let objective = arm.objective;
    let mode = arm.label_mode(&cfg.concept);
    let cache = shared.caches.iter().find(|c| c.0 == mode).map(|c| &c.1);
    let labels = match (objective.needs_labels(), cache, &shared.sae) {
        (true, Some(c), _) => Some(Labels::Cache(c)),
        (true, None, Some((s, _))) => Some(Labels::Online {
            sae: s,
            layer: cfg.teacher.layer,
            mode,
        }),
        _ => None,
    };
    let n_latents = shared
        .sae
        .as_ref()
        .map_or(cfg.sae.n_latents, |s| s.0.n_latents());
    let student = student_config(
        cfg,
        objective,
        shared.vocab_size(),
        shared.tok.eot_id(),
        n_latents,
    );
    // A run folder with checkpoints is an interrupted run of this job: continue it.
    let resume = root_decides(comm, || dir.join("checkpoints").is_dir())?;
    let mut spec = base_spec(
        &rcfg,
        objective,
        student,
        cfg.optim.clone(),
        &shared.data,
        dir.clone(),
        device,
        shared.teacher.as_ref().map(|t| t.model.as_ref()),
        labels,
        resume,
    );
    // With label caches, every student samples their aligned windows: the same batches for
    // all (caches of one job cover the same windows).
    spec.aligned_windows = shared.caches.first().map(|c| c.1.n_windows());
    let out = train_dist(&spec, comm)?;
    if comm.is_root() {
        write_run_report(&dir, &out)?;
        tracing::info!(
            "{arm} seed {seed}: val loss {:.4} (PPL {:.2}), {:.0} tokens/s",
            out.val_loss,
            out.val_ppl,
            out.tokens_per_s
        );
    }
    Ok((out, dir))
}

/// Runs the whole method as the config says (every objective of `run.objectives` for each
/// of `run.seeds` seeds) with the ranks of `comm`, and returns the folder holding the
/// comparison (`compare.md`, written by rank 0).
pub fn run_main_job(cfg: &RunConfig, device: &Device, comm: &Comm) -> Result<PathBuf> {
    let root = cfg.run.out_dir.join(&cfg.run.name);
    if comm.is_root() {
        std::fs::create_dir_all(&root).map_err(|e| Error::file(&root, e))?;
        cocomix_data::write_atomic(&root.join("config.toml"), cfg.to_toml().as_bytes())?;
    }
    let shared = Shared::prepare(cfg, &cfg.run.objectives, device, comm)?;
    stage(5, "students", comm);
    let mut runs = Vec::new();
    for seed in cfg.seeds() {
        for &arm in &cfg.run.objectives {
            let (out, dir) = train_student(cfg, &shared, arm, seed, device)?;
            if comm.is_root() {
                runs.push(crate::compare::RunRecord::read(arm, seed, out, &dir)?);
            }
        }
    }
    stage(6, "report", comm);
    if !comm.is_root() {
        return Ok(root);
    }
    let notes = format!(
        "Every student: {} steps × {} sequences × {} tokens from {}; the objectives of one seed \
         see the same batches. {}",
        cfg.optim.steps,
        cfg.optim.batch_size,
        cfg.model.context,
        cfg.data.dir.display(),
        shared.describe(cfg),
    );
    crate::compare::write_report(&root, &cfg.run.name, &runs, &notes)?;
    Ok(root)
}
