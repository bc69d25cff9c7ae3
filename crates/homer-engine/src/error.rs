//! Errors of the engine: each names the file, value or step at fault and what to do next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] homer_model::ModelError),

    #[error(transparent)]
    Homer(homer::HomerError),

    #[error("{path}: tokenizer: {what}")]
    Tokenizer { path: PathBuf, what: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("fetching the default model failed: {0}")]
    Fetch(String),

    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },

    #[error("invalid setting: {0}")]
    Setting(String),

    #[error("cancelled")]
    Cancelled,
}

impl From<homer::HomerError> for EngineError {
    fn from(e: homer::HomerError) -> Self {
        match e {
            homer::HomerError::Cancelled => EngineError::Cancelled,
            homer::HomerError::Model(m) => EngineError::Model(m),
            other => EngineError::Homer(other),
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
