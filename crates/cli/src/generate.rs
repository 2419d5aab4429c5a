//! `cocomix generate`: sampling from a GPT-2, a Llama-family model or a CoCoMix student,
//! optionally steering concepts (the student's predicted concepts, or a teacher's SAE latents
//! at one layer).
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use cocomix_model::{AnyModel, Hook, Sampling, Steer, SteerMode};
use cocomix_sae::Sae;
use cocomix_trainer::default_device;

use crate::common::model_tokenizer;

/// `--steer-mode`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SteerModeArg {
    /// Add VALUE to the concept.
    Add,
    /// Set the concept to VALUE.
    Set,
}

impl From<SteerModeArg> for SteerMode {
    fn from(m: SteerModeArg) -> Self {
        match m {
            SteerModeArg::Add => SteerMode::Add,
            SteerModeArg::Set => SteerMode::Set,
        }
    }
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model folder, hub id or `.gguf` file (GPT-2, Llama-family or a CoCoMix student).
    #[arg(long)]
    model: String,
    #[arg(long)]
    prompt: String,
    /// Steer concept IDX by VALUE (repeatable). CoCoMix: the predicted concept logit; GPT-2
    /// or Llama with --sae: the SAE latent at --layer.
    #[arg(long = "steer", value_name = "IDX=VALUE")]
    steer: Vec<String>,
    /// How --steer changes the concept.
    #[arg(long, value_enum, default_value_t = SteerModeArg::Add)]
    steer_mode: SteerModeArg,
    /// Keep steered concepts in the TopK whatever their value (CoCoMix).
    #[arg(long)]
    force_topk: bool,
    /// SAE file, for steering a GPT-2 or Llama through its latents.
    #[arg(long, requires = "layer")]
    sae: Option<String>,
    /// The layer the SAE reads (output of block LAYER).
    #[arg(long)]
    layer: Option<usize>,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_steer(items: &[String], mode: SteerMode, force: bool, n: usize) -> Result<Vec<Steer>> {
    items
        .iter()
        .map(|s| {
            let (i, v) = s
                .split_once('=')
                .with_context(|| format!("--steer {s:?}: expected IDX=VALUE"))?;
            let index: usize = i
                .trim()
                .parse()
                .with_context(|| format!("--steer {s:?}: bad index"))?;
            let value: f32 = v
                .trim()
                .parse()
                .with_context(|| format!("--steer {s:?}: bad value"))?;
            if index >= n {
                bail!("--steer {s:?}: index {index} is out of range ({n} concepts)");
            }
            Ok(Steer {
                index,
                value,
                mode,
                force,
            })
        })
        .collect()
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let dev = default_device()?;
    let model = AnyModel::load(&a.model, &dev)?;
    let tok = model_tokenizer(&a.model)?;
    let prompt = tok.encode(&a.prompt)?;
    let sae = match &a.sae {
        Some(s) => {
            if matches!(model, AnyModel::Student(_)) {
                bail!(
                    "--sae steers a GPT-2 or Llama; a CoCoMix student is steered through its own concepts"
                );
            }
            let n_layer = model.teacher().map_or(0, |t| t.n_layer());
            if let Some(l) = a.layer.filter(|&l| l >= n_layer) {
                bail!("--layer {l}: {} has {n_layer} blocks", a.model);
            }
            let sae = Sae::load(s, &dev)?;
            sae.check_input_width(model.d_model(), &a.model)?;
            Some(sae)
        }
        None => None,
    };
    let n_concepts = match (&model, &sae) {
        (AnyModel::Student(s), _) => s.cfg.concept.as_ref().map_or(0, |c| c.concept_dim),
        (_, Some(sae)) => sae.n_latents(),
        _ => 0,
    };
    if !a.steer.is_empty() && n_concepts == 0 {
        bail!("--steer needs a CoCoMix student, or a GPT-2 or Llama with --sae and --layer");
    }
    let steer = parse_steer(&a.steer, a.steer_mode.into(), a.force_topk, n_concepts)?;
    let steer = &steer;
    let sae_steer = sae.as_ref().map(|s| {
        move |x: &Tensor| {
            s.steer_residual(x, steer)
                .map_err(|e| cocomix_model::Error::Other(format!("SAE steering: {e}")))
        }
    });
    let hook = match (&sae_steer, a.layer) {
        (Some(h), Some(layer)) => Some(Hook { layer, hook: h }),
        _ => None,
    };
    let student_steer: &[Steer] = match model {
        AnyModel::Student(_) => steer,
        AnyModel::Gpt2(_) | AnyModel::Llama(_) => &[],
    };
    let sampling = Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop: Some(tok.eot_id()),
    };
    let mut cache = model.new_cache();
    let out = cocomix_model::generate(
        &prompt,
        model.context(),
        &dev,
        &mut cache,
        &sampling,
        |ids, c| model.step(ids, c, student_steer, hook.as_ref()),
    )?;
    println!("{}{}", a.prompt, tok.decode(&out)?);
    Ok(())
}
