//! The record of one HOMER prefill: for every node of the merge tree, which context tokens it
//! held, which it kept and dropped, and their scores. The desktop app's tree and kept-token views
//! and the evaluation read it. Token indices are indices into the context token list.

use std::ops::Range;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeTrace {
    /// Post-order id (children before parents; the root last).
    pub id: usize,
    pub height: usize,
    /// Leaf (chunk) indices under the node.
    pub leaves: Range<usize>,
    /// Context token span under the node.
    pub context: Range<usize>,
    /// Decoder layers the node ran.
    pub layers: Range<usize>,
    pub rows_in: usize,
    pub rows_out: usize,
    pub children: Option<[usize; 2]>,
    /// The layer whose attention scored the rows; None when the node kept everything.
    pub prune_layer: Option<usize>,
    /// Context tokens the node kept, in row order.
    pub kept: Vec<usize>,
    /// Their significance (same order as `kept`); empty when the node did not score.
    pub kept_scores: Vec<f32>,
    /// Context tokens the node dropped, ascending.
    pub dropped: Vec<usize>,
    /// Their significance (same order as `dropped`).
    pub dropped_scores: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeTrace {
    pub prefix_len: usize,
    pub context_len: usize,
    pub suffix_len: usize,
    pub chunk_len: usize,
    pub warmup_layers: usize,
    pub n_layers: usize,
    pub n_chunks: usize,
    pub height: usize,
    pub last_position_id: usize,
    /// Rows of the final cache (every layer).
    pub final_len: usize,
    /// How rows were scored ("calibrated", "uncalibrated", "random", "custom") and by which ops.
    pub scoring: String,
    pub ops: String,
    /// Nodes in post-order; the root is last.
    pub nodes: Vec<NodeTrace>,
    /// Context tokens in the final cache, in the tree's order (left-to-right chunk order), which
    /// is the cache's order unless `reread_order` says otherwise.
    pub kept: Vec<usize>,
    /// The kept context tokens in the order the final re-read put them in the cache, when that
    /// is not `kept`'s (`order=prior-first`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reread_order: Option<Vec<usize>>,
}

impl MergeTrace {
    /// Whether context token `i` survived to the final cache, for every token.
    pub fn kept_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.context_len];
        for &i in &self.kept {
            m[i] = true;
        }
        m
    }

    /// The latest score each context token received (the highest node that scored it), or None.
    pub fn last_scores(&self) -> Vec<Option<f32>> {
        let mut s = vec![None; self.context_len];
        for n in &self.nodes {
            for (&i, &v) in n.kept.iter().zip(&n.kept_scores) {
                s[i] = Some(v);
            }
            for (&i, &v) in n.dropped.iter().zip(&n.dropped_scores) {
                s[i] = Some(v);
            }
        }
        s
    }
}
