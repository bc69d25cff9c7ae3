//! The CPU kernels of [`crate::cpu`] as a burn backend extension on burn-flex (the CPU
//! backend), and the projection weights the layers apply with them.
//!
//! The model decides once, at load, whether its device takes the kernels ([`fast_path`]); the
//! other backends (wgpu, and flex with `HOMER_CPU_KERNELS=0`) run the same layer with burn tensor
//! ops, which is also the oracle the kernels are tested against (tests at the bottom).

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Device, Shape, Tensor, TensorData};
use half::{bf16, f16};

use crate::cpu::{self, AttnShape, Rows};
use crate::qcpu::QMatrix;

/// A weight of GGUF blocks travelling with a launch (host memory, shared).
#[derive(Debug, Clone)]
pub struct QWeight(pub std::sync::Arc<QMatrix>);

/// Whether `device` runs the project's CPU kernels: burn-flex, unless `HOMER_CPU_KERNELS=0`
/// (measurements of burn's own ops on the same backend).
pub fn fast_path(device: &Device) -> bool {
    *device == Device::flex() && std::env::var("HOMER_CPU_KERNELS").as_deref() != Ok("0")
}

/// Shapes of a fused attention step (host values travelling with the launch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnJob {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rows already in the KV buffers.
    pub past: usize,
}

#[backend_extension(Flex)]
pub trait CpuKernels: Backend {
    /// `x` [m, in] (f32) · `w` [out, in]ᵀ (f32 or f16 rows) → [m, out] f32.
    fn cpu_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x` [m, in] (f32) · `w` [out, in]ᵀ of GGUF blocks ([`crate::qcpu`]) → [m, out] f32.
    fn cpu_linear_q(x: FloatTensor<Self>, w: QWeight) -> FloatTensor<Self>;
    /// RMSNorm of the rows of `x` [n, d] with weight `w` [d].
    fn cpu_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;
    /// silu(gate) · up of `gu` [n, 2f] (gate columns first) → [n, f].
    fn cpu_swiglu(gu: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The fused attention step ([`cpu::attention`]): `qkv` [n, (H + 2KV)·hd], `cos`/`sin`
    /// [n, hd], KV buffers [KV, cap, hd] (written in place when not shared) → (out [n, H·hd],
    /// k buffer, v buffer, q_last [H, hd]).
    #[allow(clippy::type_complexity)]
    fn cpu_attention(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        k_buf: FloatTensor<Self>,
        v_buf: FloatTensor<Self>,
        job: AttnJob,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// A contiguous view of `t` in its own element type `E` (copied only when it is a strided view).
fn own_data<E: burn::tensor::Element + bytemuck::Pod>(t: &FlexTensor) -> std::borrow::Cow<'_, [E]> {
    match t.as_slice::<E>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.clone()
                .into_data()
                .try_into_vec::<E>()
                .expect("data of the tensor's own dtype"),
        ),
    }
}

/// A contiguous f32 view of `t` (copied only when it is a strided view or not f32).
fn f32_data(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    if t.dtype() == DType::F32 {
        return own_data(t);
    }
    let data = t.clone().into_data().convert::<f32>();
    std::borrow::Cow::Owned(data.try_into_vec::<f32>().expect("f32 data"))
}

fn out_tensor(data: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape.into()))
}

/// A contiguous tensor of element `E` (f32 or f16, as `dtype`) that owns its whole buffer
/// alone, so it can be written in place.
fn exclusive<E: burn::tensor::Element + bytemuck::Pod>(t: FlexTensor, dtype: DType) -> FlexTensor {
    let size = std::mem::size_of::<E>();
    let whole = t.dtype() == dtype
        && t.is_unique()
        && t.layout().start_offset() == 0
        && t.as_slice::<E>()
            .is_some_and(|s| s.len() * size == t.bytes().len());
    if whole {
        t
    } else {
        let shape = t.layout().shape().clone();
        let data = t.into_data().convert::<E>();
        FlexTensor::from_data(TensorData::new(
            data.try_into_vec::<E>().expect("converted data"),
            shape,
        ))
    }
}

impl CpuKernels for Flex {
    fn cpu_linear(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let xs = x.layout().shape().clone();
        let ws = w.layout().shape().clone();
        let (m, k) = (xs[0], xs[1]);
        let out = ws[0];
        assert_eq!(ws[1], k, "cpu_linear: x {xs:?} against w {ws:?}");
        let xd = f32_data(&x);
        let mut y = vec![0f32; m * out];
        match w.dtype() {
            DType::F16 => cpu::linear(&xd, m, Rows::F16(&own_data(&w)), out, &mut y),
            DType::BF16 => cpu::linear(&xd, m, Rows::BF16(&own_data(&w)), out, &mut y),
            _ => {
                let wd = f32_data(&w);
                cpu::linear(&xd, m, Rows::F32(&wd), out, &mut y);
            }
        }
        out_tensor(y, [m, out])
    }

    fn cpu_linear_q(x: FlexTensor, w: QWeight) -> FlexTensor {
        let xs = x.layout().shape().clone();
        let (m, k) = (xs[0], xs[1]);
        assert_eq!(w.0.cols(), k, "cpu_linear_q: x {xs:?} against {:?}", w.0);
        let xd = f32_data(&x);
        let mut y = vec![0f32; m * w.0.rows()];
        crate::qcpu::linear(&xd, m, &w.0, &mut y);
        out_tensor(y, [m, w.0.rows()])
    }

    fn cpu_rms_norm(x: FlexTensor, w: FlexTensor, eps: f32) -> FlexTensor {
        let shape = x.layout().shape().clone();
        let xd = f32_data(&x);
        let wd = f32_data(&w);
        let mut y = vec![0f32; xd.len()];
        cpu::rms_norm(&xd, &wd, eps, &mut y);
        out_tensor(y, shape)
    }

    fn cpu_swiglu(gu: FlexTensor) -> FlexTensor {
        let s = gu.layout().shape().clone();
        let (n, f) = (s[0], s[1] / 2);
        let gd = f32_data(&gu);
        let mut y = vec![0f32; n * f];
        cpu::swiglu(&gd, f, &mut y);
        out_tensor(y, [n, f])
    }

    fn cpu_attention(
        qkv: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        k_buf: FlexTensor,
        v_buf: FlexTensor,
        job: AttnJob,
    ) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
        let n = qkv.layout().shape()[0];
        let cap = k_buf.layout().shape()[1];
        let s = AttnShape {
            n,
            heads: job.heads,
            kv_heads: job.kv_heads,
            head_dim: job.head_dim,
            past: job.past,
            cap,
        };
        let (qd, cd, sd) = (f32_data(&qkv), f32_data(&cos), f32_data(&sin));
        let mut out = vec![0f32; n * s.heads * s.head_dim];
        let mut q_last = vec![0f32; s.heads * s.head_dim];
        // The buffers keep their element type: f16 (`--kv-dtype f16`) or f32.
        fn in_place<E: burn::tensor::Element + bytemuck::Pod + cpu::KvElem>(
            k_buf: FlexTensor,
            v_buf: FlexTensor,
            dtype: DType,
            run: impl FnOnce(&mut [E], &mut [E]),
        ) -> (FlexTensor, FlexTensor) {
            let mut k_buf = exclusive::<E>(k_buf, dtype);
            let mut v_buf = exclusive::<E>(v_buf, dtype);
            run(k_buf.storage_mut::<E>(), v_buf.storage_mut::<E>());
            (k_buf, v_buf)
        }
        let (k_buf, v_buf) = if k_buf.dtype() == DType::F16 {
            in_place::<f16>(k_buf, v_buf, DType::F16, |k, v| {
                cpu::attention(s, &qd, &cd, &sd, k, v, &mut out, &mut q_last)
            })
        } else {
            in_place::<f32>(k_buf, v_buf, DType::F32, |k, v| {
                cpu::attention(s, &qd, &cd, &sd, k, v, &mut out, &mut q_last)
            })
        };
        (
            out_tensor(out, [n, s.heads * s.head_dim]),
            k_buf,
            v_buf,
            out_tensor(q_last, [s.heads, s.head_dim]),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-level wrappers

/// Precision of the projection weights on the CPU kernels' path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
    BF16,
    /// The file's own GGUF blocks where the block kernels take them (Q4_0, Q4_1, Q8_0, Q4_K,
    /// Q6_K), f16 for every other projection.
    Native,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            "bf16" => Ok(WeightDtype::BF16),
            "native" | "q" | "gguf" => Ok(WeightDtype::Native),
            other => Err(format!(
                "unknown dtype `{other}` (expected native, f32, f16 or bf16)"
            )),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::BF16 => "bf16",
            WeightDtype::Native => "native",
        })
    }
}

/// The weight precision a device runs by default: the file's own GGUF blocks where kernels take
/// them (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K: the resident size is the file's, decode reads 4.5–8.5
/// bits a weight,
/// and the products equal f32 weights' up to summation order) — on the CPU kernels' path, and
/// on devices for which a backend crate installed a [`BlockUploader`] (homer-wgpu); other
/// tensors f16 on the CPU, f32 on devices. Without an uploader a device computes in f32.
pub fn default_dtype(device: &Device) -> WeightDtype {
    if fast_path(device) || block_uploader().is_some() {
        WeightDtype::Native
    } else {
        WeightDtype::F32
    }
}

/// A projection of GGUF blocks on a device, applied by a backend crate's kernels (`homer-wgpu`
/// installs a [`BlockUploader`] whose weights run `shaders/qgemv.wgsl` and `dequant.wgsl`).
pub trait DeviceBlocks: Send + Sync + std::fmt::Debug {
    /// x [m, in] → [m, out] (f32).
    fn apply(&self, x: Tensor<2>) -> Tensor<2>;
    /// Output rows.
    fn rows(&self) -> usize;
    /// Resident device bytes.
    fn bytes(&self) -> usize;
}

/// Puts a [`QMatrix`] on a device as [`DeviceBlocks`]; installed once per process by a backend
/// crate, so that this crate stays free of shader code.
pub trait BlockUploader: Send + Sync {
    /// The blocks on `device`, or why they cannot go there.
    fn upload(
        &self,
        w: &QMatrix,
        device: &Device,
    ) -> std::result::Result<std::sync::Arc<dyn DeviceBlocks>, String>;
}

static BLOCK_UPLOADER: std::sync::OnceLock<Box<dyn BlockUploader>> = std::sync::OnceLock::new();

/// Install the process's block uploader (the first call wins; returns whether this one did).
pub fn install_block_uploader(u: Box<dyn BlockUploader>) -> bool {
    BLOCK_UPLOADER.set(u).is_ok()
}

/// The installed block uploader, if any.
pub fn block_uploader() -> Option<&'static dyn BlockUploader> {
    BLOCK_UPLOADER.get().map(|u| u.as_ref())
}

/// A projection's weight, stored the way its device applies it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// [out, in] rows (f32 or f16) for the CPU kernels.
    Rows(Tensor<2>),
    /// [in, out] f32 for `x.matmul(w)` (any backend).
    Cols(Tensor<2>),
    /// [out, in] GGUF blocks for the CPU kernels ([`crate::qcpu`]).
    Quant(std::sync::Arc<QMatrix>),
    /// [out, in] GGUF blocks on a device ([`DeviceBlocks`]).
    Device(std::sync::Arc<dyn DeviceBlocks>),
    /// [out, in] f32 applied as `x.matmul(wᵀ)` through a transposed view (any backend): a tied
    /// LM head that shares the embedding table's buffer.
    RowsT(Tensor<2>),
    /// A fused projection whose parts keep different block types (Q4_K_M's Q4_K q/k beside a
    /// Q6_K v): each part applied, the outputs side by side.
    Cat(Vec<Weight>),
}

impl Weight {
    /// Upload host rows `data` [out, in] for the given path and precision.
    pub fn upload(
        data: Vec<f32>,
        out: usize,
        inp: usize,
        fast: bool,
        dtype: WeightDtype,
        device: &Device,
    ) -> Weight {
        if fast {
            let t = match dtype {
                WeightDtype::F32 => Tensor::from_data(TensorData::new(data, [out, inp]), device),
                WeightDtype::F16 | WeightDtype::Native => Tensor::from_data(
                    TensorData::new(
                        data.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
                        [out, inp],
                    ),
                    (device, DType::F16),
                ),
                WeightDtype::BF16 => Tensor::from_data(
                    TensorData::new(
                        data.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
                        [out, inp],
                    ),
                    (device, DType::BF16),
                ),
            };
            Weight::Rows(t)
        } else {
            Weight::Cols(Tensor::from_data(
                TensorData::new(transposed(&data, out, inp), [inp, out]),
                device,
            ))
        }
    }

    /// x [m, in] → [m, out].
    pub fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Weight::Rows(w) => Tensor::from_dispatch(Dispatch::cpu_linear(
                x.into_dispatch(),
                w.clone().into_dispatch(),
            )),
            Weight::Cols(w) => x.matmul(w.clone()),
            Weight::RowsT(w) => x.matmul(w.clone().transpose()),
            Weight::Quant(w) => Tensor::from_dispatch(Dispatch::cpu_linear_q(
                x.into_dispatch(),
                QWeight(w.clone()),
            )),
            Weight::Device(w) => w.apply(x),
            Weight::Cat(parts) => {
                Tensor::cat(parts.iter().map(|p| p.apply(x.clone())).collect(), 1)
            }
        }
    }

    /// Resident bytes of the weight.
    pub fn bytes(&self) -> usize {
        let t = |w: &Tensor<2>| w.shape().num_elements() * w.dtype().size();
        match self {
            Weight::Rows(w) | Weight::Cols(w) | Weight::RowsT(w) => t(w),
            Weight::Quant(w) => w.bytes(),
            Weight::Device(w) => w.bytes(),
            Weight::Cat(parts) => parts.iter().map(Weight::bytes).sum(),
        }
    }

    pub fn out_dim(&self) -> usize {
        match self {
            Weight::Rows(w) => w.dims()[0],
            Weight::Cols(w) => w.dims()[1],
            Weight::RowsT(w) => w.dims()[0],
            Weight::Quant(w) => w.rows(),
            Weight::Device(w) => w.rows(),
            Weight::Cat(parts) => parts.iter().map(Weight::out_dim).sum(),
        }
    }
}

/// Host transpose of a row-major [rows, cols] matrix to [cols, rows].
pub fn transposed(data: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    const B: usize = 32;
    for i0 in (0..r).step_by(B) {
        for j0 in (0..c).step_by(B) {
            for i in i0..(i0 + B).min(r) {
                for j in j0..(j0 + B).min(c) {
                    out[j * r + i] = data[i * c + j];
                }
            }
        }
    }
    out
}

/// RMSNorm (kernel on the fast path).
pub fn rms_norm_fast(x: Tensor<2>, w: &Tensor<1>, eps: f64) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::cpu_rms_norm(
        x.into_dispatch(),
        w.clone().into_dispatch(),
        eps as f32,
    ))
}

/// SwiGLU of a fused gate|up output (kernel).
pub fn swiglu_fast(gu: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::cpu_swiglu(gu.into_dispatch()))
}

/// The fused attention step (kernel): returns (out [n, H·hd], k_buf, v_buf, q_last [H, hd]).
pub fn attention_fast(
    qkv: Tensor<2>,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
    k_buf: Tensor<3>,
    v_buf: Tensor<3>,
    job: AttnJob,
) -> (Tensor<2>, Tensor<3>, Tensor<3>, Tensor<2>) {
    let (o, k, v, q) = Dispatch::cpu_attention(
        qkv.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        k_buf.into_dispatch(),
        v_buf.into_dispatch(),
        job,
    );
    (
        Tensor::from_dispatch(o),
        Tensor::from_dispatch(k),
        Tensor::from_dispatch(v),
        Tensor::from_dispatch(q),
    )
}
