//! Rotary position embedding in Hugging Face's rotate-half layout, at arbitrary (non-monotone,
//! repeated) position ids — HOMER reuses position ids across chunks (spec §2.3).
//!
//! Tables are computed on the host the way transformers computes them (f32 inverse frequencies,
//! f32 angle = position * inv_freq), so positions agree bit-for-bit with the reference before
//! cos/sin; the cost is n × head_dim/2 values per call.

use burn::tensor::{Device, Tensor, TensorData};

use crate::config::RopeScaling;

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention scaling); 1 otherwise.
    mscale: f32,
    /// Position divisor (PI); 1 otherwise.
    pos_scale: f32,
    pub head_dim: usize,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let base_inv = |base: f32| -> Vec<f32> {
            (0..half)
                .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
                .collect()
        };
        match *scaling {
            RopeScaling::None => Rope {
                inv_freq: base_inv(theta as f32),
                mscale: 1.0,
                pos_scale: 1.0,
                head_dim,
            },
            RopeScaling::Linear { factor } => Rope {
                inv_freq: base_inv(theta as f32),
                mscale: 1.0,
                pos_scale: factor as f32,
                head_dim,
            },
            RopeScaling::Ntk { factor } => {
                let d = head_dim as f64;
                let base = theta * factor.powf(d / (d - 2.0));
                Rope {
                    inv_freq: base_inv(base as f32),
                    mscale: 1.0,
                    pos_scale: 1.0,
                    head_dim,
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
            } => {
                // spec §8: beta_fast = 32, beta_slow = 1, ramp between the correction dims.
                let d = head_dim as f64;
                let orig = original_max_position_embeddings as f64;
                let corr = |r: f64| {
                    d * (orig / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
                };
                let low = corr(32.0).floor().max(0.0);
                let mut high = corr(1.0).ceil().min(d - 1.0);
                if high == low {
                    high += 0.001;
                }
                let inv_freq = (0..half)
                    .map(|i| {
                        let pos_freq = theta.powf((2 * i) as f64 / d);
                        let extrap = 1.0 / pos_freq;
                        let interp = 1.0 / (factor * pos_freq);
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let m = 1.0 - ramp;
                        (interp * (1.0 - m) + extrap * m) as f32
                    })
                    .collect();
                let mscale = if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                };
                Rope {
                    inv_freq,
                    mscale: mscale as f32,
                    pos_scale: 1.0,
                    head_dim,
                }
            }
        }
    }

    /// cos and sin tables, each [n, head_dim] (the half-table repeated twice), for `positions`.
    pub fn tables(&self, positions: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
        let n = positions.len();
        let hd = self.head_dim;
        let half = hd / 2;
        let mut cos = vec![0f32; n * hd];
        let mut sin = vec![0f32; n * hd];
        for (r, &p) in positions.iter().enumerate() {
            let p = p as f32 / self.pos_scale;
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let a = p * f;
                let (s, c) = (a as f64).sin_cos();
                let (c, s) = (c as f32 * self.mscale, s as f32 * self.mscale);
                cos[r * hd + i] = c;
                cos[r * hd + half + i] = c;
                sin[r * hd + i] = s;
                sin[r * hd + half + i] = s;
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [n, hd]), device),
            Tensor::from_data(TensorData::new(sin, [n, hd]), device),
        )
    }
}

/// Apply RoPE to `x` [heads, n, head_dim] with tables [n, head_dim].
pub fn apply(x: Tensor<3>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<3> {
    let [h, n, hd] = x.dims();
    let half = hd / 2;
    let x1 = x.clone().slice([0..h, 0..n, 0..half]);
    let x2 = x.clone().slice([0..h, 0..n, half..hd]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    let cos = cos.clone().unsqueeze_dim::<3>(0);
    let sin = sin.clone().unsqueeze_dim::<3>(0);
    x * cos + rotated * sin
}
