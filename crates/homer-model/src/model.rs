//! The Llama model: embedding, decoder layers, final norm, LM head; plain prefill in query
//! blocks (memory linear in the prompt) and the decode step. Backend-generic: only burn's
//! `Tensor` and `Device` appear here.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::cache::KvCache;
use crate::config::LlamaConfig;
use crate::config::RopeScaling;
use crate::error::{ModelError, Result};
use crate::layer::{DecoderLayer, rms_norm};
use crate::load::{HostTensor, WeightSource, llama_tensor_names, load_checked};
use crate::rope::Rope;

/// Rows per block of a plain prefill.
pub const PREFILL_BLOCK: usize = 512;

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed: Tensor<2>,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor<1>,
    /// [d, vocab]
    pub lm_head: Tensor<2>,
    pub rope: Rope,
    pub device: Device,
    /// The window and RoPE of the file, before any `set_rope_scaling`.
    native_window: usize,
    loaded_scaling: RopeScaling,
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

/// Progress callback for loading: (tensors done, tensors total).
pub type LoadProgress<'a> = &'a mut dyn FnMut(usize, usize);

fn upload(t: HostTensor, device: &Device) -> Tensor<2> {
    let [r, c] = [t.shape[0], t.shape[1]];
    Tensor::from_data(TensorData::new(t.data, [r, c]), device)
}

/// Host transpose of a [rows, cols] tensor to [cols, rows].
fn transposed(t: HostTensor) -> HostTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut out = vec![0f32; r * c];
    const B: usize = 32;
    for i0 in (0..r).step_by(B) {
        for j0 in (0..c).step_by(B) {
            for i in i0..(i0 + B).min(r) {
                for j in j0..(j0 + B).min(c) {
                    out[j * r + i] = t.data[i * c + j];
                }
            }
        }
    }
    HostTensor {
        shape: vec![c, r],
        data: out,
    }
}

impl Llama {
    /// Load every tensor from `src` onto `device`. `max_buffer_bytes` is the adapter's largest
    /// storage binding (None on CPU backends): a tensor above it is refused with a clear error
    /// rather than crashing the driver.
    pub fn load(
        src: &dyn WeightSource,
        device: &Device,
        max_buffer_bytes: Option<u64>,
        progress: LoadProgress<'_>,
    ) -> Result<Self> {
        let cfg = src.config().clone();
        let names = llama_tensor_names(&cfg);
        let total = names.len();
        for (name, shape) in &names {
            let bytes = 4 * shape.iter().product::<usize>() as u64;
            if let Some(limit) = max_buffer_bytes {
                if bytes > limit {
                    return Err(ModelError::DeviceLimit {
                        what: format!("{}: tensor `{name}` {shape:?} (f32)", src.path().display()),
                        needed: bytes,
                        limit,
                    });
                }
            }
        }
        let mut done = 0usize;
        let mut get = |name: &str, shape: &[usize]| -> Result<HostTensor> {
            let t = load_checked(src, name, shape)?;
            done += 1;
            progress(done, total);
            Ok(t)
        };
        let d = cfg.hidden_size;
        let vec1 =
            |t: HostTensor| Tensor::<1>::from_data(TensorData::new(t.data, [t.shape[0]]), device);
        let embed_host = get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let lm_head = if cfg.tie_word_embeddings {
            upload(transposed(embed_host.clone()), device)
        } else {
            upload(
                transposed(get("lm_head.weight", &[cfg.vocab_size, d])?),
                device,
            )
        };
        let embed = upload(embed_host, device);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ff = cfg.intermediate_size;
            let mut w = |n: &str, shape: [usize; 2]| -> Result<Tensor<2>> {
                Ok(upload(
                    transposed(get(&format!("{p}.{n}"), &shape)?),
                    device,
                ))
            };
            let wq = w("self_attn.q_proj.weight", [cfg.q_dim(), d])?;
            let wk = w("self_attn.k_proj.weight", [cfg.kv_dim(), d])?;
            let wv = w("self_attn.v_proj.weight", [cfg.kv_dim(), d])?;
            let wo = w("self_attn.o_proj.weight", [d, cfg.q_dim()])?;
            let w_gate = w("mlp.gate_proj.weight", [ff, d])?;
            let w_up = w("mlp.up_proj.weight", [ff, d])?;
            let w_down = w("mlp.down_proj.weight", [d, ff])?;
            let attn_norm = vec1(get(&format!("{p}.input_layernorm.weight"), &[d])?);
            let ffn_norm = vec1(get(&format!("{p}.post_attention_layernorm.weight"), &[d])?);
            layers.push(DecoderLayer {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                eps: cfg.rms_norm_eps,
            });
        }
        let norm = vec1(get("model.norm.weight", &[d])?);
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling);
        Ok(Llama {
            native_window: cfg.max_position_embeddings,
            loaded_scaling: cfg.rope_scaling.clone(),
            config: cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
        })
    }

    /// A model with uniform random weights, reproducible from `seed` (tests and shape
    /// benchmarks; no file needed). Projections have variance 1/fan_in, norms are 1.
    pub fn random(config: LlamaConfig, seed: u64, device: &Device) -> Llama {
        let mut state = seed ^ 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut mat = |rows: usize, cols: usize, fan_in: usize| -> Tensor<2> {
            let a = (3.0 / fan_in as f32).sqrt();
            let data: Vec<f32> = (0..rows * cols).map(|_| next() * a).collect();
            Tensor::from_data(TensorData::new(data, [rows, cols]), device)
        };
        let c = &config;
        let d = c.hidden_size;
        let ones = || Tensor::<1>::ones([d], device);
        let embed = mat(c.vocab_size, d, 1);
        let lm_head = if c.tie_word_embeddings {
            embed.clone().transpose()
        } else {
            mat(d, c.vocab_size, d)
        };
        let layers = (0..c.num_hidden_layers)
            .map(|_| DecoderLayer {
                attn_norm: ones(),
                wq: mat(d, c.q_dim(), d),
                wk: mat(d, c.kv_dim(), d),
                wv: mat(d, c.kv_dim(), d),
                wo: mat(c.q_dim(), d, c.q_dim()),
                ffn_norm: ones(),
                w_gate: mat(d, c.intermediate_size, d),
                w_up: mat(d, c.intermediate_size, d),
                w_down: mat(c.intermediate_size, d, c.intermediate_size),
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                eps: c.rms_norm_eps,
            })
            .collect();
        let rope = Rope::new(c.head_dim, c.rope_theta, &c.rope_scaling);
        Llama {
            native_window: c.max_position_embeddings,
            loaded_scaling: c.rope_scaling.clone(),
            norm: ones(),
            embed,
            layers,
            lm_head,
            rope,
            device: device.clone(),
            config,
        }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The window of the model file, before any RoPE scaling set here.
    pub fn native_window(&self) -> usize {
        self.native_window
    }

    /// Extend the window with a RoPE scaling (the evaluation's PI / NTK / dynamic NTK / YaRN
    /// baselines, spec §8). The model's native window becomes `native × factor` tokens
    /// (`config.max_position_embeddings`), so HOMER's default chunk length follows it;
    /// `RopeScaling::None` restores the native RoPE. Refused for a model whose file already
    /// scales its RoPE.
    pub fn set_rope_scaling(&mut self, scaling: RopeScaling) -> Result<()> {
        if self.loaded_scaling != RopeScaling::None {
            if scaling == self.loaded_scaling {
                return Ok(());
            }
            return Err(ModelError::Input(format!(
                "the model already scales its RoPE ({:?}); a second scaling is not supported",
                self.loaded_scaling
            )));
        }
        self.config.max_position_embeddings =
            (self.native_window as f64 * scaling.factor()).round() as usize;
        self.rope = Rope::new(self.config.head_dim, self.config.rope_theta, &scaling);
        self.config.rope_scaling = scaling;
        Ok(())
    }

    /// The full length of the sequence about to be prefilled (dynamic NTK picks its frequencies
    /// from it; other RoPE variants ignore it). 0 = use the positions of each call.
    pub fn set_rope_seq_len(&self, n: usize) {
        self.rope.set_seq_len(n);
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Embedding rows for `ids`, [n, d].
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor<2>> {
        self.check_ids(ids)?;
        let idx: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [ids.len()]), &self.device);
        Ok(self.embed.clone().select(0, idx))
    }

    /// Final norm + LM head on hidden rows [n, d] -> [n, vocab].
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        rms_norm(hidden, &self.norm, self.config.rms_norm_eps).matmul(self.lm_head.clone())
    }

    /// RoPE tables for a set of position ids.
    pub fn rope_tables(&self, positions: &[usize]) -> (Tensor<2>, Tensor<2>) {
        self.rope.tables(positions, &self.device)
    }

    /// Run `ids` (at `positions`, default: continuing from `cache.next_position`) through all
    /// layers, appending their K/V to `cache`, one block of rows at a time. Returns the logits of
    /// the last row ([1, vocab]) or of every row ([n, vocab]).
    pub fn forward(
        &self,
        ids: &[u32],
        positions: Option<&[usize]>,
        cache: &mut KvCache,
        which: Logits,
    ) -> Result<Tensor<2>> {
        if ids.is_empty() {
            return Err(ModelError::Input(
                "empty prompt: at least one token is needed".into(),
            ));
        }
        if cache.layers.len() != self.n_layers() {
            return Err(ModelError::Input(format!(
                "cache has {} layers, model has {}",
                cache.layers.len(),
                self.n_layers()
            )));
        }
        let owned: Vec<usize>;
        let positions = match positions {
            Some(p) => {
                if p.len() != ids.len() {
                    return Err(ModelError::Input(format!(
                        "{} position ids for {} tokens",
                        p.len(),
                        ids.len()
                    )));
                }
                p
            }
            None => {
                owned = (cache.next_position..cache.next_position + ids.len()).collect();
                &owned
            }
        };
        self.check_ids(ids)?;
        let mut outs = Vec::new();
        let mut start = 0;
        while start < ids.len() {
            let end = (start + PREFILL_BLOCK).min(ids.len());
            let mut x = self.embed(&ids[start..end])?;
            let (cos, sin) = self.rope_tables(&positions[start..end]);
            for (l, layer) in self.layers.iter().enumerate() {
                let a = layer.attend(x, &cos, &sin, cache.layers[l].as_ref());
                cache.layers[l] = Some(a.kv_all);
                x = layer.feed_forward(a.hidden);
            }
            match which {
                Logits::All => outs.push(self.logits(x)),
                Logits::Last if end == ids.len() => {
                    let n = end - start;
                    let d = self.config.hidden_size;
                    outs.push(self.logits(x.slice([n - 1..n, 0..d])));
                }
                Logits::Last => {}
            }
            start = end;
        }
        cache.next_position = positions
            .iter()
            .max()
            .map_or(cache.next_position, |&m| m + 1);
        Ok(if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(outs, 0)
        })
    }

    /// Plain prefill of a prompt from an empty cache.
    pub fn prefill(&self, ids: &[u32], which: Logits) -> Result<(Tensor<2>, KvCache)> {
        let mut cache = KvCache::new(self.n_layers());
        let logits = self.forward(ids, None, &mut cache, which)?;
        Ok((logits, cache))
    }

    /// One decode step: the logits ([vocab]) after feeding `token` at `cache.next_position`.
    pub fn decode_step(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        let logits = self.forward(&[token], None, cache, Logits::Last)?;
        read_f32(logits)
    }
}

/// Read a tensor back to the host as f32.
pub fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.try_into_vec_as::<f32>().map_err(|e| {
        ModelError::Input(format!(
            "reading a tensor back from the device failed: {e:?}"
        ))
    })
}
