//! Weight loading: Hugging Face directories (safetensors) and GGUF files, both presented to the
//! model builder as one [`WeightSource`] speaking Hugging Face tensor names, row-major f32.

pub mod gguf;
pub mod gguf_writer;
pub mod quant;
pub mod safetensors;
pub mod synth;

use std::path::{Path, PathBuf};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// A dense host tensor, row-major (last dimension fastest), in the shape PyTorch would report.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A 2-D tensor's GGUF blocks as stored, rows in Hugging Face order ([out, in]).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockTensor {
    pub ty: quant::GgmlType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Something that hands out a model's config and its tensors by Hugging Face name
/// (`model.layers.3.self_attn.q_proj.weight`, ...), one at a time so that loading never holds
/// two f32 copies of the whole model.
pub trait WeightSource: Send + Sync + std::any::Any {
    /// For callers that need the concrete source (e.g. the GGUF tokenizer metadata).
    fn as_any(&self) -> &dyn std::any::Any;
    /// The file or directory the weights come from (used in error messages).
    fn path(&self) -> &Path;
    fn config(&self) -> &LlamaConfig;
    fn contains(&self, name: &str) -> bool;
    fn load(&self, name: &str) -> Result<HostTensor>;
    /// Tensor `name` as the file's own blocks when it stores a block type (GGUF), rows in the
    /// order [`WeightSource::load`] gives them; `None` for plain float storage.
    fn load_blocks(&self, _name: &str) -> Result<Option<BlockTensor>> {
        Ok(None)
    }
    /// Short description of the storage format (e.g. "GGUF v3, Q4_1").
    fn describe(&self) -> String;
    /// How the file itself names tensor `name`, for error messages.
    fn display_name(&self, name: &str) -> String {
        name.to_string()
    }
    /// The weights file a missing or malformed tensor is reported against (a directory's
    /// safetensors file or index; the file itself for GGUF).
    fn weights_file(&self) -> PathBuf {
        self.path().to_path_buf()
    }
    /// Where the architecture is described, for messages ("in config.json").
    fn described_in(&self) -> String {
        "in the file's metadata".into()
    }
}

/// Open a model: a `.gguf` file or a Hugging Face directory holding `config.json`.
pub fn open(path: &Path) -> Result<Box<dyn WeightSource>> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        return Ok(Box::new(safetensors::HfDir::open(path)?));
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| ModelError::io(path, e))?;
        if n < 4 {
            return Err(ModelError::Truncated {
                path: path.to_path_buf(),
                what: "file is shorter than the 4-byte magic".into(),
                offset: 0,
                len: meta.len(),
            });
        }
    }
    if &magic == b"GGUF" {
        return Ok(Box::new(gguf::GgufModel::open(path)?));
    }
    if path.file_name().is_some_and(|n| n == "config.json") {
        if let Some(dir) = path.parent() {
            return Ok(Box::new(safetensors::HfDir::open(dir)?));
        }
    }
    Err(ModelError::UnknownFormat {
        path: PathBuf::from(path),
        what: "expected a .gguf file (magic \"GGUF\") or a Hugging Face directory with config.json"
            .into(),
    })
}

/// Names of the tensors a Llama model needs, in Hugging Face naming.
pub fn llama_tensor_names(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![cfg.q_dim(), d]));
        v.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![cfg.kv_dim(), d],
        ));
        v.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![cfg.kv_dim(), d],
        ));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![d, cfg.q_dim()]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        v.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![cfg.intermediate_size, d],
        ));
        v.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![cfg.intermediate_size, d],
        ));
        v.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![d, cfg.intermediate_size],
        ));
    }
    v.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    v
}

/// How many layers the tensor `names` hold: one past the largest `N` of `{prefix}N.…` (0 when
/// none). Loaders check the declared layer count against it before any loop over layers.
pub(crate) fn layers_held<'a>(names: impl Iterator<Item = &'a String>, prefix: &str) -> usize {
    names
        .filter_map(|n| {
            n.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// Load one tensor and check its shape against the config.
pub fn load_checked(src: &dyn WeightSource, name: &str, expected: &[usize]) -> Result<HostTensor> {
    if !src.contains(name) {
        return Err(ModelError::MissingTensor {
            path: src.weights_file(),
            tensor: src.display_name(name),
            described: src.described_in(),
        });
    }
    let t = src.load(name)?;
    if t.shape != expected {
        return Err(ModelError::ShapeMismatch {
            path: src.weights_file(),
            tensor: src.display_name(name),
            found: t.shape,
            expected: expected.to_vec(),
            described: src.described_in(),
        });
    }
    Ok(t)
}
