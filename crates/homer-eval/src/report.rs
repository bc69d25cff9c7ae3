//! `results.md` and its plots, rebuilt from the records alone; and the configurations of
//! `homer eval all` (full and quick).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use homer_engine::passkey::{Method, PasskeyFormat};
use homer_engine::{BiasChoice, Engine};
use serde_json::{Value, json};

use crate::passkey::{PasskeySpec, grid, ordered};
use crate::plot::{Heatmap, Lines, heatmaps, lines};
use crate::qa::QaSpec;
use crate::store::Store;
use crate::{EvalError, EvalMethod, HomerVariant, Result, Settings};

/// Everything `homer eval all` runs.
#[derive(Debug, Clone)]
pub struct AllSpec {
    pub passkey: PasskeySpec,
    pub perplexity_length: usize,
    pub perplexity_methods: Vec<Method>,
    pub qa: QaSpec,
    pub cost_lengths: Vec<usize>,
    pub ablation: PasskeySpec,
}

fn methods<M: std::str::FromStr>(list: &[&str]) -> Vec<M>
where
    M::Err: std::fmt::Debug,
{
    list.iter()
        .map(|m| m.parse().expect("known method"))
        .collect()
}

/// The baselines of the issue, HOMER and HOMER + YaRN.
pub const ALL_METHODS: [&str; 8] = [
    "plain",
    "truncation",
    "pi",
    "ntk",
    "dynamic-ntk",
    "yarn",
    "homer",
    "homer+yarn",
];

impl AllSpec {
    /// The full run: lengths ½, 1, 2, 4 windows (4K–32K for an 8K model), 5 depths, `trials`
    /// per cell; cost up to 8 windows (64K).
    pub fn full(window: usize, n_layers: usize, trials: usize) -> AllSpec {
        let w = window;
        let dflt = homer::default_warmup_layers(n_layers);
        AllSpec {
            passkey: PasskeySpec {
                lengths: vec![w / 2, w, 2 * w, 4 * w],
                depths: vec![0.1, 0.3, 0.5, 0.7, 0.9],
                trials,
                methods: methods(&ALL_METHODS),
                format: PasskeyFormat::Raw,
                filler: homer_engine::passkey::Filler::Classic,
                variants: vec![(String::new(), HomerVariant::default())],
            },
            perplexity_length: 4 * w,
            perplexity_methods: methods(&ALL_METHODS),
            qa: QaSpec {
                lengths: vec![w / 2, w, 2 * w, 4 * w],
                depths: vec![0.1, 0.5, 0.9],
                trials: trials.div_ceil(4),
                methods: ["plain", "truncation", "bm25", "yarn", "homer", "homer+yarn"]
                    .iter()
                    .map(|m| m.parse().unwrap())
                    .collect(),
            },
            cost_lengths: vec![w / 2, w, 2 * w, 4 * w, 8 * w],
            ablation: ablation(2 * w, vec![0.1, 0.5, 0.9], trials.div_ceil(2), w, dflt),
        }
    }

    /// Minutes, not hours: one trial per cell, short prompts (use a small `--window` with a big
    /// model).
    pub fn quick(window: usize, n_layers: usize) -> AllSpec {
        let w = window;
        let dflt = homer::default_warmup_layers(n_layers);
        AllSpec {
            passkey: PasskeySpec {
                lengths: vec![w / 2, 2 * w],
                depths: vec![0.5],
                trials: 1,
                methods: methods(&ALL_METHODS),
                format: PasskeyFormat::Raw,
                filler: homer_engine::passkey::Filler::Classic,
                variants: vec![(String::new(), HomerVariant::default())],
            },
            perplexity_length: 2 * w,
            perplexity_methods: methods(&["plain", "truncation", "yarn", "homer", "homer+yarn"]),
            qa: QaSpec {
                lengths: vec![2 * w],
                depths: vec![0.5],
                trials: 1,
                methods: vec![
                    EvalMethod::Model(Method::Truncation),
                    EvalMethod::Bm25,
                    EvalMethod::Model(Method::Homer),
                ],
            },
            cost_lengths: vec![w / 2, w, 2 * w],
            ablation: ablation(2 * w, vec![0.5], 1, w, dflt),
        }
    }
}

/// HOMER's ablations (spec §10) as passkey variants at one length: calibrated / uncalibrated /
/// random pruning, warm-up layers W around the default, chunk length C.
fn ablation(
    length: usize,
    depths: Vec<f64>,
    trials: usize,
    window: usize,
    w_default: usize,
) -> PasskeySpec {
    let v = HomerVariant::default;
    let mut variants = vec![
        ("calibrated".to_string(), v()),
        (
            "uncalibrated".to_string(),
            HomerVariant {
                bias: Some(BiasChoice::Zeros),
                ..v()
            },
        ),
        (
            "random".to_string(),
            HomerVariant {
                random_scores: true,
                ..v()
            },
        ),
    ];
    for w in [w_default / 2, w_default * 3 / 2] {
        variants.push((
            format!("W={w}"),
            HomerVariant {
                warmup_layers: Some(w),
                ..v()
            },
        ));
    }
    variants.push((
        format!("C={}", window / 4),
        HomerVariant {
            chunk_len: Some(window / 4),
            ..v()
        },
    ));
    PasskeySpec {
        lengths: vec![length],
        depths,
        trials,
        methods: vec![EvalMethod::Model(Method::Homer)],
        format: PasskeyFormat::Raw,
        filler: homer_engine::passkey::Filler::Classic,
        variants,
    }
}

/// Which tasks `homer eval all` runs.
pub const TASKS: [&str; 5] = ["passkey", "perplexity", "qa", "cost", "ablation"];

/// Run every task of `spec` (the missing cells only), then write the report.
#[allow(clippy::too_many_arguments)]
pub fn run_all(
    engine: &mut Engine,
    s: &Settings,
    spec: &AllSpec,
    tasks: &[String],
    kjv: &Path,
    command: &str,
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    for t in tasks {
        if !TASKS.contains(&t.as_str()) {
            return Err(EvalError::Setting(format!(
                "task `{t}`: expected one of {}",
                TASKS.join(", ")
            )));
        }
    }
    write_meta(engine, s, command)?;
    let verses = crate::text::read_verses(kjv)?;
    let source = kjv
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let want = |t: &str| tasks.iter().any(|x| x == t);
    // One token list of the text for perplexity and cost.
    let needs_tokens = want("perplexity") || want("cost");
    let max_len = spec
        .cost_lengths
        .iter()
        .copied()
        .chain([spec.perplexity_length])
        .max()
        .unwrap_or(0);
    let tokens = if needs_tokens {
        text_tokens(engine, &verses, max_len)?
    } else {
        vec![]
    };
    if want("passkey") {
        let mut st = Store::open_to_measure(&s.out_dir, "passkey")?;
        crate::passkey::run(engine, s, &spec.passkey, &mut st, cancel)?;
    }
    if want("perplexity") {
        let mut st = Store::open_to_measure(&s.out_dir, "perplexity")?;
        crate::perplexity::run(
            engine,
            s,
            &tokens,
            &source,
            spec.perplexity_length,
            &spec.perplexity_methods,
            &mut st,
            cancel,
        )?;
    }
    if want("qa") {
        let mut st = Store::open_to_measure(&s.out_dir, "qa")?;
        crate::qa::run(engine, s, &verses, &source, &spec.qa, &mut st, cancel)?;
    }
    if want("cost") {
        let mut st = Store::open_to_measure(&s.out_dir, "cost")?;
        crate::cost::run(
            engine,
            s,
            &tokens,
            &source,
            &spec.cost_lengths,
            &[Method::Plain, Method::Homer],
            &mut st,
            cancel,
        )?;
    }
    if want("ablation") {
        let mut st = Store::open_to_measure(&s.out_dir, "ablation")?;
        crate::passkey::run(engine, s, &spec.ablation, &mut st, cancel)?;
    }
    engine
        .model
        .set_rope_scaling(homer_model::RopeScaling::None)?;
    write(&s.out_dir)
}

/// The first `max_len` tokens of the verses, as running text ("label text" lines).
pub fn text_tokens(
    engine: &Engine,
    verses: &[crate::text::Verse],
    max_len: usize,
) -> Result<Vec<u32>> {
    let mut ids = vec![];
    let mut text = String::new();
    for (i, v) in verses.iter().enumerate() {
        text.push_str(&v.label);
        text.push(' ');
        text.push_str(&v.text);
        text.push('\n');
        // Tokenise in pieces of 200 verses (line starts are token boundaries).
        if (i + 1) % 200 == 0 || i + 1 == verses.len() {
            let first = ids.is_empty();
            ids.extend(engine.tokenizer.encode(&text, first)?);
            text.clear();
            if ids.len() >= max_len {
                break;
            }
        }
    }
    Ok(ids)
}

/// Record the run's settings and machine in `OUT/meta.json`, with `command` added to the
/// commands that made the records (every `homer eval` task calls it before it runs).
pub fn write_meta(engine: &Engine, s: &Settings, command: &str) -> Result<()> {
    let p = s.out_dir.join("meta.json");
    let old: Value = std::fs::read_to_string(&p)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    // Every command that added records, oldest first, once each (a rerun resumes).
    let mut commands = old["commands"].as_array().cloned().unwrap_or_default();
    if !commands.contains(&json!(command)) {
        commands.push(json!(command));
    }
    // Every backend and machine the commands ran on (a store may gather several).
    let here = json!(format!(
        "{} ({}) on {}",
        engine.device.backend,
        engine.device.adapter,
        crate::store::host()
    ));
    let mut machines = old["machines"].as_array().cloned().unwrap_or_default();
    if !machines.contains(&here) {
        machines.push(here);
    }
    let v = json!({
        "model": crate::model_id(engine), "model_path": engine.model_path,
        "backend": engine.device.backend.to_string(), "adapter": engine.device.adapter,
        "window": s.window, "native_window": engine.model.native_window(),
        "chunk_len": s.chunk_len, "warmup_layers": s.warmup_layers,
        "bias": crate::passkey::bias_name(&s.bias), "rope_factor": s.rope_factor,
        "seed": s.seed, "commands": commands, "machines": machines,
        "cpus": crate::store::threads(),
        "counting_allocator": crate::alloc::installed(),
    });
    std::fs::create_dir_all(&s.out_dir)
        .and_then(|_| std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()))
        .map_err(|e| EvalError::Io(format!("{}: cannot write: {e}", p.display())))
}

/// The commands of `meta.json` for the page, oldest first: commands that differ only in
/// `--trials N` (a grid grown a trial at a time, each run resuming the store) or `--quiet` are
/// one line, the one with the most trials, naming the values it ran with.
fn command_lines(commands: &[&str]) -> Vec<String> {
    // (command without --trials and --quiet, its trial counts, and the full command shown: the
    // latest of those run with the most trials)
    let mut groups: Vec<(String, Vec<u64>, String)> = vec![];
    for &c in commands {
        let words: Vec<&str> = c.split(' ').collect();
        let mut trials = None;
        let mut rest = vec![];
        let mut i = 0;
        while i < words.len() {
            match (
                words[i],
                words.get(i + 1).and_then(|n| n.parse::<u64>().ok()),
            ) {
                ("--trials", Some(n)) => {
                    trials = Some(n);
                    i += 2;
                    continue;
                }
                ("--quiet", _) => {}
                (w, _) => rest.push(w),
            }
            i += 1;
        }
        let key = rest.join(" ");
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => {
                if trials.unwrap_or(0) >= g.1.iter().copied().max().unwrap_or(0) {
                    g.2 = c.to_string();
                }
                if let Some(n) = trials
                    && !g.1.contains(&n)
                {
                    g.1.push(n);
                }
            }
            None => groups.push((key, trials.into_iter().collect(), c.to_string())),
        }
    }
    groups
        .into_iter()
        .map(|(_, mut ns, c)| {
            ns.sort();
            if ns.len() > 1 {
                let ns: Vec<String> = ns.iter().map(u64::to_string).collect();
                format!(
                    "`{c}` (run with --trials {} in turn, each adding to the records)",
                    ns.join(", ")
                )
            } else {
                format!("`{c}`")
            }
        })
        .collect()
}

fn order() -> Vec<String> {
    let mut o: Vec<String> = ALL_METHODS.iter().map(|s| s.to_string()).collect();
    o.insert(2, "bm25".into());
    o
}

fn heatmap_panels(records: &[Value], order: &[String]) -> Vec<Heatmap> {
    let g = grid(records);
    let mut lengths: Vec<usize> = g.values().flat_map(|l| l.keys().copied()).collect();
    lengths.sort();
    lengths.dedup();
    let depths = crate::passkey::depths_of(&g);
    ordered(g.keys(), order)
        .into_iter()
        .map(|name| {
            let cells = depths
                .iter()
                .map(|d| {
                    lengths
                        .iter()
                        .map(|l| g[&name].get(l).and_then(|c| c.get(d)).copied())
                        .collect()
                })
                .collect();
            Heatmap {
                title: short_name(&name),
                lengths: lengths.clone(),
                depths: depths.clone(),
                cells,
            }
        })
        .collect()
}

/// Write `results.md` and the plots from the records in `dir`.
pub fn write(dir: &Path) -> Result<PathBuf> {
    let order = order();
    let meta: Value = std::fs::read_to_string(dir.join("meta.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    let mut md = String::from("# homer — evaluation results\n\n");
    md += "Generated by `homer eval all` from the records (`*.jsonl`) in this directory; rerun \
           `homer eval report --out DIR` to rebuild this page and the plots from them.\n\n";
    if !meta.is_null() {
        md += &format!(
            "- model: `{}`; window held to {} tokens (native {})\n- backend: {}\n- HOMER: C = {}, W = {}, bias {}; RoPE factor {}\n- commands that made the records:\n{}\n",
            meta["model"].as_str().unwrap_or("?"),
            meta["window"],
            meta["native_window"],
            match meta["machines"].as_array() {
                Some(m) => m
                    .iter()
                    .filter_map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                None => format!(
                    "{} on {} ({} CPU threads)",
                    meta["backend"].as_str().unwrap_or("?"),
                    meta["adapter"].as_str().unwrap_or("?"),
                    meta["cpus"]
                ),
            },
            meta["chunk_len"]
                .as_u64()
                .map_or("half the window".into(), |c| c.to_string()),
            meta["warmup_layers"]
                .as_u64()
                .map_or("default".into(), |c| c.to_string()),
            meta["bias"].as_str().unwrap_or("?"),
            meta["rope_factor"]
                .as_f64()
                .map_or("smallest that holds the prompt".into(), |c| c.to_string()),
            meta["commands"]
                .as_array()
                .map(|c| command_lines(
                    &c.iter()
                        .map(|c| c.as_str().unwrap_or("?"))
                        .collect::<Vec<_>>()
                )
                .iter()
                .map(|c| format!("  - {c}\n"))
                .collect::<String>())
                .unwrap_or_default(),
        );
    }
    let load = |t: &str| -> Result<Vec<Value>> {
        if dir.join(format!("{t}.jsonl")).exists() {
            Ok(Store::open(dir, t)?.records().to_vec())
        } else {
            Ok(vec![])
        }
    };
    let pk = load("passkey")?;
    let qa = load("qa")?;
    if headline(&dir.join("headline.png"), &pk, &qa, &order)? {
        md +=
            "![headline: passkey accuracy and QA F1 against the document length](headline.png)\n\n";
        if let Ok(d) = "homer:default".parse::<Method>() {
            md += &format!(
                "In the plots `homer:default` is `{d}`, the engine's default selection (what \
                 `homer ask` runs); `homer` is the paper's algorithm.\n\n"
            );
        }
    }
    if !pk.is_empty() {
        heatmaps(
            &dir.join("passkey.png"),
            "Passkey retrieval: keys found per cell",
            &heatmap_panels(&pk, &order),
        )?;
        md += "## Passkey retrieval (spec §9.3)\n\nA 5-digit key hidden at a depth of filler text; \
               right when the first number of the answer is the key.\n\n";
        md += &crate::passkey::table(&pk, &order);
        md += "\n![passkey heatmaps](passkey.png)\n\n";
    }
    let ppl_all = load("perplexity")?;
    let ppl = crate::ran(&ppl_all);
    if !ppl_all.is_empty() {
        let maxlen = ppl
            .iter()
            .filter_map(|r| r["length"].as_u64())
            .max()
            .unwrap_or(0) as usize;
        let window = ppl.first().and_then(|r| r["window"].as_u64()).unwrap_or(0) as usize;
        let checkpoints: Vec<usize> = [window / 2, window, 2 * window, 4 * window, 8 * window]
            .into_iter()
            .filter(|&c| c > 0 && c < maxlen)
            .chain([maxlen.saturating_sub(1)])
            .collect();
        let (mut cum, mut spans) = (vec![], vec![]);
        let mut names: Vec<String> = ppl
            .iter()
            .map(|r| r["method"].as_str().unwrap_or("?").to_string())
            .collect();
        names.sort();
        names.dedup();
        // Spans of 1/24 of the text (512 tokens at 12K) for the second panel.
        let span = (maxlen / 24).max(1);
        for name in ordered(names.iter(), &order) {
            if let Some(r) = ppl
                .iter()
                .filter(|r| r["method"].as_str() == Some(&name))
                .max_by_key(|r| r["length"].as_u64())
            {
                let nll = crate::perplexity::nll_of(r);
                let step = (nll.len() / 200).max(1);
                let xs: Vec<usize> = (step..=nll.len()).step_by(step).collect();
                let ys = crate::perplexity::cumulative(&nll, &xs);
                cum.push((
                    short_name(&name),
                    xs.iter()
                        .zip(ys)
                        .filter_map(|(&x, y)| y.map(|y| (x as f64, y)))
                        .collect(),
                ));
                spans.push((
                    short_name(&name),
                    (0..nll.len())
                        .step_by(span)
                        .filter_map(|a| {
                            let b = (a + span).min(nll.len());
                            crate::perplexity::span_perplexity(&nll, a..b)
                                .map(|p| ((a + b) as f64 / 2.0, p))
                        })
                        .collect(),
                ));
            }
        }
        let range = |series: &[(String, Vec<(f64, f64)>)], cap: f64| {
            let ys = series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
            let lo = ys.clone().fold(f64::MAX, f64::min);
            let hi = ys.fold(f64::MIN, f64::max);
            (lo * 0.9, hi.min(lo * cap) * 1.05)
        };
        let (r1, r2) = (range(&cum, 4.0), range(&spans, 8.0));
        lines(
            &dir.join("perplexity.png"),
            "Long-document perplexity (KJV)",
            &[
                Lines {
                    title: "cumulative perplexity over the first x tokens".into(),
                    x_desc: "tokens scored (x)".into(),
                    y_desc: "perplexity".into(),
                    log_x: false,
                    log_y: false,
                    series: cum,
                    y_range: Some(r1),
                },
                Lines {
                    title: format!("perplexity of each {span}-token span"),
                    x_desc: "position in the text (tokens)".into(),
                    y_desc: "perplexity".into(),
                    log_x: false,
                    log_y: false,
                    series: spans,
                    y_range: Some(r2),
                },
            ],
        )?;
        md += "## Long-document perplexity (spec §9.4)\n\nEvery token after the first is scored \
               once; cumulative perplexity exp(mean NLL) over the first x tokens. HOMER condenses \
               the text before each segment of half a window and scores the segment through the \
               merged cache.\n\n";
        md += &crate::perplexity::table(&ppl_all, &checkpoints, &order);
        md += "\n![perplexity](perplexity.png)\n\n";
    }
    if !qa.is_empty() {
        let series = qa_series(&qa, &order);
        lines(
            &dir.join("qa.png"),
            "Document QA: quote a KJV verse",
            &[Lines {
                title: "mean token F1 against the verse".into(),
                x_desc: "document length (tokens)".into(),
                y_desc: "F1".into(),
                log_x: true,
                log_y: false,
                series,
                y_range: Some((0.0, 1.0)),
            }],
        )?;
        md += "## Document QA (KJV verse lookup)\n\n\"Quote the verse John11:35\" with the verse at a \
               depth of a run of KJV verses; token F1 and exact match against the verse. `bm25` \
               packs the best passages of 4 verses into the window.\n\n";
        md += &crate::qa::table(&qa, &order);
        md += "\n![qa](qa.png)\n\n";
    }
    let cost_all = load("cost")?;
    let cost = crate::ran(&cost_all);
    if !cost_all.is_empty() {
        // One host a backend: times of different machines do not share a line.
        let hosts = crate::cost::plotted_hosts(&cost);
        let mut by: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
        for r in &cost {
            let backend = r["backend"].as_str().unwrap_or("?");
            if hosts.get(backend) != Some(&r["machine"].as_str().map(str::to_string)) {
                continue;
            }
            let name = r["method"].as_str().unwrap_or("?");
            let name = if backend == "cpu" {
                name.to_string()
            } else {
                format!("{name} ({backend})")
            };
            by.entry(name).or_default().push((
                r["length"].as_f64().unwrap_or(0.0),
                r["secs"].as_f64().unwrap_or(0.0),
                // on a GPU the device pools' growth, where the tensors live
                crate::cost::device_growth(r)
                    .map(|b| b as f64)
                    .or(r["peak_bytes"].as_f64())
                    .unwrap_or(f64::NAN)
                    / 1048576.0,
            ));
        }
        let mk = |f: fn(&(f64, f64, f64)) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
            ordered(by.keys(), &order)
                .into_iter()
                .map(|n| {
                    let mut v: Vec<(f64, f64)> = by[&n].iter().map(|p| (p.0, f(p))).collect();
                    v.sort_by(|a, b| a.0.total_cmp(&b.0));
                    (short_name(&n), v)
                })
                .collect()
        };
        lines(
            &dir.join("cost.png"),
            "Prefill cost: plain vs HOMER",
            &[
                Lines {
                    title: "wall time".into(),
                    x_desc: "prompt length (tokens)".into(),
                    y_desc: "seconds".into(),
                    log_x: true,
                    log_y: true,
                    series: mk(|p| p.1),
                    y_range: None,
                },
                Lines {
                    title: "peak memory above the model".into(),
                    x_desc: "prompt length (tokens)".into(),
                    y_desc: "MiB (CPU: allocator peak; GPU: device pools)".into(),
                    log_x: true,
                    log_y: false,
                    series: mk(|p| p.2),
                    y_range: None,
                },
            ],
        )?;
        md += "## Cost: prefill time and peak memory\n\nPeak memory is the peak of live heap \
               bytes counted by homer's allocator (`homer_eval::alloc::CountingAlloc`) above what \
               was live before the prefill (the model's weights): measured, not estimated. On the \
               CPU backend every tensor lives there. On a GPU backend the device column is what \
               burn's memory pools reserved right after the prefill minus what they held before \
               it (after a cleanup): the pools keep the pages a prefill grew them by, so that is \
               its device high-water mark above the model. On a GPU an untimed prefill of the same \
               prompt runs first, so that neither column counts burn's autotune or shader \
               compilation.\n\n";
        md += &crate::cost::table(&cost_all, &order);
        let drawn: Vec<String> = hosts
            .iter()
            .map(|(b, h)| {
                format!(
                    "{b} on {}",
                    h.as_deref()
                        .unwrap_or("the host of the records that name none")
                )
            })
            .collect();
        md += &format!(
            "\n![cost](cost.png)\n\nThe plot draws one machine a backend: {}.\n\n",
            crate::and_list(&drawn)
        );
    }
    let rep = load("replay")?;
    if !rep.is_empty() {
        md += "## Readability replay (issue 15)\n\nHOMER runs once per passkey prompt; then the \
               plain model reads prefix + a selection of the context (document order, fresh \
               positions) + suffix. `homer-tree` is HOMER's own answer, `homer` its kept set \
               replayed, `whole` the needle plus random whole sentences, `shredded` the needle \
               plus as many filler tokens in runs of 1–2, and the selection units are applied \
               once to the leaves' scores. Budget: fraction of HOMER's final kept context. Cells: \
               keys found · mean runs of consecutive tokens · mean tokens · needle kept \
               whole.\n\n";
        md += &crate::replay::table(&rep);
        md += "\n";
    }
    let abl = load("ablation")?;
    if !abl.is_empty() {
        md += "## Ablations (spec §10), on passkey\n\nHOMER with calibrated significance (the \
               default), uncalibrated (zero bias), random pruning, fewer/more warm-up layers W, \
               and a shorter chunk length C.\n\n";
        md += &crate::passkey::table(&abl, &[]);
        md += "\n";
    }
    let mut timed = vec![
        ("passkey", pk),
        ("perplexity", ppl_all),
        ("qa", qa),
        ("cost", cost_all),
    ];
    timed.extend([("replay", rep), ("ablation", abl)]);
    md += &compute_time(&timed);
    let p = dir.join("results.md");
    std::fs::write(&p, md)
        .map_err(|e| EvalError::Io(format!("{}: cannot write: {e}", p.display())))?;
    Ok(p)
}

/// The seconds a record's own computation took: `secs` (its prompt's prefill and answer), or,
/// for QA records written before they carried it, the prefill alone. None for records that
/// did not run or that took another method's whole run of the same prompt (`same_run_as`).
fn record_secs(r: &Value) -> Option<(f64, bool)> {
    if r["same_run_as"].is_string() {
        return None;
    }
    match r["secs"].as_f64() {
        // A cost record on a GPU also ran an untimed warm-up prefill first.
        Some(t) => Some((t + r["warmup_secs"].as_f64().unwrap_or(0.0), false)),
        None => r["prefill_secs"].as_f64().map(|t| (t, true)),
    }
}

/// Records far slower than the rest of their cell (the same method, length, filler, variant,
/// backend and leaf sharing; cells of at least 3 timed records): over 2.5× the cell's median and
/// over a minute more. Their count and the seconds they took above the median: time the machine
/// spent on other work (a build, a test run) while they ran.
fn slowed(records: &[Value]) -> (usize, f64) {
    let cell = |r: &Value| {
        ["method", "length", "filler", "variant", "backend"]
            .map(|k| r[k].to_string())
            .join("|")
            + if r["leaves_reused"].as_u64().unwrap_or(0) > 0 {
                "|shared"
            } else {
                ""
            }
    };
    let mut cells: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in records {
        if let Some((t, _)) = record_secs(r) {
            cells.entry(cell(r)).or_default().push(t);
        }
    }
    let (mut n, mut excess) = (0, 0.0);
    for ts in cells.values() {
        if ts.len() < 3 {
            continue;
        }
        let m = crate::stats::median(&mut ts.clone());
        for &t in ts {
            if t > 2.5 * m && t - m > 60.0 {
                n += 1;
                excess += t - m;
            }
        }
    }
    (n, excess)
}

/// How long the records took on the machine, per task and in all: each record's own time, summed.
pub fn compute_time(tasks: &[(&str, Vec<Value>)]) -> String {
    let mut rows = String::new();
    let (mut total, mut total_n, mut prefill_only) = (0.0, 0usize, 0usize);
    let (mut slow_n, mut slow_secs) = (0usize, 0.0);
    for (task, records) in tasks {
        let ran = crate::ran(records);
        let times: Vec<(f64, bool)> = ran.iter().filter_map(record_secs).collect();
        if times.is_empty() {
            continue;
        }
        let (n, x) = slowed(&ran);
        slow_n += n;
        slow_secs += x;
        let secs: f64 = times.iter().map(|t| t.0).sum();
        prefill_only += times.iter().filter(|t| t.1).count();
        rows += &format!("| {task} | {} | {:.1} |\n", times.len(), secs / 3600.0);
        total += secs;
        total_n += times.len();
    }
    if rows.is_empty() {
        return rows;
    }
    let mut out = format!(
        "## Compute time\n\nThe time the records took, each its own prompt's (prefill and \
         answer) on the machines named above, summed; a record that took another method's run \
         of the same prompt counts once. Waits between runs are not in it.\n\n| task | runs \
         | hours |\n|---|---|---|\n{rows}| all | {total_n} | {:.1} |\n",
        total / 3600.0
    );
    if prefill_only > 0 {
        out += &format!(
            "\n{prefill_only} QA records written before QA records carried their whole time \
             count their prefill only (the answer's decoding, a few seconds, is left out).\n"
        );
    }
    if slow_n > 0 {
        out += &format!(
            "\n{slow_n} records took over 2.5× the median of their cell (the same method, length \
             and filler; cells of 3 or more) and over a minute more: {:.1} h of the total lies \
             above those medians, time the machine spent on other work (a build, a test run) \
             while they ran. Without it the records took {:.1} h.\n",
            slow_secs / 3600.0,
            (total - slow_secs) / 3600.0
        );
    }
    out + "\n"
}

/// The method's name in a legend: the engine's default selection as `homer:default` (alone,
/// or before a filler or variant note).
fn short_name(name: &str) -> String {
    let Ok(d) = "homer:default".parse::<Method>().map(|d| d.to_string()) else {
        return name.to_string();
    };
    match name.strip_prefix(&d) {
        Some(rest) if rest.is_empty() || rest.starts_with(' ') => format!("homer:default{rest}"),
        _ => name.to_string(),
    }
}

/// QA's mean F1 against the document length, one series a method, in the page's order.
fn qa_series(qa: &[Value], order: &[String]) -> Vec<(String, Vec<(f64, f64)>)> {
    let m = crate::qa::summary(qa);
    ordered(m.keys(), order)
        .into_iter()
        .map(|n| {
            let pts = m[&n].iter().map(|(&l, e)| (l as f64, e.0)).collect();
            (short_name(&n), pts)
        })
        .collect()
}

/// The page's headline plot: passkey accuracy against the length, one panel per filler, and
/// QA's mean F1 against the length. False (nothing drawn) when there are neither.
fn headline(path: &Path, pk: &[Value], qa: &[Value], order: &[String]) -> Result<bool> {
    let mut panels = vec![];
    // accuracy[filler][method][length] = (found, prompts)
    let mut acc: BTreeMap<String, BTreeMap<String, BTreeMap<u64, (usize, usize)>>> =
        BTreeMap::new();
    for r in &crate::ran(pk) {
        let filler = r["filler"].as_str().unwrap_or("classic").to_string();
        let c = acc
            .entry(filler)
            .or_default()
            .entry(r["method"].as_str().unwrap_or("?").to_string())
            .or_default()
            .entry(r["length"].as_u64().unwrap_or(0))
            .or_default();
        c.0 += r["correct"].as_bool().unwrap_or(false) as usize;
        c.1 += 1;
    }
    for (filler, methods) in &acc {
        let series = ordered(methods.keys(), order)
            .into_iter()
            .map(|m| {
                let pts = methods[&m]
                    .iter()
                    .map(|(&l, &(ok, n))| (l as f64, ok as f64 / n.max(1) as f64))
                    .collect();
                (short_name(&m), pts)
            })
            .collect();
        panels.push(Lines {
            title: format!("passkey, {filler} filler: share of keys found"),
            x_desc: "prompt length (tokens)".into(),
            y_desc: "accuracy".into(),
            log_x: true,
            log_y: false,
            series,
            y_range: Some((0.0, 1.0)),
        });
    }
    if !crate::ran(qa).is_empty() {
        let series = qa_series(qa, order);
        let top = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(0.5, f64::max);
        panels.push(Lines {
            title: "KJV verse QA: mean token F1".into(),
            x_desc: "document length (tokens)".into(),
            y_desc: "F1".into(),
            log_x: true,
            log_y: false,
            series,
            y_range: Some((0.0, top)),
        });
    }
    if panels.is_empty() {
        return Ok(false);
    }
    lines(
        path,
        "homer on the default model: what it reads past the window",
        &panels,
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_grown_a_trial_at_a_time_are_one_line() {
        let lines = command_lines(&[
            "homer eval qa --out d --trials 1",
            "homer eval passkey --trials 1 --filler classic --out d",
            "homer eval passkey --trials 2 --filler classic --out d --quiet",
            "homer eval passkey --trials 1 --filler kjv.txt --out d",
            "homer eval passkey --trials 3 --filler classic --out d",
            "homer eval passkey --trials 2 --filler classic --out d",
            "homer eval qa --out d --quiet --trials 1",
            "homer eval cost --out d",
        ]);
        assert_eq!(
            lines,
            vec![
                "`homer eval qa --out d --quiet --trials 1`".to_string(),
                "`homer eval passkey --trials 3 --filler classic --out d` (run with --trials 1, \
                 2, 3 in turn, each adding to the records)"
                    .to_string(),
                "`homer eval passkey --trials 1 --filler kjv.txt --out d`".to_string(),
                "`homer eval cost --out d`".to_string(),
            ]
        );
    }

    #[test]
    fn compute_time_sums_each_run_once() {
        let rs = vec![
            json!({"method": "plain", "secs": 1800.0}),
            // another method's run of the same prompt: not counted again
            json!({"method": "yarn", "secs": 1800.0, "same_run_as": "plain"}),
            json!({"method": "homer", "secs": 1080.0, "leaves_reused": 3}),
            json!({"method": "ntk", "skipped": "too long"}),
        ];
        let qa = vec![
            json!({"method": "bm25", "secs": 360.0, "prefill_secs": 300.0}),
            json!({"method": "truncation", "prefill_secs": 360.0}),
        ];
        // a GPU cost record: its untimed warm-up prefill counts too
        let cost = vec![json!({"method": "plain", "secs": 1080.0, "warmup_secs": 720.0})];
        let t = compute_time(&[
            ("passkey", rs),
            ("qa", qa),
            ("cost", cost),
            ("ablation", vec![]),
        ]);
        assert!(t.contains("| passkey | 2 | 0.8 |"), "{t}");
        assert!(t.contains("| qa | 2 | 0.2 |"), "{t}");
        assert!(t.contains("| cost | 1 | 0.5 |"), "{t}");
        assert!(t.contains("| all | 5 | 1.5 |"), "{t}");
        assert!(!t.contains("| ablation |"), "{t}");
        assert!(t.contains("1 QA records written before"), "{t}");
        assert!(compute_time(&[("qa", vec![])]).is_empty());
        assert!(!t.contains("over 2.5×"), "{t}");
    }

    #[test]
    fn records_slowed_by_other_work_are_counted_apart() {
        let rec = |len: u64, secs: f64| json!({"method": "homer", "length": len, "secs": secs});
        let rs = vec![
            rec(4096, 100.0),
            rec(4096, 110.0),
            rec(4096, 90.0),
            rec(4096, 1000.0), // 890 s above the median of 110 s
            rec(4096, 240.0),  // 2.2× the median: not counted
            rec(8192, 10.0),
            rec(8192, 12.0),
            rec(8192, 60.0), // 5× the median of 12 s but under a minute more: not counted
            rec(65536, 9000.0), // a cell of two: no median to judge by
            rec(65536, 90.0),
        ];
        let (n, x) = slowed(&rs);
        assert_eq!((n, x), (1, 890.0));
        let t = compute_time(&[("passkey", rs)]);
        assert!(t.contains("1 records took over 2.5×"), "{t}");
        assert!(t.contains(": 0.2 h of the total"), "{t}");
        let total: f64 = [
            100.0, 110.0, 90.0, 1000.0, 240.0, 10.0, 12.0, 60.0, 9000.0, 90.0,
        ]
        .iter()
        .sum();
        assert!(
            t.contains(&format!("took {:.1} h.", (total - 890.0) / 3600.0)),
            "{t}"
        );
    }

    #[test]
    fn the_default_selection_is_named_short_in_legends() {
        let long = "homer:default".parse::<Method>().unwrap().to_string();
        assert_ne!(long, "homer:default");
        assert_eq!(short_name(&long), "homer:default");
        assert_eq!(
            short_name(&format!("{long} (lines filler)")),
            "homer:default (lines filler)"
        );
        assert_eq!(short_name(&format!("{long}0")), format!("{long}0"));
        assert_eq!(short_name("homer"), "homer");
        assert_eq!(short_name("truncation"), "truncation");
    }
}
