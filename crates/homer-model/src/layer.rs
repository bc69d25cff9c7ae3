//! One Llama decoder layer, split in its two halves so HOMER can drop rows between them
//! (spec §4.1): the attention half (norm, attention, residual) and
//! [`DecoderLayer::feed_forward`] (norm, SwiGLU MLP, residual).
//!
//! The q/k/v and the gate/up projections are fused (one weight each, concatenated at load). On
//! the CPU backend the layer runs the project's kernels ([`crate::kernels`]); elsewhere it runs
//! burn tensor ops, the kernels' oracle.

use burn::tensor::Tensor;

use crate::attention::causal_attention;
use crate::cache::{KvBuffer, LayerKv};
use crate::kernels::{self, AttnJob, Weight};
use crate::rope;

/// RMSNorm over the last axis: x / sqrt(mean(x²) + eps) * w.
pub fn rms_norm(x: Tensor<2>, w: &Tensor<1>, eps: f64) -> Tensor<2> {
    let var = x.clone().square().mean_dim(1);
    let inv = var.add_scalar(eps).sqrt().recip();
    x * inv * w.clone().unsqueeze_dim::<2>(0)
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub attn_norm: Tensor<1>,
    /// q | k | v projections fused: [(H + 2·KV)·hd] outputs.
    pub w_qkv: Weight,
    pub wo: Weight,
    pub ffn_norm: Tensor<1>,
    /// gate | up projections fused: [2·ffn] outputs.
    pub w_gate_up: Weight,
    pub w_down: Weight,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    /// Element type of the KV buffers this layer creates (f32; f16 on the CPU kernels' path).
    pub kv_dtype: burn::tensor::DType,
    /// Run the CPU kernels (the device is burn-flex).
    pub fast: bool,
}

/// What [`DecoderLayer::attend`] returns.
#[derive(Debug, Clone)]
pub struct Attended {
    /// Residual stream after attention, [n, d].
    pub hidden: Tensor<2>,
    /// This layer's keys (post-RoPE) and values for the new rows, each [kv_heads, n, head_dim].
    pub kv: LayerKv,
    /// Post-RoPE query of the last new row, [heads, head_dim] (HOMER's significance, spec §4.2).
    pub q_last: Tensor<2>,
}

impl DecoderLayer {
    fn norm(&self, x: Tensor<2>, w: &Tensor<1>) -> Tensor<2> {
        if self.fast {
            kernels::rms_norm_fast(x, w, self.eps)
        } else {
            rms_norm(x, w, self.eps)
        }
    }

    /// Norm, attention of the new rows over the buffer's filled rows and themselves, residual.
    /// The new rows' K/V are appended to `buf` in place (it must have room for them).
    /// Returns the residual stream, the buffer, and the last row's post-RoPE query.
    pub fn attend_into(
        &self,
        x: Tensor<2>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        buf: KvBuffer,
    ) -> (Tensor<2>, KvBuffer, Tensor<2>) {
        let [n, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let past = buf.len();
        assert!(
            past + n <= buf.capacity(),
            "KV buffer of {} rows cannot take {n} more after {past}",
            buf.capacity()
        );
        let xn = self.norm(x.clone(), &self.attn_norm);
        let qkv = self.w_qkv.apply(xn);
        let (k_buf, v_buf) = buf.into_parts();
        let (attn, k_buf, v_buf, q_last) = if self.fast {
            let job = AttnJob {
                heads: h,
                kv_heads: kvh,
                head_dim: hd,
                past,
            };
            kernels::attention_fast(qkv, cos, sin, k_buf, v_buf, job)
        } else {
            let cols = |a: usize, b: usize, heads: usize| {
                qkv.clone()
                    .slice([0..n, a * hd..b * hd])
                    .reshape([n, heads, hd])
                    .swap_dims(0, 1)
            };
            let q = rope::apply(cols(0, h, h), cos, sin);
            let k = rope::apply(cols(h, h + kvh, kvh), cos, sin);
            let v = cols(h + kvh, h + 2 * kvh, kvh);
            let q_last = q.clone().slice([0..h, n - 1..n, 0..hd]).reshape([h, hd]);
            // An f16 cache (`--kv-dtype f16`) rounds the new rows once, as they are stored.
            let kv_dtype = k_buf.dtype();
            let k_buf = k_buf.slice_assign([0..kvh, past..past + n, 0..hd], k.cast(kv_dtype));
            let v_buf = v_buf.slice_assign([0..kvh, past..past + n, 0..hd], v.cast(kv_dtype));
            let device_kernel = crate::attention::buffer_attention()
                .and_then(|kernel| kernel.attend(&q, &k_buf, &v_buf, past));
            let attn = device_kernel.unwrap_or_else(|| {
                let kv = [&k_buf, &v_buf].map(|t| {
                    t.clone()
                        .slice([0..kvh, 0..past + n, 0..hd])
                        .cast(q.dtype())
                });
                causal_attention(q, &kv[0], &kv[1])
            });
            (attn, k_buf, v_buf, q_last)
        };
        let hidden = x + self.wo.apply(attn);
        (hidden, KvBuffer::from_parts(k_buf, v_buf, past + n), q_last)
    }

    /// Norm, attention over `past` ++ the new rows, residual (HOMER's nodes run their rows with
    /// no past). `cos`/`sin` are the RoPE tables of the new rows' position ids, which may be
    /// arbitrary (non-monotone, repeated).
    pub fn attend(
        &self,
        x: Tensor<2>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        past: Option<&LayerKv>,
    ) -> Attended {
        let [n, _] = x.dims();
        let device = x.device();
        let (kvh, hd) = (self.n_kv_heads, self.head_dim);
        let buf = match past {
            Some(p) if !p.is_empty() => {
                let mut b = KvBuffer::from_rows(p.clone());
                b.reserve(n, &device);
                b
            }
            _ => KvBuffer::empty(kvh, hd, n, self.kv_dtype, &device),
        };
        let p = buf.len();
        let (hidden, buf, q_last) = self.attend_into(x, cos, sin, buf);
        let all = buf.filled();
        let kv = if p == 0 {
            all
        } else {
            LayerKv {
                k: all.k.slice([0..kvh, p..p + n, 0..hd]),
                v: all.v.slice([0..kvh, p..p + n, 0..hd]),
            }
        };
        Attended { hidden, kv, q_last }
    }

    /// Post-RoPE queries of the rows `x` ([w, d], this layer's input residual rows) under the RoPE
    /// tables of their positions (`cos`/`sin`, [w, ·]): [heads, w, head_dim], the same values
    /// [`DecoderLayer::attend`] computes for them. HOMER's query window (issue 15) scores with
    /// the mean of a node's last rows' queries.
    pub fn queries(&self, x: Tensor<2>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<3> {
        let [w, _] = x.dims();
        let (h, hd) = (self.n_heads, self.head_dim);
        let xn = self.norm(x, &self.attn_norm);
        let q = self
            .w_qkv
            .apply(xn)
            .slice([0..w, 0..h * hd])
            .reshape([w, h, hd])
            .swap_dims(0, 1);
        rope::apply(q, cos, sin)
    }

    /// Norm, SwiGLU MLP, residual.
    pub fn feed_forward(&self, x: Tensor<2>) -> Tensor<2> {
        let xn = self.norm(x.clone(), &self.ffn_norm);
        let gu = self.w_gate_up.apply(xn);
        let act = if self.fast {
            kernels::swiglu_fast(gu)
        } else {
            let [n, f2] = gu.dims();
            let f = f2 / 2;
            let gate = gu.clone().slice([0..n, 0..f]);
            let up = gu.slice([0..n, f..f2]);
            // silu(g) = g / (1 + e^-g): one exp (burn's sigmoid takes three transcendentals).
            gate.clone() / gate.neg().exp().add_scalar(1.0) * up
        };
        x + self.w_down.apply(act)
    }
}
