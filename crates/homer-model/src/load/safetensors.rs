//! Hugging Face model directory: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`; f32, f16 and bf16 tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{HostTensor, WeightSource};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

pub struct HfDir {
    dir: PathBuf,
    config: LlamaConfig,
    shards: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `shards`
    index: BTreeMap<String, usize>,
}

impl HfDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(ModelError::UnknownFormat {
                path: dir.to_path_buf(),
                what: "directory has no config.json (expected a Hugging Face model directory)"
                    .into(),
            });
        }
        let config = LlamaConfig::from_hf_json(&cfg_path)?;
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Malformed {
                    path: index_path.clone(),
                    what: format!("invalid JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Malformed {
                    path: index_path.clone(),
                    what: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect::<Vec<_>>();
            files.sort();
            files.dedup();
            files
        } else {
            return Err(ModelError::UnknownFormat {
                path: dir.to_path_buf(),
                what: "no model.safetensors or model.safetensors.index.json (PyTorch .bin files are not supported)"
                    .into(),
            });
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (i, f) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&f).map_err(|e| ModelError::io(&f, e))?;
            // SAFETY: read-only map of a file we do not modify.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&f, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Malformed {
                path: f.clone(),
                what: format!("safetensors: {e}"),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            drop(st);
            shards.push((f, mmap));
        }
        // The layer count must match the tensors held, before any loop over layers (fuzzing
        // found a corrupt `num_hidden_layers` sending the loader after 10^11 layers).
        let held = super::layers_held(index.keys(), "model.layers.");
        if held != config.num_hidden_layers {
            return Err(ModelError::Config {
                path: dir.join("config.json"),
                what: format!(
                    "`num_hidden_layers` is {} but {} holds layers 0..{held}",
                    config.num_hidden_layers,
                    match shards.as_slice() {
                        [(one, _)] => one.display().to_string(),
                        _ => format!("{} shards", shards.len()),
                    }
                ),
            });
        }
        Ok(HfDir {
            dir: dir.to_path_buf(),
            config,
            shards,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl WeightSource for HfDir {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn path(&self) -> &Path {
        &self.dir
    }
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn weights_file(&self) -> PathBuf {
        match self.shards.as_slice() {
            [(one, _)] => one.clone(),
            _ => self.dir.join("model.safetensors.index.json"),
        }
    }
    fn described_in(&self) -> String {
        format!("in {}", self.dir.join("config.json").display())
    }
    fn load(&self, name: &str) -> Result<HostTensor> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.weights_file(),
                tensor: name.to_string(),
                described: self.described_in(),
            })?;
        let (path, mmap) = &self.shards[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| ModelError::Malformed {
            path: path.clone(),
            what: format!("safetensors: {e}"),
        })?;
        let view = st.tensor(name).map_err(|e| ModelError::Malformed {
            path: path.clone(),
            what: format!("tensor `{name}`: {e}"),
        })?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                    supported: "F32, F16, BF16",
                });
            }
        };
        Ok(HostTensor {
            shape: view.shape().to_vec(),
            data,
        })
    }
    fn describe(&self) -> String {
        format!("Hugging Face safetensors, {} shard(s)", self.shards.len())
    }
}
