//! Rotary position embedding in Hugging Face's rotate-half layout, at arbitrary (non-monotone,
//! repeated) position ids — HOMER reuses position ids across chunks (spec §2.3).
//!
//! Tables are computed on the host the way transformers computes them (f32 inverse frequencies,
//! f32 angle = position * inv_freq), so positions agree bit-for-bit with the reference before
//! cos/sin; the cost is n × head_dim/2 values per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// Dynamic NTK: (factor, original window, theta).
    dynamic: Option<(f64, usize, f64)>,
    /// Dynamic NTK: the length of the sequence being run (set before a prefill so every block
    /// of it uses the frequencies of the whole sequence, as one full forward would).
    seq_len: Arc<AtomicUsize>,
}

fn base_inv(base: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        // A scaling at factor 1 is the native RoPE: its tables, bit for bit (YaRN's blend of
        // equal frequencies would otherwise round them differently in the last place).
        let scaling = if scaling.is_native() {
            &RopeScaling::None
        } else {
            scaling
        };
        let half = head_dim / 2;
        let plain = |inv_freq: Vec<f32>, mscale: f32, pos_scale: f32| Rope {
            inv_freq,
            mscale,
            pos_scale,
            head_dim,
            dynamic: None,
            seq_len: Arc::new(AtomicUsize::new(0)),
        };
        match *scaling {
            RopeScaling::None => plain(base_inv(theta as f32, head_dim), 1.0, 1.0),
            RopeScaling::Linear { factor } => {
                plain(base_inv(theta as f32, head_dim), 1.0, factor as f32)
            }
            RopeScaling::Ntk { factor } => {
                let d = head_dim as f64;
                let base = theta * factor.powf(d / (d - 2.0));
                plain(base_inv(base as f32, head_dim), 1.0, 1.0)
            }
            RopeScaling::DynamicNtk {
                factor,
                original_max_position_embeddings,
            } => Rope {
                dynamic: Some((factor, original_max_position_embeddings, theta)),
                ..plain(base_inv(theta as f32, head_dim), 1.0, 1.0)
            },
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
                plain(inv_freq, mscale as f32, 1.0)
            }
        }
    }

    /// Dynamic NTK: the full length of the sequence about to run (0 = only the positions seen).
    pub fn set_seq_len(&self, n: usize) {
        self.seq_len.store(n, Ordering::Relaxed);
    }

    /// The inverse frequencies in effect for a sequence of `seq_len` tokens, with the position
    /// divisor folded in (what transformers' `inv_freq` holds), and the cos/sin multiplier.
    pub fn effective(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let inv = self.inv_for(seq_len);
        (
            inv.iter().map(|f| f / self.pos_scale).collect(),
            self.mscale,
        )
    }

    fn inv_for(&self, seq_len: usize) -> std::borrow::Cow<'_, [f32]> {
        match self.dynamic {
            Some((factor, orig, theta)) if seq_len > orig => {
                let d = self.head_dim as f64;
                let base = theta
                    * (factor * seq_len as f64 / orig as f64 - (factor - 1.0)).powf(d / (d - 2.0));
                std::borrow::Cow::Owned(base_inv(base as f32, self.head_dim))
            }
            _ => std::borrow::Cow::Borrowed(&self.inv_freq),
        }
    }

    /// cos and sin tables, each [n, head_dim] (the half-table repeated twice), for `positions`.
    pub fn tables(&self, positions: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
        let n = positions.len();
        let hd = self.head_dim;
        let half = hd / 2;
        let seq_len = self
            .seq_len
            .load(Ordering::Relaxed)
            .max(positions.iter().max().map_or(0, |p| p + 1));
        let inv_freq = self.inv_for(seq_len);
        let mut cos = vec![0f32; n * hd];
        let mut sin = vec![0f32; n * hd];
        for (r, &p) in positions.iter().enumerate() {
            let p = p as f32 / self.pos_scale;
            for (i, &f) in inv_freq.iter().enumerate() {
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

impl Rope {
    /// cos and sin tables [n, head_dim] of the pure rotation (no multiplier) that takes a row
    /// rotated at position `from[r]` to position `to[r]`: applied with [`apply`], it re-rotates
    /// cached post-RoPE keys to new position ids (HOMER's re-indexed positions, issue 15). The
    /// frequencies are those [`Rope::tables`] uses for the larger of the two sets.
    pub fn shift_tables(
        &self,
        from: &[usize],
        to: &[usize],
        device: &Device,
    ) -> (Tensor<2>, Tensor<2>) {
        assert_eq!(from.len(), to.len(), "shift tables: rows of from and to");
        let n = from.len();
        let hd = self.head_dim;
        let half = hd / 2;
        let top = from.iter().chain(to).max().map_or(0, |p| p + 1);
        let seq_len = self.seq_len.load(Ordering::Relaxed).max(top);
        let inv_freq = self.inv_for(seq_len);
        let mut cos = vec![0f32; n * hd];
        let mut sin = vec![0f32; n * hd];
        for r in 0..n {
            let d = (to[r] as f64 - from[r] as f64) / self.pos_scale as f64;
            for (i, &f) in inv_freq.iter().enumerate() {
                let (s, c) = (d * f as f64).sin_cos();
                cos[r * hd + i] = c as f32;
                cos[r * hd + half + i] = c as f32;
                sin[r * hd + i] = s as f32;
                sin[r * hd + half + i] = s as f32;
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

/// Turn post-RoPE keys `k` [heads, n, head_dim] by a further rotation (tables [n, head_dim], e.g.
/// [`Rope::shift_tables`]) in f32, returned in `k`'s element type (f16 caches are rotated in f32).
pub fn rotate(k: Tensor<3>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<3> {
    let dtype = k.dtype();
    apply(k.cast(burn::tensor::DType::F32), cos, sin).cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inverse frequencies and attention factors against `tests/fixtures/rope.json`
    /// (transformers' ROPE_INIT_FUNCTIONS for linear, dynamic and YaRN; numpy for static NTK,
    /// which transformers lacks), for the default model's and Llama-2's RoPE.
    #[test]
    fn scaled_rope_matches_the_reference() {
        let path = std::path::Path::new(
            &std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../../tests/fixtures/rope.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 42);
        let mut kinds = std::collections::BTreeSet::new();
        for c in cases {
            let m = &v["models"][c["model"].as_str().unwrap()];
            let (hd, theta, window) = (
                m["head_dim"].as_u64().unwrap() as usize,
                m["theta"].as_f64().unwrap(),
                m["window"].as_u64().unwrap() as usize,
            );
            let kind = c["kind"].as_str().unwrap();
            let factor = c["factor"].as_f64().unwrap();
            let choice = if kind == "dynamic" {
                "dynamic-ntk"
            } else {
                kind
            };
            let scaling = RopeScaling::from_choice(choice, factor, window).unwrap();
            let rope = Rope::new(hd, theta, &scaling);
            let seq_len = c["seq_len"].as_u64().map_or(0, |s| s as usize);
            let (inv, mscale) = rope.effective(seq_len);
            let want: Vec<f32> = c["inv_freq"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(inv.len(), want.len());
            for (i, (a, b)) in inv.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-6 * b.abs(),
                    "{kind} x{factor} {} seq {seq_len} inv_freq[{i}]: {a} vs {b}",
                    c["model"]
                );
            }
            let att = c["attention_factor"].as_f64().unwrap() as f32;
            assert!(
                (mscale - att).abs() < 1e-6,
                "{kind} x{factor}: mscale {mscale} vs {att}"
            );
            kinds.insert(kind.to_string());
        }
        assert_eq!(kinds.len(), 4, "{kinds:?}");
    }

    /// PI, static NTK and YaRN at factor 1 are the native RoPE bit for bit (the evaluation lets
    /// such a method take plain's run of the same prompt); dynamic NTK at factor 1 is not.
    #[test]
    fn scalings_at_factor_one_are_the_native_rope() {
        let native = Rope::new(64, 1e5, &RopeScaling::None);
        for kind in ["pi", "ntk", "yarn"] {
            let s = RopeScaling::from_choice(kind, 1.0, 8192).unwrap();
            assert!(s.is_native(), "{kind}");
            let rope = Rope::new(64, 1e5, &s);
            assert_eq!(rope.effective(20000), native.effective(20000), "{kind}");
            assert_eq!(rope.pos_scale, 1.0, "{kind}");
            let s2 = RopeScaling::from_choice(kind, 2.0, 8192).unwrap();
            assert!(!s2.is_native() && Rope::new(64, 1e5, &s2).effective(0) != native.effective(0));
        }
        let dynamic = RopeScaling::from_choice("dynamic-ntk", 1.0, 8192).unwrap();
        assert!(!dynamic.is_native() && RopeScaling::None.is_native());
        let rope = Rope::new(64, 1e5, &dynamic);
        rope.set_seq_len(20000);
        assert_ne!(rope.effective(20000), native.effective(20000));
    }

    #[test]
    fn dynamic_ntk_follows_the_sequence_length() {
        let s = RopeScaling::from_choice("dynamic-ntk", 4.0, 8192).unwrap();
        let rope = Rope::new(64, 1e5, &s);
        let native = Rope::new(64, 1e5, &RopeScaling::None);
        // Within the window: native RoPE, bit for bit.
        assert_eq!(rope.effective(8192), native.effective(8192));
        // Beyond it the tables follow the longest of the positions and the announced length.
        let dev = Device::flex();
        let at = |r: &Rope, p: usize| {
            r.tables(&[p], &dev)
                .0
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(at(&rope, 100), at(&native, 100));
        rope.set_seq_len(20000);
        assert_ne!(at(&rope, 100), at(&native, 100));
        let (inv, _) = rope.effective(20000);
        assert!(
            inv[1] < native.effective(0).0[1],
            "a larger base lowers the frequencies"
        );
        assert!(RopeScaling::from_choice("yarn", 0.5, 8192).is_err());
        assert!(RopeScaling::from_choice("rope", 2.0, 8192).is_err());
    }
}
