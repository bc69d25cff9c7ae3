//! homer-model: a Llama-family transformer (MHA and GQA) written against burn's backend-generic
//! `Tensor`/`Device`, with loaders for Hugging Face directories and GGUF files.
//!
//! The decoder layer is split in two halves ([`layer::DecoderLayer::attend`] and
//! [`layer::DecoderLayer::feed_forward`]) and attention accepts arbitrary position ids, which is
//! what HOMER (Song et al., ICLR 2024) needs to prune tokens between them.

pub mod attention;
pub mod backend;
pub mod cache;
pub mod config;
pub mod cpu;
pub mod error;
pub mod kernels;
pub mod layer;
pub mod load;
pub mod model;
pub mod qcpu;
pub mod rope;

pub use backend::{BackendKind, DeviceInfo};
pub use cache::{KvBuffer, KvCache, KvDtype, LayerKv};
pub use config::{LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use kernels::{Weight, WeightDtype};
pub use model::{Embedding, Llama, Logits, read_f32};

pub use burn::tensor::{Device, Tensor};
