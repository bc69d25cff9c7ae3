//! homer-wgpu: HOMER's hot operations as WGSL compute shaders (`shaders/*.wgsl`) on burn-wgpu,
//! plugged into `homer` through its [`HomerOps`] trait. The algorithm crate never sees a wgpu type;
//! [`homer::TensorOps`] (burn tensor ops) is the oracle these kernels are tested against.
//!
//! - significance: one pass over a node's keys, max over query heads of the scaled dot product,
//!   minus the calibration bias, +∞ for affixes; no [heads × n] intermediate.
//! - gather: the kept rows of the hidden state and every cached layer's K/V, two tensors a dispatch.
//! - gather_rotate: the same, every kept key turned to a new position on the way (HOMER's
//!   renumbered positions); a pure renumbering rewrites the keys alone, one dispatch a layer.
//! - merge: §5's averaged affixes + concatenated contexts, two tensors a dispatch.
//!
//! Selection of the rows to drop runs on the host (`homer::prune`) after the n scores are read
//! back: the kept indices are needed on the host anyway (trace, positions), and `homer bench
//! kernels` measures that step next to the kernels.

pub mod bench;
mod kernels;

use std::sync::Arc;

use burn::backend::Dispatch;
use burn::tensor::{DType, Int, Tensor, TensorData};
use homer::ops::{check_gather, check_merge, check_shift, check_significance_input, keeps_all};
use homer::{ChunkTensors, HomerError, HomerOps, KeyShift, Result, SignificanceInput};
use homer_model::{DeviceInfo, LayerKv, read_f32};

pub use kernels::{
    AttentionJob, BlockJob, GatherJob, HomerKernels, LaunchCfg, MergeJob, SelectJob,
    SignificanceJob, SplitMode,
};

/// HOMER's ops as WGSL kernels. Build it for a wgpu device with [`WgslOps::for_device`].
#[derive(Debug, Clone)]
pub struct WgslOps {
    /// Largest storage-buffer binding the adapter allows, in bytes.
    adapter_max_binding: u64,
    /// The limit the ops enforce: the adapter's, or lower for tests.
    max_binding: u64,
    /// The adapter has `shader-f16` (f16 tensors are refused without it).
    shader_f16: bool,
    cfg: LaunchCfg,
}

impl WgslOps {
    /// The kernels for a wgpu device described by `info` (from `homer_model::device`).
    pub fn for_device(info: &DeviceInfo) -> Result<Self> {
        if info.backend != "wgpu" {
            return Err(HomerError::Input(format!(
                "the WGSL kernels need a wgpu device, this one is `{}` ({}); use the tensor ops",
                info.backend, info.adapter
            )));
        }
        let max_binding = info
            .max_storage_buffer_binding_size
            .unwrap_or(u64::MAX)
            .min(info.max_buffer_size.unwrap_or(u64::MAX));
        Ok(Self {
            adapter_max_binding: max_binding,
            max_binding,
            shader_f16: info.shader_f16,
            cfg: LaunchCfg::default(),
        })
    }

    /// Enforce a binding limit of `bytes` (capped at the adapter's), to test the limit checks.
    pub fn with_max_binding(mut self, bytes: u64) -> Self {
        self.max_binding = self.adapter_max_binding.min(bytes);
        self
    }

    /// Workgroup size and grid cap of every dispatch; `poison` NaN-fills outputs first.
    pub fn with_launch(mut self, cfg: LaunchCfg) -> Self {
        self.cfg = cfg;
        self
    }

    pub fn launch_cfg(&self) -> LaunchCfg {
        self.cfg
    }

    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// Refuse a tensor the adapter cannot bind, or an element type the kernels do not take.
    fn check<const D: usize>(&self, what: &str, t: &Tensor<D>) -> Result<()> {
        let dtype = t.dtype();
        let size = match dtype {
            DType::F32 => 4u64,
            DType::F16 if self.shader_f16 => 2,
            DType::F16 => {
                return Err(HomerError::Input(format!(
                    "{what} is f16 but this adapter lacks `shader-f16`; load the model as f32"
                )));
            }
            other => {
                return Err(HomerError::Input(format!(
                    "{what} has element type {other:?}; the WGSL kernels take f32 (or f16 with shader-f16)"
                )));
            }
        };
        let bytes = t.shape().num_elements() as u64 * size;
        if bytes > self.max_binding {
            return Err(HomerError::Input(format!(
                "{what} {:?} is {bytes} bytes, above this adapter's max_storage_buffer_binding_size \
                 of {} bytes; use a smaller --chunk-len (fewer rows per node) or --homer-ops tensor",
                t.dims(),
                self.max_binding
            )));
        }
        Ok(())
    }

    fn check_chunk(&self, c: &ChunkTensors) -> Result<()> {
        self.check("hidden rows", &c.hidden)?;
        for (l, kv) in c.cache.iter().enumerate() {
            self.check(&format!("layer {l} keys"), &kv.k)?;
            self.check(&format!("layer {l} values"), &kv.v)?;
            if kv.k.dtype() != kv.v.dtype() {
                return Err(HomerError::Input(format!(
                    "layer {l}: keys are {:?} but values {:?}; one KV cache holds one element type",
                    kv.k.dtype(),
                    kv.v.dtype()
                )));
            }
        }
        Ok(())
    }
}

/// The node's tensors as a flat list of 3-D [outer, rows, inner] views: k0, v0, k1, v1, …, then
/// the hidden rows. The kernels move two tensors of one element type per launch; taken in this
/// order the pairs are a layer's K and V, so an f16 KV cache never shares a launch with the f32
/// hidden rows (which go last, alone).
fn flatten(c: ChunkTensors) -> (usize, Vec<Tensor<3>>) {
    let [n, d] = c.hidden.dims();
    let mut list = Vec::with_capacity(1 + 2 * c.cache.len());
    for kv in c.cache {
        list.push(kv.k);
        list.push(kv.v);
    }
    list.push(c.hidden.reshape([1, n, d]));
    (d, list)
}

fn unflatten(d: usize, mut list: Vec<Tensor<3>>) -> ChunkTensors {
    let hidden = list.pop().expect("hidden rows last");
    let rows = hidden.dims()[1];
    let hidden = hidden.reshape([rows, d]);
    let mut cache = Vec::with_capacity(list.len() / 2);
    let mut it = list.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        cache.push(LayerKv { k, v });
    }
    ChunkTensors { hidden, cache }
}

fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| HomerError::Input(format!("{what} {v} does not fit the kernels' u32")))
}

impl HomerOps for WgslOps {
    fn name(&self) -> &str {
        "wgsl"
    }

    fn significance(&self, input: &SignificanceInput<'_>) -> Result<Vec<f32>> {
        Ok(read_f32(self.significance_on_device(input)?)?)
    }

    fn gather(&self, chunk: ChunkTensors, keep: &[usize]) -> Result<ChunkTensors> {
        self.gather_on_device(chunk, keep)
    }

    fn gather_rotate(
        &self,
        chunk: ChunkTensors,
        keep: &[usize],
        shift: &KeyShift,
    ) -> Result<ChunkTensors> {
        self.gather_rotate_on_device(chunk, keep, shift)
    }

    fn merge(
        &self,
        left: ChunkTensors,
        right: ChunkTensors,
        p: usize,
        s: usize,
    ) -> Result<ChunkTensors> {
        self.merge_on_device(left, right, p, s)
    }
}

impl WgslOps {
    /// The significance scores, left on the device ([`HomerOps::significance`] reads them back).
    pub fn significance_on_device(&self, input: &SignificanceInput<'_>) -> Result<Tensor<1>> {
        let n = check_significance_input(input)?;
        let [h, hd] = input.q_last.dims();
        self.check("query row", input.q_last)?;
        self.check("keys", input.keys)?;
        let mut rows = Vec::with_capacity(2 * n);
        for (j, &p) in input.positions.iter().enumerate() {
            if input.prunable[j] {
                let d = input.last_position.checked_sub(p).ok_or_else(|| {
                    HomerError::Input(format!(
                        "row {j} has position {p} after the last row's {}",
                        input.last_position
                    ))
                })?;
                if let Some(bias) = input.bias
                    && d >= bias.len()
                {
                    return Err(HomerError::BiasMismatch(format!(
                        "distance {d} is beyond the table's {} distances",
                        bias.len()
                    )));
                }
            }
            rows.push(to_u32("position", p)?);
        }
        rows.extend(input.prunable.iter().map(|&p| p as u32));
        let job = SignificanceJob {
            rows: Arc::new(rows),
            bias: Arc::new(input.bias.map(<[f32]>::to_vec).unwrap_or_default()),
            last_position: to_u32("last position", input.last_position)?,
            scale: 1.0 / (hd as f32).sqrt(),
            heads: h as u32,
            cfg: self.cfg,
        };
        let out = Dispatch::homer_significance(
            input.q_last.clone().into_dispatch(),
            input.keys.clone().into_dispatch(),
            job,
        );
        Ok(Tensor::<1>::from_dispatch(out))
    }

    /// Device-side selection: the rows kept after dropping the `drop` smallest `scores`, by the
    /// `select.wgsl` rank count (same order and tie rule as `homer::prune`). HOMER itself selects
    /// on the host, which `homer bench kernels` measured faster (see the crate docs).
    pub fn select_keep_on_device(&self, scores: &Tensor<1>, drop: usize) -> Result<Vec<usize>> {
        self.check("scores", scores)?;
        let job = SelectJob {
            drop: to_u32("drop count", drop)?,
            cfg: self.cfg,
        };
        let flags = Dispatch::homer_select_keep(scores.clone().into_dispatch(), job);
        let flags = read_f32(Tensor::<1>::from_dispatch(flags))?;
        if let Some(j) = flags.iter().position(|f| *f != 0.0 && *f != 1.0) {
            return Err(HomerError::Input(format!(
                "select kernel wrote {} at row {j}",
                flags[j]
            )));
        }
        Ok((0..flags.len()).filter(|&j| flags[j] == 1.0).collect())
    }

    /// [`HomerOps::gather`] with the kernels.
    fn gather_on_device(&self, chunk: ChunkTensors, keep: &[usize]) -> Result<ChunkTensors> {
        check_gather(&chunk, keep)?;
        self.check_chunk(&chunk)?;
        let device = chunk.hidden.device();
        let keep: Vec<i32> = keep.iter().map(|&i| i as i32).collect();
        let m = keep.len();
        let index =
            Tensor::<1, Int>::from_data(TensorData::new(keep, [m]), &device).cast(DType::I32);
        let job = GatherJob { cfg: self.cfg };
        let (d, list) = flatten(chunk);
        let mut out = Vec::with_capacity(list.len());
        let mut it = list.into_iter();
        while let Some(a) = it.next() {
            match it.next() {
                Some(b) => {
                    let (x, y) = Dispatch::homer_gather_pair(
                        a.into_dispatch(),
                        b.into_dispatch(),
                        index.clone().into_dispatch(),
                        job.clone(),
                    );
                    out.push(Tensor::from_dispatch(x));
                    out.push(Tensor::from_dispatch(y));
                }
                None => out.push(Tensor::from_dispatch(Dispatch::homer_gather_one(
                    a.into_dispatch(),
                    index.clone().into_dispatch(),
                    job.clone(),
                ))),
            }
        }
        Ok(unflatten(d, out))
    }

    /// [`HomerOps::gather_rotate`] with the kernels: one dispatch a layer moves its values and
    /// its turned keys (`gather_rotate.wgsl`); a pure renumbering (`keep` = 0..n) rewrites the
    /// keys alone.
    fn gather_rotate_on_device(
        &self,
        chunk: ChunkTensors,
        keep: &[usize],
        shift: &KeyShift,
    ) -> Result<ChunkTensors> {
        check_gather(&chunk, keep)?;
        check_shift(&chunk, keep, shift)?;
        self.check_chunk(&chunk)?;
        self.check("key shift cos", &shift.cos)?;
        self.check("key shift sin", &shift.sin)?;
        let f32_tables = |t: &Tensor<2>| t.clone().cast(DType::F32).into_dispatch();
        let (cos, sin) = (f32_tables(&shift.cos), f32_tables(&shift.sin));
        let device = chunk.hidden.device();
        let all = keeps_all(keep, chunk.rows());
        let keep: Vec<i32> = keep.iter().map(|&i| i as i32).collect();
        let m = keep.len();
        let index =
            Tensor::<1, Int>::from_data(TensorData::new(keep, [m]), &device).cast(DType::I32);
        let job = GatherJob { cfg: self.cfg };
        let hidden = if all {
            chunk.hidden
        } else {
            let [n, d] = chunk.hidden.dims();
            let h = Dispatch::homer_gather_one(
                chunk.hidden.reshape([1, n, d]).into_dispatch(),
                index.clone().into_dispatch(),
                job.clone(),
            );
            Tensor::<3>::from_dispatch(h).reshape([m, d])
        };
        let cache = chunk
            .cache
            .into_iter()
            .map(|kv| {
                if all {
                    let k = Dispatch::homer_gather_rotate_one(
                        kv.k.into_dispatch(),
                        index.clone().into_dispatch(),
                        cos.clone(),
                        sin.clone(),
                        job.clone(),
                    );
                    LayerKv {
                        k: Tensor::from_dispatch(k),
                        v: kv.v,
                    }
                } else {
                    let (k, v) = Dispatch::homer_gather_rotate_pair(
                        kv.k.into_dispatch(),
                        kv.v.into_dispatch(),
                        index.clone().into_dispatch(),
                        cos.clone(),
                        sin.clone(),
                        job.clone(),
                    );
                    LayerKv {
                        k: Tensor::from_dispatch(k),
                        v: Tensor::from_dispatch(v),
                    }
                }
            })
            .collect();
        Ok(ChunkTensors { hidden, cache })
    }

    /// [`HomerOps::merge`] with the kernels.
    fn merge_on_device(
        &self,
        left: ChunkTensors,
        right: ChunkTensors,
        p: usize,
        s: usize,
    ) -> Result<ChunkTensors> {
        check_merge(&left, &right, p, s)?;
        let (nl, nr) = (left.rows(), right.rows());
        self.check_chunk(&left)?;
        self.check_chunk(&right)?;
        // The kernel reads both children with one layout: everything but the rows must agree.
        let same = |a: &[usize], b: &[usize], row_axis: usize| {
            a.len() == b.len() && (0..a.len()).all(|i| i == row_axis || a[i] == b[i])
        };
        let mismatch = !same(&left.hidden.dims(), &right.hidden.dims(), 0)
            || left.hidden.dtype() != right.hidden.dtype()
            || left.cache.iter().zip(&right.cache).any(|(a, b)| {
                !same(&a.k.dims(), &b.k.dims(), 1)
                    || !same(&a.v.dims(), &b.v.dims(), 1)
                    || a.k.dtype() != b.k.dtype()
                    || a.v.dtype() != b.v.dtype()
            });
        if mismatch {
            return Err(HomerError::Input(
                "merge: the two children differ in more than their row counts (widths, heads or \
                 element types)"
                    .into(),
            ));
        }
        // The merged node is the biggest binding of the call.
        let m = nl + nr - p - s;
        let elem = left.hidden.dtype().size() as u64;
        let mut merged = vec![("hidden rows", left.hidden.dims()[1])];
        if let Some(kv) = left.cache.first() {
            let [kvh, _, hd] = kv.k.dims();
            merged.push(("keys and values", kvh * hd));
        }
        for (what, per_row) in merged {
            let bytes = (per_row * m) as u64 * elem;
            if bytes > self.max_binding {
                return Err(HomerError::Input(format!(
                    "the merged node's {what} would be {bytes} bytes, above this adapter's \
                     max_storage_buffer_binding_size of {} bytes; use a smaller --chunk-len \
                     or --homer-ops tensor",
                    self.max_binding
                )));
            }
        }
        let job = MergeJob {
            prefix_len: to_u32("prefix length", p)?,
            suffix_len: to_u32("suffix length", s)?,
            cfg: self.cfg,
        };
        let (d, xs) = flatten(left);
        let (_, ys) = flatten(right);
        let mut out = Vec::with_capacity(xs.len());
        let mut pairs = xs.into_iter().zip(ys);
        while let Some((xa, ya)) = pairs.next() {
            match pairs.next() {
                Some((xb, yb)) => {
                    let (a, b) = Dispatch::homer_merge_pair(
                        xa.into_dispatch(),
                        ya.into_dispatch(),
                        xb.into_dispatch(),
                        yb.into_dispatch(),
                        job.clone(),
                    );
                    out.push(Tensor::from_dispatch(a));
                    out.push(Tensor::from_dispatch(b));
                }
                None => out.push(Tensor::from_dispatch(Dispatch::homer_merge_one(
                    xa.into_dispatch(),
                    ya.into_dispatch(),
                    job.clone(),
                ))),
            }
        }
        Ok(unflatten(d, out))
    }
}

/// The model's attention on a wgpu device as `shaders/attention.wgsl` (flash attention over the
/// layer's KV buffer, GQA by index arithmetic), installed into `homer-model` with
/// [`install_attention`]. Shapes it does not take fall back to the model's tensor ops.
#[derive(Debug, Clone)]
pub struct WgslAttention {
    max_binding: u64,
    /// The adapter has `shader-f16`: f16 queries or KV buffers are read (else declined).
    shader_f16: bool,
    split: SplitMode,
    cfg: LaunchCfg,
}

impl WgslAttention {
    /// The kernel for a wgpu device described by `info`.
    pub fn for_device(info: &DeviceInfo) -> Result<Self> {
        let ops = WgslOps::for_device(info)?;
        Ok(Self {
            max_binding: ops.max_binding,
            shader_f16: ops.shader_f16,
            split: SplitMode::Auto,
            cfg: LaunchCfg {
                workgroup_size: 64,
                ..ops.cfg
            },
        })
    }

    /// Launch settings (tests set `poison` and other workgroup sizes).
    pub fn with_launch(mut self, cfg: LaunchCfg) -> Self {
        self.cfg = cfg;
        self
    }

    /// Split-key attention for decode ([`SplitMode::Auto`], the default) or never (tests and
    /// `homer bench kernels` compare the two).
    pub fn with_split(mut self, split: SplitMode) -> Self {
        self.split = split;
        self
    }

    /// Why the kernel does not take these shapes, if it does not.
    pub fn refusal(&self, q: &Tensor<3>, k_buf: &Tensor<3>, past: usize) -> Option<String> {
        let [h, n, hd] = q.dims();
        let [kvh, cap, khd] = k_buf.dims();
        let wg = self.cfg.workgroup_size as usize;
        let takes = |t: DType| t == DType::F32 || (t == DType::F16 && self.shader_f16);
        let bytes = |e: usize, t: DType| e as u64 * t.size() as u64;
        if q.device() == burn::tensor::Device::flex() {
            Some("not a wgpu device".into())
        } else if !takes(q.dtype()) || !takes(k_buf.dtype()) {
            Some(format!(
                "element types {:?}/{:?}, the kernel takes f32 (or f16 with shader-f16)",
                q.dtype(),
                k_buf.dtype()
            ))
        } else if khd != hd || hd % 4 != 0 || hd == 0 || hd > 512 {
            Some(format!(
                "head dim {hd} (keys {khd}); the kernel needs a multiple of 4 up to 512"
            ))
        } else if kvh == 0 || h % kvh != 0 || h / kvh > wg {
            Some(format!("{h} query heads over {kvh} KV heads"))
        } else if past + n > cap {
            Some(format!("{past} + {n} rows exceed the buffer's {cap}"))
        } else if bytes(h * n * hd, q.dtype()) > self.max_binding
            || bytes(kvh * cap * hd, k_buf.dtype()) > self.max_binding
            || u32::try_from(kvh * cap * hd).is_err()
        {
            Some("a tensor above the adapter's binding limit".into())
        } else {
            None
        }
    }
}

impl homer_model::attention::BufferAttention for WgslAttention {
    fn attend(
        &self,
        q: &Tensor<3>,
        k_buf: &Tensor<3>,
        v_buf: &Tensor<3>,
        past: usize,
    ) -> Option<Tensor<2>> {
        let mixed = (v_buf.dtype() != k_buf.dtype() || v_buf.dims() != k_buf.dims())
            .then(|| "keys and values differ in shape or element type".to_string());
        if let Some(why) = mixed.or_else(|| self.refusal(q, k_buf, past)) {
            tracing::debug!("WGSL attention declined ({why}); tensor ops instead");
            return None;
        }
        let hd = q.dims()[2];
        let job = AttentionJob {
            split: self.split,
            past: past as u32,
            scale: 1.0 / (hd as f32).sqrt(),
            cfg: self.cfg,
        };
        Some(Tensor::from_dispatch(Dispatch::homer_attention(
            q.clone().into_dispatch(),
            k_buf.clone().into_dispatch(),
            v_buf.clone().into_dispatch(),
            job,
        )))
    }
}

/// Install [`WgslAttention`] as the model's attention on wgpu devices and [`WgslBlockUploader`]
/// for GGUF block weights (`--dtype native`), once per process (later calls do nothing).
/// Returns whether this call installed them.
pub fn install_attention(info: &DeviceInfo) -> Result<bool> {
    let blocks = homer_model::kernels::install_block_uploader(Box::new(
        WgslBlockUploader::for_device(info)?,
    ));
    let attention = homer_model::attention::install_buffer_attention(Box::new(
        WgslAttention::for_device(info)?,
    ));
    Ok(attention || blocks)
}

/// A weight of GGUF blocks on a wgpu device (`shaders/qgemv.wgsl` for up to 4 activation rows,
/// `dequant.wgsl` into an f32 scratch + burn's matmul above), stored in row chunks that each fit
/// the adapter's binding limit.
#[derive(Debug)]
pub struct WgslBlocks {
    qtype: u32,
    gemv_rows: u32,
    rows: usize,
    cols: usize,
    chunks: Vec<BlockChunk>,
    bytes: usize,
    cfg: LaunchCfg,
}

#[derive(Debug)]
struct BlockChunk {
    rows: usize,
    qs: Tensor<1, Int>,
    dm: Tensor<1, Int>,
}

/// Rows of activations up to which a block weight runs the matrix-vector kernel.
pub const QGEMV_MAX_ROWS: usize = 4;

impl WgslBlocks {
    /// Upload `w` to `device`, in row chunks whose quant words, scale words and f32 dequantised
    /// scratch each stay within `max_binding` bytes.
    pub fn upload(
        w: &homer_model::qcpu::QMatrix,
        device: &homer_model::Device,
        max_binding: u64,
        cfg: LaunchCfg,
        gemv_rows: u32,
    ) -> std::result::Result<Self, String> {
        if !gemv_rows.is_power_of_two() || gemv_rows > 64 {
            return Err(format!(
                "{gemv_rows} rows per matrix-vector workgroup: a power of two up to 64"
            ));
        }
        use homer_model::load::quant::GgmlType;
        let qtype = match w.ty() {
            GgmlType::Q4_0 => 0,
            GgmlType::Q4_1 => 1,
            GgmlType::Q8_0 => 2,
            GgmlType::Q4K => 3,
            GgmlType::Q6K => 4,
            other => return Err(format!("{} blocks have no WGSL kernel", other.name())),
        };
        let (rows, cols) = (w.rows(), w.cols());
        // The prefill path's f32 scratch [chunk, cols] is the largest buffer of a chunk.
        let per_row = 4 * cols as u64;
        let chunk_rows = (max_binding / per_row.max(1)).min(rows as u64) as usize;
        if chunk_rows == 0 {
            return Err(format!(
                "one row of {cols} f32 values exceeds the adapter's binding limit of {max_binding} bytes"
            ));
        }
        let mut chunks = Vec::new();
        let mut bytes = 0;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + chunk_rows).min(rows);
            let (qs, dm) = w.rows_raw(r0, r1);
            let qwords: Vec<u32> = qs
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut dwords: Vec<u32> = dm
                .chunks(2)
                .map(|c| c[0] as u32 | (c.get(1).copied().unwrap_or(0) as u32) << 16)
                .collect();
            if dwords.is_empty() {
                dwords.push(0);
            }
            bytes += 4 * (qwords.len() + dwords.len());
            let up = |v: Vec<u32>| {
                let n = v.len();
                Tensor::<1, Int>::from_data(TensorData::new(v, [n]), (device, DType::U32))
            };
            chunks.push(BlockChunk {
                rows: r1 - r0,
                qs: up(qwords),
                dm: up(dwords),
            });
            r0 = r1;
        }
        Ok(Self {
            qtype,
            gemv_rows,
            rows,
            cols,
            chunks,
            bytes,
            cfg,
        })
    }

    fn job(&self, rows: usize) -> BlockJob {
        BlockJob {
            qtype: self.qtype,
            gemv_rows: self.gemv_rows,
            rows: rows as u32,
            cols: self.cols as u32,
            cfg: self.cfg,
        }
    }

    /// The weight dequantised [rows, cols] (tests; prefill uses it chunk by chunk).
    pub fn dequantize(&self) -> Tensor<2> {
        let parts: Vec<Tensor<2>> = self
            .chunks
            .iter()
            .map(|c| {
                Tensor::from_dispatch(Dispatch::homer_dequant(
                    c.qs.clone().into_dispatch(),
                    c.dm.clone().into_dispatch(),
                    self.job(c.rows),
                ))
            })
            .collect();
        Tensor::cat(parts, 0)
    }
}

impl homer_model::kernels::DeviceBlocks for WgslBlocks {
    fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        let [m, k] = x.dims();
        assert_eq!(
            k, self.cols,
            "block weight [{}, {}] applied to [{m}, {k}]",
            self.rows, self.cols
        );
        let mut outs: Vec<Tensor<2>> = Vec::with_capacity(self.chunks.len());
        for c in &self.chunks {
            let y = if m <= QGEMV_MAX_ROWS {
                Tensor::from_dispatch(Dispatch::homer_qgemv(
                    x.clone().into_dispatch(),
                    c.qs.clone().into_dispatch(),
                    c.dm.clone().into_dispatch(),
                    self.job(c.rows),
                ))
            } else {
                let w: Tensor<2> = Tensor::from_dispatch(Dispatch::homer_dequant(
                    c.qs.clone().into_dispatch(),
                    c.dm.clone().into_dispatch(),
                    self.job(c.rows),
                ));
                x.clone().matmul(w.transpose())
            };
            outs.push(y);
        }
        if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(outs, 1)
        }
    }

    fn rows(&self) -> usize {
        self.rows
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Uploads GGUF block weights for `homer-model` (`--dtype native` on wgpu).
#[derive(Debug, Clone)]
pub struct WgslBlockUploader {
    max_binding: u64,
    cfg: LaunchCfg,
    gemv_rows: u32,
}

impl WgslBlockUploader {
    pub fn for_device(info: &DeviceInfo) -> Result<Self> {
        let ops = WgslOps::for_device(info)?;
        Ok(Self {
            max_binding: ops.max_binding,
            cfg: ops.cfg,
            gemv_rows: kernels::qgemv_rows(info),
        })
    }
}

impl homer_model::kernels::BlockUploader for WgslBlockUploader {
    fn upload(
        &self,
        w: &homer_model::qcpu::QMatrix,
        device: &homer_model::Device,
    ) -> std::result::Result<Arc<dyn homer_model::kernels::DeviceBlocks>, String> {
        if *device == homer_model::Device::flex() {
            return Err("the WGSL block kernels need a wgpu device".into());
        }
        Ok(Arc::new(WgslBlocks::upload(
            w,
            device,
            self.max_binding,
            self.cfg,
            self.gemv_rows,
        )?))
    }
}
