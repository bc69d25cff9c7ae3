//! The readability bench (issue 15, item 1): which selections of a long passkey prompt can the
//! model read? For each prompt, HOMER runs once (as configured) and records its merge trace; then
//! the plain model reads `prefix + selected context tokens in document order + suffix` (at most
//! HOMER's final cache, so within the window) for:
//! - `homer`: HOMER's own kept set (and `homer-tree`: HOMER's real answer from its cache);
//! - `whole`: the needle line plus randomly chosen whole filler sentences, up to the budget;
//! - `shredded`: the needle line plus as many filler tokens as `whole` holds, in runs of one or
//!   two tokens at random places;
//! - a selection unit (`token`, `pool7`, `span16`, `sentence`, …; [`homer::Unit`]) applied once
//!   to the leaves' significance scores (every context token is scored once, at its leaf's
//!   pruning layer, by its chunk's last suffix row), at the budget.
//!
//! Budgets are fractions of HOMER's final kept context. The model reads every selection with
//! fresh contiguous positions, so the bench separates what the selection's shape allows from
//! what HOMER's merging does.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use homer::Unit;
use homer_engine::passkey::{Filler, Method, PasskeyFormat, first_number};
use homer_engine::{Engine, GenerateParams};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use crate::store::Store;
use crate::{EvalError, HomerVariant, Result, Settings, model_id};

#[derive(Debug, Clone)]
pub struct ReplaySpec {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub trials: usize,
    pub filler: Filler,
    /// `homer`, `whole`, `shredded`, or a selection unit.
    pub selections: Vec<String>,
    /// Fractions of HOMER's final kept context (1 = the same budget).
    pub budgets: Vec<f64>,
    /// The HOMER that runs (`homer`, or `homer:<knobs>`): its answer is the `<method>-tree` row
    /// and its kept set the `homer` selection (named after the method when it is not the paper's).
    pub homer: Method,
}

/// What a selection name means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sel {
    Homer,
    Whole,
    Shredded,
    Unit(Unit),
}

pub fn parse_selection(s: &str) -> Result<Sel> {
    Ok(match s {
        "homer" => Sel::Homer,
        "whole" => Sel::Whole,
        "shredded" => Sel::Shredded,
        u => Sel::Unit(
            u.parse()
                .map_err(|e| EvalError::Setting(format!("{e}; or homer, whole, shredded")))?,
        ),
    })
}

/// Maximal runs of consecutive indices in an ascending list.
pub fn runs(kept: &[usize]) -> usize {
    kept.windows(2).filter(|w| w[1] != w[0] + 1).count() + usize::from(!kept.is_empty())
}

/// The needle plus whole units (other than the needle's) drawn at random until `budget` tokens;
/// a unit that does not fit is skipped.
pub fn whole_units(
    units: &[u32],
    needle: std::ops::Range<usize>,
    budget: usize,
    rng: &mut StdRng,
) -> Vec<usize> {
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &u) in units.iter().enumerate() {
        if !needle.contains(&i) {
            groups.entry(u).or_default().push(i);
        }
    }
    let mut order: Vec<Vec<usize>> = groups.into_values().collect();
    order.shuffle(rng);
    let mut kept: Vec<usize> = needle.clone().collect();
    let mut left = budget.saturating_sub(needle.len());
    for g in order {
        if g.len() <= left {
            left -= g.len();
            kept.extend(g);
        }
        if left == 0 {
            break;
        }
    }
    kept.sort_unstable();
    kept
}

/// The needle plus `count` other tokens in runs of one or two, at random places, never touching
/// each other or the needle (so they stay shredded).
pub fn shredded(
    n: usize,
    needle: std::ops::Range<usize>,
    count: usize,
    rng: &mut StdRng,
) -> Vec<usize> {
    let mut taken = vec![false; n];
    for i in needle.clone() {
        taken[i] = true;
    }
    let free = |taken: &[bool], i: usize, len: usize| {
        i + len <= n && (i.saturating_sub(1)..(i + len + 1).min(n)).all(|j| !taken[j])
    };
    let mut left = count;
    let mut tries = 0;
    while left > 0 && tries < 100 * n.max(1) {
        tries += 1;
        let len = rng.random_range(1..=2usize).min(left);
        let i = rng.random_range(0..n);
        if free(&taken, i, len) {
            for t in &mut taken[i..i + len] {
                *t = true;
            }
            left -= len;
        }
    }
    (0..n).filter(|&i| taken[i]).collect()
}

/// Every context token's score at its leaf (NEG_INFINITY where a leaf did not score).
pub fn leaf_scores(trace: &homer::MergeTrace) -> Vec<f32> {
    let mut s = vec![f32::NEG_INFINITY; trace.context_len];
    for n in trace.nodes.iter().filter(|n| n.children.is_none()) {
        for (&i, &v) in n.kept.iter().zip(&n.kept_scores) {
            s[i] = v;
        }
        for (&i, &v) in n.dropped.iter().zip(&n.dropped_scores) {
            s[i] = v;
        }
    }
    s
}

fn budget_name(f: f64) -> String {
    format!("{f}")
}

pub fn run(
    engine: &mut Engine,
    s: &Settings,
    spec: &ReplaySpec,
    store: &mut Store,
    cancel: &AtomicBool,
) -> Result<()> {
    let model = model_id(engine);
    let sels: Vec<(String, Sel)> = spec
        .selections
        .iter()
        .map(|n| Ok((n.clone(), parse_selection(n)?)))
        .collect::<Result<_>>()?;
    let filler = spec.filler.name();
    let (tree_name, kept_name) = match spec.homer {
        Method::Homer => ("homer-tree".to_string(), "homer".to_string()),
        ref m => (format!("{m}-tree"), m.to_string()),
    };
    let params = GenerateParams {
        max_tokens: 16,
        loop_ngram: 0,
        stop_at_window: false,
        ..Default::default()
    };
    for c in crate::cells(&spec.lengths, &spec.depths, spec.trials, s.seed ^ 0x5EA1) {
        let key = |sel: &str, f: f64| {
            format!(
                "{model}|{filler}|{}|{}|{}|{sel}|{}|{}|{}",
                c.length,
                c.depth,
                c.trial,
                budget_name(f),
                s.seed,
                s.key_tail()
            )
        };
        let mut todo = vec![];
        if !store.has_sample(&key(&tree_name, 1.0), c.seed)? {
            todo.push((tree_name.clone(), Sel::Homer, 1.0));
        }
        for (name, sel) in &sels {
            let name = if *sel == Sel::Homer { &kept_name } else { name };
            for &f in &spec.budgets {
                if *sel == Sel::Homer && f != 1.0 {
                    continue;
                }
                if !store.has_sample(&key(name, f), c.seed)? {
                    todo.push((name.clone(), *sel, f));
                }
            }
        }
        if todo.is_empty() {
            continue;
        }
        let sample = engine.passkey_sample_in(
            c.length,
            c.depth,
            c.seed,
            PasskeyFormat::Raw,
            &spec.filler,
        )?;
        let prompt = &sample.prompt;
        let needle = sample.needle_token..sample.needle_end;
        let method = spec.homer.clone();
        crate::set_rope(engine, &method, prompt.total_len(), s)?;
        let cfg = crate::homer_config(
            engine,
            &method,
            prompt.total_len(),
            s,
            &HomerVariant::default(),
        )?;
        let t0 = std::time::Instant::now();
        let out = engine.homer_prefill(prompt, &cfg, cancel, &mut |_| {})?;
        let homer_secs = t0.elapsed().as_secs_f64();
        let trace = out.trace.clone();
        let budget = trace.kept.len();
        let scores = leaf_scores(&trace);
        let units = engine.tokenizer.sentence_units(&prompt.context)?;
        let n = prompt.context.len();
        let doc_index: Vec<Option<usize>> = (0..n).map(Some).collect();
        let mut homer_answer = None;
        if todo.iter().any(|t| t.0 == tree_name) {
            let g = engine.decode(
                out.logits,
                out.cache,
                &prompt.concatenated(),
                &params,
                cancel,
                &mut |_| {},
            )?;
            homer_answer = Some(g.text);
        }
        let mut whole_filler = BTreeMap::new();
        for (name, sel, f) in todo {
            let b = ((budget as f64) * f).round() as usize;
            // `shredded` takes as many filler tokens as `whole` at the same budget and seed.
            let seed = c.seed ^ 0xC0FFEE ^ (f * 1000.0) as u64;
            let mut rng = StdRng::seed_from_u64(seed);
            let (kept, text, secs) = if name == tree_name {
                (
                    trace.kept.clone(),
                    homer_answer.clone().unwrap_or_default(),
                    homer_secs,
                )
            } else {
                let mut kept = match sel {
                    Sel::Homer => trace.kept.clone(),
                    Sel::Whole => whole_units(&units, needle.clone(), b, &mut rng),
                    Sel::Shredded => {
                        let count = *whole_filler.entry(budget_name(f)).or_insert_with(|| {
                            let mut r = StdRng::seed_from_u64(seed);
                            whole_units(&units, needle.clone(), b, &mut r).len() - needle.len()
                        });
                        shredded(n, needle.clone(), count, &mut rng)
                    }
                    Sel::Unit(u) => homer::select::select(
                        u,
                        &scores,
                        &doc_index,
                        Some(&units),
                        n.saturating_sub(b),
                    )
                    .map_err(|e| EvalError::Setting(e.to_string()))?,
                };
                kept.sort_unstable();
                let ids: Vec<u32> = prompt
                    .prefix
                    .iter()
                    .copied()
                    .chain(kept.iter().map(|&i| prompt.context[i]))
                    .chain(prompt.suffix.iter().copied())
                    .collect();
                crate::set_rope(engine, &Method::Plain, ids.len(), s)?;
                let t = std::time::Instant::now();
                let g = engine.generate(&ids, &params, cancel, &mut |_| {}, &mut |_| {})?;
                (kept, g.text, t.elapsed().as_secs_f64())
            };
            let got = first_number(&text).unwrap_or("").to_string();
            let ok = got == sample.passkey;
            let needle_kept = kept.iter().filter(|&&i| needle.contains(&i)).count();
            let nruns = runs(&kept);
            s.log(format!(
                "replay {filler} len {} depth {:.2} trial {}: {name:>10} @{f}: {} tokens in {nruns} runs, needle {needle_kept}/{}, answer {text:?} {} ({secs:.1}s)",
                c.length,
                c.depth,
                c.trial,
                kept.len(),
                needle.len(),
                if ok { "OK" } else { "wrong" }
            ));
            store.append(json!({
                "key": key(&name, f), "model": model, "filler": filler, "length": c.length,
                "depth": c.depth, "trial": c.trial, "selection": name, "budget": f,
                "budget_tokens": b, "homer_kept": budget, "kept_tokens": kept.len(), "runs": nruns,
                "needle_tokens": needle.len(), "needle_kept": needle_kept, "passkey": sample.passkey,
                "sample_seed": c.seed,
                "answer": text, "correct": ok, "secs": secs, "context_tokens": n,
            }))?;
        }
    }
    Ok(())
}

/// One row per (selection, budget), one column per (filler, length): keys found, mean runs,
/// needle kept whole.
pub fn table(records: &[Value]) -> String {
    type Cell = (usize, usize, f64, f64, usize);
    let mut cols: Vec<(String, u64)> = vec![];
    let mut rows: Vec<(String, String)> = vec![];
    let mut cells: BTreeMap<(String, String, String, u64), Cell> = BTreeMap::new();
    for r in records {
        let sel = r["selection"].as_str().unwrap_or("?").to_string();
        let f = r["budget"].as_f64().unwrap_or(1.0);
        let fill = r["filler"].as_str().unwrap_or("?").to_string();
        let len = r["length"].as_u64().unwrap_or(0);
        let col = (fill.clone(), len);
        if !cols.contains(&col) {
            cols.push(col);
        }
        let row = (sel.clone(), budget_name(f));
        if !rows.contains(&row) {
            rows.push(row);
        }
        let c = cells.entry((sel, budget_name(f), fill, len)).or_default();
        c.0 += r["correct"].as_bool().unwrap_or(false) as usize;
        c.1 += 1;
        c.2 += r["runs"].as_f64().unwrap_or(0.0);
        c.3 += r["kept_tokens"].as_f64().unwrap_or(0.0);
        c.4 += (r["needle_kept"] == r["needle_tokens"]) as usize;
    }
    cols.sort();
    let mut out = format!(
        "| selection | budget | {} |\n|---|---|{}\n",
        cols.iter()
            .map(|(f, l)| format!("{f} {l}: found · runs · tokens · needle whole"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(cols.len())
    );
    for (sel, b) in rows {
        let vals: Vec<String> = cols
            .iter()
            .map(
                |(f, l)| match cells.get(&(sel.clone(), b.clone(), f.clone(), *l)) {
                    Some(c) => format!(
                        "{}/{} · {:.0} · {:.0} · {}/{}",
                        c.0,
                        c.1,
                        c.2 / c.1 as f64,
                        c.3 / c.1 as f64,
                        c.4,
                        c.1
                    ),
                    None => "–".into(),
                },
            )
            .collect();
        out += &format!("| {sel} | {b} | {} |\n", vals.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_counting() {
        assert_eq!(runs(&[]), 0);
        assert_eq!(runs(&[3]), 1);
        assert_eq!(runs(&[1, 2, 3, 7, 8, 10]), 3);
    }

    #[test]
    fn whole_units_keep_the_needle_and_whole_sentences() {
        // Units of 3 tokens: 0..3, 3..6, ... 27..30; needle = tokens 9..12 (unit 3).
        let units: Vec<u32> = (0..30).map(|i| i / 3).collect();
        let mut rng = StdRng::seed_from_u64(1);
        let k = whole_units(&units, 9..12, 10, &mut rng);
        // The needle and two whole units (3 + 3 + 3 = 9 of 10: a third does not fit).
        assert_eq!(k.len(), 9);
        assert!((9..12).all(|i| k.contains(&i)));
        let mut by_unit: BTreeMap<u32, usize> = BTreeMap::new();
        for &i in &k {
            *by_unit.entry(units[i]).or_default() += 1;
        }
        assert!(by_unit.values().all(|&c| c == 3));
    }

    #[test]
    fn shredded_runs_are_short_and_apart() {
        let mut rng = StdRng::seed_from_u64(2);
        let k = shredded(400, 100..110, 60, &mut rng);
        assert_eq!(k.len(), 70);
        assert!((100..110).all(|i| k.contains(&i)));
        // Every run apart from the needle's is one or two tokens long.
        let mut run = 1;
        for w in k.windows(2) {
            if w[1] == w[0] + 1 {
                run += 1;
            } else {
                assert!(run <= 2 || w[0] == 109, "run of {run} ending at {}", w[0]);
                run = 1;
            }
        }
    }
}
