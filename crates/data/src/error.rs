use std::path::PathBuf;

/// Errors of the data crate. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `path` holds something it should not (bad format, wrong shape, mismatch).
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer refused its input or could not be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Anything else (bad options, hub access), with its explanation.
    #[error("{0}")]
    Other(String),
    /// `PrepareOptions::stop_after_files` was reached; running again continues.
    #[error(
        "{dir}: preparation stopped after {done} of {total} files as asked; run it again with \
         the same inputs to continue"
    )]
    Stopped {
        /// The output folder holding the checkpoint.
        dir: PathBuf,
        /// Source files finished.
        done: usize,
        /// Source files in all.
        total: usize,
    },
}

/// Result alias of the data crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
