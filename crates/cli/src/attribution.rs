//! `cocomix attribute` and `cocomix labels`: concept attribution of a text, and the label
//! cache of a prepared data folder.
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Tensor;
use cocomix_attribution::{LabelCache, LabelCacheSpec, LabelChoice, LabelMode};
use cocomix_sae::Sae;
use cocomix_trainer::default_device;

use crate::common::{model_tokenizer, print_json, text_ids, LabelModeArg};

#[derive(clap::Args)]
pub struct AttributeArgs {
    #[arg(long)]
    teacher: String,
    #[arg(long)]
    sae: String,
    #[arg(long)]
    layer: usize,
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value_t = 4)]
    k_attr: usize,
    /// Which latents may be labels.
    #[arg(long, value_enum, default_value_t = LabelModeArg::Faithful)]
    mode: LabelModeArg,
    #[arg(long)]
    json: bool,
}

pub fn attribute(a: AttributeArgs) -> Result<()> {
    let dev = default_device()?;
    let (t, _) = cocomix_trainer::pipeline::load_teacher(&a.teacher, &dev)?;
    let s = Sae::load(&a.sae, &dev)?;
    let mode: LabelMode = a.mode.into();
    let tok = model_tokenizer(&a.teacher)?;
    let ids = text_ids(&tok, &a.text, t.context(), t.vocab_size())?;
    let att = cocomix_attribution::attribute(
        t.as_ref(),
        &s,
        &Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?,
        a.layer,
    )?;
    let (lab, sc) = cocomix_attribution::labels(&att, s.n_latents(), a.k_attr, mode)?;
    let v = serde_json::json!({
        "tokens": ids,
        "labels": lab.to_vec2::<u32>()?,
        "scores": sc.to_vec2::<f32>()?,
        "teacher_loss": att.teacher_loss,
        "mode": mode,
    });
    print_json(&v, a.json)
}

#[derive(clap::Subcommand)]
pub enum LabelsCommand {
    /// Label the aligned windows of a prepared training shard with the teacher (resumable).
    Build {
        #[arg(long)]
        teacher: String,
        #[arg(long)]
        sae: String,
        #[arg(long)]
        layer: usize,
        /// Prepared data folder; the cache is written inside it.
        #[arg(long)]
        data: PathBuf,
        /// Window length = the training context (default: the teacher's context).
        #[arg(long)]
        window: Option<usize>,
        #[arg(long, default_value_t = 4)]
        k_attr: usize,
        /// Which latents may be labels.
        #[arg(long, value_enum, default_value_t = LabelModeArg::Faithful)]
        mode: LabelModeArg,
        /// Windows per teacher call.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Label only the first N windows (0: all).
        #[arg(long, default_value_t = 0)]
        max_windows: usize,
    },
}

pub fn labels(cmd: LabelsCommand) -> Result<()> {
    let LabelsCommand::Build {
        teacher,
        sae,
        layer,
        data,
        window,
        k_attr,
        mode,
        batch,
        max_windows,
    } = cmd;
    let dev = default_device()?;
    let (t, weights) = cocomix_trainer::pipeline::load_teacher(&teacher, &dev)?;
    let s = Sae::load(&sae, &dev)?;
    let ds = cocomix_data::Dataset::open(&data)?;
    ds.check_tokenizer(&model_tokenizer(&teacher)?)?;
    let window = window.unwrap_or(t.context());
    if window > t.context() {
        bail!(
            "--window {window} exceeds the teacher's context {}",
            t.context()
        );
    }
    let spec = LabelCacheSpec::new(
        &teacher,
        &weights,
        &s,
        ds.meta(),
        LabelChoice {
            layer,
            k_attr,
            window,
            mode: mode.into(),
            max_windows,
        },
    )?;
    let dir = LabelCache::path_for(&data, &spec);
    let cache = LabelCache::build(t.as_ref(), &s, &spec, &ds.train, &dir, batch)?;
    eprintln!(
        "{}: {} windows of {window} tokens",
        dir.display(),
        cache.n_windows()
    );
    Ok(())
}
