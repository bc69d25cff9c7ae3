//! Passkey retrieval (spec §9.3) over lengths × depths × trials for every method, and HOMER's
//! ablations (spec §10) as variants of the same task. `bm25` retrieves passages of whole
//! sentences (the default selection's units, at most [`PASSAGE_TOKENS`] tokens a passage) by
//! their BM25 match to the question and packs the best into the window, as the QA task's
//! retrieval baseline does.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use homer_engine::passkey::{Method, PasskeyFormat, PasskeySample, QUESTION, first_number};
use homer_engine::{DocPrompt, Engine};
use serde_json::{Value, json};

use crate::store::Store;
use crate::{EvalMethod, HomerVariant, Result, Settings, model_id, run_method};

/// Tokens of the needle line counted as "the needle" when checking what HOMER kept.
pub const NEEDLE_TOKENS: usize = 12;
/// The most tokens of a retrieval passage: whole sentences (the tokenizer's sentence units, at
/// most [`homer_engine::tokenizer::MAX_SENTENCE_TOKENS`] tokens each) while they fit.
pub const PASSAGE_TOKENS: usize = 64;

/// The retrieval baseline's prompt: the context cut into passages of whole sentences of at most
/// [`PASSAGE_TOKENS`] tokens, ranked by BM25 against the question ("What is the pass key?"),
/// the best packed into `budget` context tokens in document order ([`crate::bm25_pack`]). Also
/// how many of the needle's first [`NEEDLE_TOKENS`] tokens the chosen passages hold.
pub fn retrieve(
    engine: &Engine,
    sample: &PasskeySample,
    budget: usize,
) -> Result<(DocPrompt, usize)> {
    let context = &sample.prompt.context;
    let units = engine.tokenizer.sentence_units(context)?;
    // Unit ids ascend along the context: each unit is one run of tokens, joined to the passage
    // before it while the two fit in PASSAGE_TOKENS.
    let mut spans: Vec<std::ops::Range<usize>> = vec![];
    for r in homer::select::unit_runs(&units) {
        match spans.last_mut() {
            Some(p) if r.end - p.start <= PASSAGE_TOKENS => p.end = r.end,
            _ => spans.push(r),
        }
    }
    let texts = spans
        .iter()
        .map(|r| engine.tokenizer.decode(&context[r.clone()], true))
        .collect::<homer_engine::Result<Vec<String>>>()?;
    let chosen = crate::bm25_pack(&spans, texts, QUESTION, budget);
    let needle = sample.needle_token..sample.needle_token + NEEDLE_TOKENS;
    let kept = chosen
        .iter()
        .map(|&k| needle.clone().filter(|i| spans[k].contains(i)).count())
        .sum();
    Ok((
        DocPrompt {
            prefix: sample.prompt.prefix.clone(),
            context: chosen
                .iter()
                .flat_map(|&k| context[spans[k].clone()].to_vec())
                .collect(),
            suffix: sample.prompt.suffix.clone(),
            question: sample.prompt.question.clone(),
            docs: vec![],
        },
        kept,
    ))
}

#[derive(Debug, Clone)]
pub struct PasskeySpec {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub trials: usize,
    pub methods: Vec<EvalMethod>,
    pub format: PasskeyFormat,
    /// The text the needle hides in (classic: "The grass is green. …").
    pub filler: homer_engine::passkey::Filler,
    /// Named HOMER variants; the empty name is HOMER as configured. Non-HOMER methods run once
    /// per cell whatever the variants.
    pub variants: Vec<(String, HomerVariant)>,
}

/// The sample seed of one cell and trial: the same for every method, so they see one prompt.
pub fn sample_seed(seed: u64, length: usize, depth_index: usize, trial: usize) -> u64 {
    seed.wrapping_mul(1_000_003)
        .wrapping_add(length as u64 * 1009 + depth_index as u64 * 101 + trial as u64)
}

/// Run every missing cell, appending records to `store`.
pub fn run(
    engine: &mut Engine,
    s: &Settings,
    spec: &PasskeySpec,
    store: &mut Store,
    cancel: &AtomicBool,
) -> Result<()> {
    let model = model_id(engine);
    for c in crate::cells(&spec.lengths, &spec.depths, spec.trials, s.seed) {
        let (len, depth, t, seed) = (c.length, c.depth, c.trial, c.seed);
        let mut sample = None;
        // The runs of this prompt by what they computed (`crate::same_run`), with the label of
        // the method that ran each: a method that computes the same takes that run.
        let mut runs = crate::Runs::new();
        for method in &spec.methods {
            let variants: Vec<&(String, HomerVariant)> = if method.uses_homer() {
                spec.variants.iter().collect()
            } else {
                spec.variants.iter().take(1).collect()
            };
            for (vname, variant) in variants {
                let vname = if method.uses_homer() {
                    vname.as_str()
                } else {
                    ""
                };
                // Classic-filler keys are spelt as before fillers existed (recorded runs resume).
                let filler = match &spec.filler {
                    homer_engine::passkey::Filler::Classic => String::new(),
                    f => format!("|{}", f.name()),
                };
                let key = format!(
                    "{model}|{method}|{vname}|{len}|{depth}|{t}|{}|{:?}|{}{filler}",
                    s.seed,
                    spec.format,
                    s.key_tail()
                );
                if store.has_sample(&key, seed)? {
                    continue;
                }
                let cell = json!({
                    "key": key, "model": model, "method": method.to_string(),
                    "variant": vname, "length": len, "depth": depth, "trial": t,
                    "sample_seed": seed,
                });
                if s.skipped(store, &method.to_string(), len, cell.clone())? {
                    continue;
                }
                if sample.is_none() {
                    crate::forget_leaves(engine, s);
                    sample = Some(engine.passkey_sample_in(
                        len,
                        depth,
                        seed,
                        spec.format,
                        &spec.filler,
                    )?);
                }
                let sample = sample.as_ref().unwrap();
                // "The pass key is " and five digits: a few tokens; 16 leave room.
                let answer = crate::Answer {
                    max_tokens: 16,
                    stop_at_newline: false,
                    share_leaves: match method {
                        EvalMethod::Model(m) => {
                            crate::shares_leaves(s, EvalMethod::models(&spec.methods), m)
                        }
                        EvalMethod::Bm25 => false,
                    },
                };
                let label = if vname.is_empty() {
                    method.to_string()
                } else {
                    format!("{method} [{vname}]")
                };
                let total = sample.prompt.total_len();
                // BM25 reads its packed prompt with the plain model; where it packs every
                // passage that is the plain prompt itself.
                let (model_method, prompt, retrieved) = match method {
                    EvalMethod::Model(m) => (m.clone(), None, None),
                    EvalMethod::Bm25 => {
                        let room = crate::truncation_budget(s, answer.max_tokens).saturating_sub(
                            sample.prompt.prefix.len() + sample.prompt.suffix.len(),
                        );
                        let (p, kept) = retrieve(engine, sample, room)?;
                        (Method::Plain, Some(p), Some(kept))
                    }
                };
                let prompt = prompt.as_ref().unwrap_or(&sample.prompt);
                let identity = match method {
                    EvalMethod::Bm25 => {
                        crate::bm25_run(prompt, &sample.prompt, answer.max_tokens, s)?
                    }
                    EvalMethod::Model(_) => {
                        crate::same_run(&model_method, total, answer.max_tokens, s, variant)?
                    }
                };
                let (run, same_as) = match crate::once(&mut runs, identity, &label, || {
                    run_method(engine, prompt, &model_method, s, variant, answer, cancel)
                }) {
                    Ok(r) => r,
                    Err(e) => {
                        crate::refuse(store, s, e, cell)?;
                        continue;
                    }
                };
                let got = first_number(&run.text).unwrap_or("").to_string();
                let ok = got == sample.passkey;
                let needle_kept = retrieved.or_else(|| {
                    run.kept.as_ref().map(|k| {
                        k.iter()
                            .filter(|&&i| {
                                i >= sample.needle_token && i < sample.needle_token + NEEDLE_TOKENS
                            })
                            .count()
                    })
                });
                s.log(format!(
                            "passkey {label:>14} len {len:>6} depth {depth:.2} trial {t}: key {} answer {:?} {} ({:.1}s{}{})",
                            sample.passkey,
                            run.text,
                            if ok { "OK" } else { "wrong" },
                            run.prefill_secs,
                            needle_kept.map_or(String::new(), |k| format!(
                                ", needle kept {k}/{NEEDLE_TOKENS}"
                            )),
                            same_as.as_ref().map_or(String::new(), |by| format!(", {by}'s run"))
                        ));
                store.append(json!({
                            "key": key, "model": model, "method": method.to_string(), "variant": vname,
                            "length": len, "depth": depth, "trial": t, "prompt_tokens": sample.prompt.total_len(),
                            "read_tokens": run.prompt_tokens, "passkey": sample.passkey, "answer": run.text,
                            "correct": ok, "prefill_secs": run.prefill_secs, "secs": run.secs,
                            "needle_tokens_kept": needle_kept, "chunks": run.chunks, "cache_rows": run.cache_len,
                            "window": s.window, "filler": spec.filler.name(), "sample_seed": seed,
                            "leaves_reused": run.leaves_reused, "same_run_as": same_as,
                        }))?;
            }
        }
    }
    crate::forget_leaves(engine, s);
    Ok(())
}

pub fn bias_name(b: &homer_engine::BiasChoice) -> String {
    match b {
        homer_engine::BiasChoice::Default => "default".into(),
        homer_engine::BiasChoice::Zeros => "zeros".into(),
        homer_engine::BiasChoice::Path(p) => p.display().to_string(),
    }
}

/// Accuracy per (label, length, depth): correct and total.
pub type Grid = BTreeMap<String, BTreeMap<usize, BTreeMap<String, (usize, usize)>>>;

/// The label of a record: the method, with the variant in brackets when there is one.
pub fn label(r: &Value) -> String {
    let m = r["method"].as_str().unwrap_or("?");
    let l = match r["variant"].as_str() {
        Some(v) if !v.is_empty() => format!("{m} [{v}]"),
        _ => m.to_string(),
    };
    match r["filler"].as_str() {
        Some(f) if f != "classic" => format!("{l} ({f} filler)"),
        _ => l,
    }
}

pub fn grid(records: &[Value]) -> Grid {
    let mut g: Grid = BTreeMap::new();
    for r in &crate::ran(records) {
        let depth = format!("{:.2}", r["depth"].as_f64().unwrap_or(0.0));
        let cell = g
            .entry(label(r))
            .or_default()
            .entry(r["length"].as_u64().unwrap_or(0) as usize)
            .or_default()
            .entry(depth)
            .or_default();
        cell.0 += r["correct"].as_bool().unwrap_or(false) as usize;
        cell.1 += 1;
    }
    g
}

/// Every depth of a grid, sorted.
pub fn depths_of(g: &Grid) -> Vec<String> {
    let mut depths: Vec<String> = g
        .values()
        .flat_map(|l| l.values().flat_map(|d| d.keys().cloned()))
        .collect();
    depths.sort();
    depths.dedup();
    depths
}

/// A markdown table: one row per (label, length), one column per depth, and the total; cells of
/// more than one trial and every total carry the 95% Wilson interval of the accuracy; the prefill
/// time is the median (robust to a run that shared the machine or was paused).
pub fn table(all: &[Value], order: &[String]) -> String {
    let records = &crate::ran(all)[..];
    let g = grid(records);
    let depths = depths_of(&g);
    let mut out = format!(
        "| method | length | {} | all | median prefill s |\n|---|---|{}---|---|\n",
        depths
            .iter()
            .map(|d| format!("depth {d}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(depths.len())
    );
    for name in ordered(g.keys(), order) {
        for (len, cells) in &g[&name] {
            let (ok, n) = cells.values().fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1));
            let mut secs: Vec<f64> = records
                .iter()
                .filter(|r| label(r) == name && r["length"].as_u64() == Some(*len as u64))
                .filter(|r| !crate::took_leaves(r))
                .filter_map(|r| r["prefill_secs"].as_f64())
                .collect();
            let cols: Vec<String> = depths
                .iter()
                .map(|d| {
                    cells.get(d).map_or("–".into(), |&(o, n)| {
                        if n > 1 {
                            crate::stats::wilson_cell(o, n)
                        } else {
                            format!("{o}/{n}")
                        }
                    })
                })
                .collect();
            let (lo, hi) = crate::stats::wilson(ok, n, crate::stats::Z95);
            out += &format!(
                "| {name} | {len} | {} | {ok}/{n} ({:.0}%; {:.0}–{:.0}%) | {} |\n",
                cols.join(" | "),
                100.0 * ok as f64 / n.max(1) as f64,
                100.0 * lo,
                100.0 * hi,
                crate::prefill_cell(&mut secs)
            );
        }
    }
    out + &crate::shared_leaves_note(records) + &crate::refused_note(all)
}

/// Names in the order given first (methods as asked), then the rest sorted.
pub fn ordered<'a>(names: impl Iterator<Item = &'a String>, order: &[String]) -> Vec<String> {
    let mut all: Vec<String> = names.cloned().collect();
    all.sort_by_key(|n| {
        (
            order
                .iter()
                .position(|o| o == n || n.starts_with(&format!("{o} [")))
                .unwrap_or(usize::MAX),
            n.clone(),
        )
    });
    all
}
