//! What several subcommands share: the tokenizer of a model, reading inputs, printing JSON,
//! and the flag values clap checks.
use std::path::Path;

use anyhow::{bail, Context, Result};
use cocomix_data::Tokenizer;

/// The tokenizer of a model: a GGUF file's own, a folder's, a hub repo's, else the bundled
/// GPT-2 one.
pub fn model_tokenizer(spec: &str) -> Result<Tokenizer> {
    let dir = Path::new(spec);
    if dir.is_file() && cocomix_model::gguf::is_gguf_path(dir) {
        return Ok(Tokenizer::from_gguf(dir)?);
    }
    if !dir.exists() && spec.split('/').count() == 2 && !spec.starts_with('.') {
        return Ok(Tokenizer::load(spec)?);
    }
    if dir.is_dir() {
        if let Some(t) = Tokenizer::from_dir(dir)? {
            return Ok(t);
        }
        tracing::info!("{spec} has no tokenizer.json: using the bundled GPT-2 tokenizer");
    }
    Ok(Tokenizer::gpt2()?)
}

/// A UTF-8 text file; errors name it.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Token ids of a text file for a model of context `context` and vocabulary `vocab`
/// (truncated to the context with a warning).
pub fn text_ids(tok: &Tokenizer, path: &Path, context: usize, vocab: usize) -> Result<Vec<u32>> {
    let mut ids = tok.encode(&read_text(path)?)?;
    if ids.len() < 2 {
        bail!("{}: need at least two tokens", path.display());
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("{}: token id {bad} is outside the model's vocabulary of {vocab}: the tokenizer does not match the model (put its tokenizer.json in the model folder)", path.display());
    }
    if ids.len() > context {
        tracing::warn!(
            "{}: {} tokens, keeping the first {context} (the model's context)",
            path.display(),
            ids.len()
        );
        ids.truncate(context);
    }
    Ok(ids)
}

/// Prints `v` as one line (`compact`) or indented.
pub fn print_json(v: &impl serde::Serialize, compact: bool) -> Result<()> {
    let text = if compact {
        serde_json::to_string(v)?
    } else {
        serde_json::to_string_pretty(v)?
    };
    println!("{text}");
    Ok(())
}

/// `--mode` of concept labels.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LabelModeArg {
    /// The reference release's rule: zero-score latents fill in when fewer than K_attr
    /// scores are positive.
    Faithful,
    /// Only active latents, repeated.
    ActiveOnly,
}

impl From<LabelModeArg> for cocomix_attribution::LabelMode {
    fn from(m: LabelModeArg) -> Self {
        match m {
            LabelModeArg::Faithful => Self::Faithful,
            LabelModeArg::ActiveOnly => Self::ActiveOnly,
        }
    }
}
