//! The depth-first driver (spec §7): post-order over the merge tree, each node running its layer
//! block, scoring and pruning at its last layer (spec §4), propagating the keep-mask to every
//! cached layer (§6.1), merging children with affix averaging (§5), and dropping each child as
//! soon as it is merged. Live state is the node being computed plus one finished left sibling per
//! level of the current path, so it grows with the tree height, not the chunk count.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::Tensor;
use homer_model::{KvCache, LayerKv, Llama, read_f32};
use serde::Serialize;

use crate::bias::BiasTable;
use crate::error::{HomerError, Result};
use crate::ops::{ChunkTensors, HomerOps, KeyShift, SignificanceInput};
use crate::plan::{NodePlan, Plan, PlanParams};
use crate::select::{Positions, Reread, Selection, select_with_prior};
use crate::trace::{MergeTrace, NodeTrace};

/// Host-side metadata of a node's rows, aligned with its tensors row for row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowMeta {
    /// RoPE position id of each row (never renumbered, spec §2.3).
    pub positions: Vec<usize>,
    /// Index into the context token list for context rows; None for affix rows (not prunable).
    pub context_index: Vec<Option<usize>>,
}

impl RowMeta {
    pub fn len(&self) -> usize {
        self.positions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
    pub fn prunable(&self) -> Vec<bool> {
        self.context_index.iter().map(Option::is_some).collect()
    }
    fn gather(&self, keep: &[usize]) -> RowMeta {
        RowMeta {
            positions: keep.iter().map(|&i| self.positions[i]).collect(),
            context_index: keep.iter().map(|&i| self.context_index[i]).collect(),
        }
    }
    /// [left prefix, left context, right context, right suffix]: positions are never
    /// renumbered and both copies of an affix share theirs.
    fn merge(left: &RowMeta, right: &RowMeta, p: usize, s: usize) -> RowMeta {
        let (nl, nr) = (left.len(), right.len());
        let pick = |v: &RowMeta, r: std::ops::Range<usize>| {
            (v.positions[r.clone()].to_vec(), v.context_index[r].to_vec())
        };
        let mut out = RowMeta {
            positions: vec![],
            context_index: vec![],
        };
        for (pos, ctx) in [
            pick(left, 0..p),
            pick(left, p..nl - s),
            pick(right, p..nr - s),
            pick(right, nr - s..nr),
        ] {
            out.positions.extend(pos);
            out.context_index.extend(ctx);
        }
        out
    }
}

/// A user-supplied score for the rows of a node (tests and ablations); affix rows are forced
/// to +∞ afterwards.
pub type ScoreFn = Arc<dyn Fn(&RowMeta) -> Vec<f32> + Send + Sync>;

/// How a node ranks its context rows.
#[derive(Clone, Default)]
pub enum Scoring {
    /// The paper's significance: max over heads of the last row's raw logits, minus the bias
    /// table (`HomerConfig::bias`; none = zeros = uncalibrated).
    #[default]
    Attention,
    /// Uniform random scores (the "random pruning" ablation), reproducible from the seed.
    Random {
        seed: u64,
    },
    Custom(ScoreFn),
}

impl std::fmt::Debug for Scoring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scoring::Attention => write!(f, "Attention"),
            Scoring::Random { seed } => write!(f, "Random {{ seed: {seed} }}"),
            Scoring::Custom(_) => write!(f, "Custom"),
        }
    }
}

/// Where decoding continues after the compact cache (spec §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum NextPosition {
    /// `last_position_id + 1`, as the reference's teacher-forced forward does.
    #[default]
    AfterLast,
    /// `last_position_id` again, reproducing the reference `generate` path's off-by-one.
    ReferenceGenerate,
}

#[derive(Debug, Clone)]
pub struct HomerConfig {
    /// C: the longest leaf, affixes included (default: half the model's window).
    pub chunk_len: usize,
    /// The root's budget; None = `chunk_len` (the reference's default).
    pub target_len: Option<usize>,
    /// W: layers every leaf runs alone before merging begins.
    pub warmup_layers: usize,
    pub max_initial_chunk_len: Option<usize>,
    /// Calibration table for [`Scoring::Attention`]; None = uncalibrated (zeros).
    pub bias: Option<Arc<BiasTable>>,
    pub scoring: Scoring,
    /// Which rows a node keeps from the scores (default: the paper's per-token top-k).
    pub selection: Selection,
    pub next_position: NextPosition,
}

impl HomerConfig {
    /// Defaults for a model: C = half its window, W = 12 of 32 layers scaled to its depth.
    pub fn for_model(config: &homer_model::LlamaConfig) -> Self {
        HomerConfig {
            chunk_len: config.max_position_embeddings / 2,
            target_len: None,
            warmup_layers: default_warmup_layers(config.num_hidden_layers),
            max_initial_chunk_len: None,
            bias: None,
            scoring: Scoring::Attention,
            selection: Selection::default(),
            next_position: NextPosition::AfterLast,
        }
    }
}

/// The paper's 12 warm-up layers of Llama-2-7B's 32, scaled to `n_layers` and rounded to the
/// nearest layer (30 layers → 11, 32 → 12, 40 → 15, 22 → 8).
pub fn default_warmup_layers(n_layers: usize) -> usize {
    (n_layers * 12 + 16) / 32
}

/// The three token lists of a HOMER prompt (spec §1): each chunk gets its own copy of the
/// prefix and the suffix.
#[derive(Debug, Clone, Copy)]
pub struct HomerInput<'a> {
    pub prefix: &'a [u32],
    pub context: &'a [u32],
    pub suffix: &'a [u32],
    /// The sentence unit of every context token ([`crate::select::sentence_units`]), for a
    /// selection by sentences; None otherwise.
    pub units: Option<&'a [u32]>,
    /// A per-context-token prior for [`crate::Prior::Lexical`] (the lexical relevance of the
    /// token's unit to the question, ≥ 0); None otherwise.
    pub prior: Option<&'a [f32]>,
    /// The tokens [`crate::Sep::Newline`] puts between kept runs in the re-read (a line break in
    /// the model's vocabulary); None when the selection does not separate.
    pub separator: Option<&'a [u32]>,
}

/// Reported after every layer of every node.
#[derive(Debug, Clone, Serialize)]
pub struct HomerProgress {
    pub node: usize,
    pub nodes: usize,
    /// The chunk index when the node is a leaf.
    pub leaf: Option<usize>,
    pub n_chunks: usize,
    pub height: usize,
    pub tree_height: usize,
    pub layer: usize,
    pub rows_in: usize,
    pub rows_out: usize,
    /// Work units (rows × layers) done and in all.
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HomerStats {
    /// Largest number of rows (hidden + cached K/V rows, summed over layers) held at once.
    pub peak_live_rows: usize,
    /// Largest number of chunks held at once.
    pub peak_live_chunks: usize,
    pub seconds: f64,
    /// Leaves whose question-independent start came from the [`LeafStore`] (none without one).
    pub leaves_reused: usize,
    /// Leaves whose start was computed and handed to the [`LeafStore`].
    pub leaves_stored: usize,
    /// Row-layers the reused leaves did not compute again.
    pub row_layers_reused: u64,
}

/// The question-independent start of one leaf (issue 16): its prefix and context rows — the
/// suffix left out — through the leaf's layers up to the attention half of its last one (where
/// it prunes): every layer's post-RoPE keys and values (`kv`, one per layer) and the rows'
/// residual stream after that last attention half (`hidden`, [rows, d]). Attention is causal and
/// the suffix comes last, so these rows are the same for every question asked with the same
/// prefix, context, chunking and model; only the pruning needs the question.
#[derive(Debug, Clone)]
pub struct LeafState {
    pub hidden: Tensor<2>,
    pub kv: Vec<LayerKv>,
}

impl LeafState {
    /// Rows held.
    pub fn rows(&self) -> usize {
        self.hidden.dims()[0]
    }
    /// Bytes of tensor data held.
    pub fn bytes(&self) -> usize {
        let size = |dims: &[usize], dtype: burn::tensor::DType| {
            dims.iter().product::<usize>() * dtype.size()
        };
        size(&self.hidden.dims(), self.hidden.dtype())
            + self
                .kv
                .iter()
                .map(|l| size(&l.k.dims(), l.k.dtype()) + size(&l.v.dims(), l.v.dtype()))
                .sum::<usize>()
    }
}

/// Where a prefill finds and leaves [`LeafState`]s between questions (the engine's document
/// cache). A leaf is named by its context token range and the number of layers its state covers;
/// the store itself answers for one (model, prefix, context) — the caller keys it.
pub trait LeafStore {
    fn get(&mut self, context: &Range<usize>, layers: usize) -> Option<LeafState>;
    fn put(&mut self, context: &Range<usize>, layers: usize, state: &LeafState);
}

pub struct HomerOutput {
    /// The compact cache: the same rows at every layer, `next_position` set per
    /// [`HomerConfig::next_position`].
    pub cache: KvCache,
    /// Logits of the root's last row (the first answer token), [vocab].
    pub logits: Vec<f32>,
    pub last_position_id: usize,
    /// Position id of every row of the final cache.
    pub positions: Vec<usize>,
    pub plan: Plan,
    pub trace: MergeTrace,
    pub stats: HomerStats,
}

struct Chunk {
    t: ChunkTensors,
    meta: RowMeta,
    /// Set when the rows have been through the attention half of layer `t.cache.len() - 1`
    /// already (a leaf from a [`LeafStore`]): `t.hidden` is that half's output.
    attended: Option<Attended>,
}

/// [`Run::run_rows`]' result: the rows' state and what the pruning layer needs of them.
struct RowsRun {
    state: LeafState,
    /// The last row's post-RoPE query at the leaf's last layer, [heads, head_dim].
    q_last: Tensor<2>,
    /// The rows' residual entering the leaf's last layer.
    last_in: Tensor<2>,
}

/// What the pruning layer needs of its attention half besides its output.
struct Attended {
    /// The last row's post-RoPE query, [heads, head_dim].
    q_last: Tensor<2>,
    /// The suffix rows' residual entering the layer, [S, d] (the query window's source).
    suffix_in: Tensor<2>,
}

impl Chunk {
    fn live_rows(&self) -> usize {
        self.meta.len() * (self.t.cache.len() + 1)
    }
}

#[derive(Default)]
struct Tracker {
    held_rows: usize,
    held_chunks: usize,
    stats: HomerStats,
}

impl Tracker {
    fn observe(&mut self, rows: usize, chunks: usize) {
        let s = &mut self.stats;
        s.peak_live_rows = s.peak_live_rows.max(self.held_rows + rows);
        s.peak_live_chunks = s.peak_live_chunks.max(self.held_chunks + chunks);
    }
}

struct Run<'a, 's> {
    model: &'a Llama,
    input: HomerInput<'a>,
    plan: &'a Plan,
    config: &'a HomerConfig,
    ops: &'a dyn HomerOps,
    cancel: &'a AtomicBool,
    progress: &'a mut dyn FnMut(&HomerProgress),
    tracker: Tracker,
    traces: Vec<Option<NodeTrace>>,
    done: u64,
    total: u64,
    store: Option<&'s mut dyn LeafStore>,
}

/// Build HOMER's compact cache for `input` (spec §1–§7).
pub fn homer_prefill(
    model: &Llama,
    input: HomerInput<'_>,
    config: &HomerConfig,
    ops: &dyn HomerOps,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&HomerProgress),
) -> Result<HomerOutput> {
    homer_prefill_with_store(model, input, config, ops, None, cancel, progress)
}

/// [`homer_prefill`] that reuses leaves' question-independent starts (issue 16). With a store,
/// every leaf runs its prefix and context rows on their own through all its layers and the
/// attention half of its pruning layer (taken from the store when it has them, else computed and
/// handed to it), then its suffix rows over their cached keys and values, then the pruning and
/// everything above as usual. The result equals [`homer_prefill`]'s up to float rounding (causal
/// attention: the context rows never see the suffix); a first question and a later one run the
/// same arithmetic.
pub fn homer_prefill_with_store(
    model: &Llama,
    input: HomerInput<'_>,
    config: &HomerConfig,
    ops: &dyn HomerOps,
    store: Option<&mut dyn LeafStore>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&HomerProgress),
) -> Result<HomerOutput> {
    let t0 = Instant::now();
    let n_layers = model.n_layers();
    let plan = Plan::new(PlanParams {
        prefix_len: input.prefix.len(),
        suffix_len: input.suffix.len(),
        context_len: input.context.len(),
        max_chunk_len: config.chunk_len,
        target_len: config.target_len.unwrap_or(config.chunk_len),
        n_layers,
        warmup_layers: config.warmup_layers,
        max_initial_chunk_len: config.max_initial_chunk_len,
    })?;
    let window = model.config.max_position_embeddings;
    if plan.last_position_id >= window {
        return Err(HomerError::Plan(format!(
            "chunk length {} puts positions up to {} beyond the model's window of {window}; use a \
             chunk length of at most {window}",
            config.chunk_len, plan.last_position_id
        )));
    }
    // Re-indexed nodes number their rows 0..len: the longest node sets the largest id.
    let max_position = match config.selection.positions {
        Positions::Reindex => plan.nodes.iter().map(|n| n.len_in).max().unwrap_or(1) - 1,
        _ => plan.last_position_id,
    };
    if max_position >= window {
        return Err(HomerError::Plan(format!(
            "re-indexed positions reach {max_position}, beyond the model's window of {window}; \
             use a smaller chunk length"
        )));
    }
    if let (Scoring::Attention, Some(b)) = (&config.scoring, &config.bias) {
        b.check_fits(n_layers, max_position)?;
    }
    // Per-context-token inputs the selection needs: present, and one value per token.
    let per_token = |len: Option<usize>, what: &str, missing: String| match len {
        Some(l) if l == input.context.len() => Ok(()),
        Some(l) => Err(HomerError::Input(format!(
            "{l} {what} for {} context tokens",
            input.context.len()
        ))),
        None => Err(HomerError::Input(missing)),
    };
    if config.selection.prior != crate::Prior::None {
        per_token(
            input.prior.map(<[f32]>::len),
            "prior values",
            format!(
                "selection `{}` needs a prior for every context token",
                config.selection
            ),
        )?;
    }
    if config.selection.unit.needs_units() {
        per_token(
            input.units.map(<[u32]>::len),
            "sentence units",
            format!(
                "selection `{}` needs the document's sentence units",
                config.selection
            ),
        )?;
    }
    let total = plan
        .nodes
        .iter()
        .map(|n| (n.len_in * n.layers.len()) as u64)
        .sum();
    let mut run = Run {
        model,
        input,
        plan: &plan,
        config,
        ops,
        cancel,
        progress,
        tracker: Tracker::default(),
        traces: vec![None; plan.nodes.len()],
        done: 0,
        total,
        store,
    };
    let mut root = run.process(plan.nodes.len() - 1)?;
    if config.selection.positions != Positions::Local || config.selection.reread == Reread::All {
        // The final cache numbered 0..n, its keys re-rotated (a full re-read replaces them).
        let to: Vec<usize> = (0..root.meta.len()).collect();
        root = if config.selection.reread == Reread::All {
            root.meta.positions = to;
            root
        } else {
            // Usually numbered already: the root's own gather re-rotated its kept keys.
            run.renumber(root, to)?
        };
    }
    let mut last_position_id = *root.meta.positions.last().expect("the root has rows");
    let mut stats = std::mem::take(&mut run.tracker.stats);
    let traces: Vec<NodeTrace> = run
        .traces
        .into_iter()
        .map(|t| t.expect("every node ran"))
        .collect();

    let n = root.meta.len();
    let d = model.config.hidden_size;
    if root.t.cache.len() != n_layers {
        return Err(HomerError::Bug(format!(
            "the root cached {} of {n_layers} layers",
            root.t.cache.len()
        )));
    }
    let kept: Vec<usize> = root.meta.context_index.iter().flatten().copied().collect();
    let next_after = |last: usize| match config.next_position {
        NextPosition::AfterLast => last + 1,
        NextPosition::ReferenceGenerate => last,
    };
    let mut next_position = next_after(last_position_id);
    let mut final_len = n;
    let s = input.suffix.len();
    let mut reread_order = None;
    let (logits, mut cache) = match config.selection.reread {
        Reread::None => (
            read_f32(model.logits(root.t.hidden.slice([n - 1..n, 0..d])))?,
            KvCache::from_rows(root.t.cache, next_position),
        ),
        Reread::Suffix => {
            // Drop the merged suffix rows and read the suffix again at their positions.
            let keep: Vec<usize> = (0..n - s).collect();
            let g = ops.gather(root.t, &keep)?;
            let at = &root.meta.positions[n - s..];
            let mut cache = KvCache::from_rows(g.cache, at[0]);
            let l = model.forward(
                input.suffix,
                Some(at),
                &mut cache,
                homer_model::Logits::Last,
            )?;
            (read_f32(l)?, cache)
        }
        Reread::All => {
            // prefix + kept context + suffix as one plain prompt at 0..; under
            // order=prior-first/prior-rank the kept units that match the question come first
            // (prior-last: last, right before the suffix),
            // under sep=newline every kept run is a line of its own.
            let order: Vec<usize> = match (config.selection.order, input.prior) {
                (crate::Order::PriorFirst, Some(prior)) => {
                    let (first, rest): (Vec<usize>, Vec<usize>) =
                        kept.iter().partition(|&&i| prior[i] > 0.0);
                    first.into_iter().chain(rest).collect()
                }
                (crate::Order::PriorLast, Some(prior)) => {
                    let (last, rest): (Vec<usize>, Vec<usize>) =
                        kept.iter().partition(|&&i| prior[i] > 0.0);
                    rest.into_iter().chain(last).collect()
                }
                (crate::Order::PriorRank, Some(prior)) => {
                    let (mut first, rest): (Vec<usize>, Vec<usize>) =
                        kept.iter().partition(|&&i| prior[i] > 0.0);
                    // Stable: a unit's tokens share its prior and stay in order.
                    first.sort_by(|&a, &b| prior[b].total_cmp(&prior[a]));
                    first.into_iter().chain(rest).collect()
                }
                _ => kept.clone(),
            };
            let separator: &[u32] = match config.selection.sep {
                crate::Sep::None => &[],
                crate::Sep::Newline => input.separator.ok_or_else(|| {
                    HomerError::Input(
                        "sep=newline needs the model's line-break tokens (HomerInput::separator)"
                            .into(),
                    )
                })?,
            };
            let mut ids: Vec<u32> = input.prefix.to_vec();
            for (k, &i) in order.iter().enumerate() {
                if k > 0 && order[k - 1] + 1 != i {
                    ids.extend_from_slice(separator);
                }
                ids.push(input.context[i]);
            }
            ids.extend_from_slice(input.suffix);
            if order != kept {
                reread_order = Some(order);
            }
            drop(root.t);
            final_len = ids.len();
            last_position_id = ids.len() - 1;
            next_position = next_after(last_position_id);
            let (l, cache) = model.prefill(&ids, homer_model::Logits::Last)?;
            (read_f32(l)?, cache)
        }
    };
    cache.next_position = next_position;
    let scoring = match (&config.scoring, &config.bias) {
        (Scoring::Attention, Some(b)) if !b.is_zero() => "calibrated",
        (Scoring::Attention, _) => "uncalibrated",
        (Scoring::Random { .. }, _) => "random",
        (Scoring::Custom(_), _) => "custom",
    };
    let p = &plan.params;
    let trace = MergeTrace {
        prefix_len: p.prefix_len,
        context_len: p.context_len,
        suffix_len: p.suffix_len,
        chunk_len: p.max_chunk_len,
        warmup_layers: p.warmup_layers,
        n_layers,
        n_chunks: plan.n_chunks,
        height: plan.height,
        last_position_id,
        final_len,
        scoring: scoring.into(),
        ops: ops.name().into(),
        nodes: traces,
        kept,
        reread_order,
    };
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(HomerOutput {
        cache,
        logits,
        last_position_id,
        positions: root.meta.positions,
        plan,
        trace,
        stats,
    })
}

/// splitmix64: a small, well-mixed hash for reproducible random scores.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Run<'_, '_> {
    fn process(&mut self, id: usize) -> Result<Chunk> {
        let node = self.plan.nodes[id].clone();
        let chunk = match node.children {
            None => self.leaf(&node)?,
            Some([l, r]) => {
                let left = self.process(l)?;
                let held = left.live_rows();
                self.tracker.held_rows += held;
                self.tracker.held_chunks += 1;
                let right = self.process(r)?;
                self.tracker.held_rows -= held;
                self.tracker.held_chunks -= 1;
                self.tracker
                    .observe(left.live_rows() + right.live_rows(), 2);
                let (p, s) = (self.plan.params.prefix_len, self.plan.params.suffix_len);
                let (left, right) = if self.config.selection.positions == Positions::Reindex {
                    // Both children re-rotated to the merged numbering [prefix, left context,
                    // right context, suffix] before their affixes are averaged.
                    let (ml, mr) = (left.meta.len() - p - s, right.meta.len() - p - s);
                    let suffix = p + ml + mr..p + ml + mr + s;
                    let lt = (0..p + ml).chain(suffix.clone()).collect();
                    let rt = (0..p).chain(p + ml..p + ml + mr).chain(suffix).collect();
                    (self.renumber(left, lt)?, self.renumber(right, rt)?)
                } else {
                    (left, right)
                };
                let meta = RowMeta::merge(&left.meta, &right.meta, p, s);
                let t = self.ops.merge(left.t, right.t, p, s)?;
                Chunk {
                    t,
                    meta,
                    attended: None,
                }
            }
        };
        self.run_block(chunk, &node)
    }

    /// The chunk with its rows at positions `to`: every cached layer's keys re-rotated.
    fn renumber(&self, chunk: Chunk, to: Vec<usize>) -> Result<Chunk> {
        if chunk.meta.positions == to {
            return Ok(chunk);
        }
        let Chunk {
            t,
            mut meta,
            attended,
        } = chunk;
        let (cos, sin) = self.model.key_shift(&meta.positions, &to);
        let all: Vec<usize> = (0..meta.len()).collect();
        let t = self.ops.gather_rotate(t, &all, &KeyShift { cos, sin })?;
        meta.positions = to;
        Ok(Chunk { t, meta, attended })
    }

    /// Whether `node` is the root of a run whose final cache is renumbered 0..n with its keys
    /// re-rotated (`positions=reindex|root` without a full re-read, which replaces the cache).
    fn renumbers_root(&self, node: &NodePlan) -> bool {
        let s = &self.config.selection;
        node.id + 1 == self.plan.nodes.len()
            && s.positions != Positions::Local
            && s.reread != Reread::All
    }

    fn leaf(&mut self, node: &NodePlan) -> Result<Chunk> {
        let i = node.leaves.start;
        let slice = self.plan.chunks[i].clone();
        let HomerInput {
            prefix,
            context,
            suffix,
            ..
        } = self.input;
        let ids: Vec<u32> = prefix
            .iter()
            .chain(&context[slice.clone()])
            .chain(suffix)
            .copied()
            .collect();
        let context_index = std::iter::repeat_n(None, prefix.len())
            .chain(slice.clone().map(Some))
            .chain(std::iter::repeat_n(None, suffix.len()))
            .collect();
        let meta = RowMeta {
            positions: match self.config.selection.positions {
                Positions::Reindex => (0..ids.len()).collect(),
                _ => self.plan.leaf_positions(i),
            },
            context_index,
        };
        // A stored start covers every layer of the leaf, the last (where it prunes) up to its
        // attention half.
        let layers = node.layers.end;
        let n_doc = prefix.len() + slice.len();
        if self.store.is_none() || n_doc == 0 || node.layers.start != 0 {
            let hidden = self.model.embed(&ids)?;
            return Ok(Chunk {
                t: ChunkTensors {
                    hidden,
                    cache: Vec::new(),
                },
                meta,
                attended: None,
            });
        }
        let stored = self
            .store
            .as_mut()
            .and_then(|s| s.get(&slice, layers))
            .filter(|s| s.rows() == n_doc && s.kv.len() == layers);
        // One set of RoPE tables for the whole leaf, as a leaf run in one pass gets (a dynamic
        // scaling sizes them by the rows they cover), split between the two passes.
        let (cos, sin) = self.model.rope_tables(&meta.positions);
        let hd = cos.dims()[1];
        let rows = |t: &Tensor<2>, r: std::ops::Range<usize>| t.clone().slice([r, 0..hd]);
        let n = meta.len();
        let doc = match stored {
            Some(s) => {
                self.tracker.stats.leaves_reused += 1;
                self.tracker.stats.row_layers_reused += (n_doc * layers) as u64;
                self.done += (n_doc * (layers - 1)) as u64;
                s
            }
            None => {
                let (c, s) = (rows(&cos, 0..n_doc), rows(&sin, 0..n_doc));
                let x = self.model.embed(&ids[..n_doc])?;
                let s = self.run_rows(node, x, &c, &s, None)?.state;
                if let Some(store) = self.store.as_mut() {
                    store.put(&slice, layers, &s);
                }
                self.tracker.stats.leaves_stored += 1;
                s
            }
        };
        // The suffix rows over the document rows' keys and values, layer by layer.
        let (c, s) = (rows(&cos, n_doc..n), rows(&sin, n_doc..n));
        let x = self.model.embed(&ids[n_doc..])?;
        let q = self.run_rows(node, x, &c, &s, Some(&doc.kv))?;
        let cache = doc
            .kv
            .into_iter()
            .zip(q.state.kv)
            .map(|(d, s)| LayerKv {
                k: Tensor::cat(vec![d.k, s.k], 1),
                v: Tensor::cat(vec![d.v, s.v], 1),
            })
            .collect();
        Ok(Chunk {
            t: ChunkTensors {
                hidden: Tensor::cat(vec![doc.hidden, q.state.hidden], 0),
                cache,
            },
            meta,
            attended: Some(Attended {
                q_last: q.q_last,
                suffix_in: q.last_in,
            }),
        })
    }

    /// `x`'s rows of leaf `node` through every layer of the leaf but the last, then the last
    /// one's attention half (no pruning), each layer attending to `past`'s rows of that layer
    /// first when given.
    fn run_rows(
        &mut self,
        node: &NodePlan,
        mut x: Tensor<2>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        past: Option<&[LayerKv]>,
    ) -> Result<RowsRun> {
        let last = node.layers.end - 1;
        let mut kv = Vec::with_capacity(last + 1);
        for l in 0..=last {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(HomerError::Cancelled);
            }
            let layer = &self.model.layers[l];
            let x_in = (l == last).then(|| x.clone());
            let a = layer.attend(x, cos, sin, past.map(|p| &p[l]));
            kv.push(a.kv);
            if let Some(last_in) = x_in {
                return Ok(RowsRun {
                    state: LeafState {
                        hidden: a.hidden,
                        kv,
                    },
                    q_last: a.q_last,
                    last_in,
                });
            }
            x = layer.feed_forward(a.hidden);
            homer_model::backend::layer_done(&x.device());
            let rows = x.dims()[0];
            self.done += rows as u64;
            self.tracker.observe(rows * (kv.len() + 1), 1);
            (self.progress)(&HomerProgress {
                node: node.id,
                nodes: self.plan.nodes.len(),
                leaf: Some(node.leaves.start),
                n_chunks: self.plan.n_chunks,
                height: node.height,
                tree_height: self.plan.height,
                layer: l,
                rows_in: node.len_in,
                rows_out: node.len_in,
                done: self.done,
                total: self.total,
            });
        }
        unreachable!("the loop returns at the leaf's last layer")
    }

    fn score(
        &self,
        q_last: &Tensor<2>,
        keys: &Tensor<3>,
        meta: &RowMeta,
        node: &NodePlan,
        layer: usize,
    ) -> Result<Vec<f32>> {
        let prunable = meta.prunable();
        let mut scores = match &self.config.scoring {
            Scoring::Attention => {
                let bias = self.config.bias.as_ref().map(|b| b.row(layer));
                self.ops.significance(&SignificanceInput {
                    q_last,
                    keys,
                    positions: &meta.positions,
                    prunable: &prunable,
                    bias,
                    last_position: *meta.positions.last().expect("a node has rows"),
                })?
            }
            Scoring::Random { seed } => meta
                .context_index
                .iter()
                .map(|c| {
                    let h = mix(seed ^ mix(node.id as u64 ^ mix(c.unwrap_or(0) as u64)));
                    (h >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect(),
            Scoring::Custom(f) => f(meta),
        };
        if scores.len() != meta.len() {
            return Err(HomerError::Input(format!(
                "scoring returned {} scores for {} rows",
                scores.len(),
                meta.len()
            )));
        }
        for (s, p) in scores.iter_mut().zip(&prunable) {
            if !p {
                *s = f32::INFINITY;
            }
        }
        Ok(scores)
    }

    fn run_block(&mut self, chunk: Chunk, node: &NodePlan) -> Result<Chunk> {
        let Chunk {
            t,
            mut meta,
            mut attended,
        } = chunk;
        let ChunkTensors {
            hidden: mut x,
            mut cache,
        } = t;
        // Whole-unit selections may leave fewer rows than planned, never more.
        let rows_ok = if self.config.selection.unit.whole_units() {
            meta.len() <= node.len_in
        } else {
            meta.len() == node.len_in
        };
        // A leaf from a store arrives with every layer run but its last's feed-forward half.
        let start = cache.len() - usize::from(attended.is_some());
        let start_ok = match &attended {
            Some(_) => node.is_leaf() && start + 1 == node.layers.end,
            None => start == node.layers.start,
        };
        if !rows_ok || !start_ok {
            return Err(HomerError::Bug(format!(
                "node {} has {} rows and {} cached layers, planned {} and {}",
                node.id,
                meta.len(),
                cache.len(),
                node.len_in,
                node.layers.start
            )));
        }
        let (cos, sin) = self.model.rope_tables(&meta.positions);
        let last = node.layers.end - 1;
        let rows_in = meta.len();
        let k_drop = rows_in.saturating_sub(node.len_out);
        let mut trace = NodeTrace {
            id: node.id,
            height: node.height,
            leaves: node.leaves.clone(),
            context: node.context.clone(),
            layers: node.layers.clone(),
            rows_in,
            rows_out: rows_in - k_drop,
            children: node.children,
            prune_layer: None,
            kept: meta.context_index.iter().flatten().copied().collect(),
            kept_scores: vec![],
            dropped: vec![],
            dropped_scores: vec![],
        };
        for l in start..node.layers.end {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(HomerError::Cancelled);
            }
            let layer = &self.model.layers[l];
            let prune_here = l == last && k_drop > 0;
            // The query window's rows, before attention consumes the residual.
            let window = self
                .config
                .selection
                .query
                .rows(self.plan.params.suffix_len);
            let (n, d) = (meta.len(), self.model.config.hidden_size);
            let pre = if l == start { attended.take() } else { None };
            let (q_last, x_window) = match pre {
                // The attention half ran with the stored rows: x is its output already.
                Some(Attended { q_last, suffix_in }) => {
                    let s = suffix_in.dims()[0];
                    let xw = (prune_here && window > 1)
                        .then(|| (suffix_in.slice([s - window..s, 0..d]), n - window..n));
                    (q_last, xw)
                }
                None => {
                    let xw = (prune_here && window > 1)
                        .then(|| (x.clone().slice([n - window..n, 0..d]), n - window..n));
                    let a = layer.attend(x, &cos, &sin, None);
                    cache.push(a.kv);
                    x = a.hidden;
                    (a.q_last, xw)
                }
            };
            if prune_here {
                let q = match x_window {
                    None => q_last,
                    Some((xw, rows)) => {
                        let (wc, ws) = self.model.rope_tables(&meta.positions[rows]);
                        let q = layer.queries(xw, &wc, &ws); // [H, w, hd]
                        let [h, _, hd] = q.dims();
                        q.mean_dim(1).reshape([h, hd])
                    }
                };
                let scores = self.score(&q, &cache[l].k, &meta, node, l)?;
                let prior = match self.config.selection.prior {
                    crate::Prior::None => None,
                    _ => self.input.prior,
                };
                let keep = select_with_prior(
                    self.config.selection.unit,
                    &scores,
                    &meta.context_index,
                    self.input.units,
                    prior,
                    k_drop,
                )?;
                let mut kept_mask = vec![false; meta.len()];
                for &i in &keep {
                    kept_mask[i] = true;
                }
                trace.prune_layer = Some(l);
                trace.kept.clear();
                for (j, c) in meta.context_index.iter().enumerate() {
                    if let Some(c) = *c {
                        if kept_mask[j] {
                            trace.kept.push(c);
                            trace.kept_scores.push(scores[j]);
                        } else {
                            trace.dropped.push(c);
                            trace.dropped_scores.push(scores[j]);
                        }
                    }
                }
                let keep_ok = if self.config.selection.unit.whole_units() {
                    keep.len() <= node.len_out
                } else {
                    keep.len() == node.len_out
                };
                trace.rows_out = keep.len();
                if !keep_ok {
                    return Err(HomerError::Bug(format!(
                        "node {} kept {} rows, planned {}",
                        node.id,
                        keep.len(),
                        node.len_out
                    )));
                }
                // Prefix and suffix rows are never pruned (their +∞ scores; spec §4.3).
                if let Some(j) =
                    (0..meta.len()).find(|&j| meta.context_index[j].is_none() && !kept_mask[j])
                {
                    return Err(HomerError::Bug(format!(
                        "node {} dropped affix row {j} at layer {l}",
                        node.id
                    )));
                }
                let chunk = ChunkTensors { hidden: x, cache };
                let g = if self.renumbers_root(node) {
                    // The root's gather is its last pass over the keys (only the feed-forward
                    // half follows): the final cache's numbering 0..n is turned in on the way.
                    let from: Vec<usize> = keep.iter().map(|&j| meta.positions[j]).collect();
                    let to: Vec<usize> = (0..keep.len()).collect();
                    let (cos, sin) = self.model.key_shift(&from, &to);
                    let g = self
                        .ops
                        .gather_rotate(chunk, &keep, &KeyShift { cos, sin })?;
                    meta = meta.gather(&keep);
                    meta.positions = to;
                    g
                } else {
                    let g = self.ops.gather(chunk, &keep)?;
                    meta = meta.gather(&keep);
                    g
                };
                x = g.hidden;
                cache = g.cache;
            }
            x = layer.feed_forward(x);
            homer_model::backend::layer_done(&x.device());
            // Planned rows: the progress total is the plan's.
            self.done += node.len_in as u64;
            self.tracker.observe(meta.len() * (cache.len() + 1), 1);
            (self.progress)(&HomerProgress {
                node: node.id,
                nodes: self.plan.nodes.len(),
                leaf: node.is_leaf().then_some(node.leaves.start),
                n_chunks: self.plan.n_chunks,
                height: node.height,
                tree_height: self.plan.height,
                layer: l,
                rows_in,
                rows_out: meta.len(),
                done: self.done,
                total: self.total,
            });
        }
        // A forward pass gone non-finite (NaN or ∞ in the residual stream) stops here, naming
        // where, instead of ranking garbage and answering it.
        let total = read_f32(x.clone().sum())?;
        if !total.iter().all(|v| v.is_finite()) {
            return Err(HomerError::NonFinite(format!(
                "the hidden states turned NaN or infinite in node {} (layers {}..{} of the model's {}); \
                 the model file or its weight precision (--dtype) is likely at fault",
                node.id,
                node.layers.start,
                node.layers.end,
                self.model.n_layers()
            )));
        }
        self.traces[node.id] = Some(trace);
        Ok(Chunk {
            t: ChunkTensors { hidden: x, cache },
            meta,
            attended: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_defaults() {
        assert_eq!(default_warmup_layers(32), 12);
        assert_eq!(default_warmup_layers(30), 11);
        assert_eq!(default_warmup_layers(40), 15);
        assert_eq!(default_warmup_layers(22), 8);
        assert_eq!(default_warmup_layers(8), 3);
    }

    #[test]
    fn row_meta_merge_keeps_positions() {
        let l = RowMeta {
            positions: vec![0, 1, 5, 7, 9],
            context_index: vec![None, Some(3), Some(5), None, None],
        };
        let r = RowMeta {
            positions: vec![0, 2, 3, 7, 9],
            context_index: vec![None, Some(12), Some(13), None, None],
        };
        let m = RowMeta::merge(&l, &r, 1, 2);
        assert_eq!(m.positions, vec![0, 1, 5, 2, 3, 7, 9]);
        assert_eq!(
            m.context_index,
            vec![None, Some(3), Some(5), Some(12), Some(13), None, None]
        );
        assert_eq!(m.gather(&[0, 2, 6]).positions, vec![0, 5, 9]);
    }
}
