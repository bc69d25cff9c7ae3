//! `homer bench kernels`: the WGSL kernels against the tensor-op oracle on the same device, at
//! HOMER's shapes, median of repeated runs, with the bytes each op moves (for GB/s).

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use homer::ops::wait_for;
use homer::prune::keep_after_dropping;
use homer::{ChunkTensors, HomerOps, KeyShift, Result, SignificanceInput, TensorOps};
use homer_model::{Device, LayerKv};
use serde::Serialize;

use crate::WgslOps;

/// Shapes and repetitions of the kernel benchmark. Defaults: the default model
/// (SmolLM2-135M: 30 layers, 9 query / 3 KV heads, head dim 64, d_model 576).
#[derive(Debug, Clone)]
pub struct KernelBench {
    pub lengths: Vec<usize>,
    pub reps: usize,
    pub warmup: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub d_model: usize,
}

impl Default for KernelBench {
    fn default() -> Self {
        Self {
            lengths: vec![2048, 4096, 8192],
            reps: 7,
            warmup: 2,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            d_model: 576,
        }
    }
}

/// One op at one size: median seconds of the oracle and of the kernels.
#[derive(Debug, Clone, Serialize)]
pub struct KernelRow {
    pub op: String,
    pub rows: usize,
    pub bytes: u64,
    pub oracle_seconds: f64,
    pub wgsl_seconds: f64,
}

impl KernelRow {
    pub fn speedup(&self) -> f64 {
        self.oracle_seconds / self.wgsl_seconds
    }
    pub fn wgsl_gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.wgsl_seconds / 1e9
    }
    pub fn oracle_gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.oracle_seconds / 1e9
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn tensor<const D: usize>(&mut self, shape: [usize; D], dev: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.next()).collect();
        Tensor::from_data(TensorData::new(v, shape), dev)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn chunk(rng: &mut Rng, b: &KernelBench, n: usize, dev: &Device) -> Result<ChunkTensors> {
    let c = ChunkTensors {
        hidden: rng.tensor([n, b.d_model], dev),
        cache: (0..b.layers)
            .map(|_| LayerKv {
                k: rng.tensor([b.kv_heads, n, b.head_dim], dev),
                v: rng.tensor([b.kv_heads, n, b.head_dim], dev),
            })
            .collect(),
    };
    for kv in &c.cache {
        wait_for(&kv.v)?;
    }
    wait_for(&c.hidden)?;
    Ok(c)
}

/// Shift tables of random angles for `rows` kept rows (halves repeated, as the model's).
fn shift(rng: &mut Rng, rows: usize, hd: usize, dev: &Device) -> KeyShift {
    let angles: Vec<f32> = (0..rows * hd / 2).map(|_| rng.next() * 100.0).collect();
    KeyShift::from_angles(&angles, hd, dev)
}

/// Wait for the last layer's keys (a pure renumbering leaves the values as they were).
fn keys_done(c: &ChunkTensors) -> Result<()> {
    match c.cache.last() {
        Some(kv) => wait_for(&kv.k),
        None => wait_for(&c.hidden),
    }
}

fn done(c: &ChunkTensors) -> Result<()> {
    match c.cache.last() {
        Some(kv) => wait_for(&kv.v),
        None => wait_for(&c.hidden),
    }
}

/// Run the benchmark on `dev` with `wgsl` against [`TensorOps`]. `log` gets one line per row.
pub fn run(
    b: &KernelBench,
    wgsl: &WgslOps,
    dev: &Device,
    log: &mut dyn FnMut(&KernelRow),
) -> Result<Vec<KernelRow>> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut rows = Vec::new();
    let (p, s) = (32usize, 16usize);
    let row_bytes = ((b.d_model + 2 * b.layers * b.kv_heads * b.head_dim) * 4) as u64;
    for &n in &b.lengths {
        // Significance: the last query row against the node's keys, affixes protected, a bias.
        let q = rng.tensor([b.heads, b.head_dim], dev);
        let keys = rng.tensor([b.kv_heads, n, b.head_dim], dev);
        wait_for(&keys)?;
        let positions: Vec<usize> = (0..n).collect();
        let prunable: Vec<bool> = (0..n).map(|j| j >= p && j + s < n).collect();
        let bias: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin()).collect();
        let input = SignificanceInput {
            q_last: &q,
            keys: &keys,
            positions: &positions,
            prunable: &prunable,
            bias: Some(&bias),
            last_position: n - 1,
        };
        let sig_bytes =
            (b.kv_heads * n * b.head_dim * 4 + b.heads * b.head_dim * 4 + n * 16) as u64;
        let row = KernelRow {
            op: "significance".into(),
            rows: n,
            bytes: sig_bytes,
            oracle_seconds: timed(b.warmup, b.reps, || {
                TensorOps.significance(&input).map(drop)
            })?,
            wgsl_seconds: timed(b.warmup, b.reps, || wgsl.significance(&input).map(drop))?,
        };
        log(&row);
        rows.push(row);

        // Selection of the quarter to drop: host sort after the scores are read back (what HOMER
        // does) against the device rank count (select.wgsl) with n flags read back.
        let drop_k = (n - p - s) / 4;
        let host = timed(b.warmup, b.reps, || {
            let sc = wgsl.significance(&input)?;
            keep_after_dropping(&sc, drop_k);
            Ok(())
        })?;
        let device = timed(b.warmup, b.reps, || {
            let sc = wgsl.significance_on_device(&input)?;
            wgsl.select_keep_on_device(&sc, drop_k).map(drop)
        })?;
        let row = KernelRow {
            op: "significance+select (host sort = oracle column, device rank count = wgsl column)"
                .into(),
            rows: n,
            bytes: sig_bytes,
            oracle_seconds: host,
            wgsl_seconds: device,
        };
        log(&row);
        rows.push(row);

        // Gather: keep three quarters of the rows of the hidden state and every layer's K/V.
        let c = chunk(&mut rng, b, n, dev)?;
        let keep: Vec<usize> = (0..n).filter(|j| j % 4 != 1).collect();
        let m = keep.len() as u64;
        let row = KernelRow {
            op: "gather".into(),
            rows: n,
            bytes: 2 * m * row_bytes,
            oracle_seconds: timed(b.warmup, b.reps, || {
                done(&TensorOps.gather(c.clone(), &keep)?)
            })?,
            wgsl_seconds: timed(b.warmup, b.reps, || done(&wgsl.gather(c.clone(), &keep)?))?,
        };
        log(&row);
        rows.push(row);

        // The same gather with every kept key turned to a new position (the root's gather under
        // positions=reindex|root): oracle = gather, then RoPE's tensor ops on the keys.
        let turn = shift(&mut rng, keep.len(), b.head_dim, dev);
        wait_for(&turn.sin)?;
        let row = KernelRow {
            op: "gather+rotate keys".into(),
            rows: n,
            bytes: 2 * m * row_bytes + 2 * m * (b.head_dim * 4) as u64,
            oracle_seconds: timed(b.warmup, b.reps, || {
                done(&TensorOps.gather_rotate(c.clone(), &keep, &turn)?)
            })?,
            wgsl_seconds: timed(b.warmup, b.reps, || {
                done(&wgsl.gather_rotate(c.clone(), &keep, &turn)?)
            })?,
        };
        log(&row);
        rows.push(row);

        // Renumbering alone (the children at a positions=reindex merge): every key turned.
        let all: Vec<usize> = (0..n).collect();
        let turn = shift(&mut rng, n, b.head_dim, dev);
        wait_for(&turn.sin)?;
        let key_bytes = (b.layers * b.kv_heads * b.head_dim * 4) as u64;
        let row = KernelRow {
            op: "rotate keys".into(),
            rows: n,
            bytes: n as u64 * (2 * key_bytes + 2 * (b.head_dim * 4) as u64),
            oracle_seconds: timed(b.warmup, b.reps, || {
                keys_done(&TensorOps.gather_rotate(c.clone(), &all, &turn)?)
            })?,
            wgsl_seconds: timed(b.warmup, b.reps, || {
                keys_done(&wgsl.gather_rotate(c.clone(), &all, &turn)?)
            })?,
        };
        log(&row);
        rows.push(row);
        drop(c);

        // Merge: two children of n/2 rows each into one node of ~n rows.
        let (l, r) = (
            chunk(&mut rng, b, n / 2, dev)?,
            chunk(&mut rng, b, n - n / 2, dev)?,
        );
        let m = (n - p - s) as u64;
        let row = KernelRow {
            op: "merge".into(),
            rows: n,
            bytes: (n as u64 + m) * row_bytes,
            oracle_seconds: timed(b.warmup, b.reps, || {
                done(&TensorOps.merge(l.clone(), r.clone(), p, s)?)
            })?,
            wgsl_seconds: timed(b.warmup, b.reps, || {
                done(&wgsl.merge(l.clone(), r.clone(), p, s)?)
            })?,
        };
        log(&row);
        rows.push(row);
    }
    Ok(rows)
}
