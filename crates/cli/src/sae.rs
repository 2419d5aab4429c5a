//! `cocomix sae`: train a TopK SAE on a teacher, or encode a text with one.
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use cocomix_sae::Sae;
use cocomix_trainer::default_device;

use crate::common::{model_tokenizer, print_json, text_ids};

#[derive(clap::Subcommand)]
pub enum SaeCommand {
    /// Train a TopK SAE on a teacher's residual stream at LAYER, streaming a prepared corpus.
    Train {
        #[arg(long)]
        teacher: String,
        #[arg(long)]
        layer: usize,
        /// Prepared data folder (cocomix prepare), tokenized like the teacher.
        #[arg(long)]
        data: PathBuf,
        /// Output .safetensors file (metrics go beside it as .jsonl).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 32768)]
        latents: usize,
        #[arg(long, default_value_t = 32)]
        k: usize,
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
        /// Adam learning rate (default: Gao et al.'s scaling rule).
        #[arg(long)]
        lr: Option<f64>,
        /// Window length the activations are taken from (default: the teacher's context).
        #[arg(long)]
        context: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Sparse SAE codes of a text: JSON with tokens, indices and values ([T][k]).
    Encode {
        #[arg(long)]
        sae: String,
        /// The model whose residual the SAE reads.
        #[arg(long)]
        model: String,
        #[arg(long)]
        layer: usize,
        #[arg(long)]
        text: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: SaeCommand) -> Result<()> {
    let dev = default_device()?;
    match cmd {
        SaeCommand::Train {
            teacher,
            layer,
            data,
            out,
            latents,
            k,
            steps,
            batch_tokens,
            lr,
            context,
            seed,
        } => {
            let (t, weights) = cocomix_trainer::pipeline::load_teacher(&teacher, &dev)?;
            let ds = cocomix_data::Dataset::open(&data)?;
            ds.check_tokenizer(&model_tokenizer(&teacher)?)?;
            if layer >= t.n_layer() {
                bail!("--layer {layer}: the teacher has {} blocks", t.n_layer());
            }
            let mut cfg = cocomix_sae::SaeTrainConfig::new(t.d_model(), latents, k);
            if let Some(lr) = lr {
                cfg.lr = lr;
            }
            cfg.seed = seed;
            let ctx = context.unwrap_or(t.context()).min(t.context());
            let meta = [
                ("teacher", teacher.clone()),
                ("teacher_sha256", cocomix_data::file_sha256(&weights)?),
            ];
            cocomix_trainer::pipeline::train_sae(
                t.as_ref(),
                &ds,
                cocomix_trainer::pipeline::SaeJob {
                    sae: cfg,
                    layer,
                    steps,
                    batch_tokens,
                    context: ctx,
                },
                &out,
                &meta,
            )?;
            eprintln!(
                "saved {} (metrics: {})",
                out.display(),
                out.with_extension("jsonl").display()
            );
        }
        SaeCommand::Encode {
            sae,
            model,
            layer,
            text,
            json,
        } => {
            let (m, _) = cocomix_trainer::pipeline::load_teacher(&model, &dev)?;
            let s = Sae::load(&sae, &dev)?;
            s.check_input_width(m.d_model(), &format!("{model} at layer {layer}"))?;
            let tok = model_tokenizer(&model)?;
            let ids = text_ids(&tok, &text, m.context(), m.vocab_size())?;
            let x = m.hidden_state(&Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?, layer)?;
            let codes = s.encode(&x)?;
            let v = serde_json::json!({
                "tokens": ids,
                "indices": codes.indices.to_vec2::<u32>()?,
                "values": codes.values.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            });
            print_json(&v, json)?;
        }
    }
    Ok(())
}
