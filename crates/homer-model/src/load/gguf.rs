//! GGUF v2/v3 reader: header, metadata, tensor directory, and dequantising tensor access.
//!
//! llama.cpp's converter stores the rows of `attn_q` / `attn_k` permuted for its interleaved
//! RoPE; homer's RoPE uses Hugging Face's rotate-half layout, so those rows are un-permuted on load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::quant::{self, GgmlType};
use super::{BlockTensor, HostTensor, WeightSource};
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{ModelError, Result};

/// The longest metadata key or tensor name a GGUF file may hold (the specification's key limit).
const MAX_NAME: u64 = 65_535;

/// A name from the file as messages show it: control characters escaped, at most 80 characters.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().nth(80).is_some() {
        out.push('…');
    }
    out
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) if v >= 0 => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::I64(v) if v >= 0 => v as u64,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: dims[0] is the fastest-varying (columns).
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Shape as PyTorch reports it (slowest first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data_start: u64,
    mmap: Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if self.buf.len().saturating_sub(self.pos) < n {
            return Err(ModelError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("reading {}", what()),
                offset: self.pos as u64,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A metadata key or tensor name: at most [`MAX_NAME`] bytes (the GGUF specification's
    /// limit for keys), so a corrupt length cannot turn half the file into a name.
    fn name(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n > MAX_NAME {
            return Err(ModelError::Malformed {
                path: self.path.to_path_buf(),
                what: format!(
                    "{}: length {n} at byte {at} exceeds the {MAX_NAME} bytes GGUF allows (a corrupt header)",
                    what()
                ),
            });
        }
        self.pos = at;
        self.string(what)
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.buf.len() as u64 {
            return Err(ModelError::Malformed {
                path: self.path.to_path_buf(),
                what: format!("{}: string length {n} exceeds the file size", what()),
            });
        }
        let b = self.take(n as usize, what)?;
        // Tolerate invalid UTF-8 (some tokenizer vocabularies carry raw bytes) by replacement.
        Ok(String::from_utf8_lossy(b).into_owned())
    }
    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(ModelError::Malformed {
                        path: self.path.to_path_buf(),
                        what: format!("{}: arrays nested too deeply", what()),
                    });
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(ModelError::Malformed {
                        path: self.path.to_path_buf(),
                        what: format!("{}: array length {n} exceeds the file size", what()),
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => {
                return Err(ModelError::Malformed {
                    path: self.path.to_path_buf(),
                    what: format!("{}: unknown metadata value type {t}", what()),
                });
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; homer never writes model files while reading them.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic: [u8; 4] = c.take(4, &|| "the magic".into())?.try_into().unwrap();
        if &magic != b"GGUF" {
            return Err(ModelError::BadMagic {
                path: path.to_path_buf(),
                found: magic,
            });
        }
        let version = c.u32(&|| "the version".into())?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::BadVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_kv = c.u64(&|| "the metadata count".into())?;
        // Each entry takes at least 8 bytes, so larger counts mean a cut (or corrupt) file.
        if n_tensors > mmap.len() as u64 / 8 || n_kv > mmap.len() as u64 / 8 {
            return Err(ModelError::Truncated {
                path: path.to_path_buf(),
                what: format!(
                    "header announces {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold"
                ),
                offset: c.pos as u64,
                len: mmap.len() as u64,
            });
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.name(&|| format!("metadata key #{i}"))?;
            let shown = shown(&key);
            let ty = c.u32(&|| format!("the type of metadata `{shown}`"))?;
            let v = c.value(ty, &|| format!("metadata `{shown}`"), 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = BTreeMap::new();
        for i in 0..n_tensors {
            let name = c.name(&|| format!("the name of tensor #{i}"))?;
            let name_shown = shown(&name);
            let nd = c.u32(&|| format!("tensor `{name_shown}` rank"))?;
            if nd == 0 || nd > 4 {
                return Err(ModelError::Malformed {
                    path: path.to_path_buf(),
                    what: format!("tensor `{name_shown}` has {nd} dimensions (expected 1..4)"),
                });
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64(&|| format!("tensor `{name_shown}` dims"))?);
            }
            let type_id = c.u32(&|| format!("tensor `{name_shown}` type"))?;
            let offset = c.u64(&|| format!("tensor `{name_shown}` offset"))?;
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    dims,
                    type_id,
                    offset,
                },
            );
        }
        let align = metadata
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(32)
            .max(1);
        let data_start = (c.pos as u64).div_ceil(align) * align;
        let file_len = mmap.len() as u64;
        // Check every tensor's extent now, so truncation is reported at open time.
        for t in tensors.values() {
            // Sizes a corrupt header could overflow are refused here, once, so later arithmetic
            // on them (slices, shapes) is safe.
            let n = t
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= file_len.saturating_mul(8))
                .ok_or_else(|| ModelError::Malformed {
                    path: path.to_path_buf(),
                    what: format!(
                        "tensor `{}` has dimensions {:?}, more elements than the file can hold",
                        t.name, t.dims
                    ),
                })?;
            if let Some(ty) = GgmlType::from_id(t.type_id) {
                let bytes = ty
                    .bytes_for(n as usize)
                    .ok_or_else(|| ModelError::Malformed {
                        path: path.to_path_buf(),
                        what: format!(
                            "tensor `{}` has {n} elements, not a whole number of {} blocks",
                            t.name,
                            ty.name()
                        ),
                    })?;
                let end = data_start
                    .checked_add(t.offset)
                    .and_then(|e| e.checked_add(bytes as u64))
                    .unwrap_or(u64::MAX);
                if end > file_len {
                    return Err(ModelError::Truncated {
                        path: path.to_path_buf(),
                        what: format!(
                            "tensor `{}` data ({} bytes) runs past the end of the file",
                            t.name, bytes
                        ),
                        offset: data_start + t.offset,
                        len: file_len,
                    });
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str, what: &str) -> ModelError {
        ModelError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            what: what.to_string(),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .ok_or_else(|| self.meta_err(key, "missing"))?
            .as_u64()
            .ok_or_else(|| self.meta_err(key, "not an unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .ok_or_else(|| self.meta_err(key, "missing"))?
            .as_f64()
            .ok_or_else(|| self.meta_err(key, "not a number"))
    }

    /// Dequantise tensor `name` (GGUF naming) to f32, in PyTorch shape.
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                described: "in the file's metadata".into(),
            })?;
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| ModelError::UnsupportedDtype {
            path: self.path.clone(),
            tensor: name.to_string(),
            dtype: GgmlType::name_of(t.type_id),
            supported: quant::SUPPORTED,
        })?;
        let n = t.n_elements() as usize;
        let bytes = ty.bytes_for(n).expect("checked at open");
        let start = (self.data_start + t.offset) as usize;
        let mut data = vec![0f32; n];
        quant::dequantize(ty, &self.mmap[start..start + bytes], &mut data);
        Ok(HostTensor {
            shape: t.shape(),
            data,
        })
    }

    /// Tensor `name` as its stored bytes and type, or None when the file has no such tensor.
    pub fn tensor_bytes(&self, name: &str) -> Option<(GgmlType, Vec<usize>, &[u8])> {
        let t = self.tensors.get(name)?;
        let ty = GgmlType::from_id(t.type_id)?;
        let bytes = ty.bytes_for(t.n_elements() as usize)?;
        let start = (self.data_start + t.offset) as usize;
        Some((ty, t.shape(), &self.mmap[start..start + bytes]))
    }

    /// The most common weight type among 2-D tensors (e.g. "Q4_1"), for display.
    pub fn dominant_type(&self) -> String {
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for t in self.tensors.values().filter(|t| t.dims.len() == 2) {
            *counts.entry(t.type_id).or_default() += t.n_elements() as usize;
        }
        counts
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map(|(id, _)| GgmlType::name_of(id))
            .unwrap_or_default()
    }
}

/// Undo llama.cpp's RoPE row permutation: GGUF row `h*hd + 2*i + j` holds HF row `h*hd + j*hd/2 + i`.
pub fn unpermute_rows(t: &mut HostTensor, n_heads: usize) {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    let hd = rows / n_heads;
    let half = hd / 2;
    let src = std::mem::take(&mut t.data);
    let mut dst = vec![0f32; src.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let from = h * hd + 2 * i + j;
                let to = h * hd + j * half + i;
                dst[to * cols..(to + 1) * cols]
                    .copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
    t.data = dst;
}

/// [`unpermute_rows`] on rows of `row_bytes` raw bytes (whole rows of blocks move together).
pub fn unpermute_byte_rows(src: &[u8], rows: usize, row_bytes: usize, n_heads: usize) -> Vec<u8> {
    let hd = rows / n_heads;
    let half = hd / 2;
    let mut dst = vec![0u8; src.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let from = h * hd + 2 * i + j;
                let to = h * hd + j * half + i;
                dst[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&src[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    dst
}

/// A Llama model stored in a GGUF file.
pub struct GgufModel {
    pub file: GgufFile,
    config: LlamaConfig,
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(&file)?;
        Ok(GgufModel { file, config })
    }

    /// GGUF tensor name for a Hugging Face name.
    /// The head count whose RoPE row permutation llama.cpp applied to GGUF tensor `g` (q and k
    /// projections), checked against its shape; None for every other tensor.
    fn permuted_heads(&self, g: &str, shape: &[usize]) -> Result<Option<usize>> {
        let heads = if g.ends_with("attn_q.weight") {
            self.config.num_attention_heads
        } else if g.ends_with("attn_k.weight") {
            self.config.num_key_value_heads
        } else {
            return Ok(None);
        };
        if shape.len() != 2 || heads == 0 || shape[0] % heads != 0 || (shape[0] / heads) % 2 != 0 {
            return Err(ModelError::ShapeMismatch {
                path: self.file.path.clone(),
                tensor: g.to_string(),
                found: shape.to_vec(),
                expected: vec![heads * self.config.head_dim, self.config.hidden_size],
                described: self.described_in(),
            });
        }
        Ok(Some(heads))
    }

    fn gguf_name(hf: &str) -> Option<String> {
        if hf == "model.embed_tokens.weight" {
            return Some("token_embd.weight".into());
        }
        if hf == "model.norm.weight" {
            return Some("output_norm.weight".into());
        }
        if hf == "lm_head.weight" {
            return Some("output.weight".into());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (idx, tail) = rest.split_once('.')?;
        let g = match tail {
            "input_layernorm.weight" => "attn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => return None,
        };
        Some(format!("blk.{idx}.{g}"))
    }
}

impl WeightSource for GgufModel {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn path(&self) -> &Path {
        &self.file.path
    }
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|g| self.file.tensors.contains_key(&g))
    }
    fn load(&self, name: &str) -> Result<HostTensor> {
        let g = Self::gguf_name(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.file.path.clone(),
            tensor: name.to_string(),
            described: self.described_in(),
        })?;
        let mut t = self.file.tensor_f32(&g)?;
        if let Some(heads) = self.permuted_heads(&g, &t.shape)? {
            unpermute_rows(&mut t, heads);
        }
        Ok(t)
    }
    fn load_blocks(&self, name: &str) -> Result<Option<BlockTensor>> {
        let Some(g) = Self::gguf_name(name) else {
            return Ok(None);
        };
        let Some((ty, shape, bytes)) = self.file.tensor_bytes(&g) else {
            return Ok(None);
        };
        let (bw, _) = ty.block();
        if bw == 1 || shape.len() != 2 || shape[1] % bw != 0 {
            return Ok(None);
        }
        let row_bytes = bytes.len() / shape[0];
        let bytes = match self.permuted_heads(&g, &shape)? {
            Some(heads) => unpermute_byte_rows(bytes, shape[0], row_bytes, heads),
            None => bytes.to_vec(),
        };
        Ok(Some(BlockTensor { ty, shape, bytes }))
    }
    fn display_name(&self, name: &str) -> String {
        match Self::gguf_name(name) {
            Some(g) => format!("{g}` (`{name}"),
            None => name.to_string(),
        }
    }
    fn describe(&self) -> String {
        format!("GGUF v{}, {}", self.file.version, self.file.dominant_type())
    }
}

/// Build a [`LlamaConfig`] from `llama.*` metadata.
pub fn config_from_gguf(f: &GgufFile) -> Result<LlamaConfig> {
    let arch = f
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if arch != "llama" {
        return Err(f.meta_err(
            "general.architecture",
            &format!("`{arch}` is not supported; homer runs Llama-architecture models (`llama`)"),
        ));
    }
    let k = |s: &str| format!("llama.{s}");
    let hidden = f.get_u64(&k("embedding_length"))? as usize;
    let heads = f.get_u64(&k("attention.head_count"))? as usize;
    let kv_heads = match f.get(&k("attention.head_count_kv")) {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| f.meta_err(&k("attention.head_count_kv"), "not an integer"))?
            as usize,
        None => heads,
    };
    let head_dim = match f.get(&k("attention.key_length")) {
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None if heads > 0 => hidden / heads,
        None => 0,
    };
    let vocab = match f.get(&k("vocab_size")) {
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None => match f.tensors.get("token_embd.weight") {
            Some(t) => t.shape()[0],
            None => {
                return Err(ModelError::MissingTensor {
                    path: f.path.clone(),
                    tensor: "token_embd.weight".into(),
                    described: "in the file's metadata".into(),
                });
            }
        },
    };
    let rope_theta = f
        .get(&k("rope.freq_base"))
        .and_then(|v| v.as_f64())
        .unwrap_or(10000.0);
    let rope_scaling = match f.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
        None | Some("none") => RopeScaling::None,
        Some(kind) => {
            let factor = f.get_f64(&k("rope.scaling.factor"))?;
            match kind {
                "linear" => RopeScaling::Linear { factor },
                "yarn" => RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: f
                        .get(&k("rope.scaling.original_context_length"))
                        .and_then(|v| v.as_u64())
                        .unwrap_or(4096)
                        as usize,
                },
                other => {
                    return Err(f.meta_err(
                        &k("rope.scaling.type"),
                        &format!("`{other}` is not supported"),
                    ));
                }
            }
        }
    };
    let eos = f
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.as_u64())
        .map(|v| v as u32);
    let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
    if let Some(eot) = f
        .get("tokenizer.ggml.eot_token_id")
        .and_then(|v| v.as_u64())
    {
        if !eos_token_ids.contains(&(eot as u32)) {
            eos_token_ids.push(eot as u32);
        }
    }
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: f.get_u64(&k("feed_forward_length"))? as usize,
        num_hidden_layers: f.get_u64(&k("block_count"))? as usize,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: f.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
        rope_theta,
        max_position_embeddings: f.get_u64(&k("context_length"))? as usize,
        tie_word_embeddings: !f.tensors.contains_key("output.weight"),
        bos_token_id: f
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32),
        eos_token_ids,
        rope_scaling,
    };
    cfg.validate().map_err(|what| ModelError::Config {
        path: f.path.clone(),
        what,
    })?;
    // The declared block count must be the blocks the file holds (a corrupt count would
    // otherwise send the loader looking for billions of layers). A file with no block tensors at
    // all is left to the loader, which names the first missing tensor, as long as the count is
    // not beyond any file's (one tensor a block at least).
    let blocks = super::layers_held(f.tensors.keys(), "blk.");
    let bad_count = if blocks > 0 {
        blocks != cfg.num_hidden_layers
    } else {
        cfg.num_hidden_layers > f.tensors.len()
    };
    if bad_count {
        return Err(ModelError::Config {
            path: f.path.clone(),
            what: format!(
                "`llama.block_count` says {} blocks but the file holds tensors for {blocks}",
                cfg.num_hidden_layers
            ),
        });
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // 2 heads of head_dim 4, 3 columns. llama.cpp: reshape(h, 2, hd/2, c).swap(1, 2).
        let (h, hd, c) = (2, 4, 3);
        let orig: Vec<f32> = (0..h * hd * c).map(|x| x as f32).collect();
        let mut permuted = vec![0f32; orig.len()];
        for hh in 0..h {
            for a in 0..2 {
                for i in 0..hd / 2 {
                    // permuted[hh, i, a] = orig[hh, a, i]
                    let from = hh * hd + a * (hd / 2) + i;
                    let to = hh * hd + i * 2 + a;
                    permuted[to * c..(to + 1) * c].copy_from_slice(&orig[from * c..(from + 1) * c]);
                }
            }
        }
        let mut t = HostTensor {
            shape: vec![h * hd, c],
            data: permuted,
        };
        unpermute_rows(&mut t, h);
        assert_eq!(t.data, orig);
    }

    #[test]
    fn rejects_bad_magic_version_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"GGML\x03\0\0\0").unwrap();
        let e = GgufFile::open(&p).err().unwrap();
        assert!(matches!(e, ModelError::BadMagic { .. }), "{e}");
        std::fs::write(&p, b"GGUF\x09\0\0\0").unwrap();
        let e = GgufFile::open(&p).err().unwrap();
        assert!(e.to_string().contains("unsupported GGUF version 9"), "{e}");
        std::fs::write(&p, b"GGUF\x03\0\0\0\x01\0").unwrap();
        let e = GgufFile::open(&p).err().unwrap();
        assert!(matches!(e, ModelError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("x.gguf"), "{e}");
    }
}
