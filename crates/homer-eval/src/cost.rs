//! Cost: wall time and peak memory of a plain prefill and a HOMER prefill of the same prompt, at
//! growing lengths, on one backend in one process. Peak memory is the peak of live heap bytes
//! counted by [`crate::alloc::CountingAlloc`] (the `homer` binary's allocator) above what was
//! live before the run (the model's weights and the tokenizer), so it is the memory the prefill
//! itself needs: activations, the KV cache, HOMER's chunks. On the CPU backend every tensor is
//! in that heap; on a GPU backend the device memory is not counted and the column says so.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use homer_engine::passkey::Method;
use homer_engine::{DocPrompt, Engine};
use serde_json::{Value, json};

use crate::store::Store;
use crate::{HomerVariant, Result, Settings, alloc, homer_config, model_id, set_rope};

/// Prefill `prompt` with `method` (plain or homer); returns seconds, peak bytes above the bytes
/// live at the start (None when the counting allocator is not installed), the cache rows, and
/// the bytes live at the start.
pub fn measure(
    engine: &mut Engine,
    prompt: &DocPrompt,
    method: &Method,
    s: &Settings,
    cancel: &AtomicBool,
) -> Result<(f64, Option<usize>, usize, usize)> {
    set_rope(engine, method, prompt.total_len(), s)?;
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
    Ok((secs, peak, rows, base))
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
    for &len in lengths {
        if len > tokens.len() {
            return Err(crate::EvalError::Setting(format!(
                "{source} has {} tokens, fewer than the cost length {len} (use the whole KJV: scripts/fetch-kjv)",
                tokens.len()
            )));
        }
        for method in methods {
            let key = format!("{model}|{method}|{len}|{backend}|{}", s.key_tail());
            if store.has(&key) {
                continue;
            }
            let prompt = prompt_of(tokens, len);
            let (secs, peak, rows, before) = match measure(engine, &prompt, method, s, cancel) {
                Ok(m) => m,
                Err(e) => {
                    let cell = json!({
                        "key": key, "model": model, "method": method.to_string(), "length": len,
                    });
                    crate::refuse(store, s, e, cell)?;
                    continue;
                }
            };
            s.log(format!(
                "cost {method:>8} {len:>6} tokens: {secs:.1}s, peak {} MiB above the model, cache {rows} rows",
                peak.map_or("?".into(), |p| format!("{:.0}", p as f64 / 1048576.0))
            ));
            store.append(json!({
                "key": key, "model": model, "method": method.to_string(), "length": len,
                "backend": backend, "adapter": engine.device.adapter, "secs": secs,
                "peak_bytes": peak, "live_before_bytes": before, "cache_rows": rows,
                "window": s.window,
            }))?;
        }
    }
    Ok(())
}

pub fn table(all: &[Value], order: &[String]) -> String {
    let records = &crate::ran(all)[..];
    let mut out = "| method | length | prefill s | peak MiB above the model | tokens/s | cache rows |\n|---|---|---|---|---|---|\n".to_string();
    let names: std::collections::BTreeSet<String> = records
        .iter()
        .map(|r| r["method"].as_str().unwrap_or("?").to_string())
        .collect();
    for name in crate::passkey::ordered(names.iter(), order) {
        let mut rs: Vec<&Value> = records
            .iter()
            .filter(|r| r["method"].as_str() == Some(&name))
            .collect();
        rs.sort_by_key(|r| r["length"].as_u64());
        for r in rs {
            let len = r["length"].as_u64().unwrap_or(0);
            let secs = r["secs"].as_f64().unwrap_or(0.0);
            out += &format!(
                "| {name} | {len} | {secs:.1} | {} | {:.0} | {} |\n",
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
    out + &crate::refused_note(all)
}
