//! One Llama decoder layer, split in its two halves so HOMER can drop rows between them
//! (spec §4.1): [`DecoderLayer::attend`] (norm, attention, residual) and
//! [`DecoderLayer::feed_forward`] (norm, SwiGLU MLP, residual).

use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use crate::attention::causal_attention;
use crate::cache::LayerKv;
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
    /// Projections stored [in, out] so that `x.matmul(w)` applies them.
    pub wq: Tensor<2>,
    pub wk: Tensor<2>,
    pub wv: Tensor<2>,
    pub wo: Tensor<2>,
    pub ffn_norm: Tensor<1>,
    pub w_gate: Tensor<2>,
    pub w_up: Tensor<2>,
    pub w_down: Tensor<2>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
}

/// What [`DecoderLayer::attend`] returns.
#[derive(Debug, Clone)]
pub struct Attended {
    /// Residual stream after attention, [n, d].
    pub hidden: Tensor<2>,
    /// This layer's keys (post-RoPE) and values for the new rows, each [kv_heads, n, head_dim].
    pub kv: LayerKv,
    /// `past` ++ `kv`: the layer's whole cache after this step (built once, for the attention).
    pub kv_all: LayerKv,
    /// Post-RoPE query of the last new row, [heads, head_dim] (HOMER's significance, spec §4.2).
    pub q_last: Tensor<2>,
}

impl DecoderLayer {
    /// Norm, attention over `past` ++ the new rows, residual. `cos`/`sin` are the RoPE tables of
    /// the new rows' position ids, which may be arbitrary (non-monotone, repeated).
    pub fn attend(
        &self,
        x: Tensor<2>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        past: Option<&LayerKv>,
    ) -> Attended {
        let [n, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let xn = rms_norm(x.clone(), &self.attn_norm, self.eps);
        let q = xn
            .clone()
            .matmul(self.wq.clone())
            .reshape([n, h, hd])
            .swap_dims(0, 1);
        let k = xn
            .clone()
            .matmul(self.wk.clone())
            .reshape([n, kvh, hd])
            .swap_dims(0, 1);
        let v = xn
            .matmul(self.wv.clone())
            .reshape([n, kvh, hd])
            .swap_dims(0, 1);
        let q = rope::apply(q, cos, sin);
        let k = rope::apply(k, cos, sin);
        let q_last = q.clone().slice([0..h, n - 1..n, 0..hd]).reshape([h, hd]);
        let (k_all, v_all) = match past {
            Some(p) if !p.is_empty() => (
                Tensor::cat(vec![p.k.clone(), k.clone()], 1),
                Tensor::cat(vec![p.v.clone(), v.clone()], 1),
            ),
            _ => (k.clone(), v.clone()),
        };
        let attn = causal_attention(q, &k_all, &v_all);
        let hidden = x + attn.matmul(self.wo.clone());
        Attended {
            hidden,
            kv: LayerKv { k, v },
            kv_all: LayerKv { k: k_all, v: v_all },
            q_last,
        }
    }

    /// Norm, SwiGLU MLP, residual.
    pub fn feed_forward(&self, x: Tensor<2>) -> Tensor<2> {
        let xn = rms_norm(x.clone(), &self.ffn_norm, self.eps);
        let gate = silu(xn.clone().matmul(self.w_gate.clone()));
        let up = xn.matmul(self.w_up.clone());
        x + (gate * up).matmul(self.w_down.clone())
    }
}
