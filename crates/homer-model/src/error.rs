//! Errors of the model crate. Every message names the file, tensor or value at fault and, where
//! there is one, what the user can do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a GGUF file (magic bytes {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },

    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    BadVersion { path: PathBuf, version: u32 },

    #[error("{path}: file is truncated or corrupt: {what} (at byte {offset}, file is {len} bytes)")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        len: u64,
    },

    #[error("{path}: malformed: {what}")]
    Malformed { path: PathBuf, what: String },

    #[error(
        "{path}: tensor `{tensor}` has dtype {dtype}, which homer cannot load (supported: {supported})"
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
        supported: &'static str,
    },

    #[error("{path}: tensor `{tensor}` is missing (the Llama architecture {described} needs it)")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        /// Where the architecture that needs the tensor is described ("in config.json").
        described: String,
    },

    #[error(
        "{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?} from the model config {described}"
    )]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
        /// Where the config is ("in config.json").
        described: String,
    },

    #[error("{path}: config: {what}")]
    Config { path: PathBuf, what: String },

    #[error("{path}: metadata key `{key}`: {what}")]
    Metadata {
        path: PathBuf,
        key: String,
        what: String,
    },

    #[error("{path}: not a model file or directory homer can load: {what}")]
    UnknownFormat { path: PathBuf, what: String },

    #[error(
        "{what} needs {needed} bytes in one GPU buffer but the adapter allows {limit}; {remedy}"
    )]
    DeviceLimit {
        what: String,
        needed: u64,
        limit: u64,
        /// What to do about it.
        remedy: String,
    },

    /// A forward pass would allocate more host memory than is available (CPU backend).
    #[error("{what} needs {needed} bytes of memory but {available} are available; {remedy}")]
    Memory {
        what: String,
        needed: u64,
        available: u64,
        remedy: String,
    },

    /// A forward pass produced NaN or infinite values (weights, a kernel, or precision).
    #[error("{0}; the model file or its weight precision (--dtype) is likely at fault")]
    NonFinite(String),

    /// The device failed while computing: lost, out of memory, or a fault (cubecl's message,
    /// on one line).
    #[error("the GPU failed while computing ({cause}); {remedy}")]
    Device { cause: String, remedy: String },

    #[error("invalid input: {0}")]
    Input(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
