use std::path::{Path, PathBuf};

/// Errors of the model crate. Weight and config errors name the file and the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Ops(#[from] cocomix_ops::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype:?}; expected f32, f16 or bf16")]
    DType {
        path: PathBuf,
        name: String,
        dtype: candle_core::DType,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

/// Result alias of the model crate.
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

/// Reads a `config.json` at `path` as `T` (a `what` config) and validates it; every error
/// names the file.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
    validate: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let cfg: T = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(path, format!("not a {what} config.json: {e}")))?;
    validate(&cfg).map_err(|e| Error::invalid(path, e.to_string()))?;
    Ok(cfg)
}
