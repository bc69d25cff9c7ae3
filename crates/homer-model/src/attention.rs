//! Causal grouped-query attention over `[cache ++ new rows]`, computed in query blocks so that
//! memory stays linear in the sequence length (no [heads × n × n] score matrix), and the
//! last-query raw logits HOMER's significance uses (spec §4.2).

use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor};

/// Upper bound on the bytes of one block's score matrix [heads, block, keys]. Also keeps every
/// intermediate under lavapipe's 128 MiB storage-binding limit.
pub const SCORE_BUDGET_BYTES: usize = 64 << 20;

/// Rows of queries per block for `heads` heads against `keys` keys.
pub fn query_block(heads: usize, keys: usize) -> usize {
    (SCORE_BUDGET_BYTES / (4 * heads * keys.max(1))).clamp(1, 512)
}

/// Attention of `q` [H, n, hd] against `k`, `v` [KV, T, hd] (T ≥ n). Query row i is the
/// (T − n + i)-th row of the sequence and sees keys 0..=T − n + i (causal, aligned to the end).
/// Query head h uses KV head h / (H / KV), as Hugging Face's `repeat_kv` does. Returns [n, H·hd].
pub fn causal_attention(q: Tensor<3>, k: &Tensor<3>, v: &Tensor<3>) -> Tensor<2> {
    let [h, n, hd] = q.dims();
    let [kvh, t, _] = k.dims();
    assert!(
        t >= n && h % kvh == 0,
        "attention shapes: q {:?} k {:?}",
        q.dims(),
        k.dims()
    );
    let g = h / kvh;
    let past = t - n;
    let scale = 1.0 / (hd as f64).sqrt();
    let device = q.device();
    let block = query_block(h, t);
    let mut outs = Vec::with_capacity(n.div_ceil(block));
    let mut q0 = 0;
    while q0 < n {
        let q1 = (q0 + block).min(n);
        let b = q1 - q0;
        let visible = past + q1;
        let qb = q
            .clone()
            .slice([0..h, q0..q1, 0..hd])
            .reshape([kvh, g * b, hd]);
        let kb = k.clone().slice([0..kvh, 0..visible, 0..hd]);
        let vb = v.clone().slice([0..kvh, 0..visible, 0..hd]);
        let mut scores = qb
            .matmul(kb.swap_dims(1, 2))
            .mul_scalar(scale)
            .reshape([kvh, g, b, visible]);
        if b > 1 {
            // key j is hidden from query row i when j > past + q0 + i
            let cols = Tensor::<1, Int>::arange(0..visible as i64, &device)
                .reshape([1, visible])
                .expand([b, visible]);
            let rows = Tensor::<1, Int>::arange((past + q0) as i64..(past + q1) as i64, &device)
                .reshape([b, 1])
                .expand([b, visible]);
            let mask = cols
                .greater(rows)
                .reshape([1, 1, b, visible])
                .expand([kvh, g, b, visible]);
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        let probs = softmax(scores, 3).reshape([kvh, g * b, visible]);
        let out = probs.matmul(vb).reshape([h, b, hd]);
        outs.push(out);
        q0 = q1;
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(outs, 1)
    };
    out.swap_dims(0, 1).reshape([n, h * hd])
}

/// Raw scaled logits q·k/√hd of one query row `q_last` [H, hd] against every key `k` [KV, T, hd],
/// each query head against its own KV group (GQA-aware, spec §11.2). Returns [H, T].
pub fn last_query_logits(q_last: Tensor<2>, k: &Tensor<3>) -> Tensor<2> {
    let [h, hd] = q_last.dims();
    let [kvh, t, _] = k.dims();
    let g = h / kvh;
    let q = q_last.reshape([kvh, g, hd]);
    // f16 keys (`--kv-dtype f16`) meet the f32 query in f32
    let k = if k.dtype() == q.dtype() {
        k.clone()
    } else {
        k.clone().cast(q.dtype())
    };
    q.matmul(k.swap_dims(1, 2))
        .mul_scalar(1.0 / (hd as f64).sqrt())
        .reshape([h, t])
}

/// A device kernel for [`causal_attention`] over a layer's KV buffer, installed at run time by a
/// backend crate (`homer-wgpu` installs its WGSL flash attention), so that this crate stays free
/// of shader code. The model calls it on the tensor-op path (not on the CPU kernels' path, which
/// has its own fused attention) and falls back to [`causal_attention`] when it answers `None`.
pub trait BufferAttention: Send + Sync + 'static {
    /// Attention of `q` [H, n, hd] (post-RoPE) over rows `0 .. past + n` of `k_buf`/`v_buf`
    /// [KV, cap, hd], causal with the queries aligned to the end (as [`causal_attention`]).
    /// Returns [n, H·hd], or `None` when the kernel does not take this device or shape.
    fn attend(
        &self,
        q: &Tensor<3>,
        k_buf: &Tensor<3>,
        v_buf: &Tensor<3>,
        past: usize,
    ) -> Option<Tensor<2>>;
}

static BUFFER_ATTENTION: std::sync::OnceLock<Box<dyn BufferAttention>> = std::sync::OnceLock::new();

/// Install the process's device attention kernel (the first call wins; later ones are ignored and
/// return false). `HOMER_DEVICE_ATTENTION=0` keeps every call on [`causal_attention`].
pub fn install_buffer_attention(kernel: Box<dyn BufferAttention>) -> bool {
    BUFFER_ATTENTION.set(kernel).is_ok()
}

/// The installed device attention kernel, unless `HOMER_DEVICE_ATTENTION=0`.
pub fn buffer_attention() -> Option<&'static dyn BufferAttention> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("HOMER_DEVICE_ATTENTION").as_deref() == Ok("0"));
    if off {
        return None;
    }
    BUFFER_ATTENTION.get().map(|b| b.as_ref())
}
