//! Cost: wall time and peak memory of a plain prefill and a HOMER prefill of the same prompt, at
//! growing lengths, on one backend in one process. Peak memory is the peak of live heap bytes
//! counted by [`crate::alloc::CountingAlloc`] (the `homer` binary's allocator) above what was
//! live before the run (the model's weights and the tokenizer), so it is the memory the prefill
//! itself needs: activations, the KV cache, HOMER's chunks. On the CPU backend every tensor is
//! in that heap. On a GPU backend the device memory burn's pools hold is read before (after a
//! cleanup) and right after the prefill ([`homer_model::backend::device_memory`]): the pools
//! keep the pages a prefill grew them by, so the growth is its device high-water mark.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use homer_engine::passkey::Method;
use homer_engine::{DocPrompt, Engine};
use serde_json::{Value, json};

use crate::store::Store;
use crate::{HomerVariant, Result, Settings, alloc, homer_config, model_id, set_rope};

/// What one prefill cost.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub secs: f64,
    /// Peak heap bytes above those live at the start (None when the counting allocator is not
    /// installed).
    pub peak: Option<usize>,
    pub rows: usize,
    /// Heap bytes live at the start (the model's weights on the CPU backend).
    pub before: usize,
    /// On a GPU: device bytes burn's pools held before (after a cleanup) and right after the
    /// prefill — the pools keep the pages the prefill grew them by, so the difference is the
    /// prefill's device high-water mark above the model.
    pub device: Option<(u64, u64)>,
}

/// Prefill `prompt` with `method` (plain or homer) and measure it.
pub fn measure(
    engine: &mut Engine,
    prompt: &DocPrompt,
    method: &Method,
    s: &Settings,
    cancel: &AtomicBool,
) -> Result<Measured> {
    set_rope(engine, method, prompt.total_len(), s)?;
    let device = engine.model.device.clone();
    let dev_before = homer_model::backend::device_memory(&device).map(|_| {
        device.memory_cleanup();
        homer_model::backend::device_memory(&device).map_or(0, |m| m.reserved)
    });
    let base = alloc::reset_peak();
    let t0 = Instant::now();
    let rows = if method.uses_homer() {
        let cfg = homer_config(
            engine,
            method,
            prompt.total_len(),
            s,
            &HomerVariant::default(),
        )?;
        let out = engine.homer_prefill(prompt, &cfg, cancel, &mut |_| {})?;
        out.cache.len()
    } else {
        let (_, cache) = engine.prefill(&prompt.concatenated(), cancel, &mut |_| {})?;
        cache.len()
    };
    let secs = t0.elapsed().as_secs_f64();
    let peak = alloc::installed().then(|| alloc::peak_bytes().saturating_sub(base));
    let device = dev_before.map(|b| {
        let _ = device.sync();
        let after = homer_model::backend::device_memory(&device).map_or(0, |m| m.reserved);
        (b, after)
    });
    Ok(Measured {
        secs,
        peak,
        rows,
        before: base,
        device,
    })
}

/// A prompt of `length` tokens cut from `tokens` (prefix 32, suffix 32, the rest context).
pub fn prompt_of(tokens: &[u32], length: usize) -> DocPrompt {
    let a = 32.min(length / 4);
    DocPrompt {
        prefix: tokens[..a].to_vec(),
        context: tokens[a..length - a].to_vec(),
        suffix: tokens[length - a..length].to_vec(),
        question: None,
        docs: vec![],
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &mut Engine,
    s: &Settings,
    tokens: &[u32],
    source: &str,
    lengths: &[usize],
    methods: &[Method],
    store: &mut Store,
    cancel: &AtomicBool,
) -> Result<()> {
    let model = model_id(engine);
    let backend = engine.device.backend.to_string();
    let gpu = homer_model::backend::device_memory(&engine.model.device).is_some();
    for &len in lengths {
        if len > tokens.len() {
            return Err(crate::EvalError::Setting(format!(
                "{source} has {} tokens, fewer than the cost length {len} (use the whole KJV: scripts/fetch-kjv)",
                tokens.len()
            )));
        }
        for method in methods {
            // Cost is the host's: a store's cell measured on another host is measured again.
            let host = store.machine().map_or(String::new(), |m| format!("|{m}"));
            let key = format!("{model}|{method}|{len}|{backend}{host}|{}", s.key_tail());
            if store.has(&key) {
                continue;
            }
            let cell = json!({
                "key": key, "model": model, "method": method.to_string(), "length": len,
            });
            if s.skipped(store, &method.to_string(), len, cell.clone())? {
                continue;
            }
            let prompt = prompt_of(tokens, len);
            // On a GPU the first prefill of a shape tunes and compiles its kernels (burn's
            // autotune times every variant, on buffers of its own); an untimed run first keeps
            // that out of both the time and the device memory. The CPU backend has no tuning.
            let warmup = if gpu {
                let t0 = Instant::now();
                if let Err(e) = measure(engine, &prompt, method, s, cancel) {
                    crate::refuse(store, s, e, cell)?;
                    continue;
                }
                let w = t0.elapsed().as_secs_f64();
                s.log(format!("cost {method:>8} {len:>6} tokens: warm-up {w:.1}s"));
                Some(w)
            } else {
                None
            };
            let m = match measure(engine, &prompt, method, s, cancel) {
                Ok(m) => m,
                Err(e) => {
                    crate::refuse(store, s, e, cell)?;
                    continue;
                }
            };
            let Measured {
                secs,
                peak,
                rows,
                before,
                device,
            } = m;
            s.log(format!(
                "cost {method:>8} {len:>6} tokens: {secs:.1}s, peak {} MiB above the model{}, cache {rows} rows",
                peak.map_or("?".into(), |p| format!("{:.0}", p as f64 / 1048576.0)),
                device.map_or(String::new(), |(b, a)| format!(
                    ", device {:.0} MiB above the model",
                    a.saturating_sub(b) as f64 / 1048576.0
                ))
            ));
            store.append(json!({
                "key": key, "model": model, "method": method.to_string(), "length": len,
                "backend": backend, "adapter": engine.device.adapter, "secs": secs,
                "peak_bytes": peak, "live_before_bytes": before, "cache_rows": rows,
                "window": s.window,
                "device_reserved_before": device.map(|d| d.0),
                "device_reserved_after": device.map(|d| d.1),
                "warmup_secs": warmup,
            }))?;
        }
    }
    Ok(())
}

pub fn table(all: &[Value], order: &[String]) -> String {
    let records = &crate::ran(all)[..];
    let mut out = "| method | backend | machine | length | prefill s | peak MiB above the model | device MiB above the model | tokens/s | cache rows |\n|---|---|---|---|---|---|---|---|---|\n".to_string();
    let names: std::collections::BTreeSet<String> = records
        .iter()
        .map(|r| r["method"].as_str().unwrap_or("?").to_string())
        .collect();
    for name in crate::passkey::ordered(names.iter(), order) {
        for r in of_method(records, &name) {
            let len = r["length"].as_u64().unwrap_or(0);
            let secs = r["secs"].as_f64().unwrap_or(0.0);
            let device =
                device_growth(r).map_or("–".into(), |b| format!("{:.0}", b as f64 / 1048576.0));
            out += &format!(
                "| {name} | {} | {} | {len} | {secs:.1} | {} | {device} | {:.0} | {} |\n",
                r["backend"].as_str().unwrap_or("?"),
                machine(r),
                r["peak_bytes"]
                    .as_u64()
                    .map_or("not counted".into(), |b| format!(
                        "{:.0}",
                        b as f64 / 1048576.0
                    )),
                len as f64 / secs.max(1e-9),
                r["cache_rows"]
            );
        }
    }
    out + &ratio_table(records, order) + &crate::refused_note(all)
}

/// The records of `method`, by backend, then machine, then length.
fn of_method<'a>(records: &'a [Value], method: &str) -> Vec<&'a Value> {
    let mut rs: Vec<&Value> = records
        .iter()
        .filter(|r| r["method"].as_str() == Some(method))
        .collect();
    rs.sort_by_key(|r| {
        (
            r["backend"].as_str().map(str::to_string),
            r["machine"].as_str().map(str::to_string),
            r["length"].as_u64(),
        )
    });
    rs
}

/// For each backend the host whose records the cost plot draws: of the records that name a
/// host, the host with the most of them (on a tie the one whose first record is the latest);
/// records that name none (`None`) only where no record of the backend names one.
pub fn plotted_hosts(records: &[Value]) -> BTreeMap<String, Option<String>> {
    let mut count: BTreeMap<String, Vec<(Option<String>, usize)>> = BTreeMap::new();
    for r in records {
        let b = r["backend"].as_str().unwrap_or("?").to_string();
        let h = r["machine"].as_str().map(str::to_string);
        let hs = count.entry(b).or_default();
        match hs.iter_mut().find(|(x, _)| *x == h) {
            Some(c) => c.1 += 1,
            None => hs.push((h, 1)),
        }
    }
    count
        .into_iter()
        .map(|(b, hs)| {
            let pick = hs
                .iter()
                .enumerate()
                .max_by_key(|(i, (h, n))| (h.is_some(), *n, *i))
                .map(|(_, (h, _))| h.clone())
                .unwrap_or(None);
            (b, pick)
        })
        .collect()
}

/// The host a record names ("not recorded" for records written before records named one).
fn machine(r: &Value) -> &str {
    r["machine"].as_str().unwrap_or(NOT_RECORDED)
}

const NOT_RECORDED: &str = "not recorded";

/// Device bytes a prefill grew burn's pools by (GPU records only).
pub(crate) fn device_growth(r: &Value) -> Option<u64> {
    Some(
        r["device_reserved_after"]
            .as_u64()?
            .saturating_sub(r["device_reserved_before"].as_u64()?),
    )
}

/// Every HOMER record against the plain prefill of the same length on the same backend (the
/// layout of the paper's Table 5): its time and memory as a share of plain's. Empty when no
/// length has both.
pub fn ratio_table(records: &[Value], order: &[String]) -> String {
    let plain = |r: &Value| {
        records.iter().find(|p| {
            p["method"].as_str() == Some("plain")
                && p["length"] == r["length"]
                && p["backend"] == r["backend"]
                && machine(p) == machine(r)
        })
    };
    let names: std::collections::BTreeSet<String> = records
        .iter()
        .filter_map(|r| r["method"].as_str())
        .filter(|m| m.starts_with("homer"))
        .map(str::to_string)
        .collect();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    };
    let mut rows = String::new();
    for name in crate::passkey::ordered(names.iter(), order) {
        for r in of_method(records, &name) {
            let Some(p) = plain(r) else { continue };
            let f = |v: &Value, k: &str| v[k].as_f64();
            let dev = |v: &Value| device_growth(v).map(|b| b as f64);
            rows += &format!(
                "| {name} | {} | {} | {} | {} | {} | {} |\n",
                r["backend"].as_str().unwrap_or("?"),
                machine(r),
                r["length"],
                ratio(f(r, "secs"), f(p, "secs")),
                // On a GPU the tensors live on the device: the host heap's ratio says nothing.
                if device_growth(r).is_some() {
                    "–".into()
                } else {
                    ratio(f(r, "peak_bytes"), f(p, "peak_bytes"))
                },
                ratio(dev(r), dev(p)),
            );
        }
    }
    if rows.is_empty() {
        return rows;
    }
    let legacy = if records.iter().any(|r| r["machine"].is_null()) {
        format!(
            " Records that name no machine (\"{NOT_RECORDED}\": written before records \
             carried their host) are set against each other; they ran on the hosts listed at \
             the top of the page."
        )
    } else {
        String::new()
    };
    format!(
        "\nAgainst a plain prefill of the same length on the same backend and machine (the \
         layout of the paper's Table 5): time and memory above the model as a multiple of \
         plain's; on a GPU backend the device's memory (the host heap is not compared \
         there).{legacy}\n\n| method | backend | machine | length | time (× plain) | peak \
         memory (× plain) | device memory (× plain) |\n|---|---|---|---|---|---|---|\n"
    ) + &rows
        + PAPER_COST
}

/// What the paper itself reports on cost, labelled as theirs (from the reviews and summaries of
/// arXiv 2404.10308 the project's algorithm spec collects; its per-length table is out of reach).
pub const PAPER_COST: &str = "\nThe paper's own figures, for comparison only (theirs, not measured \
    here: Llama-2-7B on their GPU, every baseline running FlashAttention-2 over the whole input): \
    HOMER's peak GPU memory at 64K tokens more than 70% below every baseline's, and \
    \"speedups up to 162.6%\" in inference time. Their per-length cells are not quoted: no copy \
    of the paper this project can reach holds that table.\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homer_is_set_against_plain_of_the_same_length_and_backend() {
        let rec = |m: &str, backend: &str, len: u64, secs: f64, peak: u64, dev: Option<u64>| {
            json!({"method": m, "backend": backend, "length": len, "secs": secs,
                   "peak_bytes": peak, "cache_rows": 1,
                   "device_reserved_before": dev.map(|_| 1000u64),
                   "device_reserved_after": dev.map(|d| 1000 + d)})
        };
        let rs = vec![
            rec("plain", "cpu", 4096, 10.0, 400, None),
            rec("homer", "cpu", 4096, 5.0, 100, None),
            rec("homer", "cpu", 8192, 9.0, 120, None), // no plain at 8K: no ratio row
            rec("plain", "wgpu", 4096, 2.0, 10, Some(800)),
            rec("homer", "wgpu", 4096, 3.0, 10, Some(200)),
        ];
        let t = ratio_table(&rs, &[]);
        assert!(
            t.contains("| homer | cpu | not recorded | 4096 | 0.50× | 0.25× | – |"),
            "{t}"
        );
        assert!(
            t.contains("| homer | wgpu | not recorded | 4096 | 1.50× | – | 0.25× |"),
            "{t}"
        );
        assert!(t.contains("name no machine"), "{t}");
        assert!(!t.contains("| 8192 |"), "{t}");
        // The paper's own figures sit under the table, labelled as theirs.
        assert!(t.ends_with(PAPER_COST) && PAPER_COST.contains("not measured here"));
        let full = table(&rs, &[]);
        assert!(
            full.contains("| homer | wgpu | not recorded | 4096 | 3.0 | 0 | 0 | 1365 | 1 |"),
            "{full}"
        );
        assert!(ratio_table(&rs[1..3], &[]).is_empty());
    }

    #[test]
    fn homer_is_set_against_plain_of_the_same_machine_only() {
        let rec = |m: &str, host: &str, secs: f64| {
            json!({"method": m, "backend": "cpu", "machine": host, "length": 4096,
                   "secs": secs, "peak_bytes": 100, "cache_rows": 1})
        };
        let rs = vec![
            rec("plain", "2 × Fast", 10.0),
            rec("plain", "2 × Slow", 40.0),
            rec("homer", "2 × Slow", 10.0),
            rec("homer", "8 × Alone", 1.0), // no plain on this host: no ratio row
        ];
        let t = ratio_table(&rs, &[]);
        assert!(
            t.contains("| homer | cpu | 2 × Slow | 4096 | 0.25× | 1.00× | – |"),
            "{t}"
        );
        assert!(
            !t.contains("8 × Alone") && !t.contains("name no machine"),
            "{t}"
        );
        // each host's rows in the full table, named
        let full = table(&rs, &[]);
        for host in ["2 × Fast", "2 × Slow", "8 × Alone"] {
            assert!(full.contains(&format!("| cpu | {host} | 4096 |")), "{full}");
        }
    }

    #[test]
    fn the_plot_draws_one_host_a_backend_preferring_named_ones() {
        let rec = |backend: &str, host: Option<&str>| json!({"backend": backend, "machine": host});
        let rs = vec![
            rec("cpu", None),
            rec("cpu", None),
            rec("cpu", None),
            rec("cpu", Some("2 × A")),
            rec("wgpu", None),
            rec("cpu", Some("2 × B")),
            rec("cpu", Some("2 × A")),
            rec("cpu", Some("2 × B")),
        ];
        let h = plotted_hosts(&rs);
        // A and B have two records each; B's first is the later: B
        assert_eq!(h["cpu"].as_deref(), Some("2 × B"));
        assert_eq!(h["wgpu"], None);
        assert_eq!(
            plotted_hosts(&rs[..5])["cpu"].as_deref(),
            Some("2 × A"),
            "a named host wins over more records that name none"
        );
    }
}
