//! homer: HOMER — Hierarchical cOntext MERging (Song et al., ICLR 2024) — over the Llama model of
//! `homer-model`, backend-generic (it never names a backend). The spec it follows section by
//! section is `homer-spec.md`.
//!
//! - [`plan`]: the pure plan (chunks, tree height, layer blocks, per-node targets).
//! - [`tree`]: the depth-first driver: run, score, prune, propagate, merge.
//! - [`ops`]: the backend operations behind a trait ([`ops::TensorOps`] is the oracle).
//! - [`prune`]: keep-mask selection with a deterministic tie rule.
//! - [`select`]: selection policies beyond the paper's per-token top-k (pooled scores, spans,
//!   sentences).
//! - [`bias`], [`calibrate`]: the position-bias calibration tables.
//! - [`trace`]: the [`trace::MergeTrace`] the app and the evaluation read.
//!
//! Choices where the reference code has a bug (spec §11), each deliberate:
//! - Attention inside a node is causal (the reference's non-flash paths attend bidirectionally).
//! - Significance uses raw pre-softmax logits, each query head against its own KV group, max
//!   over heads (the reference breaks on GQA).
//! - No bias table means zeros (the reference crashes).
//! - Decoding continues at `last_position_id + 1` ([`tree::NextPosition::ReferenceGenerate`]
//!   reproduces the reference's `generate` off-by-one on request).
//! - An empty context is a plain prefill of prefix ++ suffix (the reference crashes on log2(0));
//!   an empty suffix, a tree with more levels than merging layers, and targets below the affixes
//!   are rejected with an error.

pub mod bias;
pub mod calibrate;
pub mod error;
pub mod ops;
pub mod plan;
pub mod prune;
pub mod select;
pub mod trace;
pub mod tree;

pub use bias::BiasTable;
pub use error::{HomerError, Result};
pub use ops::{
    ChunkTensors, HomerOps, KeyShift, OpTime, OpTimes, SignificanceInput, TensorOps, TimedOps,
};
pub use plan::{NodePlan, Plan, PlanParams};
pub use select::{Agg, Order, Positions, Prior, Query, Reread, Selection, Sep, Unit};
pub use trace::{MergeTrace, NodeTrace};
pub use tree::{
    HomerConfig, HomerInput, HomerOutput, HomerProgress, HomerStats, LeafState, LeafStore,
    NextPosition, RowMeta, Scoring, default_warmup_layers, homer_prefill, homer_prefill_with_store,
};
