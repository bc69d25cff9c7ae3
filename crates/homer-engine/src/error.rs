//! Errors of the engine: each names the file, value or step at fault and what to do next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] homer_model::ModelError),

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

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
