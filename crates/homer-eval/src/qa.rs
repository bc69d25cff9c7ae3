//! Document QA over the King James Bible: "quote the verse John11:35" with the verse somewhere in
//! a long run of verses, at a chosen depth. The answer is scored against the verse by token F1
//! and exact match. Methods: the model's (plain, truncation, RoPE scalings, HOMER, HOMER +
//! scaling) and `bm25`: BM25 retrieval of passages of 4 verses (the `bm25` crate), the best ones
//! packed into the window in document order — the retrieval baseline reviewers asked the paper
//! for.
//!
//! The prompt is raw text, like the passkey task's: an instruction line, the verses one per line,
//! then "Quote verses from the text above.", one other verse of the context quoted in full as a
//! demonstration, and the asked label, so the model completes the verse. Without the
//! demonstration ("Quote the verse L from the text above.\nL") SmolLM2-135M paraphrased or
//! answered nothing even at 1K tokens (mean F1 0.1); through its chat template it paraphrases.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use homer_engine::passkey::Method;
use homer_engine::{DocPrompt, Engine};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use crate::store::Store;
use crate::text::{Verse, exact, f1, words};
use crate::{EvalError, EvalMethod, HomerVariant, Result, Settings, model_id, run_method};

pub const INSTRUCTION: &str = "Below are verses of the King James Bible, one per line.\n\n";
/// The longest demonstration verse, in tokens.
const DEMO_MAX_TOKENS: usize = 64;
/// Tokens reserved for the suffix: the question line, the demonstration, the label.
const SUFFIX_ROOM: usize = DEMO_MAX_TOKENS + 32;
/// Part of every QA record key: the prompt's form (2 = with a demonstration verse).
const FORM: &str = "qa2";
/// Verses per retrieval passage.
pub const PASSAGE_VERSES: usize = 4;

/// One question: a run of verses, which one is asked for, and its place.
#[derive(Debug, Clone)]
pub struct QaSample {
    pub prompt: DocPrompt,
    /// Verse index range of the context, and the context token range of every verse in it.
    pub lines: Vec<std::ops::Range<usize>>,
    pub verses: std::ops::Range<usize>,
    pub target: usize,
    pub label: String,
    pub reference: String,
}

/// A question about `length` tokens of verses with the asked verse at `depth`, from `seed`.
pub fn sample(
    engine: &Engine,
    verses: &[Verse],
    length: usize,
    depth: f64,
    seed: u64,
) -> Result<QaSample> {
    let tok = &engine.tokenizer;
    let prefix = tok.encode(INSTRUCTION, true)?;
    let mut rng = StdRng::seed_from_u64(seed);
    // Verse lines take ~30 tokens: start where 2.5× the lines the length needs remain (or at
    // the first verse of a short text; too short a text is refused below).
    let need = length / 12 + 16;
    if verses.len() < 8 {
        return Err(EvalError::Setting("the KJV text has too few verses".into()));
    }
    let start = rng.random_range(0..verses.len().saturating_sub(need).max(1));
    // The suffix (a demonstration verse and the asked label) is chosen once the verses are:
    // room for it is reserved.
    let budget = length.saturating_sub(prefix.len() + SUFFIX_ROOM);
    let mut context = vec![];
    let mut lines = vec![];
    let mut end = start;
    while end < verses.len() {
        let ids = tok.encode(
            &format!("{} {}\n", verses[end].label, verses[end].text),
            false,
        )?;
        if context.len() + ids.len() > budget {
            break;
        }
        lines.push(context.len()..context.len() + ids.len());
        context.extend(ids);
        end += 1;
    }
    if context.len() < budget * 9 / 10 && end == verses.len() {
        return Err(EvalError::Setting(format!(
            "the KJV text is too short for a {length}-token question (it ends after {} tokens); use the whole Bible from scripts/fetch-kjv",
            context.len()
        )));
    }
    if end - start < 2 {
        return Err(EvalError::Setting(format!(
            "length {length} holds fewer than two verses"
        )));
    }
    let n = end - start;
    // The asked verse: at the depth, moved forward to one of at least 6 words.
    let mut target = start + ((n - 1) as f64 * depth).round() as usize;
    while target + 1 < end && words(&verses[target].text).len() < 6 {
        target += 1;
    }
    // The demonstration: another verse of the context, half the context away, quoted in full
    // before the asked label, so the task's form (label, then its text) is shown once.
    let n_words = |i: usize| words(&verses[i].text).len();
    let mut demo = start + ((n - 1) as f64 * ((depth + 0.5) % 1.0)).round() as usize;
    let mut tries = 0;
    while (demo == target || n_words(demo) < 6 || lines[demo - start].len() > DEMO_MAX_TOKENS)
        && tries < n
    {
        demo = start + (demo - start + 1) % n;
        tries += 1;
    }
    let label = verses[target].label.clone();
    let suffix = tok.encode(
        &format!(
            "\nQuote verses from the text above.\n{} {}\n{label}",
            verses[demo].label, verses[demo].text
        ),
        false,
    )?;
    Ok(QaSample {
        prompt: DocPrompt {
            prefix,
            context,
            suffix,
            // What the lexical prior matches: the request, as the BM25 baseline's query words,
            // not the suffix's demonstration verse (whose words would pull its own verse in).
            question: Some(format!("Quote the verse {label}")),
            docs: vec![],
        },
        lines,
        verses: start..end,
        target,
        label,
        reference: verses[target].text.clone(),
    })
}

/// The retrieval baseline's prompt: passages ranked by BM25 against the question, the best
/// packed into `budget` context tokens, kept in document order. Also says whether the passage
/// holding the asked verse made it.
pub fn retrieve(s: &QaSample, verses: &[Verse], budget: usize) -> (DocPrompt, bool) {
    let n = s.lines.len();
    let passages: Vec<std::ops::Range<usize>> = (0..n)
        .step_by(PASSAGE_VERSES)
        .map(|i| i..(i + PASSAGE_VERSES).min(n))
        .collect();
    let corpus: Vec<String> = passages
        .iter()
        .map(|p| {
            p.clone()
                .map(|i| {
                    let v = &verses[s.verses.start + i];
                    format!("{} {}", v.label, v.text)
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let query = format!("Quote the verse {} from the text above.", s.label);
    let spans: Vec<std::ops::Range<usize>> = passages
        .iter()
        .map(|p| s.lines[p.start].start..s.lines[p.end - 1].end)
        .collect();
    let chosen = crate::bm25_pack(&spans, corpus, &query, budget);
    let target_line = s.target - s.verses.start;
    let hit = chosen.iter().any(|&k| passages[k].contains(&target_line));
    let context = chosen
        .iter()
        .flat_map(|&k| s.prompt.context[spans[k].clone()].to_vec())
        .collect();
    (
        DocPrompt {
            prefix: s.prompt.prefix.clone(),
            context,
            suffix: s.prompt.suffix.clone(),
            question: s.prompt.question.clone(),
            docs: vec![],
        },
        hit,
    )
}

#[derive(Debug, Clone)]
pub struct QaSpec {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub trials: usize,
    pub methods: Vec<EvalMethod>,
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &mut Engine,
    s: &Settings,
    verses: &[Verse],
    source: &str,
    spec: &QaSpec,
    store: &mut Store,
    cancel: &AtomicBool,
) -> Result<()> {
    let model = model_id(engine);
    for c in crate::cells(&spec.lengths, &spec.depths, spec.trials, s.seed ^ 0x9a) {
        let (len, depth, t, seed) = (c.length, c.depth, c.trial, c.seed);
        let mut smp = None;
        // The runs of this question by what they computed (`crate::same_run`), with the method
        // that ran each: where the document fits the window, truncation cuts nothing and BM25
        // packs every passage, so both read the plain prompt; the second takes the first's run.
        let mut runs = crate::Runs::new();
        for method in &spec.methods {
            let key = format!(
                "{FORM}|{model}|{method}|{len}|{depth}|{t}|{}|{source}|{}",
                s.seed,
                s.key_tail()
            );
            if store.has_sample(&key, seed)? {
                continue;
            }
            let cell = json!({
                "key": key, "model": model, "method": method.to_string(),
                "length": len, "depth": depth, "trial": t, "sample_seed": seed,
            });
            if s.skipped(store, &method.to_string(), len, cell.clone())? {
                continue;
            }
            if smp.is_none() {
                crate::forget_leaves(engine, s);
                smp = Some(sample(engine, verses, len, depth, seed)?);
            }
            let q = smp.as_ref().unwrap();
            let max_tokens = engine.tokenizer.encode(&q.reference, false)?.len() + 8;
            let answer = |share_leaves| crate::Answer {
                max_tokens,
                stop_at_newline: true,
                share_leaves,
            };
            let total = q.prompt.total_len();
            let default = HomerVariant::default();
            let result = match method {
                EvalMethod::Model(m) => {
                    let share = crate::shares_leaves(s, EvalMethod::models(&spec.methods), m);
                    let identity = match crate::same_run(m, total, max_tokens, s, &default) {
                        Ok(i) => i,
                        Err(e) => {
                            crate::refuse(store, s, e, cell)?;
                            continue;
                        }
                    };
                    crate::once(&mut runs, identity, &method.to_string(), || {
                        run_method(engine, &q.prompt, m, s, &default, answer(share), cancel)
                    })
                    .map(|(r, by)| (r, None, by))
                }
                EvalMethod::Bm25 => {
                    let budget = s
                        .window
                        .saturating_sub(q.prompt.prefix.len() + q.prompt.suffix.len() + max_tokens);
                    let (p, hit) = retrieve(q, verses, budget);
                    let identity = crate::bm25_run(&p, &q.prompt, max_tokens, s)?;
                    crate::once(&mut runs, identity, &method.to_string(), || {
                        run_method(
                            engine,
                            &p,
                            &Method::Plain,
                            s,
                            &default,
                            answer(false),
                            cancel,
                        )
                    })
                    .map(|(r, by)| (r, Some(hit), by))
                }
            };
            let (run, retrieved, same_as) = match result {
                Ok(r) => r,
                Err(e) => {
                    crate::refuse(store, s, e, cell)?;
                    continue;
                }
            };
            let answer = run.text.trim().to_string();
            let score = f1(&answer, &q.reference);
            let ex = exact(&answer, &q.reference);
            let target = &q.lines[q.target - q.verses.start];
            let kept_share = run.kept.as_ref().map(|k| {
                k.iter().filter(|&&i| target.contains(&i)).count() as f64 / target.len() as f64
            });
            s.log(format!(
                        "qa {method:>12} len {len:>6} depth {depth:.2} trial {t}: {} -> {answer:?} F1 {score:.2}{} ({:.1}s{})",
                        q.label,
                        if ex { " exact" } else { "" },
                        run.prefill_secs,
                        same_as.as_ref().map_or(String::new(), |by| format!(", {by}'s run"))
                    ));
            store.append(json!({
                        "key": key, "model": model, "method": method.to_string(), "length": len,
                        "depth": depth, "trial": t, "label": q.label, "reference": q.reference,
                        "answer": answer, "f1": score, "exact": ex, "prompt_tokens": q.prompt.total_len(),
                        "read_tokens": run.prompt_tokens, "prefill_secs": run.prefill_secs, "secs": run.secs,
                        "target_kept_share": kept_share, "retrieved": retrieved, "cache_rows": run.cache_len,
                        "window": s.window, "sample_seed": seed,
                        "leaves_reused": run.leaves_reused, "same_run_as": same_as,
                    }))?;
        }
    }
    crate::forget_leaves(engine, s);
    Ok(())
}

/// Mean F1 and exact-match rate per (method, length).
pub fn summary(records: &[Value]) -> BTreeMap<String, BTreeMap<usize, (f64, f64, usize)>> {
    let mut m: BTreeMap<String, BTreeMap<usize, (f64, f64, usize)>> = BTreeMap::new();
    for r in &crate::ran(records) {
        let e = m
            .entry(r["method"].as_str().unwrap_or("?").to_string())
            .or_default()
            .entry(r["length"].as_u64().unwrap_or(0) as usize)
            .or_default();
        e.0 += r["f1"].as_f64().unwrap_or(0.0);
        e.1 += r["exact"].as_bool().unwrap_or(false) as u8 as f64;
        e.2 += 1;
    }
    for lens in m.values_mut() {
        for e in lens.values_mut() {
            e.0 /= e.2 as f64;
            e.1 /= e.2 as f64;
        }
    }
    m
}

pub fn table(all: &[Value], order: &[String]) -> String {
    let records = &crate::ran(all)[..];
    let m = summary(records);
    let mut out = "| method | length | mean F1 (95% interval) | exact | questions | retrieved / needle kept |\n|---|---|---|---|---|---|\n".to_string();
    for name in crate::passkey::ordered(m.keys(), order) {
        for (len, (f, e, n)) in &m[&name] {
            let rs: Vec<&Value> = records
                .iter()
                .filter(|r| {
                    r["method"].as_str() == Some(&name) && r["length"].as_u64() == Some(*len as u64)
                })
                .collect();
            let extra = if name == "bm25" {
                let hits = rs
                    .iter()
                    .filter(|r| r["retrieved"].as_bool() == Some(true))
                    .count();
                format!("{hits}/{} retrieved", rs.len())
            } else {
                let shares: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| r["target_kept_share"].as_f64())
                    .collect();
                if shares.is_empty() {
                    "–".into()
                } else {
                    format!(
                        "{:.0}% of the verse kept",
                        100.0 * shares.iter().sum::<f64>() / shares.len() as f64
                    )
                }
            };
            let f1s: Vec<f64> = rs.iter().filter_map(|r| r["f1"].as_f64()).collect();
            let (_, half) = crate::stats::mean_ci(&f1s);
            let ci = if half.is_nan() {
                String::new()
            } else {
                format!(" ({:.3}–{:.3})", f - half, f + half)
            };
            out += &format!(
                "| {name} | {len} | {f:.3}{ci} | {:.0}% | {n} | {extra} |\n",
                100.0 * e
            );
        }
    }
    out + &paired_table(records, order) + &crate::refused_note(all)
}

/// One question of the grid, the same for every method: length, depth, trial and the asked
/// label.
fn question_of(r: &Value) -> Option<(u64, String, u64, String)> {
    Some((
        r["length"].as_u64()?,
        format!("{:.4}", r["depth"].as_f64()?),
        r["trial"].as_u64()?,
        r["label"].as_str()?.to_string(),
    ))
}

/// Each HOMER method against each other method on the questions both answered: the mean F1
/// difference with its 95% interval (normal approximation over the paired differences) and how
/// many questions each scored higher on. Empty when no two methods share a question.
pub fn paired_table(records: &[Value], order: &[String]) -> String {
    type Scores = BTreeMap<(u64, String, u64, String), f64>;
    let mut by: BTreeMap<String, Scores> = BTreeMap::new();
    for r in records {
        if let (Some(q), Some(f), Some(m)) =
            (question_of(r), r["f1"].as_f64(), r["method"].as_str())
        {
            by.entry(m.to_string()).or_default().insert(q, f);
        }
    }
    let names = crate::passkey::ordered(by.keys(), order);
    let mut rows = String::new();
    let homer = |n: &String| n.starts_with("homer");
    for (ia, a) in names.iter().enumerate().filter(|(_, n)| homer(n)) {
        // Every baseline; another HOMER method once per pair (the later one in the order).
        for b in names
            .iter()
            .enumerate()
            .filter(|&(ib, b)| !homer(b) || ib > ia)
            .map(|(_, b)| b)
        {
            let mut lens: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
            for (q, fa) in &by[a] {
                if let Some(fb) = by[b].get(q) {
                    lens.entry(q.0).or_default().push(fa - fb);
                }
            }
            for (len, d) in lens {
                let (mean, half) = crate::stats::mean_ci(&d);
                let wins = d.iter().filter(|&&x| x > 0.0).count();
                let losses = d.iter().filter(|&&x| x < 0.0).count();
                let ci = if half.is_nan() {
                    "–".to_string()
                } else {
                    format!("{:+.3} to {:+.3}", mean - half, mean + half)
                };
                rows += &format!(
                    "| {a} | {b} | {len} | {} | {mean:+.3} | {ci} | {wins} / {} / {losses} |\n",
                    d.len(),
                    d.len() - wins - losses
                );
            }
        }
    }
    if rows.is_empty() {
        return rows;
    }
    "\nPaired on the same questions (length, depth, trial): F1 of the first method minus the \
     second's, with a 95% interval of the mean difference; questions the first scored higher / \
     equal / lower.\n\n| method | against | length | questions | mean F1 difference | 95% \
     interval | higher / equal / lower |\n|---|---|---|---|---|---|---|\n"
        .to_string()
        + &rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40 verses of 10 tokens each; BM25 must pick the passage of the asked verse when the
    /// budget holds one passage, and fill a larger budget from the end of the document.
    #[test]
    fn retrieval_packs_the_passage_of_the_asked_verse() {
        let verses: Vec<Verse> = (0..40)
            .map(|i| Verse {
                label: format!("Ex{}:{}", 1 + i / 10, 1 + i % 10),
                text: if i == 21 {
                    "Thou shalt not kill the quail".into()
                } else {
                    format!("And the people went unto verse {i}")
                },
            })
            .collect();
        let lines: Vec<std::ops::Range<usize>> = (0..40).map(|i| i * 10..i * 10 + 10).collect();
        let q = QaSample {
            prompt: DocPrompt {
                prefix: vec![1],
                context: (0..400).collect(),
                suffix: vec![2, 3],
                question: None,
                docs: vec![],
            },
            lines,
            verses: 0..40,
            target: 21,
            label: "Ex3:2".into(),
            reference: verses[21].text.clone(),
        };
        // The label's words ("ex3", "2") match verses of chapter 3; one passage fits.
        let (p, hit) = retrieve(&q, &verses, 40);
        assert!(hit, "the passage of Ex3:2 (verses 20-23) was retrieved");
        assert_eq!(p.context, (200..240).collect::<Vec<u32>>());
        assert_eq!((p.prefix, p.suffix), (vec![1], vec![2, 3]));
        // Room for three passages: kept in document order, no passage twice.
        let (p, hit) = retrieve(&q, &verses, 120);
        assert!(hit && p.context.len() == 120);
        assert!(p.context.windows(2).all(|w| w[0] < w[1]));
    }

    /// The paired table matches questions across methods by (length, depth, trial, label) and
    /// leaves out questions only one method answered.
    #[test]
    fn paired_differences_use_shared_questions_only() {
        let rec = |m: &str, len: u64, depth: f64, trial: u64, f1: f64| {
            json!({"method": m, "length": len, "depth": depth, "trial": trial,
                   "label": format!("Gen{trial}:{depth}"), "f1": f1, "exact": false})
        };
        let mut rs = vec![
            rec("homer", 100, 0.1, 0, 0.5),
            rec("homer", 100, 0.5, 0, 0.4),
            rec("homer", 100, 0.9, 0, 0.2),
            rec("homer", 100, 0.9, 1, 0.9), // bm25 never answered this one
            rec("bm25", 100, 0.1, 0, 0.3),
            rec("bm25", 100, 0.5, 0, 0.4),
            rec("bm25", 100, 0.9, 0, 0.3),
        ];
        let t = paired_table(&rs, &[]);
        // Differences +0.2, 0, -0.1: mean +0.033, sd 0.1528, half-width 1.96·0.0882 = 0.173.
        assert!(
            t.contains("| homer | bm25 | 100 | 3 | +0.033 | -0.140 to +0.206 | 1 / 1 / 1 |"),
            "{t}"
        );
        // bm25 is not a HOMER method: no row of its own.
        assert!(!t.contains("| bm25 | homer |"), "{t}");
        assert!(paired_table(&rs[..4], &[]).is_empty());
        let full = table(&rs, &[]);
        assert!(
            full.contains("| homer | 100 | 0.500 (0.212–0.788) | 0% | 4 |"),
            "{full}"
        );
        // Two HOMER methods: one row for the pair, not one each way.
        rs.push(rec("homer:default", 100, 0.1, 0, 0.1));
        let t = paired_table(&rs, &[]);
        assert_eq!(
            t.matches("| homer | homer:default |").count()
                + t.matches("| homer:default | homer |").count(),
            1,
            "{t}"
        );
        assert!(
            t.contains("| homer:default | bm25 | 100 | 1 | -0.200 | – | 0 / 0 / 1 |"),
            "{t}"
        );
    }
}
