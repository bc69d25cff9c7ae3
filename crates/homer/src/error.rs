//! Errors of the HOMER crate. Messages name the value at fault and what to change.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HomerError {
    /// The sizes cannot form a valid merge tree.
    #[error("HOMER plan: {0}")]
    Plan(String),

    #[error(transparent)]
    Model(#[from] homer_model::ModelError),

    #[error("{path}: bias table: {what}")]
    Bias { path: PathBuf, what: String },

    #[error("bias table does not fit this run: {0}")]
    BiasMismatch(String),

    #[error("{0}")]
    Input(String),

    #[error("cancelled")]
    Cancelled,

    /// The forward pass produced NaN or infinite values (weights, a kernel, or precision).
    #[error("{0}")]
    NonFinite(String),

    /// An invariant of homer's own broke: not the input's fault.
    #[error("bug: {0}; please report it with the command that caused it")]
    Bug(String),
}

pub type Result<T> = std::result::Result<T, HomerError>;
