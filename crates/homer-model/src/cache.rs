//! Per-layer key/value cache. Keys are stored post-RoPE; rows line up across layers only when the
//! caller keeps them so (plain prefill does; HOMER prunes all layers together, spec §6.1).
//!
//! Each layer's K and V live in a preallocated buffer [kv_heads, capacity, head_dim] whose first
//! `len` rows are filled; new rows are written in place (the CPU kernels write them directly,
//! other backends with `slice_assign` on the uniquely held buffer), and attention reads the
//! filled rows. A full buffer doubles.

use burn::tensor::{DType, Device, Tensor};

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

/// One layer's K/V buffer: `len` filled rows of `capacity`.
#[derive(Debug, Clone)]
pub struct KvBuffer {
    k: Tensor<3>,
    v: Tensor<3>,
    len: usize,
}

impl KvBuffer {
    /// An empty buffer with room for `capacity` rows of `dtype` (f32, or f16 on the CPU
    /// kernels' path: [`crate::Llama::set_kv_dtype`]).
    pub fn empty(
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let z = || Tensor::<3>::zeros([kv_heads, capacity.max(1), head_dim], (device, dtype));
        KvBuffer {
            k: z(),
            v: z(),
            len: 0,
        }
    }

    /// A full buffer holding exactly `kv`'s rows (HOMER's gathered cache); it grows on the
    /// next append.
    pub fn from_rows(kv: LayerKv) -> Self {
        let len = kv.len();
        KvBuffer {
            k: kv.k,
            v: kv.v,
            len,
        }
    }

    pub(crate) fn from_parts(k: Tensor<3>, v: Tensor<3>, len: usize) -> Self {
        KvBuffer { k, v, len }
    }

    pub(crate) fn into_parts(self) -> (Tensor<3>, Tensor<3>) {
        (self.k, self.v)
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.k.dims()[1]
    }

    /// The filled rows (views of the buffer where the backend has views).
    pub fn filled(&self) -> LayerKv {
        let [kvh, cap, hd] = self.k.dims();
        if self.len == cap {
            return LayerKv {
                k: self.k.clone(),
                v: self.v.clone(),
            };
        }
        LayerKv {
            k: self.k.clone().slice([0..kvh, 0..self.len, 0..hd]),
            v: self.v.clone().slice([0..kvh, 0..self.len, 0..hd]),
        }
    }

    /// Make room for `extra` more rows: a new buffer of at least double the capacity, the
    /// filled rows copied once.
    pub fn reserve(&mut self, extra: usize, device: &Device) {
        let need = self.len + extra;
        if need <= self.capacity() {
            return;
        }
        self.grow_to(need.max(2 * self.capacity()), device);
    }

    /// Make room for exactly `rows` rows in all (no doubling): a known answer budget.
    pub fn reserve_exact(&mut self, rows: usize, device: &Device) {
        if rows > self.capacity() {
            self.grow_to(rows, device);
        }
    }

    fn grow_to(&mut self, cap: usize, device: &Device) {
        let [kvh, _, hd] = self.k.dims();
        let mut grown = KvBuffer::empty(kvh, hd, cap, self.k.dtype(), device);
        if self.len > 0 {
            let filled = self.filled();
            grown.k = grown.k.slice_assign([0..kvh, 0..self.len, 0..hd], filled.k);
            grown.v = grown.v.slice_assign([0..kvh, 0..self.len, 0..hd], filled.v);
        }
        grown.len = self.len;
        *self = grown;
    }
}

/// Element type of the KV cache (`--kv-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn dtype(self) -> DType {
        match self {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(format!(
                "unknown KV cache dtype `{other}` (expected f32 or f16)"
            )),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        })
    }
}

/// The model's cache: one optional [`KvBuffer`] per layer, plus the position id the next token
/// gets (HOMER's compact cache does not end at `len()`, spec §6.3).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<Option<KvBuffer>>,
    pub next_position: usize,
    /// Rows a layer's buffer is created with (0: just the first call's rows).
    pub initial_capacity: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            next_position: 0,
            initial_capacity: 0,
        }
    }
    /// A cache whose buffers are created with room for `rows` rows (prompt + answer budget), so
    /// a prefill and the decode after it never copy the cache.
    pub fn with_capacity(n_layers: usize, rows: usize) -> Self {
        KvCache {
            initial_capacity: rows,
            ..KvCache::new(n_layers)
        }
    }
    /// A cache holding exactly the given rows per layer (HOMER's root).
    pub fn from_rows(layers: Vec<LayerKv>, next_position: usize) -> Self {
        KvCache {
            layers: layers
                .into_iter()
                .map(|l| Some(KvBuffer::from_rows(l)))
                .collect(),
            next_position,
            initial_capacity: 0,
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
    /// The filled rows of layer `l`.
    pub fn layer(&self, l: usize) -> Option<LayerKv> {
        self.layers.get(l)?.as_ref().map(|b| b.filled())
    }
    /// Make room for `rows` rows in all at every layer without later doubling (call before
    /// decoding a known number of tokens after HOMER's compact cache).
    pub fn reserve_total(&mut self, rows: usize, device: &Device) {
        for b in self.layers.iter_mut().flatten() {
            b.reserve_exact(rows, device);
        }
    }
}
