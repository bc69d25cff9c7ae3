//! Next-token selection: greedy, or temperature sampling filtered by top-k, top-p and min-p, with
//! a repetition penalty (as transformers applies it) and a seed for reproducibility.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 299792458,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature {} must be ≥ 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition penalty {} must be > 0",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the history seen so far (vocab-sized flags, and the ids in first-seen order).
    seen: Vec<bool>,
    seen_ids: Vec<u32>,
    /// Length of the history those flags cover.
    history_len: usize,
}

/// Index of the largest value (lowest index on ties), as argmax in PyTorch.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest (id, logit) pairs, largest first.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter().map(|i| (i, logits[i as usize])).collect()
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            seen: vec![],
            seen_ids: vec![],
            history_len: 0,
        }
    }

    /// The repetition penalty on every distinct token of `history`, with the set of seen tokens
    /// kept between calls (decoding extends the history by one token per call).
    fn penalise(&mut self, logits: &mut [f32], history: &[u32]) {
        if history.len() < self.history_len || self.seen.len() != logits.len() {
            self.seen = vec![false; logits.len()];
            self.seen_ids.clear();
            self.history_len = 0;
        }
        for &t in &history[self.history_len..] {
            if let Some(s) = self.seen.get_mut(t as usize) {
                if !*s {
                    *s = true;
                    self.seen_ids.push(t);
                }
            }
        }
        self.history_len = history.len();
        let rp = self.params.repetition_penalty;
        for &t in &self.seen_ids {
            let l = &mut logits[t as usize];
            *l = if *l > 0.0 { *l / rp } else { *l * rp };
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Choose the next token from `logits` given the tokens seen so far (prompt + output).
    /// Calls with a history that extends the previous call's only look at the new tokens.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.params.repetition_penalty != 1.0 {
            self.penalise(logits, history);
        }
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // No filter at all: draw from the whole distribution in id order (no sort).
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            let probs: Vec<f32> = logits
                .iter()
                .map(|&l| ((l - max) / p.temperature).exp())
                .collect();
            let total: f32 = probs.iter().sum();
            let mut r = self.rng.random::<f32>() * total;
            for (i, &x) in probs.iter().enumerate() {
                if r < x {
                    return i as u32;
                }
                r -= x;
            }
            return argmax(logits);
        }
        // Candidates sorted by logit: the top k, or (top-k off) only the tokens that a min-p or
        // top-p filter can keep. Tokens below ε = (1 − top_p) / V in probability hold at most
        // 1 − top_p of the mass together, so the top-p prefix ends before them; min-p keeps only
        // logits ≥ max + T·ln(min_p).
        let v = logits.len();
        let mut cand = if p.top_k > 0 {
            top_k(logits, p.top_k)
        } else {
            let mut floor = f32::NEG_INFINITY;
            if p.min_p > 0.0 {
                floor = floor.max(max + p.temperature * p.min_p.ln());
            }
            if p.top_p < 1.0 {
                let z: f32 = logits
                    .iter()
                    .map(|&l| ((l - max) / p.temperature).exp())
                    .sum();
                let eps = (1.0 - p.top_p) / v as f32;
                // p_i = exp((l − max)/T) / z ≥ eps  ⇔  l ≥ max + T·ln(eps·z); keep a margin.
                floor = floor.max(max + p.temperature * (eps * z).ln() - 1e-3);
            }
            let mut c: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .filter(|&(_, &l)| l >= floor)
                .map(|(i, &l)| (i as u32, l))
                .collect();
            c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            c
        };
        // Normalised over every token the top-k left (all of them when top-k is off).
        let denom: f32 = if p.top_k > 0 {
            cand.iter()
                .map(|&(_, l)| ((l - max) / p.temperature).exp())
                .sum()
        } else {
            logits
                .iter()
                .map(|&l| ((l - max) / p.temperature).exp())
                .sum()
        };
        let mut probs: Vec<f32> = cand
            .iter()
            .map(|&(_, l)| ((l - max) / p.temperature).exp() / denom)
            .collect();
        // min-p: drop tokens below min_p × the top probability.
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            cand.truncate(keep);
            probs.truncate(keep);
        }
        // top-p: the smallest prefix whose mass reaches top_p.
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return cand[i].0;
            }
            r -= x;
        }
        cand[cand.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_topk_and_penalty() {
        let mut s = Sampler::new(SamplingParams::default());
        let mut l = vec![0.1, 2.0, 2.0, -1.0];
        assert_eq!(s.sample(&mut l, &[]), 1, "ties go to the lowest id");
        assert_eq!(
            top_k(&[0.5, 3.0, 1.0, 3.0], 3),
            vec![(1, 3.0), (3, 3.0), (2, 1.0)]
        );
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 4.0,
            ..Default::default()
        });
        let mut l = vec![0.1, 2.0, 1.0, -1.0];
        assert_eq!(s.sample(&mut l, &[1]), 2);
        assert_eq!(l[1], 0.5);
    }

    #[test]
    fn top_k_one_and_min_p_force_the_argmax_and_seed_repeats() {
        let logits = vec![0.3, 1.2, 0.9, 1.1, -0.4];
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.99,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.01,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params);
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
            }
        }
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.5,
                seed,
                ..Default::default()
            });
            (0..32)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        assert!(
            d.iter().collect::<std::collections::HashSet<_>>().len() > 2,
            "temperature sampling varies: {d:?}"
        );
    }

    /// The filtered candidate lists (no full sort) draw what the full sort drew.
    #[test]
    fn filtered_candidates_draw_like_a_full_sort() {
        let v = 5000;
        let mut x = 12345u64;
        let logits: Vec<f32> = (0..v)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 12.0 - 6.0
            })
            .collect();
        // The previous implementation: every token sorted, then min-p and top-p on the prefix.
        let reference = |p: &SamplingParams, rng: &mut StdRng| -> u32 {
            let cand = top_k(&logits, logits.len());
            let max = cand[0].1;
            let mut probs: Vec<f32> = cand
                .iter()
                .map(|&(_, l)| ((l - max) / p.temperature).exp())
                .collect();
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= sum);
            let mut keep = probs.len();
            if p.min_p > 0.0 {
                let floor = probs[0] * p.min_p;
                keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            }
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                for (i, &q) in probs[..keep].iter().enumerate() {
                    acc += q;
                    if acc >= p.top_p {
                        keep = i + 1;
                        break;
                    }
                }
            }
            let total: f32 = probs[..keep].iter().sum();
            let mut r = rng.random::<f32>() * total;
            for (i, &q) in probs[..keep].iter().enumerate() {
                if r < q {
                    return cand[i].0;
                }
                r -= q;
            }
            cand[keep - 1].0
        };
        for params in [
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.3,
                min_p: 0.05,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                min_p: 0.01,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params.clone());
            let mut rng = StdRng::seed_from_u64(params.seed);
            let mut same = 0;
            for _ in 0..300 {
                let a = s.sample(&mut logits.clone(), &[]);
                let b = reference(&params, &mut rng);
                same += (a == b) as usize;
            }
            assert!(same >= 298, "{params:?}: {same} of 300 draws agree");
        }
    }

    #[test]
    fn repetition_penalty_state_follows_the_history() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        let base = vec![1.0, 4.0, 3.0, -1.0];
        let mut l = base.clone();
        assert_eq!(s.sample(&mut l, &[1]), 2);
        assert_eq!(l, vec![1.0, 2.0, 3.0, -1.0]);
        // The history grew by one: both tokens are penalised, each once.
        let mut l = base.clone();
        s.sample(&mut l, &[1, 2]);
        assert_eq!(l, vec![1.0, 2.0, 1.5, -1.0]);
        // A shorter (new) history starts over.
        let mut l = base.clone();
        s.sample(&mut l, &[3]);
        assert_eq!(l, vec![1.0, 4.0, 3.0, -2.0]);
    }
}
