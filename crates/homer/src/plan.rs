//! The plan of one HOMER prefill, as a pure function of the sizes (spec §2.2, §3, §4.4): how
//! many chunks, the tree height, every leaf's context slice, the layer block of every level, the
//! target length of every node (with the short-right-chunk rule), and the final cache length and
//! last position id. Nothing here touches a tensor.

use std::ops::Range;

use serde::Serialize;

use crate::error::{HomerError, Result};

/// The sizes a plan is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlanParams {
    /// P: tokens of the shared prefix (instruction), copied into every chunk.
    pub prefix_len: usize,
    /// S: tokens of the shared suffix (question), copied into every chunk. Must be ≥ 1.
    pub suffix_len: usize,
    /// L: tokens of the context (the document).
    pub context_len: usize,
    /// C: the longest leaf (affixes included) and the bound a merged node is cut back to.
    pub max_chunk_len: usize,
    /// The root's budget (the reference's `target_len`, by default C).
    pub target_len: usize,
    /// Decoder layers of the model.
    pub n_layers: usize,
    /// W: bottom layers every leaf runs on its own before any merging level.
    pub warmup_layers: usize,
    /// Optional smaller leaves (the reference's `max_initial_chunk_len`; None = C).
    pub max_initial_chunk_len: Option<usize>,
}

/// One node of the merge tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodePlan {
    /// Index in [`Plan::nodes`] (post-order: children before parents, the root last).
    pub id: usize,
    /// 0 for leaves, `Plan::height` for the root.
    pub height: usize,
    /// The leaves (chunk indices) under this node.
    pub leaves: Range<usize>,
    /// The span of context token indices under this node.
    pub context: Range<usize>,
    /// The decoder layers this node runs (empty never happens in a valid plan).
    pub layers: Range<usize>,
    /// The length this node is cut to at its last layer (no cut when `len_in <= target`).
    pub target: usize,
    /// Rows entering the node (a leaf: P + c + S; a merge: the children's outputs, affixes once).
    pub len_in: usize,
    /// Rows leaving it: min(len_in, target).
    pub len_out: usize,
    /// Left and right child ids for internal nodes.
    pub children: Option<[usize; 2]>,
}

impl NodePlan {
    /// Rows this node drops at its last layer.
    pub fn drop_count(&self) -> usize {
        self.len_in - self.len_out
    }
    pub fn is_leaf(&self) -> bool {
        self.children.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub params: PlanParams,
    /// C − (P + S): context tokens that fit in one chunk.
    pub eff_max: usize,
    /// n: number of chunks, always a power of two.
    pub n_chunks: usize,
    /// h = log2(n).
    pub height: usize,
    /// e = ceil(L / n): context tokens per chunk (the last may hold fewer, or none).
    pub chunk_context_len: usize,
    /// Layers per merging level: floor((N − W) / (h + 1)).
    pub per_level: usize,
    /// (N − W) − per_level · (h + 1), given to the leaves.
    pub leftover: usize,
    /// P + floor(eff_max / 2) + S: a non-root node's budget.
    pub default_len: usize,
    /// min(target_len, P + L + S): the root's budget.
    pub final_target: usize,
    /// Context slice of every leaf, in order.
    pub chunks: Vec<Range<usize>>,
    /// Every node, post-order (the order the depth-first driver runs them); the root is last.
    pub nodes: Vec<NodePlan>,
    /// Rows of the final cache (the same at every layer).
    pub final_len: usize,
    /// Position id of the last suffix token; decoding continues at `last_position_id + 1`.
    pub last_position_id: usize,
}

fn bad(what: String) -> HomerError {
    HomerError::Plan(what)
}

impl Plan {
    pub fn new(p: PlanParams) -> Result<Plan> {
        let (pl, sl, l, c) = (p.prefix_len, p.suffix_len, p.context_len, p.max_chunk_len);
        if sl == 0 {
            return Err(bad(
                "the suffix is empty: HOMER scores the context with the query of the last suffix \
                 token, so the suffix (the question) needs at least one token (spec §2.1)"
                    .into(),
            ));
        }
        if c <= pl + sl {
            return Err(bad(format!(
                "chunk length {c} leaves no room for context next to the prefix ({pl} tokens) and \
                 suffix ({sl} tokens); raise the chunk length or shorten the prompt around the document"
            )));
        }
        if p.target_len < pl + sl {
            return Err(bad(format!(
                "target length {} is shorter than prefix + suffix ({}); the affixes are never \
                 pruned, so raise the target length",
                p.target_len,
                pl + sl
            )));
        }
        if p.n_layers == 0 {
            return Err(bad("the model has no layers".into()));
        }
        if p.warmup_layers >= p.n_layers {
            return Err(bad(format!(
                "{} warm-up layers leave none of the model's {} layers for merging; use fewer",
                p.warmup_layers, p.n_layers
            )));
        }
        let eff_max = c - (pl + sl);
        let leaf_room = match p.max_initial_chunk_len {
            Some(mi) => {
                if mi <= pl + sl || mi > c {
                    return Err(bad(format!(
                        "initial chunk length {mi} must lie in ({}, {c}] (above prefix + suffix, \
                         at most the chunk length)",
                        pl + sl
                    )));
                }
                mi - (pl + sl)
            }
            None => eff_max,
        };
        // L = 0 is a plain prefill of prefix ++ suffix (the reference crashes on log2(0)).
        let n_needed = l.div_ceil(leaf_room).max(1);
        let height = n_needed.next_power_of_two().trailing_zeros() as usize;
        let n = 1usize << height;
        let e = l.div_ceil(n);
        let merging = p.n_layers - p.warmup_layers;
        if height + 1 > merging {
            return Err(bad(format!(
                "{l} context tokens need a tree of height {height} ({n} chunks), which needs {} \
                 merging levels, but only {merging} layers remain after {} warm-up layers; raise \
                 the chunk length or lower the warm-up layers",
                height + 1,
                p.warmup_layers
            )));
        }
        let per = merging / (height + 1);
        let leftover = merging - per * (height + 1);
        let default_len = pl + eff_max / 2 + sl;
        let final_target = p.target_len.min(pl + l + sl);
        let chunks: Vec<Range<usize>> = (0..n)
            .map(|i| (i * e).min(l)..((i + 1) * e).min(l))
            .collect();
        let mut plan = Plan {
            params: p,
            eff_max,
            n_chunks: n,
            height,
            chunk_context_len: e,
            per_level: per,
            leftover,
            default_len,
            final_target,
            chunks,
            nodes: Vec::with_capacity(2 * n - 1),
            final_len: 0,
            last_position_id: if n > 1 {
                pl + e + sl - 1
            } else {
                pl + l + sl - 1
            },
        };
        let root = plan.build(0..n, height, final_target);
        plan.final_len = plan.nodes[root].len_out;
        Ok(plan)
    }

    /// Layers run by a node at `height`.
    pub fn layers_at(&self, height: usize) -> Range<usize> {
        let w = self.params.warmup_layers + self.leftover;
        if height == 0 {
            0..w + self.per_level
        } else {
            w + self.per_level * height..w + self.per_level * (height + 1)
        }
    }

    /// Raw length of leaf `i`: P + c_i + S.
    pub fn leaf_len(&self, i: usize) -> usize {
        self.params.prefix_len + self.chunks[i].len() + self.params.suffix_len
    }

    /// Position ids of leaf `i` (spec §2.3): prefix 0..P, context P..P+c_i, suffix from P + e
    /// (from P + c_0 with one chunk), identical ranges in every chunk.
    pub fn leaf_positions(&self, i: usize) -> Vec<usize> {
        let (pl, sl) = (self.params.prefix_len, self.params.suffix_len);
        let c = self.chunks[i].len();
        let suffix_start = if self.n_chunks > 1 {
            pl + self.chunk_context_len
        } else {
            pl + c
        };
        (0..pl + c).chain(suffix_start..suffix_start + sl).collect()
    }

    pub fn root(&self) -> &NodePlan {
        self.nodes.last().expect("a plan has at least one node")
    }

    /// Post-order construction with top-down targets (spec §4.4). Returns the node id.
    fn build(&mut self, leaves: Range<usize>, height: usize, target: usize) -> usize {
        let (pl, sl) = (self.params.prefix_len, self.params.suffix_len);
        let context = self.chunks[leaves.start].start..self.chunks[leaves.end - 1].end;
        let layers = self.layers_at(height);
        let (len_in, children) = if height == 0 {
            (self.leaf_len(leaves.start), None)
        } else {
            let mid = leaves.start + leaves.len() / 2;
            // The short-right-chunk rule looks at the first leaf of the right subtree.
            let right_raw = self.leaf_len(mid);
            let (lt, rt) = if right_raw < self.default_len {
                (self.params.max_chunk_len - (right_raw - pl - sl), right_raw)
            } else {
                (self.default_len, self.default_len)
            };
            let left = self.build(leaves.start..mid, height - 1, lt);
            let right = self.build(mid..leaves.end, height - 1, rt);
            let len = self.nodes[left].len_out + self.nodes[right].len_out - pl - sl;
            (len, Some([left, right]))
        };
        let id = self.nodes.len();
        self.nodes.push(NodePlan {
            id,
            height,
            leaves,
            context,
            layers,
            target,
            len_in,
            len_out: len_in.min(target),
            children,
        });
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(p: usize, s: usize, l: usize, c: usize, n_layers: usize, w: usize) -> PlanParams {
        PlanParams {
            prefix_len: p,
            suffix_len: s,
            context_len: l,
            max_chunk_len: c,
            target_len: c,
            n_layers,
            warmup_layers: w,
            max_initial_chunk_len: None,
        }
    }

    fn at_height(plan: &Plan, h: usize) -> Vec<&NodePlan> {
        plan.nodes.iter().filter(|n| n.height == h).collect()
    }

    #[test]
    fn t1_eight_chunks() {
        let plan = Plan::new(params(2, 2, 128, 20, 8, 2)).unwrap();
        assert_eq!(plan.eff_max, 16);
        assert_eq!(
            (plan.n_chunks, plan.height, plan.chunk_context_len),
            (8, 3, 16)
        );
        assert_eq!((plan.per_level, plan.leftover), (1, 2));
        assert_eq!((plan.default_len, plan.final_target), (12, 20));
        assert_eq!(plan.layers_at(0), 0..5);
        assert_eq!(plan.layers_at(1), 5..6);
        assert_eq!(plan.layers_at(2), 6..7);
        assert_eq!(plan.layers_at(3), 7..8);
        for leaf in at_height(&plan, 0) {
            assert_eq!((leaf.len_in, leaf.target, leaf.len_out), (20, 12, 12));
        }
        for h in 1..=2 {
            for n in at_height(&plan, h) {
                assert_eq!((n.len_in, n.len_out), (20, 12), "height {h}");
            }
        }
        let root = plan.root();
        assert_eq!((root.len_in, root.target, root.len_out), (20, 20, 20));
        assert_eq!(root.drop_count(), 0);
        assert_eq!(plan.final_len, 20);
        assert_eq!(plan.last_position_id, 19);
        let mut pos: Vec<usize> = (0..2).collect();
        pos.extend(2..18);
        pos.extend([18, 19]);
        assert_eq!(plan.leaf_positions(5), pos);
        assert_eq!(plan.chunks[3], 48..64);
        // Post-order: 15 nodes, the root last, children before parents.
        assert_eq!(plan.nodes.len(), 15);
        for n in &plan.nodes {
            if let Some([l, r]) = n.children {
                assert!(l < n.id && r < n.id && l < r);
            }
        }
    }

    #[test]
    fn t2_seven_needed_becomes_eight() {
        let plan = Plan::new(params(2, 2, 100, 20, 8, 2)).unwrap();
        assert_eq!(
            (plan.n_chunks, plan.height, plan.chunk_context_len),
            (8, 3, 13)
        );
        let leaves = at_height(&plan, 0);
        for leaf in &leaves[..7] {
            assert_eq!((leaf.len_in, leaf.len_out), (17, 12));
            assert_eq!(leaf.drop_count(), 5);
        }
        assert_eq!(plan.chunks[7], 91..100);
        assert_eq!((leaves[7].len_in, leaves[7].len_out), (13, 12));
        assert_eq!(
            plan.leaf_positions(7),
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16]
        );
        for h in 1..=2 {
            for n in at_height(&plan, h) {
                assert_eq!((n.len_in, n.len_out), (20, 12));
            }
        }
        assert_eq!((plan.root().len_in, plan.root().len_out), (20, 20));
        assert_eq!(plan.last_position_id, 16);
    }

    #[test]
    fn t3_short_right_chunk() {
        let plan = Plan::new(params(2, 2, 98, 20, 8, 2)).unwrap();
        assert_eq!(plan.chunk_context_len, 13);
        let leaves = at_height(&plan, 0);
        assert_eq!(plan.chunks[7].len(), 7);
        assert_eq!(
            (leaves[7].len_in, leaves[7].target, leaves[7].len_out),
            (11, 11, 11)
        );
        assert_eq!(
            (leaves[6].len_in, leaves[6].target, leaves[6].len_out),
            (17, 13, 13)
        );
        let parent = plan
            .nodes
            .iter()
            .find(|n| n.height == 1 && n.leaves == (6..8))
            .unwrap();
        assert_eq!((parent.len_in, parent.target, parent.len_out), (20, 12, 12));
        assert_eq!(plan.last_position_id, 16);
        assert_eq!(plan.final_len, 20);
    }

    #[test]
    fn t4_fits_one_chunk() {
        let plan = Plan::new(params(2, 2, 10, 20, 8, 2)).unwrap();
        assert_eq!((plan.n_chunks, plan.height, plan.per_level), (1, 0, 6));
        assert_eq!(plan.layers_at(0), 0..8);
        assert_eq!(plan.nodes.len(), 1);
        assert_eq!((plan.root().len_in, plan.root().len_out), (14, 14));
        assert_eq!(plan.leaf_positions(0), (0..14).collect::<Vec<_>>());
        assert_eq!(plan.last_position_id, 13);
    }

    #[test]
    fn t5_llama2_7b_sizes() {
        let plan = Plan::new(params(50, 10, 8112, 2048, 32, 12)).unwrap();
        assert_eq!((plan.eff_max, plan.default_len), (1988, 1054));
        assert_eq!((plan.n_chunks, plan.chunk_context_len), (8, 1014));
        assert_eq!(plan.layers_at(0), 0..17);
        assert_eq!(plan.layers_at(1), 17..22);
        assert_eq!(plan.layers_at(3), 27..32);
        for n in &plan.nodes {
            match n.height {
                0 => assert_eq!((n.len_in, n.len_out), (1074, 1054)),
                3 => assert_eq!((n.len_in, n.len_out), (2048, 2048)),
                _ => assert_eq!((n.len_in, n.len_out), (2048, 1054)),
            }
        }
        assert_eq!(plan.final_len, 2048);
        assert_eq!(plan.last_position_id, 1073);

        let plan = Plan::new(params(50, 10, 32688, 2048, 32, 12)).unwrap();
        assert_eq!((plan.n_chunks, plan.chunk_context_len), (32, 1022));
        assert_eq!(plan.layers_at(0), 0..17);
        let blocks: Vec<_> = (1..=5).map(|h| plan.layers_at(h)).collect();
        assert_eq!(blocks, vec![17..20, 20..23, 23..26, 26..29, 29..32]);
        let leaves = at_height(&plan, 0);
        assert_eq!(leaves[0].drop_count(), 28);
        assert_eq!(plan.chunks[31].len(), 1006);
        assert_eq!(leaves[31].drop_count(), 12);
        assert_eq!(plan.last_position_id, 1081);

        let plan = Plan::new(params(50, 10, 65456, 2048, 32, 12)).unwrap();
        assert_eq!((plan.n_chunks, plan.chunk_context_len), (64, 1023));
        assert_eq!((plan.per_level, plan.leftover), (2, 6));
        assert_eq!(plan.layers_at(0), 0..20);
        let blocks: Vec<_> = (1..=6).map(|h| plan.layers_at(h)).collect();
        assert_eq!(blocks, vec![20..22, 22..24, 24..26, 26..28, 28..30, 30..32]);
        assert_eq!(plan.last_position_id, 1082);
    }

    #[test]
    fn section3_schedule_table() {
        // (context, n, h, per, leftover, leaf layers end) for Llama-2-7B, P + S = 60.
        for (l, n, h, per, left, leaf_end) in [
            (1988, 1, 0, 20, 0, 32),
            (4000, 4, 2, 6, 2, 20),
            (8000, 8, 3, 5, 0, 17),
            (16000, 16, 4, 4, 0, 16),
            (32000, 32, 5, 3, 2, 17),
            (64000, 64, 6, 2, 6, 20),
        ] {
            let plan = Plan::new(params(50, 10, l, 2048, 32, 12)).unwrap();
            assert_eq!(
                (plan.n_chunks, plan.height, plan.per_level, plan.leftover),
                (n, h, per, left),
                "L = {l}"
            );
            assert_eq!(plan.layers_at(0).end, leaf_end);
            assert_eq!(plan.layers_at(h).end, 32, "the root ends at the top layer");
        }
    }

    #[test]
    fn target_below_chunk_only_root_prunes_more() {
        let mut p = params(2, 2, 128, 20, 8, 2);
        p.target_len = 10;
        let plan = Plan::new(p).unwrap();
        assert_eq!(plan.final_target, 10);
        assert_eq!((plan.root().len_in, plan.root().len_out), (20, 10));
        assert_eq!(plan.final_len, 10);
        for n in &plan.nodes[..plan.nodes.len() - 1] {
            assert_eq!(n.len_out, 12);
        }
    }

    #[test]
    fn empty_context_is_a_plain_prefill() {
        let plan = Plan::new(params(3, 2, 0, 20, 8, 2)).unwrap();
        assert_eq!((plan.n_chunks, plan.height), (1, 0));
        assert_eq!(plan.root().len_in, 5);
        assert_eq!(plan.last_position_id, 4);
        assert_eq!(plan.leaf_positions(0), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn empty_trailing_chunk_is_harmless() {
        // C = 8, P = S = 2, L = 9: 4 chunks of 3, 3, 3, 0 (spec §12).
        let plan = Plan::new(params(2, 2, 9, 8, 8, 2)).unwrap();
        assert_eq!(plan.n_chunks, 4);
        let lens: Vec<usize> = plan.chunks.iter().map(|c| c.len()).collect();
        assert_eq!(lens, vec![3, 3, 3, 0]);
        assert_eq!(plan.leaf_len(3), 4);
        assert_eq!(plan.leaf_positions(3), vec![0, 1, 5, 6]);
        // Degenerate split where ceil(L/n) leaves several chunks empty: no negative slices.
        let plan = Plan::new(params(1, 1, 5, 3, 20, 2)).unwrap();
        assert_eq!(plan.n_chunks, 8);
        let lens: Vec<usize> = plan.chunks.iter().map(|c| c.len()).collect();
        assert_eq!(lens, vec![1, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(plan.root().len_out, plan.final_len);
    }

    #[test]
    fn prefix_may_be_empty() {
        let plan = Plan::new(params(0, 1, 40, 11, 8, 2)).unwrap();
        assert_eq!(plan.n_chunks, 4);
        assert_eq!(plan.leaf_positions(0), (0..11).collect::<Vec<_>>());
    }

    #[test]
    fn rejected_configurations_say_why() {
        let err = |p: PlanParams| Plan::new(p).unwrap_err().to_string();
        assert!(err(params(2, 0, 10, 20, 8, 2)).contains("suffix is empty"));
        assert!(err(params(10, 10, 10, 20, 8, 2)).contains("no room for context"));
        let mut p = params(2, 2, 100, 20, 8, 2);
        p.target_len = 3;
        assert!(err(p).contains("target length 3"));
        assert!(err(params(2, 2, 100, 20, 8, 8)).contains("warm-up"));
        // h + 1 > N − W: 128 chunks need 8 levels, 4 layers remain.
        let e = err(params(1, 1, 128 * 10, 12, 8, 4));
        assert!(e.contains("height 7") && e.contains("only 4 layers"), "{e}");
        let mut p = params(2, 2, 100, 20, 8, 2);
        p.max_initial_chunk_len = Some(4);
        assert!(err(p).contains("initial chunk length 4"));
    }

    #[test]
    fn max_initial_chunk_len_changes_only_the_count() {
        let mut p = params(2, 2, 64, 20, 8, 2);
        assert_eq!(Plan::new(p).unwrap().n_chunks, 4);
        p.max_initial_chunk_len = Some(12);
        let plan = Plan::new(p).unwrap();
        assert_eq!((plan.n_chunks, plan.chunk_context_len), (8, 8));
        // Targets still come from C: default_len = 2 + 8 + 2.
        assert_eq!(plan.default_len, 12);
    }
}
