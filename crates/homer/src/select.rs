//! Selection policies: which rows a node keeps, given its rows' significance (issue 15).
//!
//! The paper ranks every context token on its own ([`Unit::Token`], the default, exactly
//! [`keep_after_dropping`]). A small model cannot read the shredded text that leaves, so the
//! other units keep neighbours together:
//! - [`Unit::Pool`]: SnapKV's pooling — each row's score becomes the max (or mean) of the scores
//!   of the `width` context rows around it (in row order, which is document order) before the
//!   same top-k. The node keeps exactly the planned number of rows.
//! - [`Unit::Span`] (fixed spans of `len` document tokens: ChunkKV, InfLLM's blocks) and
//!   [`Unit::Sentence`] (sentences and lines from the text, see [`sentence_units`]): rows are
//!   grouped by unit; a unit scores the max (or mean) of its rows' scores; units are taken best
//!   first while they fit the node's budget, a unit that does not fit is skipped for a smaller
//!   one, and every unit is kept or dropped whole — so a node may keep fewer rows than planned
//!   (never more). A unit cut by a chunk boundary is two units at the leaves and one again once
//!   both halves meet in a merge.
//!
//! With [`Prior::Lexical`] whole units are ranked by the reciprocal-rank fusion of their attention
//! score and a per-token prior the caller computes (the engine: each unit's BM25 match to the
//! question), so a unit that shares the question's rare words is kept even where a small
//! model's attention does not find it.
//!
//! Ties are broken towards the earlier row (units: the unit starting earlier), so selection is
//! deterministic. Affix rows (score +∞) are always kept.

use serde::{Deserialize, Serialize};

use crate::error::{HomerError, Result};
use crate::prune::keep_after_dropping;

/// How a unit's (or a pooling window's) score is formed from its rows' scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Agg {
    #[default]
    Max,
    Mean,
}

/// What is kept or dropped as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Each token on its own (the paper).
    #[default]
    Token,
    /// Each token, ranked by the pooled score of the `width` context rows centred on it.
    Pool { width: usize, agg: Agg },
    /// Fixed spans of `len` document tokens (token i belongs to span i / len).
    Span { len: usize, agg: Agg },
    /// Sentences and lines of the document ([`sentence_units`]).
    Sentence { agg: Agg },
}

impl Unit {
    /// Whether the policy needs the document's sentence units ([`crate::HomerInput::units`]).
    pub fn needs_units(&self) -> bool {
        matches!(self, Unit::Sentence { .. })
    }

    /// Whether a node may keep fewer rows than planned (whole units that do not fill it).
    pub fn whole_units(&self) -> bool {
        matches!(self, Unit::Span { .. } | Unit::Sentence { .. })
    }
}

impl std::fmt::Display for Agg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Agg::Max => "max",
            Agg::Mean => "mean",
        })
    }
}

impl std::fmt::Display for Unit {
    /// The spelling [`Unit::from_str`] reads: `token`, `pool7`, `pool7-mean`, `span16`,
    /// `span16-mean`, `sentence`, `sentence-mean` (max is the default aggregate).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let agg = |a: &Agg| if *a == Agg::Mean { "-mean" } else { "" };
        match self {
            Unit::Token => write!(f, "token"),
            Unit::Pool { width, agg: a } => write!(f, "pool{width}{}", agg(a)),
            Unit::Span { len, agg: a } => write!(f, "span{len}{}", agg(a)),
            Unit::Sentence { agg: a } => write!(f, "sentence{}", agg(a)),
        }
    }
}

impl std::str::FromStr for Unit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "selection unit `{s}`: expected token, poolK, spanL or sentence (K, L ≥ 1; add \
                 -mean for a mean instead of a max), e.g. pool7, span16, sentence-mean"
            )
        };
        let (head, agg) = match s.strip_suffix("-mean") {
            Some(h) => (h, Agg::Mean),
            None => (s.strip_suffix("-max").unwrap_or(s), Agg::Max),
        };
        let num = |rest: &str| -> std::result::Result<usize, String> {
            rest.parse::<usize>()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(bad)
        };
        if head == "token" && agg == Agg::Max && !s.ends_with("-max") {
            Ok(Unit::Token)
        } else if head == "sentence" {
            Ok(Unit::Sentence { agg })
        } else if let Some(r) = head.strip_prefix("pool") {
            Ok(Unit::Pool {
                width: num(r)?,
                agg,
            })
        } else if let Some(r) = head.strip_prefix("span") {
            Ok(Unit::Span { len: num(r)?, agg })
        } else {
            Err(bad())
        }
    }
}

/// Which of a node's rows query its keys for the significance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    /// The last row (the paper).
    #[default]
    Last,
    /// The mean of the last `n` rows' post-RoPE queries (at most the suffix). By linearity the
    /// score is, per head, the mean over those rows of q·k/√d, then the max over heads; the
    /// bias is subtracted by distance from the last row, as for the paper's score.
    Window(usize),
    /// The mean over every suffix row (the whole question and the template around it).
    Suffix,
}

impl Query {
    /// How many of a node's last rows query, given `suffix_len` suffix rows.
    pub fn rows(&self, suffix_len: usize) -> usize {
        match self {
            Query::Last => 1,
            Query::Window(n) => (*n).clamp(1, suffix_len.max(1)),
            Query::Suffix => suffix_len.max(1),
        }
    }
}

impl std::fmt::Display for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Query::Last => write!(f, "last"),
            Query::Window(n) => write!(f, "last{n}"),
            Query::Suffix => write!(f, "suffix"),
        }
    }
}

impl std::str::FromStr for Query {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "last" => Ok(Query::Last),
            "suffix" | "question" => Ok(Query::Suffix),
            _ => s
                .strip_prefix("last")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n >= 1)
                .map(|n| {
                    if n == 1 {
                        Query::Last
                    } else {
                        Query::Window(n)
                    }
                })
                .ok_or_else(|| format!("query `{s}`: expected last, lastN (N ≥ 1 rows) or suffix")),
        }
    }
}

/// Which position ids the kept rows carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Each chunk's local ids, never renumbered (the paper): merged chunks share ids.
    #[default]
    Local,
    /// Rows numbered by their place in the node, at the leaves and at every merge (each child's
    /// cached keys re-rotated to the merged numbering before the affixes are averaged), and in
    /// the final cache.
    Reindex,
    /// Local ids while merging; the final cache renumbered 0..n (its keys re-rotated).
    Root,
}

impl std::fmt::Display for Positions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Positions::Local => "local",
            Positions::Reindex => "reindex",
            Positions::Root => "root",
        })
    }
}

impl std::str::FromStr for Positions {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "local" => Ok(Positions::Local),
            "reindex" => Ok(Positions::Reindex),
            "root" => Ok(Positions::Root),
            _ => Err(format!("positions `{s}`: expected local, reindex or root")),
        }
    }
}

/// What is read again after merging, on top of (or instead of) the root's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reread {
    /// Nothing: the root's rows are the cache, its suffix rows the average of its children's
    /// copies at every merge (the paper).
    #[default]
    None,
    /// The suffix: its merged rows dropped and the suffix tokens run through every layer over the
    /// kept context at the same positions, so the question attends to the kept document at
    /// every layer. Costs S rows of a forward pass.
    Suffix,
    /// Everything kept: prefix + kept context tokens (document order) + suffix read as one plain
    /// prompt at positions 0..n (≤ the chunk length, inside the window) — merging only chooses
    /// what to keep. Costs a plain prefill of the final cache's length.
    All,
}

impl std::fmt::Display for Reread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reread::None => "none",
            Reread::Suffix => "suffix",
            Reread::All => "all",
        })
    }
}

impl std::str::FromStr for Reread {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Reread::None),
            "suffix" => Ok(Reread::Suffix),
            "all" => Ok(Reread::All),
            _ => Err(format!("reread `{s}`: expected none, suffix or all")),
        }
    }
}

/// A second opinion on the units besides attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prior {
    /// Attention significance alone (the paper).
    #[default]
    None,
    /// Lexical relevance of each unit to the question ([`crate::HomerInput::prior`], BM25 in the
    /// engine), fused with the attention ranking by reciprocal ranks: a unit scores
    /// `1/(K + rank by attention) + 1/(K + rank by prior)` (K = [`RRF_K`]; units without any
    /// lexical match get the attention term only). Whole units (spans, sentences) only.
    Lexical,
}

/// The constant of reciprocal-rank fusion (Cormack et al., SIGIR 2009: 60).
pub const RRF_K: f64 = 60.0;

impl std::fmt::Display for Prior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Prior::None => "none",
            Prior::Lexical => "lexical",
        })
    }
}

impl std::str::FromStr for Prior {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Prior::None),
            "lexical" => Ok(Prior::Lexical),
            _ => Err(format!("prior `{s}`: expected none or lexical")),
        }
    }
}

/// The order the kept context is read again in under [`Reread::All`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Document order.
    #[default]
    Document,
    /// The units that match the question ([`crate::HomerInput::prior`] > 0) first, each group
    /// in document order: what the question asks about sits right after the prefix.
    PriorFirst,
    /// The units that match the question first, the best match first (ties in document
    /// order), then the rest in document order.
    PriorRank,
    /// The units that do not match the question first, then those that do, each group in
    /// document order: what the question asks about sits right before the question.
    PriorLast,
}

impl std::fmt::Display for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Order::Document => "document",
            Order::PriorFirst => "prior-first",
            Order::PriorRank => "prior-rank",
            Order::PriorLast => "prior-last",
        })
    }
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "document" => Ok(Order::Document),
            "prior-first" => Ok(Order::PriorFirst),
            "prior-rank" => Ok(Order::PriorRank),
            "prior-last" => Ok(Order::PriorLast),
            _ => Err(format!(
                "order `{s}`: expected document, prior-first, prior-rank or prior-last"
            )),
        }
    }
}

/// A node's whole selection policy (issue 15). The default is the paper's; `--selection`
/// spells it as comma-separated knobs (`paper`, or e.g. `sentence`, `unit=pool7,query=suffix`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Selection {
    pub unit: Unit,
    pub query: Query,
    pub positions: Positions,
    pub reread: Reread,
    pub prior: Prior,
    pub order: Order,
    pub sep: Sep,
}

/// What the re-read ([`Reread::All`]) puts between kept runs that are not next to each other in
/// the document (or that the order moved apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sep {
    /// Nothing: the runs are read back to back.
    #[default]
    None,
    /// A line break ([`crate::HomerInput::separator`]): every kept run reads as its own line.
    Newline,
}

impl std::fmt::Display for Sep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sep::None => "none",
            Sep::Newline => "newline",
        })
    }
}

impl std::str::FromStr for Sep {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Sep::None),
            "newline" => Ok(Sep::Newline),
            _ => Err(format!("sep `{s}`: expected none or newline")),
        }
    }
}

impl Selection {
    pub fn is_paper(&self) -> bool {
        *self == Selection::default()
    }
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_paper() {
            f.write_str("paper")
        } else {
            // The knobs that differ from the paper's.
            let d = Selection::default();
            let mut knobs = vec![];
            if self.unit != d.unit {
                knobs.push(format!("unit={}", self.unit));
            }
            if self.query != d.query {
                knobs.push(format!("query={}", self.query));
            }
            if self.positions != d.positions {
                knobs.push(format!("positions={}", self.positions));
            }
            if self.reread != d.reread {
                knobs.push(format!("reread={}", self.reread));
            }
            if self.prior != d.prior {
                knobs.push(format!("prior={}", self.prior));
            }
            if self.order != d.order {
                knobs.push(format!("order={}", self.order));
            }
            if self.sep != d.sep {
                knobs.push(format!("sep={}", self.sep));
            }
            f.write_str(&knobs.join(","))
        }
    }
}

impl std::str::FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut sel = Selection::default();
        for knob in s.split(',').map(str::trim) {
            match knob.split_once('=') {
                None if knob == "paper" => sel = Selection::default(),
                Some(("unit", v)) => sel.unit = v.parse()?,
                Some(("query", v)) => sel.query = v.parse()?,
                Some(("positions", v)) => sel.positions = v.parse()?,
                Some(("reread", v)) => sel.reread = v.parse()?,
                Some(("prior", v)) => sel.prior = v.parse()?,
                Some(("order", v)) => sel.order = v.parse()?,
                Some(("sep", v)) => sel.sep = v.parse()?,
                // A bare unit is the unit knob.
                None => {
                    sel.unit = knob.parse().map_err(|e| {
                        format!("--selection `{s}`: {e}; or `paper` for the paper's selection")
                    })?
                }
                Some((k, _)) => {
                    return Err(format!(
                        "--selection `{s}`: unknown knob `{k}` (known: unit, query, positions, reread, prior, order, sep); or `paper`"
                    ));
                }
            }
        }
        if sel.prior != Prior::None && !sel.unit.whole_units() {
            return Err(format!(
                "--selection `{s}`: prior={} ranks whole units; add unit=sentence or unit=spanL",
                sel.prior
            ));
        }
        if sel.order != Order::Document && (sel.prior == Prior::None || sel.reread != Reread::All) {
            return Err(format!(
                "--selection `{s}`: order={} reorders the re-read by the prior; add \
                 prior=lexical and reread=all",
                sel.order
            ));
        }
        if sel.sep != Sep::None && sel.reread != Reread::All {
            return Err(format!(
                "--selection `{s}`: sep={} separates the kept runs of the re-read; add reread=all",
                sel.sep
            ));
        }
        Ok(sel)
    }
}

fn aggregate(agg: Agg, xs: impl Iterator<Item = f32>) -> f32 {
    let (mut best, mut sum, mut n) = (f32::NEG_INFINITY, 0f64, 0usize);
    for x in xs {
        // A NaN score counts as the least significant (it must not lift its neighbours).
        let x = if x.is_nan() { f32::NEG_INFINITY } else { x };
        best = best.max(x);
        sum += x as f64;
        n += 1;
    }
    match agg {
        Agg::Max => best,
        Agg::Mean if n == 0 => f32::NEG_INFINITY,
        Agg::Mean => (sum / n as f64) as f32,
    }
}

/// Rows (ascending) a node keeps under `unit`.
///
/// `scores[j]`: row j's significance (+∞ for affix rows); `doc_index[j]`: the context token of
/// row j, None for affix rows; `units`: the sentence unit of every context token (needed for
/// [`Unit::Sentence`]); `drop`: how many rows the plan drops. Token and pooled units drop exactly
/// `drop` rows; spans and sentences drop at least `drop` (whole units only).
pub fn select(
    unit: Unit,
    scores: &[f32],
    doc_index: &[Option<usize>],
    units: Option<&[u32]>,
    drop: usize,
) -> Result<Vec<usize>> {
    select_with_prior(unit, scores, doc_index, units, None, drop)
}

/// [`select`] with a per-context-token prior ([`Prior::Lexical`]): whole units are ranked by the
/// reciprocal-rank fusion of their attention score and their prior (a unit's prior is the max
/// over its tokens; 0 = no lexical match, attention term only). Token and pooled units ignore
/// the prior.
pub fn select_with_prior(
    unit: Unit,
    scores: &[f32],
    doc_index: &[Option<usize>],
    units: Option<&[u32]>,
    prior: Option<&[f32]>,
    drop: usize,
) -> Result<Vec<usize>> {
    let n = scores.len();
    if let Some(p) = prior {
        if let Some(&bad) = doc_index.iter().flatten().find(|&&i| i >= p.len()) {
            return Err(HomerError::Input(format!(
                "selection: context token {bad} has no prior ({} given)",
                p.len()
            )));
        }
    }
    if doc_index.len() != n {
        return Err(HomerError::Input(format!(
            "selection: {n} scores for {} rows",
            doc_index.len()
        )));
    }
    if drop == 0 {
        return Ok((0..n).collect());
    }
    match unit {
        Unit::Token => Ok(keep_after_dropping(scores, drop)),
        Unit::Pool { width, agg } => {
            let ctx: Vec<usize> = (0..n).filter(|&j| doc_index[j].is_some()).collect();
            let half_lo = (width.max(1) - 1) / 2;
            let half_hi = width.max(1) - 1 - half_lo;
            let mut pooled = scores.to_vec();
            for (c, &j) in ctx.iter().enumerate() {
                let lo = c.saturating_sub(half_lo);
                let hi = (c + half_hi + 1).min(ctx.len());
                pooled[j] = aggregate(agg, ctx[lo..hi].iter().map(|&r| scores[r]));
            }
            Ok(keep_after_dropping(&pooled, drop))
        }
        Unit::Span { len, agg } => {
            let len = len.max(1);
            whole_units(scores, doc_index, |i| (i / len) as u64, agg, prior, drop)
        }
        Unit::Sentence { agg } => {
            let units = units.ok_or_else(|| {
                HomerError::Input(
                    "sentence selection needs the document's sentence units (HomerInput::units)"
                        .into(),
                )
            })?;
            if let Some(&bad) = doc_index.iter().flatten().find(|&&i| i >= units.len()) {
                return Err(HomerError::Input(format!(
                    "selection: context token {bad} has no sentence unit ({} given)",
                    units.len()
                )));
            }
            whole_units(scores, doc_index, |i| units[i] as u64, agg, prior, drop)
        }
    }
}

/// Keep the best whole units that fit `context rows − drop` rows.
fn whole_units(
    scores: &[f32],
    doc_index: &[Option<usize>],
    unit_of: impl Fn(usize) -> u64,
    agg: Agg,
    prior: Option<&[f32]>,
    drop: usize,
) -> Result<Vec<usize>> {
    // Runs of consecutive context rows with the same unit (a unit's rows are adjacent: rows
    // stay in document order).
    let mut runs: Vec<(u64, Vec<usize>)> = vec![];
    for (j, d) in doc_index.iter().enumerate() {
        let Some(i) = *d else { continue };
        let u = unit_of(i);
        match runs.last_mut() {
            Some((lu, rows)) if *lu == u && *rows.last().unwrap() + 1 == j => rows.push(j),
            _ => runs.push((u, vec![j])),
        }
    }
    let n_ctx: usize = runs.iter().map(|r| r.1.len()).sum();
    let mut budget = n_ctx.saturating_sub(drop);
    let score: Vec<f32> = runs
        .iter()
        .map(|(_, rows)| aggregate(agg, rows.iter().map(|&j| scores[j])))
        .collect();
    let by_score = |score: &[f32]| {
        let mut order: Vec<usize> = (0..score.len()).collect();
        order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        order
    };
    let mut order = by_score(&score);
    if let Some(p) = prior {
        // NaN priors count as no match.
        let lex: Vec<f32> = runs
            .iter()
            .map(|(_, rows)| {
                rows.iter()
                    .map(|&j| p[doc_index[j].unwrap()])
                    .filter(|v| v.is_finite())
                    .fold(0f32, f32::max)
            })
            .collect();
        let mut fused = vec![0f64; runs.len()];
        for (rank, &u) in order.iter().enumerate() {
            fused[u] += 1.0 / (RRF_K + rank as f64);
        }
        for (rank, &u) in by_score(&lex).iter().enumerate() {
            if lex[u] > 0.0 {
                fused[u] += 1.0 / (RRF_K + rank as f64);
            }
        }
        order.sort_by(|&a, &b| fused[b].total_cmp(&fused[a]).then(a.cmp(&b)));
    }
    let mut keep = vec![false; scores.len()];
    for (j, d) in doc_index.iter().enumerate() {
        keep[j] = d.is_none();
    }
    for u in order {
        let rows = &runs[u].1;
        if rows.len() <= budget {
            budget -= rows.len();
            for &j in rows {
                keep[j] = true;
            }
        }
        if budget == 0 {
            break;
        }
    }
    Ok((0..scores.len()).filter(|&j| keep[j]).collect())
}

/// Sentence units of a document from its tokens' text: a new unit starts after a token holding
/// a line break, and after a token ending a sentence (`.`, `?`, `!`, optionally followed by
/// closing quotes or brackets) unless the next token is only whitespace (which stays with the
/// sentence it ends). Units longer than `max_len` tokens are split. Returns each token's unit id
/// (ascending from 0).
pub fn sentence_units(token_texts: &[String], max_len: usize) -> Vec<u32> {
    let max_len = max_len.max(1);
    let mut out = Vec::with_capacity(token_texts.len());
    let (mut id, mut len) = (0u32, 0usize);
    for (j, t) in token_texts.iter().enumerate() {
        if j > 0 {
            let prev = &token_texts[j - 1];
            let ends_sentence = prev
                .trim_end()
                .trim_end_matches(['"', '\'', ')', ']', '\u{201d}', '\u{2019}'])
                .ends_with(['.', '?', '!']);
            let only_space = t.trim().is_empty() && !t.is_empty();
            let brk = prev.contains('\n') || (ends_sentence && !only_space) || len >= max_len;
            if brk {
                id += 1;
                len = 0;
            }
        }
        out.push(id);
        len += 1;
    }
    out
}

/// The token runs of a unit labelling (as [`sentence_units`] gives): one range for each maximal
/// run of equal consecutive ids, in order, covering `0..unit_of.len()`. Ids that ascend along the
/// context (as [`sentence_units`]' do) give one run a unit.
pub fn unit_runs(unit_of: &[u32]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = vec![];
    for (i, &u) in unit_of.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if unit_of[r.start] == u => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: f32 = f32::INFINITY;

    fn ctx(p: usize, c: std::ops::Range<usize>, s: usize) -> Vec<Option<usize>> {
        std::iter::repeat_n(None, p)
            .chain(c.map(Some))
            .chain(std::iter::repeat_n(None, s))
            .collect()
    }

    #[test]
    fn unit_runs_split_where_the_id_changes() {
        assert_eq!(unit_runs(&[]), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(unit_runs(&[7]), vec![0..1]);
        assert_eq!(
            unit_runs(&[0, 0, 1, 2, 2, 2, 3]),
            vec![0..2, 2..3, 3..6, 6..7]
        );
        // A repeated id after a different one starts a new run.
        assert_eq!(unit_runs(&[4, 4, 5, 4]), vec![0..2, 2..3, 3..4]);
        // Runs of sentence_units' labels: one per sentence and newline-ended line.
        let toks: Vec<String> = ["A", " cat", ".", " It", " ran", "!\n", "Next"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            unit_runs(&sentence_units(&toks, 64)),
            vec![0..3, 3..6, 6..7]
        );
    }

    #[test]
    fn token_is_the_paper() {
        let s = [INF, 1.5, 2.0, 2.5, 2.0, INF];
        let d = ctx(1, 0..4, 1);
        assert_eq!(
            select(Unit::Token, &s, &d, None, 2).unwrap(),
            vec![0, 3, 4, 5]
        );
        assert_eq!(
            select(Unit::Token, &s, &d, None, 2).unwrap(),
            keep_after_dropping(&s, 2)
        );
    }

    #[test]
    fn pooling_keeps_neighbours_of_a_peak() {
        // One peak at context row 4 (row 5); max-pool 3 lifts rows 4 and 6 with it.
        let mut s = vec![INF];
        s.extend([0.1, 0.3, 0.2, 0.0, 9.0, 0.05, 0.4, 0.2]);
        s.push(INF);
        let d = ctx(1, 10..18, 1);
        let keep = select(
            Unit::Pool {
                width: 3,
                agg: Agg::Max,
            },
            &s,
            &d,
            None,
            5,
        )
        .unwrap();
        assert_eq!(keep, vec![0, 4, 5, 6, 9]);
        // Token selection keeps the two best single rows instead.
        assert_eq!(
            select(Unit::Token, &s, &d, None, 5).unwrap(),
            vec![0, 2, 5, 7, 9]
        );
        // Exactly `drop` rows go; width 1 is the paper's selection.
        let w1 = Unit::Pool {
            width: 1,
            agg: Agg::Mean,
        };
        assert_eq!(
            select(w1, &s, &d, None, 5).unwrap(),
            keep_after_dropping(&s, 5)
        );
        // Mean of 3: row 6 (9, 0.05, 0.4) beats row 4 (0.2, 0, 9). The pool does not reach
        // across the affixes, or row 1 would score +∞ and be kept.
        let mean = Unit::Pool {
            width: 3,
            agg: Agg::Mean,
        };
        let k = select(mean, &s, &d, None, 7).unwrap();
        assert_eq!(k, vec![0, 6, 9]);
    }

    #[test]
    fn spans_are_whole_and_may_underfill() {
        // Context tokens 0..10 in spans of 4: {0..4}, {4..8}, {8,9}. Budget 10 − 5 = 5 rows.
        let s = [INF, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5, INF];
        let d = ctx(1, 0..10, 1);
        let sp = Unit::Span {
            len: 4,
            agg: Agg::Max,
        };
        // Span {4..8} (max 1.0) fits (4 rows), span {8,9} (0.5) does not fit the 1 left, span
        // {0..4} neither: 4 context rows kept, one fewer than planned.
        assert_eq!(
            select(sp, &s, &d, None, 5).unwrap(),
            vec![0, 5, 6, 7, 8, 11]
        );
        // Budget 6: {4..8} and then {8,9} fit exactly.
        assert_eq!(
            select(sp, &s, &d, None, 4).unwrap(),
            vec![0, 5, 6, 7, 8, 9, 10, 11]
        );
        // Mean: {8,9} (0.5) beats {4..8} (0.25).
        let mean = Unit::Span {
            len: 4,
            agg: Agg::Mean,
        };
        assert_eq!(
            select(mean, &s, &d, None, 4).unwrap(),
            vec![0, 5, 6, 7, 8, 9, 10, 11]
        );
        assert_eq!(select(mean, &s, &d, None, 7).unwrap(), vec![0, 9, 10, 11]);
        // A kept set of a pruned node: rows are context tokens 2, 3, 8, 9 — span {0..4} is the
        // run of tokens 2, 3 only.
        let d2 = vec![None, Some(2), Some(3), Some(8), Some(9), None];
        let s2 = [INF, 0.2, 0.1, 0.3, 0.0, INF];
        assert_eq!(select(sp, &s2, &d2, None, 2).unwrap(), vec![0, 3, 4, 5]);
    }

    #[test]
    fn sentences_use_the_given_units_and_nan_is_least() {
        let units = [0u32, 0, 0, 1, 1, 2, 2, 2, 2];
        let d = ctx(1, 0..9, 0);
        let s = [INF, 0.0, 0.0, f32::NAN, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let u = Unit::Sentence { agg: Agg::Max };
        assert_eq!(select(u, &s, &d, Some(&units), 7).unwrap(), vec![0, 4, 5]);
        assert!(select(u, &s, &d, None, 7).is_err());
        assert!(select(u, &s, &d, Some(&units[..5]), 7).is_err());
        // A NaN row does not carry its unit: {0..3} with NaN and zeros stays below {3,4}.
        let s = [
            INF,
            f32::NAN,
            f32::NAN,
            f32::NAN,
            0.5,
            0.5,
            0.0,
            0.0,
            0.0,
            0.0,
        ];
        assert_eq!(select(u, &s, &d, Some(&units), 7).unwrap(), vec![0, 4, 5]);
    }

    #[test]
    fn a_lexical_prior_fuses_ranks() {
        // Four sentences of two rows after one prefix row; attention ranks them 0 > 1 > 2 > 3.
        let units = [0u32, 0, 1, 1, 2, 2, 3, 3];
        let d = ctx(1, 0..8, 0);
        let s = [INF, 4.0, 0.0, 3.0, 0.0, 2.0, 0.0, 1.0, 0.0];
        let u = Unit::Sentence { agg: Agg::Max };
        let keep = |prior: Option<&[f32]>, drop| {
            select_with_prior(u, &s, &d, Some(&units), prior, drop).unwrap()
        };
        // No prior, or one that matches nothing: attention alone.
        assert_eq!(keep(None, 6), vec![0, 1, 2]);
        assert_eq!(keep(Some(&[0.0; 8]), 6), vec![0, 1, 2]);
        // Sentence 3 alone matches the question: 1/(K+3) + 1/K beats 1/K.
        let p = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0];
        assert_eq!(keep(Some(&p), 6), vec![0, 7, 8]);
        // Two matches: the better-matching one first, then the other matches, then attention.
        let p = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 5.0, 5.0];
        assert_eq!(keep(Some(&p), 4), vec![0, 5, 6, 7, 8]);
        // A NaN prior is no match; a short prior is an error.
        let p = [f32::NAN; 8];
        assert_eq!(keep(Some(&p), 6), vec![0, 1, 2]);
        assert!(select_with_prior(u, &s, &d, Some(&units), Some(&[1.0; 3]), 6).is_err());
        // Token units ignore it; the knob needs whole units.
        assert_eq!(
            select_with_prior(Unit::Token, &s, &d, None, Some(&[9.0; 8]), 6).unwrap(),
            vec![0, 1, 3]
        );
        assert!("prior=lexical".parse::<Selection>().is_err());
        let sel: Selection = "sentence,prior=lexical".parse().unwrap();
        assert_eq!(sel.prior, Prior::Lexical);
        assert_eq!(sel.to_string(), "unit=sentence,prior=lexical");
        assert_eq!(sel.to_string().parse::<Selection>().unwrap(), sel);
        // order=prior-first reorders a re-read by the prior: it needs both.
        assert!(
            "sentence,prior=lexical,order=prior-first"
                .parse::<Selection>()
                .is_err()
        );
        assert!(
            "sentence,reread=all,order=prior-first"
                .parse::<Selection>()
                .is_err()
        );
        let pf: Selection = "sentence,reread=all,prior=lexical,order=prior-first"
            .parse()
            .unwrap();
        assert_eq!(pf.order, Order::PriorFirst);
        assert_eq!(pf.to_string().parse::<Selection>().unwrap(), pf);
        assert!("sentence,order=score".parse::<Selection>().is_err());
        let pr: Selection = "sentence,reread=all,prior=lexical,order=prior-rank,sep=newline"
            .parse()
            .unwrap();
        assert_eq!((pr.order, pr.sep), (Order::PriorRank, Sep::Newline));
        assert_eq!(
            pr.to_string(),
            "unit=sentence,reread=all,prior=lexical,order=prior-rank,sep=newline"
        );
        assert_eq!(pr.to_string().parse::<Selection>().unwrap(), pr);
        let pl: Selection = "sentence,reread=all,prior=lexical,order=prior-last"
            .parse()
            .unwrap();
        assert_eq!(pl.order, Order::PriorLast);
        assert_eq!(pl.to_string().parse::<Selection>().unwrap(), pl);
        // The separator separates the runs of a re-read: it needs one.
        assert!("sentence,sep=newline".parse::<Selection>().is_err());
        assert!("sentence,reread=all,sep=tab".parse::<Selection>().is_err());
    }

    #[test]
    fn sentence_boundaries() {
        let t = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // "The grass is green. The sky is blue.\n\nJohn11:35 Jesus wept."
        let toks = t(&[
            "The", " grass", " is", " green", ".", " The", " sky", " is", " blue", ".", "\n\n",
            "John", "1", "1", ":", "3", "5", " Jesus", " wept", ".",
        ]);
        assert_eq!(
            sentence_units(&toks, 64),
            vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]
        );
        // Quotes close the sentence; the cap splits long units.
        let toks = t(&["He", " said", ".\"", " Then", " a", " b", " c"]);
        assert_eq!(sentence_units(&toks, 2), vec![0, 0, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn selection_spelling() {
        assert!("paper".parse::<Selection>().unwrap().is_paper());
        assert_eq!(Selection::default().to_string(), "paper");
        let s: Selection = "sentence".parse().unwrap();
        assert_eq!(s.unit, Unit::Sentence { agg: Agg::Max });
        assert_eq!(s.query, Query::Last);
        assert_eq!(s.to_string(), "unit=sentence");
        assert_eq!(s.to_string().parse::<Selection>().unwrap(), s);
        let q: Selection = "pool7,query=suffix".parse().unwrap();
        assert_eq!(q.query, Query::Suffix);
        assert_eq!(q.to_string(), "unit=pool7,query=suffix");
        let r: Selection = "positions=reindex,span16".parse().unwrap();
        assert_eq!(r.positions, Positions::Reindex);
        assert_eq!(r.to_string(), "unit=span16,positions=reindex");
        assert_eq!(r.to_string().parse::<Selection>().unwrap(), r);
        assert!("positions=global".parse::<Selection>().is_err());
        let f: Selection = "sentence,reread=suffix".parse().unwrap();
        assert_eq!(f.reread, Reread::Suffix);
        assert_eq!(
            "reread=all".parse::<Selection>().unwrap().reread,
            Reread::All
        );
        assert!("reread=twice".parse::<Selection>().is_err());
        assert_eq!(f.to_string(), "unit=sentence,reread=suffix");
        assert_eq!(f.to_string().parse::<Selection>().unwrap(), f);
        assert_eq!(q.to_string().parse::<Selection>().unwrap(), q);
        assert_eq!(
            "query=last8".parse::<Selection>().unwrap().query,
            Query::Window(8)
        );
        assert_eq!(
            "query=last1".parse::<Selection>().unwrap().query,
            Query::Last
        );
        assert!("query=last0".parse::<Selection>().is_err());
        assert_eq!(Query::Window(8).rows(5), 5);
        assert_eq!(Query::Suffix.rows(5), 5);
        assert_eq!(Query::Last.rows(5), 1);
        assert!("unit=bogus".parse::<Selection>().is_err());
        assert!("speed=fast".parse::<Selection>().is_err());
    }

    #[test]
    fn unit_spelling_round_trips() {
        for s in [
            "token",
            "pool7",
            "pool5-mean",
            "span16",
            "span8-mean",
            "sentence",
            "sentence-mean",
        ] {
            let u: Unit = s.parse().unwrap();
            assert_eq!(u.to_string(), s);
        }
        assert_eq!("span16-max".parse::<Unit>().unwrap().to_string(), "span16");
        for bad in ["pool0", "span", "sentences", "token-mean", "pool-3", ""] {
            assert!(bad.parse::<Unit>().is_err(), "{bad}");
        }
    }
}
