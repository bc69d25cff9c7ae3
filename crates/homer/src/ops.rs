//! The backend operations HOMER needs beyond the model's own layers, behind a trait so a backend
//! can bring its own kernels (`homer-wgpu`'s WGSL) without touching the algorithm. [`TensorOps`]
//! implements them with burn tensor ops on any backend and is the oracle the kernels are tested
//! against.

use burn::tensor::{Int, Tensor, TensorData};
use homer_model::attention::last_query_logits;
use homer_model::{LayerKv, read_f32};

use crate::error::{HomerError, Result};

/// Everything the significance of one node's rows depends on (spec §4.2).
pub struct SignificanceInput<'a> {
    /// Post-RoPE query of the node's last row at the pruning layer, [H, head_dim].
    pub q_last: &'a Tensor<2>,
    /// The layer's post-RoPE keys of all the node's rows, [KV, n, head_dim].
    pub keys: &'a Tensor<3>,
    /// Position id of every row (length n).
    pub positions: &'a [usize],
    /// False for affix rows, which score +∞ and are never dropped (length n).
    pub prunable: &'a [bool],
    /// The layer's calibration row, indexed by distance `last_position − position`; None = zeros.
    pub bias: Option<&'a [f32]>,
    /// Position id of the node's last row.
    pub last_position: usize,
}

/// A node's tensors: its residual rows and the K/V of every layer it has cached, row-aligned.
#[derive(Debug, Clone)]
pub struct ChunkTensors {
    /// [n, d_model]
    pub hidden: Tensor<2>,
    /// Layers 0..cache.len(), each K and V [KV, n, head_dim].
    pub cache: Vec<LayerKv>,
}

impl ChunkTensors {
    pub fn rows(&self) -> usize {
        self.hidden.dims()[0]
    }
}

/// HOMER's backend operations. Implementations must agree with [`TensorOps`] (the oracle).
pub trait HomerOps: Send + Sync {
    /// A short name for logs and traces ("tensor", "wgsl").
    fn name(&self) -> &str;

    /// sig[j] = max over query heads h of (q_last[h] · k[group(h), j]) / √head_dim
    ///          − bias[last_position − position[j]],  and +∞ where the row is not prunable.
    /// Query head h reads KV head h / (H / KV). Returns n scores on the host.
    fn significance(&self, input: &SignificanceInput<'_>) -> Result<Vec<f32>>;

    /// Keep rows `keep` (ascending, distinct) of the hidden rows and of every cached layer's K
    /// and V, in that order.
    fn gather(&self, chunk: ChunkTensors, keep: &[usize]) -> Result<ChunkTensors>;

    /// [`gather`](Self::gather), and every cached layer's keys turned row by row by `shift`
    /// (its row r turns output row r, input row `keep[r]`): k' = k·cos + rotate_half(k)·sin, in
    /// f32 (f16 keys come back f16). HOMER renumbers positions this way (`positions=reindex`,
    /// `positions=root`); the turn rides on the gather's pass over the keys. With `keep` = 0..n
    /// the hidden rows and values are returned as they are and only the keys are rewritten.
    fn gather_rotate(
        &self,
        chunk: ChunkTensors,
        keep: &[usize],
        shift: &KeyShift,
    ) -> Result<ChunkTensors>;

    /// Merge two adjacent nodes (spec §5): [avg(prefixes), left context, right context,
    /// avg(suffixes)] along the rows of the hidden state and of every cached layer's K and V.
    /// Both children cache the same layers.
    fn merge(
        &self,
        left: ChunkTensors,
        right: ChunkTensors,
        prefix_len: usize,
        suffix_len: usize,
    ) -> Result<ChunkTensors>;
}

/// A rotation of kept keys from the positions they were computed at to new ones, one row of
/// tables per kept row: cos and sin [rows, head_dim] with halves repeated, as
/// `homer_model::Llama::key_shift` builds them.
#[derive(Debug, Clone)]
pub struct KeyShift {
    pub cos: Tensor<2>,
    pub sin: Tensor<2>,
}

impl KeyShift {
    /// The tables of one angle per row and rotate-half pair (`angles` [rows, head_dim / 2],
    /// row-major, radians), laid out as the model's: each angle at column i and i + head_dim / 2.
    pub fn from_angles(angles: &[f32], head_dim: usize, device: &burn::tensor::Device) -> Self {
        let half = head_dim / 2;
        let rows = angles.len() / half.max(1);
        let (mut cos, mut sin) = (vec![0f32; rows * head_dim], vec![0f32; rows * head_dim]);
        for (j, a) in angles.iter().enumerate() {
            let (r, i) = (j / half, j % half);
            for c in [r * head_dim + i, r * head_dim + half + i] {
                cos[c] = a.cos();
                sin[c] = a.sin();
            }
        }
        KeyShift {
            cos: Tensor::from_data(TensorData::new(cos, [rows, head_dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [rows, head_dim]), device),
        }
    }

    pub fn rows(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// Whether `keep` lists every one of `n` rows in order (a pure re-rotation, no gather).
pub fn keeps_all(keep: &[usize], n: usize) -> bool {
    keep.len() == n && keep.iter().enumerate().all(|(i, &j)| i == j)
}

/// A key shift fits the kept rows and the keys of every cached layer; shared by every
/// [`HomerOps`] implementation.
pub fn check_shift(chunk: &ChunkTensors, keep: &[usize], shift: &KeyShift) -> Result<()> {
    let (cos, sin) = (shift.cos.dims(), shift.sin.dims());
    let hd = chunk.cache.first().map(|kv| kv.k.dims()[2]);
    if cos != sin || cos[0] != keep.len() || hd.is_some_and(|hd| hd != cos[1] || hd % 2 != 0) {
        return Err(HomerError::Bug(format!(
            "key shift tables {cos:?} / {sin:?} for {} kept rows of keys with head dim {hd:?}",
            keep.len()
        )));
    }
    Ok(())
}

/// The oracle: burn tensor ops, any backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct TensorOps;

/// Host half of the significance: subtract the bias by distance and protect the affixes.
pub fn calibrate_scores(raw: &mut [f32], input: &SignificanceInput<'_>) -> Result<()> {
    for (j, s) in raw.iter_mut().enumerate() {
        if !input.prunable[j] {
            *s = f32::INFINITY;
            continue;
        }
        if let Some(bias) = input.bias {
            let d = input
                .last_position
                .checked_sub(input.positions[j])
                .ok_or_else(|| {
                    HomerError::Input(format!(
                        "row {j} has position {} after the last row's {}",
                        input.positions[j], input.last_position
                    ))
                })?;
            let b = bias.get(d).ok_or_else(|| {
                HomerError::BiasMismatch(format!(
                    "distance {d} is beyond the table's {} distances",
                    bias.len()
                ))
            })?;
            *s -= b;
        }
    }
    Ok(())
}

/// Shape checks of a significance input, shared by every [`HomerOps`] implementation; returns n.
pub fn check_significance_input(input: &SignificanceInput<'_>) -> Result<usize> {
    let [kvh, n, hd] = input.keys.dims();
    let [h, qd] = input.q_last.dims();
    if qd != hd || kvh == 0 || h % kvh != 0 {
        return Err(HomerError::Input(format!(
            "significance shapes: q_last [{h}, {qd}], keys [{kvh}, {n}, {hd}]"
        )));
    }
    if input.positions.len() != n || input.prunable.len() != n {
        return Err(HomerError::Input(format!(
            "significance: {n} keys but {} positions and {} mask entries",
            input.positions.len(),
            input.prunable.len()
        )));
    }
    Ok(n)
}

/// Every kept row exists in the chunk; shared by every [`HomerOps`] implementation.
pub fn check_gather(chunk: &ChunkTensors, keep: &[usize]) -> Result<()> {
    let n = chunk.rows();
    match keep.iter().find(|&&i| i >= n) {
        Some(&bad) => Err(HomerError::Input(format!(
            "gather: row {bad} of a {n}-row chunk"
        ))),
        None => Ok(()),
    }
}

/// Both children cache the same layers and carry both affixes; shared by every [`HomerOps`]
/// implementation.
pub fn check_merge(left: &ChunkTensors, right: &ChunkTensors, p: usize, s: usize) -> Result<()> {
    let (nl, nr) = (left.rows(), right.rows());
    if left.cache.len() != right.cache.len() || nl < p + s || nr < p + s {
        return Err(HomerError::Input(format!(
            "merge: children with {nl} and {nr} rows, {} and {} cached layers, affixes {p}+{s}",
            left.cache.len(),
            right.cache.len()
        )));
    }
    Ok(())
}

fn index_tensor(keep: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let idx: Vec<i64> = keep.iter().map(|&i| i as i64).collect();
    Tensor::<1, Int>::from_data(TensorData::new(idx, [keep.len()]), device)
}

/// The merge of one tensor pair along its row axis `dim` (spec §5): [mean of the two prefixes,
/// left context, right context, mean of the two suffixes]; empty parts are left out.
fn merge_rows<const D: usize>(
    l: &Tensor<D>,
    r: &Tensor<D>,
    dim: usize,
    p: usize,
    s: usize,
) -> Tensor<D> {
    let (nl, nr) = (l.dims()[dim], r.dims()[dim]);
    let rows = |t: &Tensor<D>, start: usize, len: usize| {
        (len > 0).then(|| t.clone().narrow(dim, start, len))
    };
    let avg = |a: Option<Tensor<D>>, b: Option<Tensor<D>>| Some((a? + b?).mul_scalar(0.5));
    let parts: Vec<Tensor<D>> = [
        avg(rows(l, 0, p), rows(r, 0, p)),
        rows(l, p, nl - p - s),
        rows(r, p, nr - p - s),
        avg(rows(l, nl - s, s), rows(r, nr - s, s)),
    ]
    .into_iter()
    .flatten()
    .collect();
    Tensor::cat(parts, dim)
}

impl HomerOps for TensorOps {
    fn name(&self) -> &str {
        "tensor"
    }

    fn significance(&self, input: &SignificanceInput<'_>) -> Result<Vec<f32>> {
        let n = check_significance_input(input)?;
        let logits = last_query_logits(input.q_last.clone(), input.keys); // [H, n]
        let raw = logits.max_dim(0).reshape([n]);
        let mut s = read_f32(raw)?;
        calibrate_scores(&mut s, input)?;
        Ok(s)
    }

    fn gather(&self, chunk: ChunkTensors, keep: &[usize]) -> Result<ChunkTensors> {
        check_gather(&chunk, keep)?;
        let device = chunk.hidden.device();
        let idx = index_tensor(keep, &device);
        let hidden = chunk.hidden.select(0, idx.clone());
        let cache = chunk
            .cache
            .into_iter()
            .map(|kv| LayerKv {
                k: kv.k.select(1, idx.clone()),
                v: kv.v.select(1, idx.clone()),
            })
            .collect();
        Ok(ChunkTensors { hidden, cache })
    }

    fn gather_rotate(
        &self,
        chunk: ChunkTensors,
        keep: &[usize],
        shift: &KeyShift,
    ) -> Result<ChunkTensors> {
        check_gather(&chunk, keep)?;
        check_shift(&chunk, keep, shift)?;
        let chunk = if keeps_all(keep, chunk.rows()) {
            chunk
        } else {
            self.gather(chunk, keep)?
        };
        let cache = chunk
            .cache
            .into_iter()
            .map(|kv| LayerKv {
                k: homer_model::rope::rotate(kv.k, &shift.cos, &shift.sin),
                v: kv.v,
            })
            .collect();
        Ok(ChunkTensors {
            hidden: chunk.hidden,
            cache,
        })
    }

    fn merge(
        &self,
        left: ChunkTensors,
        right: ChunkTensors,
        p: usize,
        s: usize,
    ) -> Result<ChunkTensors> {
        check_merge(&left, &right, p, s)?;
        let hidden = merge_rows(&left.hidden, &right.hidden, 0, p, s);
        let cache = left
            .cache
            .iter()
            .zip(&right.cache)
            .map(|(a, b)| LayerKv {
                k: merge_rows(&a.k, &b.k, 1, p, s),
                v: merge_rows(&a.v, &b.v, 1, p, s),
            })
            .collect();
        Ok(ChunkTensors { hidden, cache })
    }
}

/// Time spent in one kind of op.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct OpTime {
    pub calls: usize,
    pub seconds: f64,
}

/// Per-op wall time of a run, see [`TimedOps`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct OpTimes {
    pub significance: OpTime,
    /// Gathers, and gathers that re-rotate keys ([`HomerOps::gather_rotate`]).
    pub gather: OpTime,
    pub merge: OpTime,
}

impl OpTimes {
    pub fn total_seconds(&self) -> f64 {
        self.significance.seconds + self.gather.seconds + self.merge.seconds
    }
}

/// Wraps ops and measures each call's wall time. Devices run asynchronously, so every call waits
/// for the device before starting the clock (its inputs, i.e. all earlier work, are read) and
/// after it (one element of its output is read): the numbers are the ops' own time, at the cost
/// of those extra waits. For benchmarks (`homer bench kernels`), not for production runs.
pub struct TimedOps<'a> {
    inner: &'a dyn HomerOps,
    times: std::sync::Mutex<OpTimes>,
}

impl<'a> TimedOps<'a> {
    pub fn new(inner: &'a dyn HomerOps) -> Self {
        Self {
            inner,
            times: Default::default(),
        }
    }

    pub fn times(&self) -> OpTimes {
        *self.times.lock().expect("timer lock")
    }

    fn record(&self, which: fn(&mut OpTimes) -> &mut OpTime, start: std::time::Instant) {
        let mut t = self.times.lock().expect("timer lock");
        let slot = which(&mut t);
        slot.calls += 1;
        slot.seconds += start.elapsed().as_secs_f64();
    }
}

/// Wait until the device has produced `t` (reads one element back).
pub fn wait_for<const D: usize>(t: &Tensor<D>) -> Result<()> {
    if t.shape().num_elements() > 0 {
        let flat: Tensor<1> = t.clone().flatten(0, D - 1);
        read_f32(flat.narrow(0, 0, 1))?;
    }
    Ok(())
}

fn wait_for_chunk(c: &ChunkTensors) -> Result<()> {
    match c.cache.last() {
        Some(kv) => wait_for(&kv.v),
        None => wait_for(&c.hidden),
    }
}

impl HomerOps for TimedOps<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn significance(&self, input: &SignificanceInput<'_>) -> Result<Vec<f32>> {
        wait_for(input.keys)?;
        let t = std::time::Instant::now();
        let s = self.inner.significance(input)?;
        self.record(|t| &mut t.significance, t);
        Ok(s)
    }

    fn gather(&self, chunk: ChunkTensors, keep: &[usize]) -> Result<ChunkTensors> {
        wait_for_chunk(&chunk)?;
        let t = std::time::Instant::now();
        let out = self.inner.gather(chunk, keep)?;
        wait_for_chunk(&out)?;
        self.record(|t| &mut t.gather, t);
        Ok(out)
    }

    fn gather_rotate(
        &self,
        chunk: ChunkTensors,
        keep: &[usize],
        shift: &KeyShift,
    ) -> Result<ChunkTensors> {
        wait_for_chunk(&chunk)?;
        let t = std::time::Instant::now();
        let out = self.inner.gather_rotate(chunk, keep, shift)?;
        // The turned keys are the op's last output (a pure renumbering leaves the values).
        match out.cache.last() {
            Some(kv) => wait_for(&kv.k)?,
            None => wait_for(&out.hidden)?,
        }
        self.record(|t| &mut t.gather, t);
        Ok(out)
    }

    fn merge(
        &self,
        left: ChunkTensors,
        right: ChunkTensors,
        p: usize,
        s: usize,
    ) -> Result<ChunkTensors> {
        wait_for_chunk(&left)?;
        wait_for_chunk(&right)?;
        let t = std::time::Instant::now();
        let out = self.inner.merge(left, right, p, s)?;
        wait_for_chunk(&out)?;
        self.record(|t| &mut t.merge, t);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homer_model::BackendKind;

    /// Tables from angles are laid out as RoPE's own (each angle at i and i + hd/2), so the
    /// oracle's turn by the model's shift equals its turn by the same angles.
    #[test]
    fn key_shift_tables_from_angles_match_the_models_layout() {
        let (dev, _) = homer_model::backend::device(BackendKind::Cpu).unwrap();
        let s = KeyShift::from_angles(&[0.5, -1.25, 2.0, 0.0], 4, &dev);
        assert_eq!(s.rows(), 2);
        let cos = read_f32(s.cos.clone()).unwrap();
        let sin = read_f32(s.sin.clone()).unwrap();
        let by_column = [0.5f32, -1.25, 0.5, -1.25, 2.0, 0.0, 2.0, 0.0];
        assert_eq!(cos, by_column.map(f32::cos));
        assert_eq!(sin, by_column.map(f32::sin));

        // RoPE's shift from position 3 to 10 (what `Llama::key_shift` hands the tree): angle
        // 7·inv_freq[i] per pair.
        let (hd, theta) = (8, 10000.0f64);
        let rope = homer_model::rope::Rope::new(hd, theta, &Default::default());
        let (mc, ms) = rope.shift_tables(&[3], &[10], &dev);
        let angles: Vec<f32> = (0..hd / 2)
            .map(|i| (7.0 * theta.powf(-((2 * i) as f64) / hd as f64)) as f32)
            .collect();
        let ours = KeyShift::from_angles(&angles, hd, &dev);
        let close = |a: Tensor<2>, b: Tensor<2>| {
            let (a, b) = (read_f32(a).unwrap(), read_f32(b).unwrap());
            a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5)
        };
        assert!(close(mc, ours.cos) && close(ms, ours.sin));
    }
}
