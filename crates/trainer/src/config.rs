//! Run configs: TOML files in `configs/`, any key overridable with `--set section.key=value`,
//! checked before any work starts.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which model and loss a student trains with: the method, its baselines and the paper's
/// ablations (all trained on the same batches in a comparison).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Next-token cross-entropy (GPT-2 at `model.d_model_ntp`).
    Ntp,
    /// Distillation from the teacher: α·τ²·KL(p_t^τ ‖ p_s^τ) + (1 − α)·CE.
    Kd,
    /// CoCoMix: NTP + λ·concept loss, the continuous concept interleaved.
    Cocomix,
    /// Ablation: the concept loss without interleaving (concepts predicted, never fed back).
    PredictOnly,
    /// Ablation: the interleaved concept path trained by NTP alone (λ = 0, no labels).
    MixOnly,
    /// Ablation: CoCoMix with the teacher's labels mapped through a fixed random
    /// permutation of concept ids. The student's concept predictor and compress layer are
    /// initialised i.i.d., so a fixed relabelling is a symmetry of the learning problem:
    /// this arm equals CoCoMix in distribution (a control for seed noise, not for meaning).
    RandomLabels,
    /// Ablation: CoCoMix where each cached window reads the labels of another window (a
    /// fixed permutation of the windows with no fixed point): every label statistic is
    /// kept, their link to the tokens read is broken. Needs `concept.labels = "cache"`.
    ShuffledLabels,
    /// Baseline: a learned pause vector interleaved in place of the concept.
    Pause,
}

impl Objective {
    /// Every objective, in report order.
    pub const ALL: [Objective; 8] = [
        Objective::Ntp,
        Objective::Kd,
        Objective::Cocomix,
        Objective::PredictOnly,
        Objective::MixOnly,
        Objective::RandomLabels,
        Objective::ShuffledLabels,
        Objective::Pause,
    ];

    /// The name configs and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            Objective::Ntp => "ntp",
            Objective::Kd => "kd",
            Objective::Cocomix => "cocomix",
            Objective::PredictOnly => "predict-only",
            Objective::MixOnly => "mix-only",
            Objective::RandomLabels => "random-labels",
            Objective::ShuffledLabels => "shuffled-labels",
            Objective::Pause => "pause",
        }
    }

    /// Trains on the teacher's concept labels.
    pub fn needs_labels(self) -> bool {
        matches!(
            self,
            Objective::Cocomix
                | Objective::PredictOnly
                | Objective::RandomLabels
                | Objective::ShuffledLabels
        )
    }

    /// Needs the teacher (for its logits or its labels).
    pub fn needs_teacher(self) -> bool {
        self == Objective::Kd || self.needs_labels()
    }

    /// A plain GPT-2 (at the NTP width `model.d_model_ntp`); the others are built at
    /// `model.d_model`.
    pub fn is_plain(self) -> bool {
        matches!(self, Objective::Ntp | Objective::Kd)
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Objective {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Objective::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown objective {s:?}; known: {}",
                    Objective::ALL.map(|o| o.name()).join(", ")
                ))
            })
    }
}

/// Where a frozen model (teacher or SAE) comes from: trained by the pipeline on the corpus
/// (`"train"`), or loaded from a path, hub id or URL (any other string).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Source {
    /// Train one first (shape and budget from the config).
    Train,
    /// A folder, file, hub id or URL.
    Load(String),
}

impl From<String> for Source {
    fn from(s: String) -> Self {
        if s == "train" {
            Source::Train
        } else {
            Source::Load(s)
        }
    }
}

impl From<Source> for String {
    fn from(s: Source) -> Self {
        s.to_string()
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Train => f.write_str("train"),
            Source::Load(s) => f.write_str(s),
        }
    }
}

/// Where CoCoMix's concept labels come from (`concept.labels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelSource {
    /// A label cache of aligned windows, built once.
    Cache,
    /// The teacher on every batch, at random offsets (the paper).
    Online,
}

/// Matmul precision (`optim.precision`): f32, or bf16 / f16 autocast with f32 master
/// weights, optimizer state and losses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// The dtype the matmuls run in.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            p => Err(Error::Config(format!(
                "precision {p:?}: expected f32, bf16 or f16"
            ))),
        }
    }
}

/// `[run]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub name: String,
    /// Runs go to `out_dir/name/<arm>/seed-<seed>`.
    pub out_dir: PathBuf,
    /// The first seed; a comparison over `seeds` seeds uses `seed, seed + 1, …`.
    pub seed: u64,
    /// Seeds per objective (each seed: its own init, batches and dropout; the objectives
    /// of one seed see the same batches).
    #[serde(default = "one")]
    pub seeds: usize,
    /// The students to train and compare, with the same token budget: objective names,
    /// optionally with their own λ or label mode (`cocomix[lambda=0.3,labels=negative]`).
    pub objectives: Vec<Arm>,
}

fn one() -> usize {
    1
}

/// One arm of a comparison: an objective, optionally with its own concept-loss weight λ
/// and label mode, written `cocomix[lambda=0.3]`, `cocomix[labels=negative]` or
/// `cocomix[lambda=0.3,labels=activation]` (the config's `[concept]` values otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Arm {
    pub objective: Objective,
    pub lambda: Option<f64>,
    pub label_mode: Option<cocomix_attribution::LabelMode>,
}

impl Arm {
    /// An arm with the config's λ and label mode.
    pub fn new(objective: Objective) -> Self {
        Self {
            objective,
            lambda: None,
            label_mode: None,
        }
    }

    /// The λ this arm trains with.
    pub fn lambda(&self, cfg: &ConceptSection) -> f64 {
        self.lambda.unwrap_or(cfg.lambda)
    }

    /// The label mode this arm's labels are chosen with.
    pub fn label_mode(&self, cfg: &ConceptSection) -> cocomix_attribution::LabelMode {
        self.label_mode.unwrap_or(cfg.label_mode)
    }
}

impl std::fmt::Display for Arm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.objective)?;
        let mut opts = Vec::new();
        if let Some(l) = self.lambda {
            opts.push(format!("lambda={l}"));
        }
        if let Some(m) = self.label_mode {
            opts.push(format!("labels={m}"));
        }
        if !opts.is_empty() {
            write!(f, "[{}]", opts.join(","))?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Arm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Config(format!("objective {s:?}: {why}"));
        let (name, opts) = match s.split_once('[') {
            None => (s, ""),
            Some((n, rest)) => (
                n,
                rest.strip_suffix(']')
                    .ok_or_else(|| bad("options go in brackets: cocomix[lambda=0.3]"))?,
            ),
        };
        let mut arm = Arm::new(name.trim().parse()?);
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match opt.split_once('=') {
                Some(("lambda", v)) => {
                    let l: f64 = v.parse().map_err(|_| bad("lambda must be a number"))?;
                    if !(l >= 0.0 && l.is_finite()) {
                        return Err(bad("lambda must be ≥ 0"));
                    }
                    arm.lambda = Some(l);
                }
                Some(("labels", v)) => {
                    arm.label_mode = Some(v.parse().map_err(|e| bad(&format!("{e}")))?);
                }
                _ => return Err(bad("options are lambda=<number> and labels=<label mode>")),
            }
        }
        if (arm.lambda.is_some() || arm.label_mode.is_some()) && !arm.objective.needs_labels() {
            return Err(bad(
                "only objectives trained on concept labels take lambda or labels",
            ));
        }
        Ok(arm)
    }
}

/// Arms separated by commas outside brackets: `ntp,cocomix[lambda=0.3,labels=negative],kd`.
pub fn parse_arms(s: &str) -> Result<Vec<Arm>> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim().parse()?);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !s[start..].trim().is_empty() {
        out.push(s[start..].trim().parse()?);
    }
    Ok(out)
}

impl TryFrom<String> for Arm {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Arm> for String {
    fn from(a: Arm) -> Self {
        a.to_string()
    }
}

/// `[data]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Corpus files and folders (prepared into `dir` when needed).
    pub inputs: Vec<PathBuf>,
    /// The prepared data folder.
    pub dir: PathBuf,
    /// `gpt2` (bundled), a tokenizer file/folder, `.gguf` file or hub id, `train` (a
    /// byte-level BPE of `vocab_size` trained on the corpus), or `teacher` (the loaded
    /// teacher's own: a Llama's GGUF or tokenizer.json).
    pub tokenizer: String,
    #[serde(default)]
    pub vocab_size: Option<usize>,
    pub val_fraction: f64,
    pub split_seed: u64,
}

/// `[teacher]`: a frozen LM (GPT-2 or Llama-family: a Hugging Face folder, hub id or `.gguf`
/// file), or `source = "train"` to train a small GPT-2 on the corpus first (shape and budget
/// below).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    pub source: Source,
    /// The layer the SAE reads (output of block `layer`, 0-indexed).
    pub layer: usize,
    #[serde(default)]
    pub train: Option<ShapeBudget>,
}

/// Shape and budget of a model trained by the pipeline (the default teacher).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeBudget {
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub steps: u64,
    pub lr: f64,
    /// Sequences per step (default: `optim.batch_size`).
    #[serde(default)]
    pub batch_size: Option<usize>,
}

/// `[sae]`: an SAE file / URL / `hf://` path, or `source = "train"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeSection {
    pub source: Source,
    pub n_latents: usize,
    pub k: usize,
    /// Training steps and tokens per step when `source = "train"`.
    pub steps: u64,
    pub batch_tokens: usize,
    pub lr: f64,
}

/// `[concept]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConceptSection {
    pub k_attr: usize,
    /// λ, the weight of the concept loss.
    pub lambda: f64,
    /// K_c, predicted concepts kept by the TopK.
    pub concept_num: usize,
    pub insert_layer: usize,
    /// `cache` (label cache, aligned windows) or `online` (teacher every step, random offsets).
    pub labels: LabelSource,
    /// `faithful` or `active-only`.
    pub label_mode: cocomix_attribution::LabelMode,
    /// Windows the label cache covers (0: the whole training shard).
    #[serde(default)]
    pub cache_windows: usize,
}

/// `[model]`: the student. NTP and KD students use `d_model_ntp` (wider, to match size).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub n_layer: usize,
    pub d_model: usize,
    pub d_model_ntp: usize,
    pub n_head: usize,
    pub context: usize,
    pub dropout: f64,
}

/// `[optim]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub steps: u64,
    /// Sequences per optimizer step (split into `grad_accum` micro-batches).
    pub batch_size: usize,
    pub grad_accum: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip.
    pub clip: f64,
    /// Matmul precision: `f32`, or `bf16` / `f16` autocast (f32 master weights, optimizer
    /// state and losses).
    #[serde(default)]
    pub precision: Precision,
}

/// `[kd]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdSection {
    pub alpha: f64,
    pub tau: f64,
}

/// `[eval]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Validation every this many steps (and at the end).
    pub every: u64,
    /// At most this many validation blocks of `context` tokens.
    pub max_val_blocks: usize,
}

/// `[checkpoint]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub every: u64,
    /// Checkpoints kept besides the best one.
    pub keep_last: usize,
}

/// A whole run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub data: DataSection,
    pub teacher: TeacherSection,
    pub sae: SaeSection,
    pub concept: ConceptSection,
    pub model: ModelSection,
    pub optim: OptimSection,
    pub kd: KdSection,
    pub eval: EvalSection,
    pub checkpoint: CheckpointSection,
    /// `[dist]`: data-parallel training (optional; one process by default). Not part of a
    /// run's identity: a run may resume under another world size.
    #[serde(default, skip_serializing_if = "is_single")]
    pub dist: cocomix_dist::DistConfig,
}

fn is_single(d: &cocomix_dist::DistConfig) -> bool {
    *d == cocomix_dist::DistConfig::default()
}

fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

impl RunConfig {
    /// Reads a TOML config, applies `key=value` overrides (`optim.lr=3e-4`), and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::from_toml(&text, overrides).map_err(|e| Error::file(path, e))
    }

    /// Parses TOML text with overrides and validates.
    pub fn from_toml(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        for o in overrides {
            let (key, value) = o.split_once('=').ok_or_else(|| {
                Error::Config(format!("override {o:?}: expected section.key=value"))
            })?;
            let parts: Vec<&str> = key.trim().split('.').collect();
            let (last, sections) = parts.split_last().expect("split yields one part");
            let mut t = &mut table;
            for s in sections {
                t = t
                    .entry(s.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| {
                        Error::Config(format!("override {o:?}: {s} is not a section"))
                    })?;
            }
            t.insert(last.to_string(), parse_value(value.trim()));
        }
        let cfg: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config of one run of a comparison: this arm alone, with its seed and λ (what the
    /// run folder records, so a run is reused only when everything it depends on is equal).
    pub fn for_run(&self, arm: Arm, seed: u64) -> Self {
        let mut c = self.clone();
        c.run.seed = seed;
        c.run.seeds = 1;
        c.run.objectives = vec![Arm::new(arm.objective)];
        c.concept.lambda = arm.lambda(&self.concept);
        c.concept.label_mode = arm.label_mode(&self.concept);
        c.dist = Default::default();
        c
    }

    /// The seeds of a comparison.
    pub fn seeds(&self) -> Vec<u64> {
        (0..self.run.seeds as u64)
            .map(|i| self.run.seed + i)
            .collect()
    }

    /// The config as TOML (what a run folder records).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Checks every value that can be checked without loading anything.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let m = &self.model;
        let o = &self.optim;
        let c = &self.concept;
        if m.n_layer == 0 || m.d_model == 0 || m.d_model_ntp == 0 || m.n_head == 0 || m.context < 2
        {
            return bad(format!(
                "model sizes must be positive and context ≥ 2: {m:?}"
            ));
        }
        if !m.d_model.is_multiple_of(m.n_head) || !m.d_model_ntp.is_multiple_of(m.n_head) {
            return bad(format!(
                "model.d_model {} and d_model_ntp {} must be divisible by n_head {}",
                m.d_model, m.d_model_ntp, m.n_head
            ));
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return bad(format!("model.dropout {} must be in [0, 1)", m.dropout));
        }
        if c.insert_layer >= m.n_layer {
            return bad(format!(
                "concept.insert_layer {} must be below model.n_layer {}",
                c.insert_layer, m.n_layer
            ));
        }
        if c.concept_num == 0 || c.concept_num > self.sae.n_latents {
            return bad(format!(
                "concept.concept_num (K_c) {} must be in 1..=sae.n_latents {}",
                c.concept_num, self.sae.n_latents
            ));
        }
        if c.k_attr == 0 || c.k_attr > self.sae.n_latents {
            return bad(format!(
                "concept.k_attr {} must be in 1..=sae.n_latents {}",
                c.k_attr, self.sae.n_latents
            ));
        }
        if self.sae.k == 0 || self.sae.k > self.sae.n_latents {
            return bad(format!(
                "sae.k {} must be in 1..=sae.n_latents {}",
                self.sae.k, self.sae.n_latents
            ));
        }
        if o.batch_size == 0 || o.grad_accum == 0 || !o.batch_size.is_multiple_of(o.grad_accum) {
            return bad(format!(
                "optim.batch_size {} must be a positive multiple of optim.grad_accum {}",
                o.batch_size, o.grad_accum
            ));
        }
        if o.lr.is_nan() || o.lr <= 0.0 || o.min_lr < 0.0 || o.min_lr > o.lr {
            return bad(format!(
                "need 0 ≤ optim.min_lr ≤ optim.lr and lr > 0 (lr {}, min_lr {})",
                o.lr, o.min_lr
            ));
        }
        if o.steps == 0 || o.warmup > o.steps {
            return bad(format!(
                "optim.steps {} must be positive and ≥ optim.warmup {}",
                o.steps, o.warmup
            ));
        }
        if !(0.0..1.0).contains(&o.beta1)
            || !(0.0..1.0).contains(&o.beta2)
            || o.eps.is_nan()
            || o.eps <= 0.0
            || o.weight_decay < 0.0
            || o.clip.is_nan()
            || o.clip <= 0.0
        {
            return bad(format!(
                "optim betas must be in [0, 1), eps and clip positive, weight_decay ≥ 0: {o:?}"
            ));
        }
        if !(0.0..=1.0).contains(&self.kd.alpha) || self.kd.tau.is_nan() || self.kd.tau <= 0.0 {
            return bad(format!(
                "kd.alpha must be in [0, 1] and kd.tau > 0: {:?}",
                self.kd
            ));
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return bad(format!(
                "data.val_fraction {} must be in [0, 1)",
                self.data.val_fraction
            ));
        }
        if self.data.tokenizer == "train" && self.data.vocab_size.is_none() {
            return bad("data.tokenizer = \"train\" needs data.vocab_size".into());
        }
        if self.data.tokenizer == "teacher" && self.teacher.source == Source::Train {
            return bad(
                "data.tokenizer = \"teacher\" needs a teacher loaded from teacher.source (not \"train\")"
                    .into(),
            );
        }
        if self.teacher.source == Source::Train {
            let Some(t) = &self.teacher.train else {
                return bad("teacher.source = \"train\" needs a [teacher.train] section".into());
            };
            if self.teacher.layer >= t.n_layer {
                return bad(format!(
                    "teacher.layer {} must be below teacher.train.n_layer {}",
                    self.teacher.layer, t.n_layer
                ));
            }
            if t.batch_size == Some(0) {
                return bad("teacher.train.batch_size must be positive".into());
            }
            if !t.d_model.is_multiple_of(t.n_head) {
                return bad(format!(
                    "teacher.train.d_model {} must be divisible by n_head {}",
                    t.d_model, t.n_head
                ));
            }
        }
        if self.run.objectives.is_empty() {
            return bad("run.objectives is empty".into());
        }
        if self.run.seeds == 0 {
            return bad("run.seeds must be at least 1".into());
        }
        let mut names: Vec<String> = self.run.objectives.iter().map(|a| a.to_string()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("run.objectives lists {} twice", w[0]));
        }
        if self.concept.labels != LabelSource::Cache
            && self
                .run
                .objectives
                .iter()
                .any(|a| a.objective == Objective::ShuffledLabels)
        {
            return bad(
                "shuffled-labels reads other windows' labels from the label cache: it needs \
                 concept.labels = \"cache\""
                    .into(),
            );
        }
        if self.eval.every == 0 || self.checkpoint.every == 0 {
            return bad("eval.every and checkpoint.every must be positive".into());
        }
        self.dist
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(())
    }
}
