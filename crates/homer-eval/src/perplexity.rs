//! Long-document perplexity (spec §9.4), adapted to the model: every token 1..N-1 of a long text
//! is scored once by every method, so the cumulative perplexity curves compare like with like.
//!
//! - plain and the RoPE scalings: one causal pass over the first N tokens (factor: the smallest
//!   whole factor whose window holds N, or `--rope-factor`);
//! - truncation: the first window plainly, then each segment of `eval_len` tokens after the
//!   `window − eval_len` tokens before it;
//! - HOMER (and HOMER + a scaling, factor 2 unless given): the first `2·eval_len = window` tokens
//!   plainly, then for each segment starting at `end`: prefix = tokens[0..a], context =
//!   tokens[a..end−a], suffix = tokens[end−a..end] merged by HOMER, and the segment
//!   teacher-forced through the merged cache at positions last+1, … (the reference's protocol;
//!   `a` = 100 tokens, or window/16 for windows under 1,600).
//!
//! `eval_len` is half the window, as in the reference.

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use homer_engine::passkey::Method;
use homer_engine::{DocPrompt, Engine};
use homer_model::{KvCache, Logits, read_f32};
use serde_json::{Value, json};

use crate::store::Store;
use crate::{EvalError, HomerVariant, Result, Settings, homer_config, model_id, set_rope};

/// Rows per forward call while scoring (bounds the logits held at once: rows × vocab × 4 bytes).
const SCORE_BLOCK: usize = 256;

/// Affix length of the HOMER parts.
pub fn affix_len(window: usize) -> usize {
    (window / 16).min(100)
}

/// Feed `ids` at positions `pos0..` through `cache` and return the negative log-likelihood of
/// the target of every row in `rows`: the row's next id, or `next` after the last row.
fn nll_rows(
    engine: &Engine,
    cache: &mut KvCache,
    ids: &[u32],
    pos0: usize,
    next: Option<u32>,
    rows: Range<usize>,
    cancel: &AtomicBool,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(rows.len());
    let mut start = 0;
    while start < ids.len() {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(homer_engine::EngineError::Cancelled.into());
        }
        let end = (start + SCORE_BLOCK).min(ids.len());
        let positions: Vec<usize> = (pos0 + start..pos0 + end).collect();
        let want = rows.start.max(start)..rows.end.min(end);
        let which = if want.is_empty() {
            Logits::Last
        } else {
            Logits::All
        };
        let logits = engine
            .model
            .forward(&ids[start..end], Some(&positions), cache, which)?;
        if !want.is_empty() {
            let v = read_f32(logits)?;
            let vocab = v.len() / (end - start);
            for j in want {
                let target = if j + 1 < ids.len() {
                    ids[j + 1]
                } else {
                    next.ok_or_else(|| EvalError::Setting("no target after the last row".into()))?
                };
                out.push(nll(
                    &v[(j - start) * vocab..(j - start + 1) * vocab],
                    target,
                ));
            }
        }
        start = end;
    }
    Ok(out)
}

/// −log softmax(row)[target].
fn nll(row: &[f32], target: u32) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + row
        .iter()
        .map(|&x| ((x - m) as f64).exp())
        .sum::<f64>()
        .ln() as f32;
    lse - row[target as usize]
}

/// Per-token NLL of tokens 1..N−1 of `tokens` (N = tokens.len()) under `method`.
pub fn score(
    engine: &mut Engine,
    tokens: &[u32],
    method: &Method,
    s: &Settings,
    cancel: &AtomicBool,
) -> Result<Vec<f32>> {
    let n = tokens.len();
    let window = s.window;
    let eval_len = (window / 2).max(1);
    if n < 2 {
        return Err(EvalError::Setting(
            "perplexity needs at least 2 tokens".into(),
        ));
    }
    let fresh = |e: &Engine| KvCache::new(e.model.n_layers());
    match method {
        Method::Plain | Method::Rope(_) => {
            set_rope(engine, method, n, s)?;
            engine.model.set_rope_seq_len(n);
            let mut cache = fresh(engine);
            nll_rows(engine, &mut cache, tokens, 0, None, 0..n - 1, cancel)
        }
        Method::Truncation => {
            set_rope(engine, method, n, s)?;
            engine.model.set_rope_seq_len(0);
            let first = window.min(n);
            let mut cache = fresh(engine);
            let mut out = nll_rows(
                engine,
                &mut cache,
                &tokens[..first],
                0,
                tokens.get(first).copied(),
                0..first - 1,
                cancel,
            )?;
            let keep = window - eval_len;
            let mut end = first - 1; // the next target to score is tokens[end + 1]
            while end + 1 < n {
                let seg_end = (end + 1 + eval_len).min(n); // targets end+1..seg_end
                let from = (end + 1).saturating_sub(keep);
                let ids = &tokens[from..seg_end - 1];
                let mut cache = fresh(engine);
                let first_row = end - from;
                out.extend(nll_rows(
                    engine,
                    &mut cache,
                    ids,
                    0,
                    Some(tokens[seg_end - 1]),
                    first_row..ids.len(),
                    cancel,
                )?);
                end = seg_end - 1;
            }
            Ok(out)
        }
        Method::Homer | Method::HomerRope(_) | Method::HomerWith { .. } => {
            // HOMER + scaling: factor 2 unless given (the reference's setting).
            let mut s2 = s.clone();
            if matches!(method, Method::HomerRope(_)) && s2.rope_factor.is_none() {
                s2.rope_factor = Some(2.0);
            }
            set_rope(engine, method, n, &s2)?;
            engine.model.set_rope_seq_len(0);
            let first = (2 * eval_len).min(n);
            let mut cache = fresh(engine);
            let mut out = nll_rows(
                engine,
                &mut cache,
                &tokens[..first],
                0,
                None,
                0..first - 1,
                cancel,
            )?;
            drop(cache);
            let a = affix_len(window);
            let mut end = first;
            while end < n {
                let seg_end = (end + eval_len).min(n);
                let prompt = DocPrompt {
                    prefix: tokens[..a].to_vec(),
                    context: tokens[a..end - a].to_vec(),
                    suffix: tokens[end - a..end].to_vec(),
                    question: None,
                    docs: vec![],
                };
                let cfg = homer_config(engine, method, end, &s2, &HomerVariant::default())?;
                let h = engine.homer_prefill(&prompt, &cfg, cancel, &mut |_| {})?;
                out.push(nll(&h.logits, tokens[end]));
                let mut cache = h.cache;
                if seg_end - end > 1 {
                    let ids = &tokens[end..seg_end - 1];
                    out.extend(nll_rows(
                        engine,
                        &mut cache,
                        ids,
                        h.last_position_id + 1,
                        Some(tokens[seg_end - 1]),
                        0..ids.len(),
                        cancel,
                    )?);
                }
                end = seg_end;
            }
            Ok(out)
        }
    }
}

/// Score the first `length` tokens of `tokens` with every method not yet recorded.
pub fn run(
    engine: &mut Engine,
    s: &Settings,
    tokens: &[u32],
    source: &str,
    length: usize,
    methods: &[Method],
    store: &mut Store,
    cancel: &AtomicBool,
) -> Result<()> {
    if tokens.len() < length {
        return Err(EvalError::Setting(format!(
            "{source} has {} tokens; perplexity at {length} needs that many (use the whole KJV: scripts/fetch-kjv)",
            tokens.len()
        )));
    }
    let model = model_id(engine);
    for method in methods {
        let key = format!("{model}|{method}|{length}|{source}|{}", s.key_tail());
        if store.has(&key) {
            continue;
        }
        let cell = json!({
            "key": key, "model": model, "method": method.to_string(), "length": length,
        });
        if s.skipped(store, &method.to_string(), length, cell.clone())? {
            continue;
        }
        let t0 = Instant::now();
        let nll = match score(engine, &tokens[..length], method, s, cancel) {
            Ok(n) => n,
            Err(e) => {
                crate::refuse(store, s, e, cell)?;
                continue;
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        let ppl = (nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64).exp();
        s.log(format!(
            "perplexity {method:>12} over {length} tokens: {ppl:.3} ({secs:.0}s)"
        ));
        let rounded: Vec<f64> = nll
            .iter()
            .map(|&x| (x as f64 * 1e4).round() / 1e4)
            .collect();
        store.append(json!({
            "key": key, "model": model, "method": method.to_string(), "length": length,
            "source": source, "window": s.window, "eval_len": s.window / 2, "perplexity": ppl,
            "secs": secs, "nll": rounded,
        }))?;
    }
    Ok(())
}

/// Cumulative perplexity over the first x scored tokens, at the given x.
pub fn cumulative(nll: &[f64], at: &[usize]) -> Vec<Option<f64>> {
    let mut sums = Vec::with_capacity(nll.len());
    let mut acc = 0.0;
    for &x in nll {
        acc += x;
        sums.push(acc);
    }
    at.iter()
        .map(|&x| (x >= 1 && x <= nll.len()).then(|| (sums[x - 1] / x as f64).exp()))
        .collect()
}

/// Perplexity of the scored tokens in `range` (indices into the NLL list); None when empty.
pub fn span_perplexity(nll: &[f64], range: Range<usize>) -> Option<f64> {
    let v = nll.get(range)?;
    (!v.is_empty()).then(|| (v.iter().sum::<f64>() / v.len() as f64).exp())
}

pub fn nll_of(r: &Value) -> Vec<f64> {
    r["nll"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default()
}

/// Markdown: cumulative perplexity per method at the checkpoints (tokens scored from the start).
pub fn table(all: &[Value], checkpoints: &[usize], order: &[String]) -> String {
    let records = &crate::ran(all)[..];
    let mut out = format!(
        "| method | {} | ppl past the window | seconds |\n|---|{}---|---|\n",
        checkpoints
            .iter()
            .map(|c| format!("ppl @ {c}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(checkpoints.len())
    );
    let names: std::collections::BTreeSet<String> = records
        .iter()
        .map(|r| r["method"].as_str().unwrap_or("?").to_string())
        .collect();
    for name in crate::passkey::ordered(names.iter(), order) {
        let name = name.as_str();
        // The longest record of the method.
        let Some(r) = records
            .iter()
            .filter(|r| r["method"].as_str() == Some(name))
            .max_by_key(|r| r["length"].as_u64().unwrap_or(0))
        else {
            continue;
        };
        let nll = nll_of(r);
        let cols: Vec<String> = cumulative(&nll, checkpoints)
            .iter()
            .map(|p| p.map_or("–".into(), |p| format!("{p:.3}")))
            .collect();
        // Tokens at positions past the window: scored with more text before them than the
        // window holds.
        let window = r["window"].as_u64().unwrap_or(0) as usize;
        let past = span_perplexity(&nll, window.saturating_sub(1)..nll.len())
            .map_or("–".into(), |p| format!("{p:.3}"));
        out += &format!(
            "| {name} | {} | {past} | {:.0} |\n",
            cols.join(" | "),
            r["secs"].as_f64().unwrap_or(0.0)
        );
    }
    out + &crate::refused_note(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_minus_log_softmax() {
        let row = [0.0f32, (2.0f32).ln(), 0.0];
        // softmax = [1/4, 2/4, 1/4]
        assert!((nll(&row, 1) - (2.0f32).ln()).abs() < 1e-6);
        assert!((nll(&row, 0) - (4.0f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn cumulative_perplexity_is_exp_of_the_running_mean() {
        let nll = [1.0, 3.0, 2.0];
        let c = cumulative(&nll, &[1, 2, 3, 4]);
        assert!((c[0].unwrap() - 1f64.exp()).abs() < 1e-12);
        assert!((c[1].unwrap() - 2f64.exp()).abs() < 1e-12);
        assert!((c[2].unwrap() - 2f64.exp()).abs() < 1e-12);
        assert_eq!(c[3], None);
        assert!((span_perplexity(&nll, 1..3).unwrap() - 2.5f64.exp()).abs() < 1e-12);
        assert_eq!(span_perplexity(&nll, 3..3), None);
        assert_eq!(span_perplexity(&nll, 2..9), None);
    }
}
