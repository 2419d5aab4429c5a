//! Evaluation of cocomix models as the CoCoMix paper (Tack et al. 2025, Table 1) reports it:
//! perplexity over windows, word perplexity and bits per byte of a text (lm-evaluation-
//! harness's WikiText metrics), the zero-shot tasks scored as lm-evaluation-harness scores
//! them, and the Table 1 comparison of runs.
//!
//! ```no_run
//! use candle_core::Device;
//! use cocomix_model::AnyModel;
//! let model = AnyModel::load("runs/default/cocomix/final", &Device::Cpu)?;
//! let tok = cocomix_data::Tokenizer::from_dir("runs/default/cocomix/final".as_ref())?
//!     .expect("the run saved its tokenizer");
//! let wiki = cocomix_eval::score_text_file(&model, &tok, "wiki.txt".as_ref(), 1024, 4)?;
//! println!("word perplexity {:.2}", wiki.word_perplexity);
//! let task = cocomix_eval::tasks::load_task("piqa", "data/eval/piqa/requests.jsonl.gz".as_ref())?;
//! let scorer = cocomix_eval::tasks::ModelScorer { model: &model, max_len: model.context() };
//! let r = cocomix_eval::tasks::evaluate(&task, &tok, &scorer, Some(100))?;
//! println!("piqa acc {:.3}", r.metrics["acc"].value);
//! # Ok::<(), cocomix_eval::Error>(())
//! ```
mod perplexity;
pub mod table;
pub mod tasks;
mod text;

pub use perplexity::{perplexity, Perplexity};
pub use table::{
    build_table1, model_scores, render_markdown, ModelScores, RunInfo, Table1, Table1Row,
};
pub use text::{count_words, score_ids, score_text, score_text_file, TextScore};

use std::path::PathBuf;

/// Errors of the eval crate. File problems name the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From the model crate.
    #[error(transparent)]
    Model(#[from] cocomix_model::Error),
    /// From the data crate.
    #[error(transparent)]
    Data(#[from] cocomix_data::Error),
    /// A file and what is wrong with it.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Bad input, in words.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            reason: e.to_string(),
        }
    }
}

/// Result alias of the eval crate.
pub type Result<T> = std::result::Result<T, Error>;
