//! The evaluation of homer (issue 6): passkey retrieval, long-document perplexity, document QA,
//! cost (time and peak memory) and HOMER's ablations, each against the baselines of spec §8-§10,
//! written as JSON-lines records, markdown tables and PNG plots under one results directory.
//!
//! Every task appends one record per finished cell to `<out>/<task>.jsonl`, keyed by everything
//! that determines its result; a rerun skips the keys it already has. A long evaluation can so
//! be stopped and resumed (and split over sessions), and `report` rebuilds every table and plot
//! from the records alone.

pub mod alloc;
pub mod cost;
pub mod passkey;
pub mod perplexity;
pub mod plot;
pub mod qa;
pub mod replay;
pub mod report;
pub mod stats;
pub mod store;
pub mod text;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use homer_engine::passkey::Method;
use homer_engine::{BiasChoice, DocPrompt, Engine, GenerateParams};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Engine(#[from] homer_engine::EngineError),
    #[error(transparent)]
    Model(#[from] homer_model::ModelError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Setting(String),
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, EvalError>;

/// What every task shares: where results go, the window the baselines are held to, and HOMER's
/// settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The results directory (records, tables, plots, results.md).
    pub out_dir: PathBuf,
    /// The window the baselines are held to (truncation and retrieval budgets, the RoPE factor
    /// that stretches it over a prompt, HOMER's default chunk length): the model's native
    /// window unless a smaller one is asked for (smoke tests, short-window studies).
    pub window: usize,
    /// HOMER's C; None = half the window (× s with a RoPE scaling, spec §8).
    pub chunk_len: Option<usize>,
    pub warmup_layers: Option<usize>,
    pub bias: BiasChoice,
    /// RoPE scaling factor; None = the smallest whole factor whose window holds the prompt.
    pub rope_factor: Option<f64>,
    pub seed: u64,
    /// Print one line per finished cell to stderr.
    pub verbose: bool,
    /// Cells not to run, recorded as skipped with `skip_reason` (the table lists them).
    pub skip: Vec<Skip>,
    pub skip_reason: String,
    /// HOMER methods of one prompt share the leaves they compute alike (the same chunks and
    /// warm-up layers under the same RoPE: the paper's selection and the default, say) through
    /// the engine's document cache: the same kept tokens and logits to float rounding (the
    /// cache's tests), most of a prompt's second HOMER prefill skipped. Such a record's prefill
    /// time is not the method's own cost: `leaves_reused` counts the leaves it took.
    pub reuse_leaves: bool,
}

/// A method of a task: one of the model's (plain, truncation, RoPE scalings, HOMER, HOMER +
/// scaling) or `bm25`: BM25 retrieval of passages, the best packed into the window in document
/// order and read by the plain model (the retrieval baseline reviewers asked the paper for).
#[derive(Debug, Clone, PartialEq)]
pub enum EvalMethod {
    Model(Method),
    Bm25,
}

impl EvalMethod {
    pub fn uses_homer(&self) -> bool {
        matches!(self, EvalMethod::Model(m) if m.uses_homer())
    }

    /// The model's methods of a list (BM25 left out).
    pub fn models<'a>(list: &'a [EvalMethod]) -> impl Iterator<Item = &'a Method> + 'a {
        list.iter().filter_map(|m| match m {
            EvalMethod::Model(m) => Some(m),
            EvalMethod::Bm25 => None,
        })
    }
}

impl std::str::FromStr for EvalMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "bm25" {
            Ok(EvalMethod::Bm25)
        } else {
            s.parse::<Method>()
                .map(EvalMethod::Model)
                .map_err(|e| format!("{e}, or bm25"))
        }
    }
}

impl std::fmt::Display for EvalMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EvalMethod::Model(m) => m.fmt(f),
            EvalMethod::Bm25 => f.write_str("bm25"),
        }
    }
}

/// The retrieval baseline's choice: the passages (`texts`, each the context tokens `spans`)
/// ranked by BM25 (the `bm25` crate, English stemming and stop words) against `query`, the best
/// packed into `budget` tokens; passages that share no word with the query (BM25 returns only
/// matches) fill what room is left from the end of the document backwards. The chosen indices,
/// in document order.
pub fn bm25_pack(
    spans: &[std::ops::Range<usize>],
    texts: Vec<String>,
    query: &str,
    budget: usize,
) -> Vec<usize> {
    let engine =
        bm25::SearchEngineBuilder::<u32>::with_corpus(bm25::Language::English, texts).build();
    let mut order: Vec<usize> = engine
        .search(query, spans.len())
        .into_iter()
        .map(|r| r.document.id as usize)
        .collect();
    let ranked: std::collections::HashSet<usize> = order.iter().copied().collect();
    order.extend((0..spans.len()).rev().filter(|k| !ranked.contains(k)));
    let mut chosen = vec![];
    let mut used = 0;
    for k in order {
        if used + spans[k].len() <= budget {
            used += spans[k].len();
            chosen.push(k);
        }
    }
    chosen.sort();
    chosen
}

/// A method at a length that a run leaves out (`--skip METHOD@LENGTH`), e.g. full attention over
/// 32K tokens on a 2-core CPU. A skipped cell is recorded once with the reason; a later run
/// without the skip measures it (the skip record does not count as done).
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    /// The method as records spell it ([`EvalMethod`]'s display).
    pub method: String,
    pub length: usize,
}

impl std::str::FromStr for Skip {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (m, l) = s
            .rsplit_once('@')
            .ok_or_else(|| format!("--skip `{s}`: write METHOD@LENGTH, e.g. plain@32768"))?;
        let method = m
            .parse::<EvalMethod>()
            .map_err(|e| format!("--skip `{s}`: {e}"))?
            .to_string();
        let length = l
            .parse()
            .map_err(|_| format!("--skip `{s}`: `{l}` is not a length in tokens"))?;
        Ok(Skip { method, length })
    }
}

impl Settings {
    /// Whether `method` at `len` is skipped; if so, record `cell` (its key and coordinates) as
    /// skipped, once, and return true.
    pub fn skipped(
        &self,
        store: &mut store::Store,
        method: &str,
        len: usize,
        mut cell: serde_json::Value,
    ) -> Result<bool> {
        if !self
            .skip
            .iter()
            .any(|k| k.method == method && k.length == len)
        {
            return Ok(false);
        }
        let key = cell["key"].as_str().unwrap_or_default().to_string();
        if !store.has_skip(&key) {
            self.log(format!("{method} at {len}: skipped: {}", self.skip_reason));
            cell["skipped"] = serde_json::json!(self.skip_reason);
            store.append(cell)?;
        }
        Ok(true)
    }

    pub fn log(&self, line: impl AsRef<str>) {
        if self.verbose {
            eprintln!("{}", line.as_ref());
        }
    }

    /// The part of every record key that the settings decide: window, C, W, bias, RoPE factor.
    pub fn key_tail(&self) -> String {
        format!(
            "w{}|c{:?}|W{:?}|{}|s{:?}",
            self.window,
            self.chunk_len,
            self.warmup_layers,
            passkey::bias_name(&self.bias),
            self.rope_factor
        )
    }
}

/// Record a refused cell (`cell`: its key and coordinates) when `e` is a refusal, so the
/// evaluation goes on; any other error is returned.
pub fn refuse(
    store: &mut store::Store,
    s: &Settings,
    e: EvalError,
    mut cell: serde_json::Value,
) -> Result<()> {
    let Some(msg) = refusal(&e) else {
        return Err(e);
    };
    s.log(format!(
        "{} {} at {}: refused: {msg}",
        store
            .path()
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        passkey::label(&cell),
        cell["length"]
    ));
    cell["refused"] = serde_json::json!(msg);
    store.append(cell)
}

/// How HOMER itself is varied (the ablations of spec §10); the default is the paper's HOMER.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HomerVariant {
    /// Replace the settings' bias choice.
    pub bias: Option<BiasChoice>,
    /// Random pruning instead of calibrated significance.
    pub random_scores: bool,
    pub warmup_layers: Option<usize>,
    pub chunk_len: Option<usize>,
}

/// One run of a method on a prompt, with greedy decoding.
#[derive(Debug, Clone)]
pub struct Run {
    pub text: String,
    pub prefill_secs: f64,
    pub secs: f64,
    /// Tokens the model actually read (after truncation or retrieval).
    pub prompt_tokens: usize,
    /// Context token indices HOMER kept at the root (None: HOMER did not run).
    pub kept: Option<Vec<usize>>,
    pub chunks: Option<usize>,
    pub cache_len: usize,
    /// Leaves a HOMER prefill took from the document cache ([`Settings::reuse_leaves`]).
    pub leaves_reused: Option<usize>,
}

/// Whether a record's HOMER prefill took leaves another method computed for the same prompt
/// ([`Settings::reuse_leaves`]): its prefill time is not its method's own. (A record that took
/// another method's whole run, [`same_run`], keeps that run's time: the same computation.)
pub fn took_leaves(r: &serde_json::Value) -> bool {
    r["leaves_reused"].as_u64().unwrap_or(0) > 0
}

/// The prompt tokens truncation keeps: the window less room for the answer (a prompt of at most
/// this many tokens is not cut).
pub fn truncation_budget(s: &Settings, max_tokens: usize) -> usize {
    s.window.saturating_sub(max_tokens)
}

/// What `method` (with `v`) computes on a `total`-token prompt, as a key: two methods with the
/// same key run the same prefill and decode on that prompt, so the second may take the first's
/// run. Full attention under the native RoPE is one run whatever the method's name (PI, NTK and
/// YaRN at factor 1 are the native RoPE, `RopeScaling::is_native`; truncation that cuts nothing
/// is plain), and so is HOMER under the native RoPE with the same chunk, variant and selection
/// (HOMER + YaRN at factor 1 is HOMER). Every other method is its own key.
pub fn same_run(
    method: &Method,
    total: usize,
    max_tokens: usize,
    s: &Settings,
    v: &HomerVariant,
) -> Result<String> {
    let scaling = method
        .rope_scaling(total, s.window, s.rope_factor)
        .map_err(EvalError::Setting)?;
    let rope = if scaling.is_native() {
        "native".to_string()
    } else {
        format!("{scaling:?}")
    };
    Ok(match method {
        Method::Truncation if total > truncation_budget(s, max_tokens) => "truncation".into(),
        Method::Plain | Method::Truncation | Method::Rope(_) => format!("full|{rope}"),
        Method::Homer | Method::HomerWith { .. } | Method::HomerRope(_) => {
            let (selection, budget) = match method {
                Method::HomerWith { selection, budget } => (*selection, *budget),
                _ => (homer::Selection::default(), None),
            };
            format!(
                "homer|{rope}|c{}|{v:?}|{selection:?}|{budget:?}",
                chunk_len_for(method, total, s, v)
            )
        }
    })
}

/// [`same_run`]'s key for BM25 reading `packed`, its retrieval from `whole`, with the plain model:
/// where it packed every passage in document order, `packed` is the plain prompt and the run is
/// plain's; otherwise its own.
pub fn bm25_run(
    packed: &DocPrompt,
    whole: &DocPrompt,
    max_tokens: usize,
    s: &Settings,
) -> Result<String> {
    if packed.concatenated() == whole.concatenated() {
        same_run(
            &Method::Plain,
            whole.total_len(),
            max_tokens,
            s,
            &HomerVariant::default(),
        )
    } else {
        Ok("bm25".into())
    }
}

/// The runs of one prompt by what they computed (`same_run`), with the label of the method that
/// ran each.
pub type Runs = BTreeMap<String, (String, Run)>;

/// The run of `identity` if a method of this prompt already computed it (with that method's
/// label), else `run`'s, kept under `label` for the methods after it.
pub fn once(
    runs: &mut Runs,
    identity: String,
    label: &str,
    run: impl FnOnce() -> Result<Run>,
) -> Result<(Run, Option<String>)> {
    if let Some((by, r)) = runs.get(&identity) {
        return Ok((r.clone(), Some(by.clone())));
    }
    let r = run()?;
    runs.insert(identity, (label.to_string(), r.clone()));
    Ok((r, None))
}

/// The median of a table cell's own prefill times, "–" where every record shared leaves.
pub fn prefill_cell(secs: &mut [f64]) -> String {
    if secs.is_empty() {
        "–".into()
    } else {
        format!("{:.1}", stats::median(secs))
    }
}

/// A line under a table whose records include shared leaves, saying their times are left out.
pub fn shared_leaves_note(records: &[serde_json::Value]) -> String {
    let mut out = String::new();
    let n = records.iter().filter(|r| took_leaves(r)).count();
    if n > 0 {
        out += &format!(
            "\nPrefill times leave out the {n} records whose HOMER leaves came from another \
             method's run on the same prompt (`--reuse-leaves`: the same result, not the \
             method's own cost).\n"
        );
    }
    let same = records
        .iter()
        .filter(|r| r["same_run_as"].is_string())
        .count();
    if same > 0 {
        out += &format!(
            "\n{same} records are another method's run of the same prompt, which computes the \
             same (a RoPE scaling at factor 1 is the native RoPE; truncation that cuts nothing is \
             the plain prompt; HOMER + a scaling at factor 1 is HOMER): its answer and time, run \
             once (`same_run_as` in the records).\n"
        );
    }
    // The hosts the timed records ran on, in the order they first appear.
    let mut hosts: Vec<Option<&str>> = vec![];
    for r in records.iter().filter(|r| r["secs"].is_number()) {
        let h = r["machine"].as_str();
        if !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    if hosts.len() > 1 {
        let mut named: Vec<String> = hosts.iter().flatten().map(|h| format!("`{h}`")).collect();
        if hosts.contains(&None) {
            named.push("hosts the records do not name (written before records carried it)".into());
        }
        out += &format!(
            "\nThe prefill medians pool records measured on more than one host ({}): they show \
             where the time goes, not one machine's speed; the cost section times each host \
             apart.\n",
            and_list(&named)
        );
    }
    out
}

/// Before the methods of a new prompt run, and after a task's last: leaves shared by a
/// prompt's methods are of no further use ([`Settings::reuse_leaves`]).
pub fn forget_leaves(engine: &Engine, s: &Settings) {
    if s.reuse_leaves {
        engine.doc_cache_lock().clear();
    }
}

/// The RoPE scaling `method` runs a `total`-token prompt with, for the settings' window.
pub fn set_rope(engine: &mut Engine, method: &Method, total: usize, s: &Settings) -> Result<()> {
    let scaling = method
        .rope_scaling(total, s.window, s.rope_factor)
        .map_err(EvalError::Setting)?;
    engine.model.set_rope_scaling(scaling)?;
    Ok(())
}

/// HOMER's chunk length for `method`: the variant's, else the settings', else half the window
/// (half the scaled window for HOMER + RoPE scaling, spec §8).
pub fn chunk_len_for(method: &Method, total: usize, s: &Settings, v: &HomerVariant) -> usize {
    v.chunk_len.or(s.chunk_len).unwrap_or_else(|| {
        let factor = match method {
            Method::HomerRope(_) => s
                .rope_factor
                .unwrap_or_else(|| (total as f64 / s.window as f64).ceil().max(1.0)),
            _ => 1.0,
        };
        ((s.window as f64 * factor) as usize / 2).max(1)
    })
}

/// HOMER's configuration for a method and variant.
pub fn homer_config(
    engine: &Engine,
    method: &Method,
    total: usize,
    s: &Settings,
    v: &HomerVariant,
) -> Result<homer::HomerConfig> {
    let c = chunk_len_for(method, total, s, v);
    let bias = v.bias.as_ref().unwrap_or(&s.bias);
    let mut cfg = engine.homer_config(Some(c), v.warmup_layers.or(s.warmup_layers), bias)?;
    if v.random_scores {
        cfg.scoring = homer::Scoring::Random { seed: s.seed };
    }
    if let Method::HomerWith { selection, budget } = method {
        cfg.selection = *selection;
        cfg.target_len = *budget;
    }
    Ok(cfg)
}

/// Run `prompt` with `method` (plain, truncation, a RoPE scaling, HOMER, HOMER + scaling) and
/// decode greedily up to `max_tokens`, stopping at a newline when `stop_at_newline`.
/// How [`run_method`] answers: at most `max_tokens`, stopping at a newline or not, and whether
/// the HOMER prefill takes and keeps leaves in the engine's document cache ([`shares_leaves`]).
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub max_tokens: usize,
    pub stop_at_newline: bool,
    pub share_leaves: bool,
}

/// The RoPE a HOMER method's leaves are computed under, when they may be shared: none for
/// dynamic NTK, whose tables also follow the RoPE's running sequence length, a state a leaf
/// kept from another method's run may have met differently (kept out as a precaution).
fn leaf_rope(m: &Method) -> Option<&str> {
    match m {
        Method::Homer | Method::HomerWith { .. } => Some("native"),
        Method::HomerRope(k) if k != "dynamic-ntk" => Some(k.as_str()),
        _ => None,
    }
}

/// Whether `method` shares leaves with the other methods of its prompt: `--reuse-leaves`, and
/// another HOMER method in `methods` runs under the same RoPE (so their chunks can match; the
/// cache's keys decide). A method with no partner keeps its own path, time and memory.
pub fn shares_leaves<'a>(
    s: &Settings,
    methods: impl IntoIterator<Item = &'a Method>,
    method: &Method,
) -> bool {
    let Some(rope) = leaf_rope(method).filter(|_| s.reuse_leaves) else {
        return false;
    };
    methods
        .into_iter()
        .filter(|m| leaf_rope(m) == Some(rope))
        .count()
        >= 2
}

pub fn run_method(
    engine: &mut Engine,
    prompt: &DocPrompt,
    method: &Method,
    s: &Settings,
    v: &HomerVariant,
    answer: Answer,
    cancel: &AtomicBool,
) -> Result<Run> {
    let Answer {
        max_tokens,
        stop_at_newline,
        share_leaves,
    } = answer;
    let total = prompt.total_len();
    set_rope(engine, method, total, s)?;
    let prompt = if *method == Method::Truncation {
        prompt.truncated(truncation_budget(s, max_tokens))
    } else {
        prompt.clone()
    };
    let params = GenerateParams {
        max_tokens,
        stop_strings: if stop_at_newline {
            vec!["\n".into()]
        } else {
            vec![]
        },
        // The evaluation scores what the model writes, loops included (as its recorded runs),
        // and baselines that run past the window on purpose.
        loop_ngram: 0,
        stop_at_window: false,
        ..Default::default()
    };
    let all = prompt.concatenated();
    let t0 = Instant::now();
    let (logits, cache, kept, chunks, leaves_reused) = if method.uses_homer() {
        let cfg = homer_config(engine, method, total, s, v)?;
        let out = if share_leaves {
            engine.homer_prefill_cached(&prompt, &cfg, cancel, &mut |_| {})?
        } else {
            engine.homer_prefill(&prompt, &cfg, cancel, &mut |_| {})?
        };
        (
            out.logits,
            out.cache,
            Some(out.trace.kept),
            Some(out.plan.n_chunks),
            Some(out.stats.leaves_reused),
        )
    } else {
        let (l, c) = engine.prefill(&all, cancel, &mut |_| {})?;
        (l, c, None, None, None)
    };
    let prefill_secs = t0.elapsed().as_secs_f64();
    let cache_len = cache.len();
    let g = engine.decode(logits, cache, &all, &params, cancel, &mut |_| {})?;
    Ok(Run {
        text: g.text,
        prefill_secs,
        secs: t0.elapsed().as_secs_f64(),
        prompt_tokens: all.len(),
        kept,
        chunks,
        cache_len,
        leaves_reused,
    })
}

/// The message of an error that refuses a cell's settings (HOMER's plan cannot be built for
/// them: too many chunks for the layers left, no room for the context), as opposed to a failure
/// of the run. Such cells are recorded as refused and the evaluation goes on.
pub fn refusal(e: &EvalError) -> Option<String> {
    match e {
        EvalError::Engine(homer_engine::EngineError::Homer(h @ homer::HomerError::Plan(_))) => {
            Some(h.to_string())
        }
        _ => None,
    }
}

/// Records of cells that ran (not refused, not skipped).
pub fn ran(records: &[serde_json::Value]) -> Vec<serde_json::Value> {
    records
        .iter()
        .filter(|r| r.get("refused").is_none_or(|v| v.is_null()))
        .filter(|r| r.get("skipped").is_none_or(|v| v.is_null()))
        .cloned()
        .collect()
}

/// A markdown list of the refused cells, if any.
pub fn refused_note(records: &[serde_json::Value]) -> String {
    let mut seen = std::collections::BTreeSet::new();
    for r in records {
        if let Some(msg) = r["refused"].as_str() {
            let m = r["method"].as_str().unwrap_or("?");
            let v = r["variant"].as_str().unwrap_or("");
            let name = if v.is_empty() {
                m.to_string()
            } else {
                format!("{m} [{v}]")
            };
            seen.insert(format!("- {name} at {} tokens: {msg}\n", r["length"]));
        }
    }
    // Skipped cells, per method and length, unless a later run measured them.
    let done: std::collections::HashSet<String> = ran(records)
        .iter()
        .filter_map(|r| r["key"].as_str().map(str::to_string))
        .collect();
    let mut skipped: BTreeMap<(String, u64, String), usize> = Default::default();
    for r in records {
        if let Some(msg) = r["skipped"].as_str()
            && !r["key"].as_str().is_some_and(|k| done.contains(k))
        {
            let m = r["method"].as_str().unwrap_or("?").to_string();
            let len = r["length"].as_u64().unwrap_or(0);
            *skipped.entry((m, len, msg.to_string())).or_default() += 1;
        }
    }
    let mut out = String::new();
    if !seen.is_empty() {
        out += &format!(
            "\nRefused (the settings cannot form a HOMER plan for the model):\n\n{}",
            seen.into_iter().collect::<String>()
        );
    }
    if !skipped.is_empty() {
        out += "\nSkipped (not run here; the reason is the run's):\n\n";
        // One line a reason; in it, the methods skipped at the same lengths together.
        let mut by_reason: BTreeMap<String, BTreeMap<String, (Vec<u64>, usize)>> =
            Default::default();
        for ((m, len, msg), n) in skipped {
            let e = by_reason.entry(msg).or_default().entry(m).or_default();
            e.0.push(len);
            e.1 += n;
        }
        for (msg, methods) in by_reason {
            let mut groups: Vec<(Vec<u64>, Vec<String>, usize)> = vec![];
            for (m, (lens, n)) in methods {
                match groups.iter_mut().find(|g| g.0 == lens) {
                    Some(g) => {
                        g.1.push(m);
                        g.2 += n;
                    }
                    None => groups.push((lens, vec![m], n)),
                }
            }
            let parts: Vec<String> = groups
                .iter()
                .map(|(lens, ms, n)| {
                    let lens: Vec<String> = lens.iter().map(u64::to_string).collect();
                    let cells = if *n == 1 { "cell" } else { "cells" };
                    format!(
                        "{} at {} tokens ({n} {cells})",
                        and_list(ms),
                        and_list(&lens)
                    )
                })
                .collect();
            out += &format!("- {}: {msg}\n", parts.join("; "));
        }
    }
    out
}

/// "a", "a and b", "a, b and c".
pub(crate) fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [a] => a.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// One (length, depth, trial) cell of a task's grid, with the seed its sample is drawn from (the
/// same for every method, so they all see one prompt).
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub length: usize,
    pub depth: f64,
    pub trial: usize,
    pub seed: u64,
}

/// Every cell of lengths × depths × trials, lengths outermost; `seed` distinguishes tasks.
pub fn cells(lengths: &[usize], depths: &[f64], trials: usize, seed: u64) -> Vec<Cell> {
    let mut out = vec![];
    for &length in lengths {
        for (di, &depth) in depths.iter().enumerate() {
            for trial in 0..trials {
                out.push(Cell {
                    length,
                    depth,
                    trial,
                    seed: passkey::sample_seed(seed, length, di, trial),
                });
            }
        }
    }
    out
}

/// The model's file name, for record keys.
pub fn model_id(engine: &Engine) -> String {
    engine
        .model_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| engine.model_path.display().to_string())
}

/// Parse a comma list of methods.
pub fn parse_methods(list: &[String]) -> Result<Vec<Method>> {
    list.iter()
        .map(|m| m.parse::<Method>().map_err(EvalError::Setting))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skipped cells: one line a reason, the methods skipped at the same lengths together, a
    /// cell measured later left out.
    #[test]
    fn prefill_medians_over_several_hosts_say_so() {
        let one = vec![
            serde_json::json!({"secs": 1.0, "machine": "2 × A"}),
            serde_json::json!({"secs": 2.0, "machine": "2 × A"}),
            serde_json::json!({"skipped": "x"}),
        ];
        assert!(!shared_leaves_note(&one).contains("host"));
        let mut many = one.clone();
        many.push(serde_json::json!({"secs": 3.0}));
        many.push(serde_json::json!({"secs": 3.0, "machine": "2 × B"}));
        let n = shared_leaves_note(&many);
        assert!(
            n.contains("(`2 × A`, `2 × B` and hosts the records do not name"),
            "{n}"
        );
    }

    #[test]
    fn skipped_cells_are_listed_once_a_reason() {
        fn skip(m: &str, len: u64, k: &str, why: &str) -> serde_json::Value {
            serde_json::json!({"method": m, "length": len, "key": k, "skipped": why})
        }
        let rs = vec![
            skip("plain", 16384, "p16a", "slow"),
            skip("plain", 16384, "p16b", "slow"),
            skip("plain", 32768, "p32", "slow"),
            skip("yarn", 16384, "y16", "slow"),
            skip("yarn", 32768, "y32", "slow"),
            skip("ntk", 8192, "n8", "slow"),
            skip("plain", 600, "p6", "other"),
            skip("ntk", 300, "n3", "slow"),
            serde_json::json!({"method": "ntk", "length": 300, "key": "n3", "correct": true}),
        ];
        assert_eq!(
            refused_note(&rs),
            "\nSkipped (not run here; the reason is the run's):\n\n\
             - plain at 600 tokens (1 cell): other\n\
             - ntk at 8192 tokens (1 cell); plain and yarn at 16384 and 32768 tokens (5 cells): \
             slow\n"
        );
        assert_eq!(
            and_list(&["a".into(), "b".into(), "c".into()]),
            "a, b and c"
        );
    }

    /// Matches first (best first), then the unmatched from the end backwards, while they fit;
    /// the choice comes back in document order.
    #[test]
    fn bm25_pack_ranks_matches_then_fills_from_the_end() {
        let texts = [
            "the grass is green",
            "the pass key is 123",
            "the sky is blue",
            "a key to the door",
            "here we go",
            "there and back",
        ];
        // Token spans of uneven lengths, in document order.
        let lens = [5, 7, 4, 6, 3, 9];
        let mut spans = vec![];
        let mut at = 0;
        for l in lens {
            spans.push(at..at + l);
            at += l;
        }
        let texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
        let q = "What is the pass key?";
        // Room for everything: all of it, in order.
        assert_eq!(bm25_pack(&spans, texts.clone(), q, 100), [0, 1, 2, 3, 4, 5]);
        // 7 + 6 for the two matches (the needle's first), then 3 of the tail (9 does not fit).
        assert_eq!(bm25_pack(&spans, texts.clone(), q, 16), [1, 3, 4]);
        // Room for the best match only.
        assert_eq!(bm25_pack(&spans, texts.clone(), q, 8), [1]);
        // Nothing fits.
        assert!(bm25_pack(&spans, texts, q, 2).is_empty());
    }
}
