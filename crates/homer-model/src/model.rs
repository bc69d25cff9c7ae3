//! The Llama model: embedding, decoder layers, final norm, LM head; plain prefill in query
//! blocks (memory linear in the prompt) and the decode step. Backend-generic: only burn's
//! `Tensor` and `Device` appear here.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::cache::{KvBuffer, KvCache};
use crate::config::LlamaConfig;
use crate::config::RopeScaling;
use crate::error::{ModelError, Result};
use crate::kernels::{self, Weight, WeightDtype};
use crate::layer::{DecoderLayer, rms_norm};
use crate::load::{HostTensor, WeightSource, llama_tensor_names, load_checked};
use crate::qcpu::QMatrix;
use crate::rope::Rope;

/// The token embedding table [vocab, d].
#[derive(Debug, Clone)]
pub enum Embedding {
    /// A tensor (f16/bf16 on the CPU kernels' path with those dtypes, else f32).
    Table(Tensor<2>),
    /// The file's GGUF blocks (`--dtype native`); rows are dequantised as they are looked up.
    Blocks(std::sync::Arc<QMatrix>),
}

/// Rows per block of a plain prefill.
pub const PREFILL_BLOCK: usize = 512;

/// What to do about a weight above the device's buffer limit.
const WEIGHT_REMEDY: &str = "use --backend cpu or a smaller model";

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    /// The token embedding table [vocab, d].
    pub embed: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor<1>,
    /// The LM head; with tied embeddings on the CPU kernels' path it is `embed` itself.
    pub lm_head: Weight,
    pub rope: Rope,
    pub device: Device,
    /// The layers run the project's CPU kernels (burn-flex).
    pub fast: bool,
    pub dtype: WeightDtype,
    /// The window and RoPE of the file, before any `set_rope_scaling`.
    native_window: usize,
    loaded_scaling: RopeScaling,
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
    /// None (a prefill block whose logits nobody reads): the call returns an empty [0, vocab].
    None,
}

/// Progress callback for loading: (tensors done, tensors total).
pub type LoadProgress<'a> = &'a mut dyn FnMut(usize, usize);

/// Concatenate host matrices [r_i, c] along the rows.
fn stack_rows(parts: Vec<HostTensor>) -> (Vec<f32>, usize, usize) {
    let c = parts[0].shape[1];
    let r = parts.iter().map(|p| p.shape[0]).sum();
    let mut data = Vec::with_capacity(r * c);
    for p in parts {
        data.extend_from_slice(&p.data);
    }
    (data, r, c)
}

impl Llama {
    /// Load every tensor from `src` onto `device` with f32 weights.
    pub fn load(
        src: &dyn WeightSource,
        device: &Device,
        max_buffer_bytes: Option<u64>,
        progress: LoadProgress<'_>,
    ) -> Result<Self> {
        Self::load_with(src, device, max_buffer_bytes, WeightDtype::F32, progress)
    }

    /// Load every tensor from `src` onto `device`. `max_buffer_bytes` is the adapter's largest
    /// storage binding (None on CPU backends): a tensor above it is refused with a clear error
    /// rather than crashing the driver. `dtype` is the precision of the projection and
    /// embedding weights on the CPU kernels' path (other backends take f32 only).
    pub fn load_with(
        src: &dyn WeightSource,
        device: &Device,
        max_buffer_bytes: Option<u64>,
        dtype: WeightDtype,
        progress: LoadProgress<'_>,
    ) -> Result<Self> {
        let cfg = src.config().clone();
        let fast = kernels::fast_path(device);
        let native = dtype == WeightDtype::Native;
        if dtype != WeightDtype::F32 && !fast && !(native && kernels::block_uploader().is_some()) {
            return Err(ModelError::Input(format!(
                "--dtype {dtype} runs on the CPU backend only for now; use --dtype f32 (or native \
                 through homer-wgpu's block kernels) with this backend"
            )));
        }
        let names = llama_tensor_names(&cfg);
        let total = names.len();
        for (name, shape) in &names {
            // Fused projections are three (q|k|v) or two (gate|up) of these side by side.
            let fused = if name.ends_with("q_proj.weight") {
                (cfg.q_dim() + 2 * cfg.kv_dim()) as f64 / cfg.q_dim() as f64
            } else if name.ends_with("gate_proj.weight") {
                2.0
            } else {
                1.0
            };
            let bytes = (4.0 * fused * shape.iter().product::<usize>() as f64) as u64;
            // (GGUF blocks on a device are uploaded in row chunks below the limit.)
            if let Some(limit) = max_buffer_bytes.filter(|_| !native) {
                if bytes > limit {
                    return Err(ModelError::DeviceLimit {
                        what: format!("{}: tensor `{name}` {shape:?} (f32)", src.path().display()),
                        needed: bytes,
                        limit,
                        remedy: WEIGHT_REMEDY.into(),
                    });
                }
            }
        }
        let done = std::cell::Cell::new(0usize);
        let progress = std::cell::RefCell::new(progress);
        let tick = || {
            done.set(done.get() + 1);
            (progress.borrow_mut())(done.get(), total);
        };
        let get = |name: &str, shape: &[usize]| -> Result<HostTensor> {
            let t = load_checked(src, name, shape)?;
            tick();
            Ok(t)
        };
        // The file's own blocks of tensors, when every part has blocks of a type the block
        // kernels take (`--dtype native`), adjacent parts of one type stacked by rows (Q4_K_M
        // files mix Q4_K q/k with Q6_K v: two runs); None otherwise.
        let block_runs = |parts: &[(String, [usize; 2])]| -> Result<Option<Vec<QMatrix>>> {
            if !native {
                return Ok(None);
            }
            let mut mats = Vec::with_capacity(parts.len());
            for (name, shape) in parts {
                let Some(b) = src.load_blocks(name)? else {
                    return Ok(None);
                };
                if b.shape != shape {
                    return Err(ModelError::ShapeMismatch {
                        path: src.weights_file(),
                        tensor: src.display_name(name),
                        found: b.shape,
                        expected: shape.to_vec(),
                        described: src.described_in(),
                    });
                }
                if !QMatrix::supports(b.ty) {
                    return Ok(None);
                }
                let m = QMatrix::from_gguf(b.ty, shape[0], shape[1], &b.bytes)
                    .map_err(|e| ModelError::Input(format!("{}: {e}", src.display_name(name))))?;
                mats.push(m);
            }
            let mut runs: Vec<Vec<QMatrix>> = Vec::new();
            for m in mats {
                match runs.last_mut() {
                    Some(run) if run[0].ty() == m.ty() && run[0].cols() == m.cols() => run.push(m),
                    _ => runs.push(vec![m]),
                }
            }
            let runs = runs
                .into_iter()
                .map(QMatrix::stack)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| ModelError::Input(format!("{}: {e}", src.path().display())))?;
            for _ in parts {
                tick();
            }
            Ok(Some(runs))
        };
        // One tensor's blocks.
        let blocks = |parts: &[(String, [usize; 2])]| -> Result<Option<QMatrix>> {
            Ok(block_runs(parts)?.map(|mut runs| {
                debug_assert_eq!(runs.len(), 1);
                runs.swap_remove(0)
            }))
        };
        // Blocks as a weight: the CPU kernels read them in place; another device gets them
        // through the installed uploader.
        let block_weight = |m: std::sync::Arc<QMatrix>| -> Result<Weight> {
            if fast {
                return Ok(Weight::Quant(m));
            }
            let up = kernels::block_uploader().ok_or_else(|| {
                ModelError::Input("no block kernels are installed for this device".into())
            })?;
            up.upload(&m, device)
                .map(Weight::Device)
                .map_err(|e| ModelError::Input(format!("{}: {e}", src.path().display())))
        };
        // With `native`, the float tensors that stay f32 on a device with a binding limit are
        // checked here (the check above skips native loads).
        let fits = |name: &str, shape: [usize; 2]| -> Result<()> {
            let bytes = 4 * (shape[0] * shape[1]) as u64;
            match max_buffer_bytes {
                Some(limit) if native && !fast && bytes > limit => Err(ModelError::DeviceLimit {
                    what: format!("{}: tensor `{name}` {shape:?} (f32)", src.path().display()),
                    needed: bytes,
                    limit,
                    remedy: WEIGHT_REMEDY.into(),
                }),
                _ => Ok(()),
            }
        };
        let d = cfg.hidden_size;
        let vec1 =
            |t: HostTensor| Tensor::<1>::from_data(TensorData::new(t.data, [t.shape[0]]), device);
        let embed_name = "model.embed_tokens.weight".to_string();
        let head_name = "lm_head.weight".to_string();
        let embed_blocks = blocks(&[(embed_name.clone(), [cfg.vocab_size, d])])?;
        let (embed, lm_head) = if let Some(table) = embed_blocks {
            let table = std::sync::Arc::new(table);
            let lm_head = if cfg.tie_word_embeddings {
                block_weight(table.clone())?
            } else {
                match blocks(&[(head_name.clone(), [cfg.vocab_size, d])])? {
                    Some(m) => block_weight(std::sync::Arc::new(m))?,
                    None => {
                        fits(&head_name, [cfg.vocab_size, d])?;
                        let t = get(&head_name, &[cfg.vocab_size, d])?;
                        Weight::upload(t.data, cfg.vocab_size, d, fast, dtype, device)
                    }
                }
            };
            (Embedding::Blocks(table), lm_head)
        } else if fast {
            let embed_host = get(&embed_name, &[cfg.vocab_size, d])?;
            let wt = |t: HostTensor| {
                let (r, c) = (t.shape[0], t.shape[1]);
                Weight::upload(t.data, r, c, true, dtype, device)
            };
            let embed = wt(embed_host);
            let Weight::Rows(table) = &embed else {
                unreachable!("the fast path uploads rows")
            };
            let table = table.clone();
            let lm_head = if cfg.tie_word_embeddings {
                embed
            } else {
                match blocks(&[(head_name.clone(), [cfg.vocab_size, d])])? {
                    Some(m) => Weight::Quant(std::sync::Arc::new(m)),
                    None => wt(get(&head_name, &[cfg.vocab_size, d])?),
                }
            };
            (Embedding::Table(table), lm_head)
        } else {
            fits(&embed_name, [cfg.vocab_size, d])?;
            let embed_host = get(&embed_name, &[cfg.vocab_size, d])?;
            let embed = Tensor::from_data(
                TensorData::new(embed_host.data, [cfg.vocab_size, d]),
                device,
            );
            let lm_head = if cfg.tie_word_embeddings {
                // One buffer: the head reads the table through a transposed view.
                Weight::RowsT(embed.clone())
            } else {
                match blocks(&[(head_name.clone(), [cfg.vocab_size, d])])? {
                    Some(m) => block_weight(std::sync::Arc::new(m))?,
                    None => {
                        fits(&head_name, [cfg.vocab_size, d])?;
                        let head = get(&head_name, &[cfg.vocab_size, d])?;
                        Weight::upload(head.data, cfg.vocab_size, d, false, dtype, device)
                    }
                }
            };
            (Embedding::Table(embed), lm_head)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ff = cfg.intermediate_size;
            let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
            let part = |n: &str, shape: [usize; 2]| (format!("{p}.{n}"), shape);
            // A projection from its parts (stacked by rows): blocks (one weight per run of one
            // type, side by side), else host f32 rows.
            let weight = |parts: Vec<(String, [usize; 2])>| -> Result<Weight> {
                if let Some(mut runs) = block_runs(&parts)? {
                    if runs.len() == 1 {
                        return block_weight(std::sync::Arc::new(runs.swap_remove(0)));
                    }
                    return runs
                        .into_iter()
                        .map(|m| block_weight(std::sync::Arc::new(m)))
                        .collect::<Result<Vec<_>>>()
                        .map(Weight::Cat);
                }
                let rows: usize = parts.iter().map(|(_, s)| s[0]).sum();
                fits(&parts[0].0, [rows, parts[0].1[1]])?;
                let mut host = Vec::with_capacity(parts.len());
                for (name, shape) in &parts {
                    host.push(get(name, shape)?);
                }
                let (data, r, c) = stack_rows(host);
                Ok(Weight::upload(data, r, c, fast, dtype, device))
            };
            let w_qkv = weight(vec![
                part("self_attn.q_proj.weight", [qd, d]),
                part("self_attn.k_proj.weight", [kvd, d]),
                part("self_attn.v_proj.weight", [kvd, d]),
            ])?;
            let wo = weight(vec![part("self_attn.o_proj.weight", [d, qd])])?;
            let w_gate_up = weight(vec![
                part("mlp.gate_proj.weight", [ff, d]),
                part("mlp.up_proj.weight", [ff, d]),
            ])?;
            let w_down = weight(vec![part("mlp.down_proj.weight", [d, ff])])?;
            let attn_norm = vec1(get(&format!("{p}.input_layernorm.weight"), &[d])?);
            let ffn_norm = vec1(get(&format!("{p}.post_attention_layernorm.weight"), &[d])?);
            layers.push(DecoderLayer {
                attn_norm,
                w_qkv,
                wo,
                ffn_norm,
                w_gate_up,
                w_down,
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                eps: cfg.rms_norm_eps,
                kv_dtype: DType::F32,
                fast,
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
            fast,
            dtype,
        })
    }

    /// A model with uniform random weights, reproducible from `seed` (tests and shape
    /// benchmarks; no file needed). Projections have variance 1/fan_in, norms are 1.
    pub fn random(config: LlamaConfig, seed: u64, device: &Device) -> Llama {
        Self::random_with(config, seed, device, WeightDtype::F32)
    }

    /// [`Llama::random`] with the given weight precision (CPU kernels' path only for f16).
    pub fn random_with(
        config: LlamaConfig,
        seed: u64,
        device: &Device,
        dtype: WeightDtype,
    ) -> Llama {
        Self::random_on_path(config, seed, device, dtype, kernels::fast_path(device))
    }

    /// [`Llama::random_with`] on a chosen path: `fast` = the CPU kernels (burn-flex devices
    /// only), else burn tensor ops (the kernels' oracle, on any device).
    pub fn random_on_path(
        config: LlamaConfig,
        seed: u64,
        device: &Device,
        dtype: WeightDtype,
        fast: bool,
    ) -> Llama {
        let dtype = if fast { dtype } else { WeightDtype::F32 };
        let mut state = seed ^ 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        // Host rows [out, in] (the file orientation).
        let mut mat = |rows: usize, cols: usize, fan_in: usize| -> Vec<f32> {
            let a = (3.0 / fan_in as f32).sqrt();
            (0..rows * cols).map(|_| next() * a).collect()
        };
        let c = &config;
        let d = c.hidden_size;
        let ones = || Tensor::<1>::ones([d], device);
        let embed_host = mat(c.vocab_size, d, 1);
        let head_host = if c.tie_word_embeddings {
            embed_host.clone()
        } else {
            mat(c.vocab_size, d, d)
        };
        let (kvd, qd, ff) = (c.kv_dim(), c.q_dim(), c.intermediate_size);
        let mut layers = Vec::new();
        for _ in 0..c.num_hidden_layers {
            let mut qkv = mat(qd, d, d);
            qkv.extend(mat(kvd, d, d));
            qkv.extend(mat(kvd, d, d));
            let o = mat(d, qd, qd);
            let mut gu = mat(ff, d, d);
            gu.extend(mat(ff, d, d));
            let down = mat(d, ff, ff);
            layers.push(DecoderLayer {
                attn_norm: ones(),
                w_qkv: Weight::upload(qkv, qd + 2 * kvd, d, fast, dtype, device),
                wo: Weight::upload(o, d, qd, fast, dtype, device),
                ffn_norm: ones(),
                w_gate_up: Weight::upload(gu, 2 * ff, d, fast, dtype, device),
                w_down: Weight::upload(down, d, ff, fast, dtype, device),
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                eps: c.rms_norm_eps,
                kv_dtype: DType::F32,
                fast,
            });
        }
        let (embed, lm_head) = if fast {
            let lm_head = Weight::upload(head_host, c.vocab_size, d, fast, dtype, device);
            let embed = match (&lm_head, c.tie_word_embeddings) {
                (Weight::Rows(t), true) => t.clone(),
                _ => match Weight::upload(embed_host, c.vocab_size, d, true, dtype, device) {
                    Weight::Rows(t) => t,
                    _ => unreachable!("the fast path uploads rows"),
                },
            };
            (Embedding::Table(embed), lm_head)
        } else {
            let embed = Tensor::from_data(TensorData::new(embed_host, [c.vocab_size, d]), device);
            let lm_head = if c.tie_word_embeddings {
                Weight::RowsT(embed.clone())
            } else {
                Weight::upload(head_host, c.vocab_size, d, false, dtype, device)
            };
            (Embedding::Table(embed), lm_head)
        };
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
            fast,
            dtype,
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

    /// Resident bytes of the weights (the tied LM head, which shares the embedding's storage,
    /// counted once).
    pub fn weight_bytes(&self) -> usize {
        let vec = |t: &Tensor<1>| t.shape().num_elements() * t.dtype().size();
        let embed = match &self.embed {
            Embedding::Table(t) => t.shape().num_elements() * t.dtype().size(),
            Embedding::Blocks(q) => q.bytes(),
        };
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.bytes()
        };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.w_qkv, &l.wo, &l.w_gate_up, &l.w_down]
                    .iter()
                    .map(|w| w.bytes())
                    .sum::<usize>()
                    + vec(&l.attn_norm)
                    + vec(&l.ffn_norm)
            })
            .sum();
        embed + head + layers + vec(&self.norm)
    }

    /// Embedding rows for `ids`, [n, d].
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor<2>> {
        self.check_ids(ids)?;
        let idx: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [ids.len()]), &self.device);
        let table = match &self.embed {
            Embedding::Table(t) => t,
            Embedding::Blocks(q) => {
                let d = q.cols();
                let mut rows = vec![0f32; ids.len() * d];
                for (i, &t) in ids.iter().enumerate() {
                    let t = t as usize;
                    q.dequantize_rows(t, t + 1, &mut rows[i * d..(i + 1) * d]);
                }
                return Ok(Tensor::from_data(
                    TensorData::new(rows, [ids.len(), d]),
                    &self.device,
                ));
            }
        };
        let rows = table.clone().select(0, idx);
        Ok(if rows.dtype() == DType::F32 {
            rows
        } else {
            rows.cast(DType::F32)
        })
    }

    /// Final norm + LM head on hidden rows [n, d] -> [n, vocab].
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        let eps = self.config.rms_norm_eps;
        let xn = if self.fast {
            kernels::rms_norm_fast(hidden, &self.norm, eps)
        } else {
            rms_norm(hidden, &self.norm, eps)
        };
        self.lm_head.apply(xn)
    }

    /// RoPE tables for a set of position ids.
    pub fn rope_tables(&self, positions: &[usize]) -> (Tensor<2>, Tensor<2>) {
        self.rope.tables(positions, &self.device)
    }

    /// Post-RoPE keys `k` [KV, n, head_dim] rotated at positions `from` (row-wise), re-rotated
    /// to positions `to`, in `k`'s element type (f16 caches are rotated in f32).
    pub fn rerotate_keys(&self, k: Tensor<3>, from: &[usize], to: &[usize]) -> Tensor<3> {
        let (c, s) = self.key_shift(from, to);
        crate::rope::rotate(k, &c, &s)
    }

    /// The rotation that moves a post-RoPE key from position `from[r]` to `to[r]`, row by row:
    /// cos and sin tables [rows, head_dim] for [`crate::rope::rotate`] (halves repeated, as
    /// RoPE's own tables; the model's frequency scaling included).
    pub fn key_shift(&self, from: &[usize], to: &[usize]) -> (Tensor<2>, Tensor<2>) {
        self.rope.shift_tables(from, to, &self.device)
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
        if self.fast {
            crate::cpu::on_pool(|| self.forward_here(ids, positions, cache, which))
        } else {
            self.forward_here(ids, positions, cache, which)
        }
    }

    fn forward_here(
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
        self.check_buffers(ids.len(), cache, which)?;
        let mut outs = Vec::new();
        let mut start = 0;
        while start < ids.len() {
            let end = (start + PREFILL_BLOCK).min(ids.len());
            let mut x = self.embed(&ids[start..end])?;
            let (cos, sin) = self.rope_tables(&positions[start..end]);
            let n = end - start;
            let (kvh, hd) = (self.config.num_key_value_heads, self.config.head_dim);
            for (l, layer) in self.layers.iter().enumerate() {
                let mut buf = cache.layers[l].take().unwrap_or_else(|| {
                    let cap = cache.initial_capacity.max(ids.len() - start);
                    KvBuffer::empty(kvh, hd, cap, layer.kv_dtype, &self.device)
                });
                buf.reserve(n, &self.device);
                let (h, buf, _) = layer.attend_into(x, &cos, &sin, buf);
                cache.layers[l] = Some(buf);
                x = layer.feed_forward(h);
                crate::backend::layer_done(&self.device);
            }
            match which {
                Logits::All => outs.push(self.logits(x)),
                Logits::Last if end == ids.len() => {
                    let d = self.config.hidden_size;
                    outs.push(self.logits(x.slice([n - 1..n, 0..d])));
                }
                Logits::Last | Logits::None => {}
            }
            start = end;
        }
        cache.next_position = positions
            .iter()
            .max()
            .map_or(cache.next_position, |&m| m + 1);
        Ok(match outs.len() {
            0 => Tensor::zeros([0, self.config.vocab_size], &self.device),
            1 => outs.pop().unwrap(),
            _ => Tensor::cat(outs, 0),
        })
    }

    /// Refuse a forward of `n` rows whose buffers would not fit: on wgpu, activations, logits or
    /// a K/V buffer above the device's buffer limit (wgpu reports such a buffer on cubecl's
    /// server thread, where the caller never sees it, and the results are garbage); on the CPU,
    /// K/V growth and logits beyond the memory available (an allocation failure aborts the
    /// process).
    fn check_buffers(&self, n: usize, cache: &KvCache, which: Logits) -> Result<()> {
        let c = &self.config;
        // The K/V buffers' rows after this call, by the growth rule of `KvBuffer::reserve`.
        let (len, old_cap) = match cache.layers.first().and_then(Option::as_ref) {
            Some(b) => (b.len(), b.capacity()),
            None => (0, 0),
        };
        let mut cap = if old_cap == 0 {
            cache.initial_capacity.max(n)
        } else {
            old_cap
        };
        let mut at = 0;
        while at < n {
            let step = PREFILL_BLOCK.min(n - at);
            if len + at + step > cap {
                cap = (len + at + step).max(cap.saturating_mul(2));
            }
            at += step;
        }
        let elem = self.layers.first().map_or(4, |l| l.kv_dtype.size()) as u64;
        // u64 and saturating: a capacity asked for may be absurd (that is what is refused).
        let kv_bytes = [c.num_key_value_heads, cap, c.head_dim]
            .iter()
            .fold(elem, |b, &x| b.saturating_mul(x as u64));
        let logit_rows = match which {
            Logits::All => n,
            Logits::Last => 1,
            Logits::None => 0,
        };
        let logit_bytes = (logit_rows as u64).saturating_mul(c.vocab_size as u64 * 4);
        let kv_remedy = "ask about a shorter document (with HOMER, a smaller --chunk-len or \
                         --budget), use --kv-dtype f16";
        let Some(limit) = crate::backend::buffer_limit(&self.device) else {
            // The CPU: what this call adds (new K and V of every layer, the logits) against the
            // memory available, read only when the cache grows or many logits are asked for.
            let grown = if cap > old_cap {
                kv_bytes.saturating_mul(2 * self.n_layers() as u64)
            } else {
                0
            };
            let needed = grown.saturating_add(logit_bytes);
            if needed < 64 << 20 {
                return Ok(());
            }
            if let Some(available) = crate::backend::available_memory().map(|a| a as u64) {
                if needed > available {
                    return Err(ModelError::Memory {
                        what: format!(
                            "the K/V cache for {cap} positions ({} layers) and the logits of \
                             {logit_rows} rows",
                            self.n_layers()
                        ),
                        needed,
                        available,
                        remedy: kv_remedy.into(),
                    });
                }
            }
            return Ok(());
        };
        let refuse = |what: String, needed: u64, remedy: &str| -> Result<()> {
            if needed > limit {
                return Err(ModelError::DeviceLimit {
                    what,
                    needed,
                    limit,
                    remedy: remedy.into(),
                });
            }
            Ok(())
        };
        let rows = n.min(PREFILL_BLOCK);
        let widest = [
            c.hidden_size,
            c.q_dim() + 2 * c.kv_dim(),
            2 * c.intermediate_size,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let shorter = "ask about a shorter document (with HOMER, a smaller --chunk-len), or use \
                       --backend cpu";
        refuse(
            format!("a block of {rows} prompt rows × {widest} activations (f32)"),
            (rows * widest * 4) as u64,
            shorter,
        )?;
        refuse(
            format!(
                "the logits of {logit_rows} rows × {} tokens (f32)",
                c.vocab_size
            ),
            logit_bytes,
            shorter,
        )?;
        refuse(
            format!(
                "a layer's keys for {cap} positions ({} heads × {} dims)",
                c.num_key_value_heads, c.head_dim
            ),
            kv_bytes,
            &format!("{kv_remedy}, or --backend cpu"),
        )
    }

    /// The error for logits that came out NaN or infinite on a forward over `ids` (the prompt,
    /// and the answer so far): the last ≤ 64 of them are run again layer by layer to name the
    /// first layer whose output is not finite. Only called once the logits are bad.
    pub fn non_finite_error(&self, ids: &[u32]) -> ModelError {
        let tail = &ids[ids.len().saturating_sub(64)..];
        let found = if self.fast {
            crate::cpu::on_pool(|| self.first_non_finite_layer(tail))
        } else {
            self.first_non_finite_layer(tail)
        };
        let n = self.n_layers();
        ModelError::NonFinite(match found {
            Ok(Some(l)) => format!(
                "the logits are NaN or infinite: the hidden states turn non-finite at layer {l} \
                 of {n}"
            ),
            Ok(None) => format!(
                "the logits are NaN or infinite (each of the {n} layers' output on the last {} \
                 tokens is finite)",
                tail.len()
            ),
            Err(e) => format!("the logits are NaN or infinite (finding the layer failed: {e})"),
        })
    }

    /// The first layer whose output over `ids` (from an empty cache) holds a NaN or an ∞.
    fn first_non_finite_layer(&self, ids: &[u32]) -> Result<Option<usize>> {
        if ids.is_empty() {
            return Ok(None);
        }
        let positions: Vec<usize> = (0..ids.len()).collect();
        let (cos, sin) = self.rope_tables(&positions);
        let (kvh, hd) = (self.config.num_key_value_heads, self.config.head_dim);
        let mut x = self.embed(ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let buf = KvBuffer::empty(kvh, hd, ids.len(), layer.kv_dtype, &self.device);
            let (h, _, _) = layer.attend_into(x, &cos, &sin, buf);
            x = layer.feed_forward(h);
            if !read_f32(x.clone().sum())?.iter().all(|v| v.is_finite()) {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    /// Plain prefill of a prompt from an empty cache.
    pub fn prefill(&self, ids: &[u32], which: Logits) -> Result<(Tensor<2>, KvCache)> {
        let mut cache = KvCache::new(self.n_layers());
        let logits = self.forward(ids, None, &mut cache, which)?;
        Ok((logits, cache))
    }

    /// The KV cache's element type for new caches: f32 (default), or f16 (half the cache's
    /// memory and the bandwidth decode spends on it at long context; keys and values rounded
    /// once when written, every product in f32). f16 needs the CPU backend or a wgpu adapter
    /// with `shader-f16` (lavapipe has it), whose attention and HOMER kernels read f16 keys and
    /// values under f32 queries.
    pub fn set_kv_dtype(&mut self, kv: crate::cache::KvDtype) -> Result<()> {
        if kv == crate::cache::KvDtype::F16 && !crate::backend::supports_f16(&self.device) {
            return Err(ModelError::Input(
                "--kv-dtype f16 needs a wgpu adapter with shader-f16 (this one lacks it) or the \
                 CPU backend (--backend cpu)"
                    .into(),
            ));
        }
        for l in &mut self.layers {
            l.kv_dtype = kv.dtype();
        }
        Ok(())
    }

    /// The KV cache's element type ([`Llama::set_kv_dtype`]).
    pub fn kv_dtype(&self) -> DType {
        self.layers.first().map_or(DType::F32, |l| l.kv_dtype)
    }

    /// One decode step: the logits ([vocab]) after feeding `token` at `cache.next_position`.
    pub fn decode_step(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        let logits = self.forward(&[token], None, cache, Logits::Last)?;
        read_f32(logits)
    }
}

/// Read a tensor back to the host as f32.
pub fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.try_into_vec_as::<f32>()
        .map_err(|e| device_error(&format!("{e:?}")))
}

/// A device failure (the message of a failed read-back, or the wgpu error behind it when the
/// device thread reported one) as an error with a remedy: what is worth trying depends on
/// whether the device ran out of memory or was lost.
pub fn device_error(message: &str) -> ModelError {
    let message = crate::backend::take_device_panic().unwrap_or_else(|| message.to_string());
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    let cause: String = match line.char_indices().nth(240) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.clone(),
    };
    let lower = line.to_lowercase();
    let remedy = if lower.contains("out of memory") || lower.contains("outofmemory") {
        "it ran out of memory: use a smaller --chunk-len, --kv-dtype f16, a quantized model \
         (--dtype native with a Q4/Q8 GGUF), or --backend cpu"
    } else {
        "the device may have been lost (a driver reset, a sleep, an unplugged GPU) or faulted: \
         load the model again (restart homer, or pick the model again in homer-desk's \
         settings), or use --backend cpu"
    };
    ModelError::Device {
        cause,
        remedy: remedy.into(),
    }
}
