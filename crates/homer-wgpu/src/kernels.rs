//! The WGSL kernels of `shaders/` as a burn backend extension: the CubeCL backend (wgpu runtime)
//! implements them by launching the WGSL source, and `#[backend_extension]` derives the lazy
//! `Fusion` wrapper and the `Dispatch` routing, so callers stay on `Tensor<D>`.
//!
//! Every gathered or merged tensor is 3-D `[outer, rows, inner]` and made contiguous first; the
//! small host-side arguments (positions, masks, bias) travel in the `*Job` structs and are
//! uploaded next to the launch, a gather's row list is an index tensor uploaded once per node.
//! All validation happens in [`crate::WgslOps`] before these are called: the kernels themselves
//! only clamp to stay inside their buffers.

use std::sync::Arc;

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::{
    CubeBackend, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::backend::{Backend, backend_extension};
use burn::tensor::{DType, Shape};
use cubecl::prelude::KernelId;
use cubecl::server::KernelArguments;
use cubecl::{CubeCount, CubeDim};

const SIGNIFICANCE: &str = include_str!("../../../shaders/significance.wgsl");
const GATHER: &str = include_str!("../../../shaders/gather.wgsl");
const GATHER_ROTATE: &str = include_str!("../../../shaders/gather_rotate.wgsl");
const MERGE: &str = include_str!("../../../shaders/merge.wgsl");
const SELECT: &str = include_str!("../../../shaders/select.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
const ATTENTION_SPLIT: &str = include_str!("../../../shaders/attention_split.wgsl");
const ATTENTION_COMBINE: &str = include_str!("../../../shaders/attention_combine.wgsl");
const QGEMV: &str = include_str!("../../../shaders/qgemv.wgsl");
const DEQUANT: &str = include_str!("../../../shaders/dequant.wgsl");
/// Not a kernel: the block decoding `QGEMV` and `DEQUANT` share (their `{{ block_decode }}`).
const BLOCK_DECODE: &str = include_str!("../../../shaders/block_decode.wgsl");

/// Launch settings shared by every kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaunchCfg {
    /// Invocations per workgroup (the shaders' `{{ workgroup_size }}`).
    pub workgroup_size: u32,
    /// Most workgroups per dispatch (grid-stride loops cover the rest).
    pub max_workgroups: u32,
    /// Fill outputs with NaN before the launch (tests check every element gets written).
    pub poison: bool,
}

impl Default for LaunchCfg {
    fn default() -> Self {
        Self {
            workgroup_size: 128,
            max_workgroups: 4096,
            poison: false,
        }
    }
}

/// Host inputs of the significance kernel.
#[derive(Debug, Clone)]
pub struct SignificanceJob {
    /// positions[0..n] then prunable flags (1/0) [n..2n].
    pub rows: Arc<Vec<u32>>,
    /// The layer's bias row; empty = uncalibrated.
    pub bias: Arc<Vec<f32>>,
    pub last_position: u32,
    pub scale: f32,
    pub heads: u32,
    pub cfg: LaunchCfg,
}

/// Launch settings of the gather kernel (the rows travel as an index tensor).
#[derive(Debug, Clone)]
pub struct GatherJob {
    pub cfg: LaunchCfg,
}

/// Host inputs of the device-side selection kernel.
#[derive(Debug, Clone)]
pub struct SelectJob {
    /// Rows to drop (the k smallest scores).
    pub drop: u32,
    pub cfg: LaunchCfg,
}

/// Host inputs of the attention kernel.
#[derive(Debug, Clone)]
pub struct AttentionJob {
    /// Rows of the KV buffers filled before the new rows.
    pub past: u32,
    /// Multiplier of q·k (1/√hd).
    pub scale: f32,
    /// Split-key attention for a few new rows ([`SplitMode::Auto`]) or always one pass.
    pub split: SplitMode,
    pub cfg: LaunchCfg,
}

/// Whether the attention of a few new rows (decode) cuts the keys into spans, one workgroup
/// each (`attention_split.wgsl`), or runs `attention.wgsl` in one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitMode {
    /// Split where it applies (up to 4 new rows whose queries fit the workgroup memory).
    #[default]
    Auto,
    /// Always one pass (the tests compare the two).
    Never,
}

/// Host inputs of the block kernels (`qgemv`, `dequant`).
#[derive(Debug, Clone)]
pub struct BlockJob {
    /// 0 = Q4_0, 1 = Q4_1, 2 = Q8_0, 3 = Q4_K, 4 = Q6_K (the shaders' TYPE).
    pub qtype: u32,
    /// Output rows and input columns of the weight (a multiple of 32; of 256 for K-quants).
    pub rows: u32,
    pub cols: u32,
    /// Output rows per `qgemv.wgsl` workgroup (a power of two ≤ 64; [`qgemv_rows`]).
    pub gemv_rows: u32,
    pub cfg: LaunchCfg,
}

/// Output rows per workgroup of `qgemv.wgsl`.
pub const QGEMV_ROWS: u32 = 4;

/// Output rows per `qgemv.wgsl` workgroup on a software adapter (lavapipe): one invocation per
/// row. There a workgroup's invocations run as SIMD lanes of one CPU thread and every barrier is
/// a coroutine switch, so the 16-lane reduction costs more than it saves (default model decode
/// 2.3 → 3.0 tok/s on lavapipe; 16 and 32 rows measured in between).
pub const QGEMV_ROWS_SOFTWARE: u32 = 64;

/// Rows per `qgemv.wgsl` workgroup for an adapter.
pub fn qgemv_rows(info: &homer_model::DeviceInfo) -> u32 {
    if info.device_type == "Cpu" {
        QGEMV_ROWS_SOFTWARE
    } else {
        QGEMV_ROWS
    }
}

/// Host inputs of the merge kernel.
#[derive(Debug, Clone)]
pub struct MergeJob {
    pub prefix_len: u32,
    pub suffix_len: u32,
    pub cfg: LaunchCfg,
}

fn with_rows(shape: &Shape, rows: usize) -> Shape {
    Shape::new([shape[0], rows, shape[2]])
}

fn merged_rows(x: &Shape, y: &Shape, job: &MergeJob) -> usize {
    x[1] + y[1] - job.prefix_len as usize - job.suffix_len as usize
}

/// HOMER's kernels as a backend extension. Implemented for the CubeCL backend; the macro adds
/// the `Fusion` wrapper (lazy, output shapes below) and the `Dispatch` routing.
#[backend_extension(Cube, Fusion)]
pub trait HomerKernels: Backend {
    /// `q` [H, D], `keys` [KV, N, D] → scores [N] (f32).
    #[fusion(meta = |_q, keys, _job| TensorSpec::new(Shape::new([keys.shape[1]]), DType::F32))]
    fn homer_significance(
        q: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        job: SignificanceJob,
    ) -> FloatTensor<Self>;

    /// Rows `index` [M] (32-bit, uploaded once per node) of two tensors with the same row count.
    #[fusion(meta = |a, b, index, _job| (
        TensorSpec::new(with_rows(&a.shape, index.shape[0]), a.dtype),
        TensorSpec::new(with_rows(&b.shape, index.shape[0]), b.dtype),
    ))]
    fn homer_gather_pair(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        index: IntTensor<Self>,
        job: GatherJob,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Rows `index` [M] of one tensor.
    #[fusion(meta = |a, index, _job| TensorSpec::new(with_rows(&a.shape, index.shape[0]), a.dtype))]
    fn homer_gather_one(
        a: FloatTensor<Self>,
        index: IntTensor<Self>,
        job: GatherJob,
    ) -> FloatTensor<Self>;

    /// Rows `index` [M] of a layer's keys `k` and values `v` [KV, N, hd], the keys turned by the
    /// shift tables `cos`, `sin` [M, hd] (f32) on the way (`shaders/gather_rotate.wgsl`).
    #[fusion(meta = |k, v, index, _cos, _sin, _job| (
        TensorSpec::new(with_rows(&k.shape, index.shape[0]), k.dtype),
        TensorSpec::new(with_rows(&v.shape, index.shape[0]), v.dtype),
    ))]
    fn homer_gather_rotate_pair(
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        index: IntTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        job: GatherJob,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Rows `index` [M] of keys `k` [KV, N, hd], turned by `cos`, `sin` [M, hd] (f32).
    #[fusion(meta = |k, index, _cos, _sin, _job| TensorSpec::new(
        with_rows(&k.shape, index.shape[0]),
        k.dtype,
    ))]
    fn homer_gather_rotate_one(
        k: FloatTensor<Self>,
        index: IntTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        job: GatherJob,
    ) -> FloatTensor<Self>;

    /// The §5 merge of two tensor pairs (x = left child, y = right child).
    #[fusion(meta = |xa, ya, xb, yb, job| (
        TensorSpec::new(with_rows(&xa.shape, merged_rows(&xa.shape, &ya.shape, job)), xa.dtype),
        TensorSpec::new(with_rows(&xb.shape, merged_rows(&xb.shape, &yb.shape, job)), xb.dtype),
    ))]
    fn homer_merge_pair(
        xa: FloatTensor<Self>,
        ya: FloatTensor<Self>,
        xb: FloatTensor<Self>,
        yb: FloatTensor<Self>,
        job: MergeJob,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Keep flags (1.0 keep / 0.0 drop) of `scores` [N] after dropping the `job.drop` smallest.
    #[fusion(meta = |scores, _job| TensorSpec::new(scores.shape.clone(), DType::F32))]
    fn homer_select_keep(scores: FloatTensor<Self>, job: SelectJob) -> FloatTensor<Self>;

    /// Causal GQA flash attention of `q` [H, n, hd] over rows `0 .. past + n` of the KV buffers
    /// `k`, `v` [KV, cap, hd] → [n, H·hd] f32 (`shaders/attention.wgsl`).
    #[fusion(meta = |q, _k, _v, _job| TensorSpec::new(
        Shape::new([q.shape[1], q.shape[0] * q.shape[2]]),
        DType::F32,
    ))]
    fn homer_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        job: AttentionJob,
    ) -> FloatTensor<Self>;

    /// `x` [m ≤ 4, cols] · the block weight (`qs`, `dm` u32 words) ᵀ → [m, rows] f32
    /// (`shaders/qgemv.wgsl`).
    #[fusion(meta = |x, _qs, _dm, job| TensorSpec::new(
        Shape::new([x.shape[0], job.rows as usize]),
        DType::F32,
    ))]
    fn homer_qgemv(
        x: FloatTensor<Self>,
        qs: IntTensor<Self>,
        dm: IntTensor<Self>,
        job: BlockJob,
    ) -> FloatTensor<Self>;

    /// The block weight dequantised → [rows, cols] f32 (`shaders/dequant.wgsl`).
    #[fusion(meta = |_qs, _dm, job| TensorSpec::new(
        Shape::new([job.rows as usize, job.cols as usize]),
        DType::F32,
    ))]
    fn homer_dequant(qs: IntTensor<Self>, dm: IntTensor<Self>, job: BlockJob) -> FloatTensor<Self>;

    /// The §5 merge of one tensor pair.
    #[fusion(meta = |xa, ya, job| TensorSpec::new(
        with_rows(&xa.shape, merged_rows(&xa.shape, &ya.shape, job)),
        xa.dtype,
    ))]
    fn homer_merge_one(
        xa: FloatTensor<Self>,
        ya: FloatTensor<Self>,
        job: MergeJob,
    ) -> FloatTensor<Self>;
}

/// Which shader, with its template values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shader {
    Significance,
    Gather,
    GatherRotate,
    Merge,
    Select,
    Attention,
    AttentionSplit,
    AttentionCombine,
    Qgemv,
    Dequant,
}

#[derive(Debug)]
struct WgslKernel {
    shader: Shader,
    workgroup_size: u32,
    f16: bool,
    /// The query's element type is f16 (attention and significance; `{{ q_elem }}`), which may
    /// differ from the keys' (`{{ elem }}`): an f16 KV cache under an f32 model.
    q_f16: bool,
    /// Elements are `vec4`s of the scalar type (copy kernels on rows whose width is a multiple
    /// of 4: four times fewer invocations and index computations, 16-byte loads).
    vec4: bool,
    /// Row widths of the copy kernels' two tensors, in elements (compile-time constants there).
    inner: (u32, u32),
    /// The attention kernel's head dim, key tile and query rows per workgroup; the split
    /// kernel's head dim, key span and query pairs (G·N).
    attn: (u32, u32, u32),
    /// The block kernels' quant type and (qgemv) rows per workgroup.
    qtype: u32,
    gemv_rows: u32,
}

impl KernelSource for WgslKernel {
    fn source(&self) -> SourceTemplate {
        let text = match self.shader {
            Shader::Significance => SIGNIFICANCE,
            Shader::Gather => GATHER,
            Shader::GatherRotate => GATHER_ROTATE,
            Shader::Merge => MERGE,
            Shader::Select => SELECT,
            Shader::Attention => ATTENTION,
            Shader::AttentionSplit => ATTENTION_SPLIT,
            Shader::AttentionCombine => ATTENTION_COMBINE,
            Shader::Qgemv => QGEMV,
            Shader::Dequant => DEQUANT,
        };
        // The shared block decoding is pasted in first, so its own placeholders get filled too.
        let text = text.replace("{{ block_decode }}", BLOCK_DECODE);
        SourceTemplate::new(text)
            .register("workgroup_size", self.workgroup_size.to_string())
            .register("elem", {
                let scalar = if self.f16 { "f16" } else { "f32" };
                if self.vec4 {
                    format!("vec4<{scalar}>")
                } else {
                    scalar.to_string()
                }
            })
            .register("felem", if self.vec4 { "vec4<f32>" } else { "f32" })
            .register("q_elem", if self.q_f16 { "f16" } else { "f32" })
            .register(
                "enable",
                if self.f16 || self.q_f16 {
                    "enable f16;"
                } else {
                    ""
                },
            )
            .register("a_inner", self.inner.0.to_string())
            .register("b_inner", self.inner.1.to_string())
            .register("head_dim", self.attn.0.to_string())
            .register("key_tile", self.attn.1.to_string())
            .register("query_rows", self.attn.2.to_string())
            .register("key_span", self.attn.1.to_string())
            .register("pairs", self.attn.2.to_string())
            .register("qtype", self.qtype.to_string())
            .register("rows_per_group", self.gemv_rows.to_string())
    }

    fn id(&self) -> KernelId {
        // Unchecked: no loop-bounding counters. cubecl compiles WGSL sources without wgpu's bounds
        // checks in either mode, so the kernels' own safety is what counts: every index they read
        // is validated on the host and clamped in the shader, every write is below the output
        // size by construction, and every loop has a fixed trip count.
        KernelId::new::<Self>()
            .mode(cubecl::prelude::ExecutionMode::Unchecked)
            .info((
                self.shader,
                self.workgroup_size,
                self.f16,
                self.q_f16,
                self.vec4,
                self.inner,
                self.attn,
                self.qtype,
                self.gemv_rows,
            ))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

fn element_f16(dtype: DType) -> bool {
    match dtype {
        DType::F32 => false,
        DType::F16 => true,
        other => {
            panic!("homer-wgpu kernels take f32 or f16 tensors, got {other:?} (checked by WgslOps)")
        }
    }
}

/// An output tensor of `shape`, uninitialised or NaN-filled. The buffer is at least 16 bytes so
/// that even an empty output can be bound where the shader reads vec4s.
fn output(like: &CubeTensor, shape: Shape, dtype: DType, poison: bool) -> CubeTensor {
    let n = shape.num_elements();
    let bytes = (n * dtype.size()).max(16);
    let handle = if poison {
        match dtype {
            DType::F16 => {
                let nan = vec![0x7e00u16; bytes / 2];
                like.client.create_from_slice(bytemuck::cast_slice(&nan))
            }
            _ => {
                let nan = vec![f32::NAN; bytes.div_ceil(4)];
                like.client.create_from_slice(bytemuck::cast_slice(&nan))
            }
        }
    } else {
        like.client.empty(bytes)
    };
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        dtype,
    )
}

fn upload_u32(like: &CubeTensor, data: &[u32]) -> cubecl::server::Handle {
    if data.is_empty() {
        like.client.create_from_slice(bytemuck::cast_slice(&[0u32]))
    } else {
        like.client.create_from_slice(bytemuck::cast_slice(data))
    }
}

/// Most grid-stride trips one invocation makes; the grid grows beyond `max_workgroups` rather
/// than exceed it (lavapipe was seen to stop a loop after 65,535 trips).
const MAX_TRIPS: usize = 1024;

/// The workgroup grid for `elements` items: at least enough workgroups that no invocation loops
/// more than [`MAX_TRIPS`] times, else at most `max_workgroups`; x ≤ 65,535, the rest in y.
pub(crate) fn grid(elements: usize, cfg: LaunchCfg) -> (u32, u32) {
    let wg = cfg.workgroup_size.max(1) as usize;
    let needed = elements.div_ceil(wg).max(1);
    let floor = elements.div_ceil(wg * MAX_TRIPS).max(1);
    let groups = needed.min(cfg.max_workgroups.max(1) as usize).max(floor);
    let x = groups.min(65_535);
    let y = groups.div_ceil(x);
    (x as u32, y as u32)
}

/// Launch `shader`. Flat kernels (`slabs` = None) get a flattened 2-D grid over `elements`; the
/// copy kernels get one grid row (y) per slab and x over the `elements` of the largest slab.
#[allow(clippy::too_many_arguments)]
fn launch(
    like: &CubeTensor,
    shader: Shader,
    (f16, q_f16): (bool, bool),
    vec4: bool,
    inner: (u32, u32),
    cfg: LaunchCfg,
    elements: usize,
    slabs: Option<usize>,
    buffers: Vec<cubecl::server::BufferBinding>,
) {
    let wg = cfg.workgroup_size.max(1);
    let (x, y) = match slabs {
        None => grid(elements, cfg),
        Some(slabs) => {
            // Every slab runs its own grid-stride loop over x.
            let per_slab = LaunchCfg {
                max_workgroups: (cfg.max_workgroups as usize / slabs.max(1)).max(1) as u32,
                ..cfg
            };
            // One grid row per slab suffices: a slab is one tensor's [rows, inner] plane, bounded
            // by the binding limit (≤ 2^32 bytes), far below 65,535 × workgroup × 1024 elements;
            // slabs are KV heads (+1), far below 65,535.
            let (x, y) = grid(elements, per_slab);
            debug_assert_eq!(y, 1);
            (x, slabs.clamp(1, 65_535) as u32)
        }
    };
    let kernel = WgslKernel {
        shader,
        workgroup_size: wg,
        f16,
        q_f16,
        vec4,
        inner,
        attn: (0, 0, 0),
        qtype: 0,
        gemv_rows: 1,
    };
    like.client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(wg))),
        CubeCount::Static(x, y, 1),
        KernelArguments::new().with_buffers(buffers),
    );
}

/// A zero-row stand-in for the missing partner of an odd tensor out (16 bytes: one vec4).
fn dummy(like: &CubeTensor) -> CubeTensor {
    let handle = like
        .client
        .create_from_slice(bytemuck::cast_slice(&[0u32; 4]));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::new([0, 0, 1]),
        handle,
        like.dtype,
    )
}

fn gather(
    a: CubeTensor,
    b: Option<CubeTensor>,
    index: CubeTensor,
    job: &GatherJob,
) -> (CubeTensor, CubeTensor) {
    let a = into_contiguous(a);
    let b = b.map(into_contiguous);
    let index = into_contiguous(index);
    assert_eq!(
        index.dtype.size(),
        4,
        "gather index must be 32-bit (checked by WgslOps)"
    );
    let f16 = element_f16(a.dtype);
    let m = index.meta.shape().num_elements();
    let sa = a.meta.shape().clone();
    let a_out = output(&a, with_rows(&sa, m), a.dtype, job.cfg.poison);
    let (b_in, b_out, sb) = match b {
        Some(b) => {
            assert_eq!(
                a.dtype, b.dtype,
                "gather pairs one element type (WgslOps pairs K with V)"
            );
            let sb = b.meta.shape().clone();
            let out = output(&b, with_rows(&sb, m), b.dtype, job.cfg.poison);
            (b, out, [sb[0], sb[2]])
        }
        None => (dummy(&a), dummy(&a), [0, 4]),
    };
    // Rows of a multiple of 4 elements move as vec4s.
    let w = if sa[2] % 4 == 0 && sb[1] % 4 == 0 {
        4
    } else {
        1
    };
    let (ia, ib) = (sa[2] / w, sb[1] / w);
    let info = [sa[1] as u32, m as u32, sa[0] as u32, sb[0] as u32];
    let info = upload_u32(&a, &info);
    launch(
        &a,
        Shader::Gather,
        (f16, f16),
        w == 4,
        (ia as u32, ib as u32),
        job.cfg,
        m * ia.max(ib),
        Some(sa[0] + sb[0]),
        vec![
            a.handle.clone().binding(),
            b_in.handle.clone().binding(),
            a_out.handle.clone().binding(),
            b_out.handle.clone().binding(),
            index.handle.clone().binding(),
            info.binding(),
        ],
    );
    (a_out, b_out)
}

/// Rows `index` of keys `k` (turned by the shift tables `cos`, `sin` [M, hd]) and of values `v`.
fn gather_rotate(
    k: CubeTensor,
    v: Option<CubeTensor>,
    index: CubeTensor,
    (cos, sin): (CubeTensor, CubeTensor),
    job: &GatherJob,
) -> (CubeTensor, CubeTensor) {
    let k = into_contiguous(k);
    let v = v.map(into_contiguous);
    let index = into_contiguous(index);
    let (cos, sin) = (into_contiguous(cos), into_contiguous(sin));
    assert_eq!(
        index.dtype.size(),
        4,
        "gather index must be 32-bit (checked by WgslOps)"
    );
    assert!(
        cos.dtype == DType::F32 && sin.dtype == DType::F32,
        "shift tables are f32 (checked by WgslOps)"
    );
    let f16 = element_f16(k.dtype);
    let m = index.meta.shape().num_elements();
    let sk = k.meta.shape().clone();
    let hd = sk[2];
    assert!(
        hd % 2 == 0 && cos.meta.shape().num_elements() == m * hd,
        "shift tables [{m}, {hd}] for even head dims (checked by WgslOps)"
    );
    let k_out = output(&k, with_rows(&sk, m), k.dtype, job.cfg.poison);
    let (v_in, v_out, sv) = match v {
        Some(v) => {
            assert_eq!(k.dtype, v.dtype, "one KV cache, one element type");
            let sv = v.meta.shape().clone();
            let out = output(&v, with_rows(&sv, m), v.dtype, job.cfg.poison);
            (v, out, [sv[0], sv[2]])
        }
        None => (dummy(&k), dummy(&k), [0, 8]),
    };
    // vec4 elements when both halves of a key row hold whole vec4s.
    let w = if hd % 8 == 0 && sv[1] % 4 == 0 { 4 } else { 1 };
    let (ik, iv) = (hd / w, sv[1] / w);
    let info = [sk[1] as u32, m as u32, sk[0] as u32, sv[0] as u32];
    let info = upload_u32(&k, &info);
    launch(
        &k,
        Shader::GatherRotate,
        (f16, f16),
        w == 4,
        (ik as u32, iv as u32),
        job.cfg,
        m * ik.max(iv),
        Some(sk[0] + sv[0]),
        vec![
            k.handle.clone().binding(),
            v_in.handle.clone().binding(),
            k_out.handle.clone().binding(),
            v_out.handle.clone().binding(),
            index.handle.clone().binding(),
            cos.handle.clone().binding(),
            sin.handle.clone().binding(),
            info.binding(),
        ],
    );
    (k_out, v_out)
}

fn merge(
    xa: CubeTensor,
    ya: CubeTensor,
    b: Option<(CubeTensor, CubeTensor)>,
    job: &MergeJob,
) -> (CubeTensor, CubeTensor) {
    let (xa, ya) = (into_contiguous(xa), into_contiguous(ya));
    let f16 = element_f16(xa.dtype);
    let (p, s) = (job.prefix_len as usize, job.suffix_len as usize);
    let (sx, sy) = (xa.meta.shape().clone(), ya.meta.shape().clone());
    let (nl, nr) = (sx[1], sy[1]);
    let m = nl + nr - p - s;
    let a_out = output(&xa, with_rows(&sx, m), xa.dtype, job.cfg.poison);
    let (xb, yb, b_out, sb) = match b {
        Some((xb, yb)) => {
            let (xb, yb) = (into_contiguous(xb), into_contiguous(yb));
            assert_eq!(
                xa.dtype, xb.dtype,
                "merge pairs one element type (WgslOps pairs K with V)"
            );
            let sb = xb.meta.shape().clone();
            let out = output(&xb, with_rows(&sb, m), xb.dtype, job.cfg.poison);
            (xb, yb, out, [sb[0], sb[2]])
        }
        None => (dummy(&xa), dummy(&xa), dummy(&xa), [0, 4]),
    };
    // Rows of a multiple of 4 elements move as vec4s.
    let w = if sx[2] % 4 == 0 && sb[1] % 4 == 0 {
        4
    } else {
        1
    };
    let (ia, ib) = (sx[2] / w, sb[1] / w);
    let info = [
        nl as u32,
        nr as u32,
        p as u32,
        s as u32,
        sx[0] as u32,
        sb[0] as u32,
    ];
    let info = upload_u32(&xa, &info);
    launch(
        &xa,
        Shader::Merge,
        (f16, f16),
        w == 4,
        (ia as u32, ib as u32),
        job.cfg,
        m * ia.max(ib),
        Some(sx[0] + sb[0]),
        vec![
            xa.handle.clone().binding(),
            ya.handle.clone().binding(),
            xb.handle.clone().binding(),
            yb.handle.clone().binding(),
            a_out.handle.clone().binding(),
            b_out.handle.clone().binding(),
            info.binding(),
        ],
    );
    (a_out, b_out)
}

/// Key rows per workgroup tile of the attention kernel: K and V tiles together stay within 8 KiB
/// per 64 head dims (half of WebGPU's default 16 KiB of workgroup memory at head dim 128).
pub(crate) fn attention_key_tile(head_dim: usize) -> usize {
    (1024 / head_dim.max(1)).clamp(4, 32)
}

fn attention(q: CubeTensor, k: CubeTensor, v: CubeTensor, job: &AttentionJob) -> CubeTensor {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let f16 = element_f16(k.dtype);
    let (sq, sk) = (q.meta.shape().clone(), k.meta.shape().clone());
    let (h, n, hd) = (sq[0], sq[1], sq[2]);
    let (kvh, cap) = (sk[0], sk[1]);
    let out = output(&q, Shape::new([n, h * hd]), DType::F32, job.cfg.poison);
    if n == 0 {
        return out;
    }
    // The header both attention shaders read.
    let info = [
        n as u32,
        h as u32,
        kvh as u32,
        job.past,
        cap as u32,
        job.scale.to_bits(),
    ];
    let info = upload_u32(&q, &info);
    let elems = (f16, element_f16(q.dtype));
    let wg = job.cfg.workgroup_size.max(1) as usize;
    let group = h / kvh;
    if let Some(span) = split_key_span(n, group, hd, job.past as usize + n, job.split) {
        let kernel = attention_kernel(
            Shader::AttentionSplit,
            SPLIT_WORKGROUP,
            elems,
            (hd as u32, span as u32, (group * n) as u32),
        );
        return attention_split(&q, &k, &v, out, info, kernel, job);
    }
    let rows = (wg / group).max(1);
    let kernel = attention_kernel(
        Shader::Attention,
        wg as u32,
        elems,
        (hd as u32, attention_key_tile(hd) as u32, rows as u32),
    );
    q.client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(wg as u32))),
        CubeCount::Static(n.div_ceil(rows) as u32, kvh as u32, 1),
        KernelArguments::new().with_buffers(vec![
            q.handle.clone().binding(),
            k.handle.clone().binding(),
            v.handle.clone().binding(),
            out.handle.clone().binding(),
            info.binding(),
        ]),
    );
    out
}

/// An attention shader's kernel: element types (keys/values, query) and its `attn` constants.
/// The shaders declare their own vec4s of the element types.
fn attention_kernel(
    shader: Shader,
    wg: u32,
    (f16, q_f16): (bool, bool),
    attn: (u32, u32, u32),
) -> WgslKernel {
    WgslKernel {
        shader,
        workgroup_size: wg,
        f16,
        q_f16,
        vec4: false,
        inner: (0, 0),
        attn,
        qtype: 0,
        gemv_rows: 1,
    }
}

/// Workgroup size of both split-key attention shaders.
const SPLIT_WORKGROUP: u32 = 64;

/// Most new rows split-key attention takes (decode and short appends).
const SPLIT_MAX_ROWS: usize = 4;
/// Workgroup memory the split kernel may use for its queries and probabilities (WebGPU's
/// default limit is 16 KiB).
const SPLIT_SHARED_BYTES: usize = 12 * 1024;

/// The key span of split-key attention for `n` new rows of GQA groups of `group` heads over
/// `keys` visible keys, or None where the one-pass kernel runs (more rows, or queries that do
/// not fit the workgroup memory). Spans of 32 to 256 keys, about 64 of them: enough workgroups
/// to fill a GPU at any context (spans × KV heads), few enough to merge cheaply.
pub(crate) fn split_key_span(
    n: usize,
    group: usize,
    head_dim: usize,
    keys: usize,
    mode: SplitMode,
) -> Option<usize> {
    if mode == SplitMode::Never || n == 0 || n > SPLIT_MAX_ROWS {
        return None;
    }
    let span = keys.div_ceil(64).next_power_of_two().clamp(32, 256);
    let pairs = group * n;
    let shared = pairs * (head_dim + span + 1) * 4;
    // One grid row of spans (x ≤ 65,535 workgroups).
    (shared <= SPLIT_SHARED_BYTES && keys.div_ceil(span) <= 65_535).then_some(span)
}

/// Split-key attention (`attention_split.wgsl` + `attention_combine.wgsl`) into `out`:
/// `kernel` is the split pass (its `attn` holds the head dim and key span), `info` the header
/// the one-pass kernel would have read.
fn attention_split(
    q: &CubeTensor,
    k: &CubeTensor,
    v: &CubeTensor,
    out: CubeTensor,
    info: cubecl::server::Handle,
    kernel: WgslKernel,
    job: &AttentionJob,
) -> CubeTensor {
    let [h, n, hd] = [0, 1, 2].map(|d| q.meta.shape()[d]);
    let kvh = k.meta.shape()[0];
    let spans = (job.past as usize + n).div_ceil(kernel.attn.1 as usize);
    let acc = output(
        q,
        Shape::new([spans * h * n * hd]),
        DType::F32,
        job.cfg.poison,
    );
    let ml = output(
        q,
        Shape::new([spans * h * n * 2]),
        DType::F32,
        job.cfg.poison,
    );
    let wg = SPLIT_WORKGROUP;
    q.client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(wg))),
        CubeCount::Static(spans as u32, kvh as u32, 1),
        KernelArguments::new().with_buffers(vec![
            q.handle.clone().binding(),
            k.handle.clone().binding(),
            v.handle.clone().binding(),
            acc.handle.clone().binding(),
            ml.handle.clone().binding(),
            info.binding(),
        ]),
    );
    let info = upload_u32(q, &[n as u32, h as u32, spans as u32]);
    let cfg = LaunchCfg {
        workgroup_size: wg,
        ..job.cfg
    };
    let (x, y) = grid(n * h * hd / 4, cfg);
    let kernel = attention_kernel(
        Shader::AttentionCombine,
        wg,
        (false, false),
        (hd as u32, 0, 0),
    );
    q.client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(wg))),
        CubeCount::Static(x, y, 1),
        KernelArguments::new().with_buffers(vec![
            acc.handle.clone().binding(),
            ml.handle.clone().binding(),
            out.handle.clone().binding(),
            info.binding(),
        ]),
    );
    out
}

fn block_kernel(shader: Shader, wg: u32, qtype: u32, gemv_rows: u32) -> WgslKernel {
    WgslKernel {
        shader,
        workgroup_size: wg,
        f16: false,
        q_f16: false,
        vec4: false,
        inner: (0, 0),
        attn: (0, 0, 0),
        qtype,
        gemv_rows,
    }
}

fn qgemv(x: CubeTensor, qs: CubeTensor, dm: CubeTensor, job: &BlockJob) -> CubeTensor {
    let (x, qs, dm) = (into_contiguous(x), into_contiguous(qs), into_contiguous(dm));
    let m = x.meta.shape()[0];
    let rows = job.rows as usize;
    let out = output(&x, Shape::new([m, rows]), DType::F32, job.cfg.poison);
    if m == 0 || rows == 0 {
        return out;
    }
    // Whole groups of 4 rows per workgroup, never capped (each workgroup finishes its rows).
    let wg = 64u32;
    let cfg = LaunchCfg {
        workgroup_size: 1,
        max_workgroups: u32::MAX,
        ..job.cfg
    };
    let rpw = job.gemv_rows.clamp(1, wg);
    assert!(rpw.is_power_of_two(), "qgemv rows per workgroup {rpw}");
    let (gx, gy) = grid(rows.div_ceil(rpw as usize), cfg);
    let info = upload_u32(&x, &[m as u32, job.rows, job.cols]);
    x.client.launch(
        Box::new(SourceKernel::new(
            block_kernel(Shader::Qgemv, wg, job.qtype, rpw),
            CubeDim::new_1d(wg),
        )),
        CubeCount::Static(gx, gy, 1),
        KernelArguments::new().with_buffers(vec![
            x.handle.clone().binding(),
            qs.handle.clone().binding(),
            dm.handle.clone().binding(),
            out.handle.clone().binding(),
            info.binding(),
        ]),
    );
    out
}

fn dequant(qs: CubeTensor, dm: CubeTensor, job: &BlockJob) -> CubeTensor {
    let (qs, dm) = (into_contiguous(qs), into_contiguous(dm));
    let (rows, cols) = (job.rows as usize, job.cols as usize);
    let out = output(&qs, Shape::new([rows, cols]), DType::F32, job.cfg.poison);
    // units of block_decode.wgsl: 8 per Q8_0 block, 4 per 4- or 6-bit block
    let units = rows * cols / 32 * if job.qtype == 2 { 8 } else { 4 };
    if units == 0 {
        return out;
    }
    let wg = job.cfg.workgroup_size.max(1);
    let (gx, gy) = grid(units, job.cfg);
    let info = upload_u32(&qs, &[job.rows, job.cols]);
    qs.client.launch(
        Box::new(SourceKernel::new(
            block_kernel(Shader::Dequant, wg, job.qtype, 1),
            CubeDim::new_1d(wg),
        )),
        CubeCount::Static(gx, gy, 1),
        KernelArguments::new().with_buffers(vec![
            qs.handle.clone().binding(),
            dm.handle.clone().binding(),
            out.handle.clone().binding(),
            info.binding(),
        ]),
    );
    out
}

impl HomerKernels for CubeBackend {
    fn homer_qgemv(x: CubeTensor, qs: CubeTensor, dm: CubeTensor, job: BlockJob) -> CubeTensor {
        qgemv(x, qs, dm, &job)
    }

    fn homer_dequant(qs: CubeTensor, dm: CubeTensor, job: BlockJob) -> CubeTensor {
        dequant(qs, dm, &job)
    }

    fn homer_attention(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        job: AttentionJob,
    ) -> CubeTensor {
        attention(q, k, v, &job)
    }

    fn homer_significance(q: CubeTensor, keys: CubeTensor, job: SignificanceJob) -> CubeTensor {
        let q = into_contiguous(q);
        let keys = into_contiguous(keys);
        let f16 = element_f16(keys.dtype);
        let shape = keys.meta.shape().clone();
        let (kv, n, d) = (shape[0], shape[1], shape[2]);
        let out = output(&keys, Shape::new([n]), DType::F32, job.cfg.poison);
        let rows = upload_u32(&keys, &job.rows);
        let bias = if job.bias.is_empty() {
            keys.client.create_from_slice(bytemuck::cast_slice(&[0f32]))
        } else {
            keys.client
                .create_from_slice(bytemuck::cast_slice(&job.bias))
        };
        let info = [
            n as u32,
            job.heads,
            kv as u32,
            d as u32,
            job.last_position,
            job.bias.len() as u32,
            job.scale.to_bits(),
        ];
        let info = upload_u32(&keys, &info);
        launch(
            &keys,
            Shader::Significance,
            (f16, element_f16(q.dtype)),
            false,
            (0, 0),
            job.cfg,
            n,
            None,
            vec![
                q.handle.clone().binding(),
                keys.handle.clone().binding(),
                rows.binding(),
                bias.binding(),
                out.handle.clone().binding(),
                info.binding(),
            ],
        );
        out
    }

    fn homer_gather_pair(
        a: CubeTensor,
        b: CubeTensor,
        index: CubeTensor,
        job: GatherJob,
    ) -> (CubeTensor, CubeTensor) {
        gather(a, Some(b), index, &job)
    }

    fn homer_gather_one(a: CubeTensor, index: CubeTensor, job: GatherJob) -> CubeTensor {
        gather(a, None, index, &job).0
    }

    fn homer_gather_rotate_pair(
        k: CubeTensor,
        v: CubeTensor,
        index: CubeTensor,
        cos: CubeTensor,
        sin: CubeTensor,
        job: GatherJob,
    ) -> (CubeTensor, CubeTensor) {
        gather_rotate(k, Some(v), index, (cos, sin), &job)
    }

    fn homer_gather_rotate_one(
        k: CubeTensor,
        index: CubeTensor,
        cos: CubeTensor,
        sin: CubeTensor,
        job: GatherJob,
    ) -> CubeTensor {
        gather_rotate(k, None, index, (cos, sin), &job).0
    }

    fn homer_merge_pair(
        xa: CubeTensor,
        ya: CubeTensor,
        xb: CubeTensor,
        yb: CubeTensor,
        job: MergeJob,
    ) -> (CubeTensor, CubeTensor) {
        merge(xa, ya, Some((xb, yb)), &job)
    }

    fn homer_merge_one(xa: CubeTensor, ya: CubeTensor, job: MergeJob) -> CubeTensor {
        merge(xa, ya, None, &job).0
    }

    fn homer_select_keep(scores: CubeTensor, job: SelectJob) -> CubeTensor {
        let scores = into_contiguous(scores);
        let n = scores.meta.shape().num_elements();
        let out = output(&scores, Shape::new([n]), DType::F32, job.cfg.poison);
        let info = upload_u32(&scores, &[n as u32, job.drop]);
        // One invocation per row: the grid is the row count, never capped below it (each
        // invocation already loops over all N scores).
        let cfg = LaunchCfg {
            max_workgroups: u32::MAX,
            ..job.cfg
        };
        launch(
            &scores,
            Shader::Select,
            (false, false),
            false,
            (0, 0),
            cfg,
            n,
            None,
            vec![
                scores.handle.clone().binding(),
                out.handle.clone().binding(),
                info.binding(),
            ],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_key_span_grows_with_the_context_and_declines_what_does_not_fit() {
        use super::{SplitMode, split_key_span};
        let span = |n, g, hd, keys| split_key_span(n, g, hd, keys, SplitMode::Auto);
        // about 64 spans of 32..256 keys
        assert_eq!(span(1, 3, 64, 1), Some(32));
        assert_eq!(span(1, 3, 64, 2048), Some(32));
        assert_eq!(span(1, 3, 64, 2049), Some(64));
        assert_eq!(span(1, 3, 64, 16_384), Some(256));
        assert_eq!(span(4, 1, 128, 1 << 20), Some(256));
        // more than 4 rows, queries beyond the workgroup memory, too many spans, or Never
        assert_eq!(span(5, 1, 64, 100), None);
        assert_eq!(span(4, 64, 8, 100), None);
        assert_eq!(span(1, 1, 64, 256 * 65_536), None);
        assert_eq!(span(0, 3, 64, 100), None);
        assert_eq!(split_key_span(1, 3, 64, 100, SplitMode::Never), None);
    }

    #[test]
    fn grid_covers_every_element_within_the_trip_and_x_limits() {
        let cfg = LaunchCfg {
            workgroup_size: 64,
            max_workgroups: 3,
            poison: false,
        };
        for elements in [
            0usize,
            1,
            63,
            64,
            65,
            192,
            193,
            1 << 20,
            8_484_840,
            3_000_000_000,
        ] {
            let (x, y) = grid(elements, cfg);
            let threads = x as usize * y as usize * 64;
            assert!(x >= 1 && y >= 1 && x <= 65_535, "{elements}: grid {x}×{y}");
            assert!(
                elements.div_ceil(threads) <= MAX_TRIPS,
                "{elements}: {x}×{y} loops too often"
            );
            if elements <= 3 * 64 * MAX_TRIPS {
                assert!(
                    x * y <= 3,
                    "{elements}: grid {x}×{y} exceeds the cap it did not need to"
                );
            }
        }
        // The cap limits small and medium launches; one thread-per-element when below it.
        let cfg = LaunchCfg::default();
        assert_eq!(grid(1000, cfg), (8, 1));
        assert_eq!(grid(10_000_000, cfg), (4096, 1));
    }
}
