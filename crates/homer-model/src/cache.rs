//! Per-layer key/value cache. Keys are stored post-RoPE; rows line up across layers only when the
//! caller keeps them so (plain prefill does; HOMER prunes all layers together, spec §6.1).

use burn::tensor::Tensor;

/// One layer's keys and values, each [kv_heads, rows, head_dim].
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub k: Tensor<3>,
    pub v: Tensor<3>,
}

impl LayerKv {
    pub fn len(&self) -> usize {
        self.k.dims()[1]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The model's cache: one optional [`LayerKv`] per layer, plus the position id the next token
/// gets (HOMER's compact cache does not end at `len()`, spec §6.3).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<Option<LayerKv>>,
    pub next_position: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            next_position: 0,
        }
    }
    /// Rows cached at layer 0 (all layers hold the same count after a prefill).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
