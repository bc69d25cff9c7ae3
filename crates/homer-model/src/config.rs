//! Llama-family hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Rotary embedding variant. `None` is the model's native RoPE; the others extend its window
/// (used by the evaluation's baselines; HOMER itself never needs them, spec §2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    #[default]
    None,
    /// Position interpolation: position / factor.
    Linear { factor: f64 },
    /// Static NTK-aware scaling: base' = base * factor^(d / (d - 2)).
    Ntk { factor: f64 },
    /// Dynamic NTK (transformers' "dynamic"): native RoPE up to the original window, beyond it
    /// base' = base * (factor * len / original - (factor - 1))^(d / (d - 2)) for a sequence of
    /// `len` tokens.
    #[serde(rename = "dynamic")]
    DynamicNtk {
        factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN (spec §8) with the original window it was computed for.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// A scaling chosen on the command line (`--rope-scaling KIND --rope-factor S`) for a model
    /// whose native window is `native` tokens. KIND: none, pi (or linear), ntk, dynamic-ntk, yarn.
    pub fn from_choice(
        kind: &str,
        factor: f64,
        native: usize,
    ) -> std::result::Result<Self, String> {
        if kind != "none" && !(factor.is_finite() && factor >= 1.0) {
            return Err(format!(
                "--rope-factor {factor}: a RoPE scaling factor must be a number >= 1"
            ));
        }
        Ok(match kind {
            "none" => RopeScaling::None,
            "pi" | "linear" => RopeScaling::Linear { factor },
            "ntk" => RopeScaling::Ntk { factor },
            "dynamic-ntk" | "dynamic" => RopeScaling::DynamicNtk {
                factor,
                original_max_position_embeddings: native,
            },
            "yarn" => RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: native,
            },
            other => {
                return Err(format!(
                    "--rope-scaling {other}: expected none, pi, ntk, dynamic-ntk or yarn"
                ));
            }
        })
    }

    /// Whether the scaling is the native RoPE itself: none, or PI, static NTK or YaRN at factor
    /// 1 (positions, base, frequencies and attention factor all unchanged, spec §8). Dynamic NTK
    /// is never native: past its original window it raises the base even at factor 1.
    pub fn is_native(&self) -> bool {
        match *self {
            RopeScaling::None => true,
            RopeScaling::Linear { factor }
            | RopeScaling::Ntk { factor }
            | RopeScaling::Yarn { factor, .. } => factor == 1.0,
            RopeScaling::DynamicNtk { .. } => false,
        }
    }

    /// The factor (1 for none).
    pub fn factor(&self) -> f64 {
        match *self {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor }
            | RopeScaling::Ntk { factor }
            | RopeScaling::DynamicNtk { factor, .. }
            | RopeScaling::Yarn { factor, .. } => factor,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    #[serde(default)]
    pub rope_scaling: RopeScaling,
}

/// The subset of HF's `config.json` we read. Unknown keys are ignored.
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    pretraining_tp: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    /// Parse a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_str(&text, path)
    }

    pub fn from_hf_str(text: &str, path: &Path) -> Result<Self> {
        let bad = |what: String| ModelError::Config {
            path: path.to_path_buf(),
            what,
        };
        let hf: HfConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let is_llama = hf
            .model_type
            .as_deref()
            .is_none_or(|t| t == "llama" || t == "mistral")
            && hf
                .architectures
                .iter()
                .all(|a| a.contains("Llama") || a.contains("Mistral"));
        if !is_llama {
            return Err(bad(format!(
                "model_type {:?} / architectures {:?} is not a Llama-family model; homer supports LlamaForCausalLM",
                hf.model_type, hf.architectures
            )));
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act `{act}` is not supported (Llama uses silu)"
                )));
            }
        }
        if hf.attention_bias || hf.mlp_bias {
            return Err(bad("attention_bias/mlp_bias = true is not supported".into()));
        }
        if hf.pretraining_tp.unwrap_or(1) != 1 {
            return Err(bad("pretraining_tp > 1 is not supported".into()));
        }
        let eos_token_ids = match hf.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Number(n)) => vec![n.as_u64().unwrap_or(0) as u32],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(other) => {
                return Err(bad(format!(
                    "eos_token_id {other} is not an id or a list of ids"
                )));
            }
        };
        // transformers 5 moved rope_theta into `rope_parameters`.
        let mut rope_theta = hf.rope_theta;
        let mut scaling_value = hf.rope_scaling.clone();
        if let Some(p) = &hf.rope_parameters {
            if let Some(t) = p.get("rope_theta").and_then(|v| v.as_f64()) {
                rope_theta = t;
            }
            if p.get("rope_type")
                .and_then(|v| v.as_str())
                .is_some_and(|t| t != "default")
            {
                scaling_value = Some(p.clone());
            }
        }
        let rope_scaling = match scaling_value {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(v) => parse_rope_scaling(&v, hf.max_position_embeddings).map_err(bad)?,
        };
        let heads = hf.num_attention_heads;
        let cfg = LlamaConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim: hf
                .head_dim
                .unwrap_or(if heads > 0 { hf.hidden_size / heads } else { 0 }),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
            rope_scaling,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Check the relations the model code relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps > 0.0) || !(self.rope_theta > 0.0) {
            return Err("rms_norm_eps and rope_theta must be > 0".into());
        }
        Ok(())
    }

    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
    /// Number of parameters (weights) the config implies.
    pub fn n_params(&self) -> usize {
        let d = self.hidden_size;
        let per_layer =
            d * self.q_dim() * 2 + d * self.kv_dim() * 2 + 3 * d * self.intermediate_size + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + head + d + self.num_hidden_layers * per_layer
    }
}

fn parse_rope_scaling(
    v: &serde_json::Value,
    max_pos: usize,
) -> std::result::Result<RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let factor = v.get("factor").and_then(|f| f.as_f64());
    let original = v
        .get("original_max_position_embeddings")
        .and_then(|x| x.as_u64())
        .map_or(max_pos, |x| x as usize);
    match (kind, factor) {
        ("default", _) => Ok(RopeScaling::None),
        ("linear", Some(f)) => Ok(RopeScaling::Linear { factor: f }),
        ("ntk", Some(f)) => Ok(RopeScaling::Ntk { factor: f }),
        ("dynamic", Some(f)) => Ok(RopeScaling::DynamicNtk {
            factor: f,
            original_max_position_embeddings: original,
        }),
        ("yarn", Some(f)) => Ok(RopeScaling::Yarn {
            factor: f,
            original_max_position_embeddings: original,
        }),
        _ => Err(format!(
            "rope_scaling {v} is not supported (supported: linear, dynamic/ntk, yarn with a factor); \
             Llama-3 style `llama3` scaling is not implemented"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gqa_config_and_rejects_non_llama() {
        let p = Path::new("config.json");
        let c = LlamaConfig::from_hf_str(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":300,
            "hidden_size":64,"intermediate_size":128,"num_hidden_layers":3,"num_attention_heads":4,
            "num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,"eos_token_id":[2,7]}"#,
            p,
        )
        .unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_groups(), 2);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        let e = LlamaConfig::from_hf_str(
            r#"{"model_type":"gpt2","vocab_size":3,"hidden_size":4,"intermediate_size":4,
            "num_hidden_layers":1,"num_attention_heads":1}"#,
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a Llama-family model"), "{e}");
        let e = LlamaConfig::from_hf_str(
            r#"{"model_type":"llama","vocab_size":3,"hidden_size":64,"intermediate_size":4,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#,
            p,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("multiple of num_key_value_heads"),
            "{e}"
        );
    }
}
