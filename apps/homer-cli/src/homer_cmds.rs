//! The HOMER subcommands: `ask`, `prefill`, `calibrate`, `bench kernels`. Printing and argument
//! plumbing only; the work is in homer-engine.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use clap::Args;
use homer_engine::{
    AskParams, BiasChoice, DocPrompt, GenerateParams, HomerMode, SamplingParams, top_k,
};

use homer_model::BackendKind;

use crate::{ModelArgs, SampleArgs, load, peak_rss_bytes, progress_handler};

#[derive(Args, Clone)]
pub struct HomerArgs {
    /// When to merge: auto = only when the prompt and answer exceed the model's window
    #[arg(long = "homer", default_value = "auto")]
    pub mode: HomerMode,
    /// HOMER chunk length C, affixes included (default: half the model's window)
    #[arg(long)]
    pub chunk_len: Option<usize>,
    /// Layers every chunk runs alone before merging (default: 12 of 32 scaled to the model)
    #[arg(long)]
    pub warmup_layers: Option<usize>,
    /// Calibration table: default (shipped for the default model), zeros, or a .safetensors path
    #[arg(long, default_value = "default")]
    pub bias: BiasChoice,
    /// Which rows each node keeps: `paper` (each token on its own, by the last row's query), or
    /// knobs: unit=token|poolK|spanL|sentence[-mean] (kept or dropped whole; pooled scores),
    /// query=last|lastN|suffix (the mean query of the last N rows or of the whole question),
    /// positions=local|reindex|root (contiguous ids at every merge, or in the final cache),
    /// reread=none|suffix|all (read the question, or the whole kept prompt, again),
    /// prior=none|lexical (whole units also ranked by their BM25 match to the question),
    /// order=document|prior-first|prior-rank|prior-last (the re-read puts the units matching
    /// the question first, in document order or best match first, or last), sep=none|newline (a line break between
    /// kept runs that are not adjacent in the document),
    /// e.g. `sentence,query=suffix`; `default` is the engine's:
    /// sentence,reread=all,prior=lexical,order=prior-first
    #[arg(long, default_value = "default", value_parser = homer_engine::parse_selection)]
    pub selection: homer_engine::Selection,
    /// The root's budget in rows (default: 640 when the selection rereads all it kept,
    /// reread=all; else the chunk length, as the paper)
    #[arg(long, alias = "target-len")]
    pub budget: Option<usize>,
}

fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), String> {
    let s = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    std::fs::write(path, s).map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

/// Per document: how many kept tokens fall in each tenth of it, and the lines holding the most
/// kept tokens.
fn kept_summary(
    prompt: &DocPrompt,
    docs: &[homer_engine::Document],
    kept: &[usize],
) -> serde_json::Value {
    let mut out = vec![];
    for (k, span) in prompt.docs.iter().enumerate() {
        let doc = &docs[k];
        let n = span.tokens.len().max(1);
        let mut deciles = [0usize; 10];
        let mut lines: BTreeMap<usize, usize> = BTreeMap::new();
        let mut count = 0;
        for &i in kept.iter().filter(|&&i| span.tokens.contains(&i)) {
            let local = i - span.tokens.start;
            deciles[(local * 10 / n).min(9)] += 1;
            *lines.entry(doc.line_of(span.offsets[local])).or_default() += 1;
            count += 1;
        }
        let per_line: Vec<[usize; 2]> = lines.iter().map(|(&l, &k)| [l, k]).collect();
        let mut top: Vec<(usize, usize)> = lines.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let text_lines: Vec<&str> = doc.text.lines().collect();
        let top: Vec<_> = top
            .iter()
            .take(8)
            .map(|&(line, kept)| {
                let t = text_lines.get(line - 1).copied().unwrap_or("");
                let snippet: String = t.chars().take(100).collect();
                serde_json::json!({"line": line, "kept_tokens": kept, "text": snippet})
            })
            .collect();
        out.push(serde_json::json!({
            "document": span.name, "tokens": span.tokens.len(), "kept_tokens": count,
            "kept_per_tenth": deciles, "top_lines": top, "kept_per_line": per_line,
        }));
    }
    serde_json::Value::Array(out)
}

/// `homer ask`'s settings besides the questions and documents.
pub struct AskOptions {
    pub model: ModelArgs,
    pub homer: HomerArgs,
    pub sample: SampleArgs,
    pub system: Option<String>,
    pub trace: Option<PathBuf>,
    pub stats: bool,
    pub doc_cache_mb: Option<usize>,
    pub doc_cache_disk_mb: u64,
}

/// Answer each question about `doc_paths` in turn; HOMER's question-independent work on the
/// documents is kept in the engine's document cache and reused from the second question on.
pub fn ask(questions: Vec<String>, doc_paths: Vec<PathBuf>, o: AskOptions) -> Result<(), String> {
    let several = questions.len() > 1;
    let mut next = questions.into_iter();
    ask_each(&mut || Ok(next.next()), several, doc_paths, o)
}

/// `homer chat --doc`: questions from stdin, one a line (an empty line or end of input ends),
/// each answered from the documents, which are read once for all of them.
pub fn chat_about(doc_paths: Vec<PathBuf>, o: AskOptions) -> Result<(), String> {
    use std::io::BufRead;
    let stdin = std::io::stdin();
    ask_each(
        &mut || {
            eprint!("> ");
            let _ = std::io::stderr().flush();
            let mut line = String::new();
            let n = stdin
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            Ok((n > 0 && !line.trim().is_empty()).then(|| line.trim().to_string()))
        },
        false,
        doc_paths,
        o,
    )
}

/// Answer the questions `next` gives (until None) about `doc_paths`; `label` numbers them.
fn ask_each(
    next: &mut dyn FnMut() -> Result<Option<String>, String>,
    label: bool,
    doc_paths: Vec<PathBuf>,
    o: AskOptions,
) -> Result<(), String> {
    let AskOptions {
        model,
        homer,
        sample,
        system,
        trace,
        stats,
        doc_cache_mb,
        doc_cache_disk_mb,
    } = o;
    let docs = doc_paths
        .iter()
        .map(|p| homer_engine::load_document(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let engine = load(&model)?;
    if let Some(mb) = doc_cache_mb {
        engine
            .doc_cache
            .lock()
            .map_err(|_| "the document cache is unusable after a failed question".to_string())?
            .set_budget(mb << 20);
    }
    if doc_cache_disk_mb > 0 && doc_cache_mb != Some(0) {
        engine.use_disk_cache(
            homer_engine::fetch::homer_home().join("doc-cache"),
            doc_cache_disk_mb << 20,
        );
    }
    let params = AskParams {
        mode: homer.mode,
        chunk_len: homer.chunk_len,
        warmup_layers: homer.warmup_layers,
        bias: homer.bias,
        selection: homer.selection,
        budget: homer.budget,
        system,
        generate: sample.params(),
        // --doc-cache-mb 0: nothing kept, every question runs the whole prefill as one.
        reuse_document: doc_cache_mb != Some(0),
    };
    let cancel = AtomicBool::new(false);
    let several = label;
    let mut traces = vec![];
    for qi in 0.. {
        let Some(question) = next()? else { break };
        let question = &question;
        if several {
            println!("{}Q{}: {question}", if qi > 0 { "\n" } else { "" }, qi + 1);
            print!("A{}: ", qi + 1);
        }
        let mut prog = progress_handler(model.quiet);
        let mut stdout = std::io::stdout();
        let a = engine
            .ask(&docs, question, &params, &cancel, &mut prog, &mut |t| {
                let _ = stdout.write_all(t.as_bytes());
                let _ = stdout.flush();
            })
            .map_err(|e| e.to_string())?;
        println!();
        let g = &a.generation;
        let summary = a
            .trace
            .as_ref()
            .map(|t| kept_summary(&a.prompt, &docs, &t.kept));
        if stats || !model.quiet {
            let window = engine.model.config.max_position_embeddings;
            eprintln!(
                "prompt {} tokens (prefix {}, documents {}, suffix {}; window {window}); {}",
                a.prompt.total_len(),
                a.prompt.prefix.len(),
                a.prompt.context.len(),
                a.prompt.suffix.len(),
                if a.used_homer {
                    "HOMER"
                } else {
                    "plain prefill"
                }
            );
            if let (Some(t), Some(s)) = (&a.trace, &a.homer_stats) {
                eprintln!(
                    "HOMER: {} chunks, tree height {}, C {}, W {}, {} scoring; kept {} of {} document tokens; cache {} rows; last position {}",
                    t.n_chunks,
                    t.height,
                    t.chunk_len,
                    t.warmup_layers,
                    t.scoring,
                    t.kept.len(),
                    t.context_len,
                    a.cache_len,
                    t.last_position_id
                );
                eprintln!(
                    "       peak live rows {} in {} chunks (depth-first); the tree {:.1}s",
                    s.peak_live_rows, s.peak_live_chunks, s.seconds
                );
                if a.doc_reuse.is_some() {
                    let u = engine
                        .doc_cache
                        .lock()
                        .map(|c| c.usage())
                        .unwrap_or_default();
                    eprintln!(
                        "document cache: {} of {} leaves reused, {} computed and kept; {} leaves of {} document(s) held, {:.1} of {:.0} MiB",
                        s.leaves_reused,
                        t.n_chunks,
                        s.leaves_stored,
                        u.leaves,
                        u.documents,
                        u.bytes as f64 / (1 << 20) as f64,
                        u.budget as f64 / (1 << 20) as f64
                    );
                }
            }
            if let Some(r) = a.doc_reuse.filter(|r| r.plain) {
                let u = engine
                    .doc_cache
                    .lock()
                    .map(|c| c.usage())
                    .unwrap_or_default();
                eprintln!(
                    "document cache: the documents' prefix {}; {:.1} of {:.0} MiB held",
                    if r.reused > 0 {
                        "reused"
                    } else {
                        "computed and kept"
                    },
                    u.bytes as f64 / (1 << 20) as f64,
                    u.budget as f64 / (1 << 20) as f64
                );
            }
            if let Some(sum) = &summary {
                for d in sum.as_array().unwrap() {
                    eprintln!(
                        "kept in {} per tenth: {}",
                        d["document"].as_str().unwrap_or(""),
                        d["kept_per_tenth"]
                    );
                    for l in d["top_lines"].as_array().unwrap().iter().take(3) {
                        eprintln!(
                            "  line {:>6}: {:>3} kept  {}",
                            l["line"],
                            l["kept_tokens"],
                            l["text"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            eprintln!(
                "prefill {:.1}s; answer {} tokens at {:.2} tok/s; stop: {:?}; peak RSS {} MiB",
                g.prefill_secs,
                g.ids.len(),
                g.decode_tokens_per_sec(),
                g.stop,
                peak_rss_bytes().map_or("?".into(), |b| (b >> 20).to_string())
            );
        }
        if trace.is_some() {
            traces.push(serde_json::json!({
                "question": question,
                "answer": g.text,
                "used_homer": a.used_homer,
                "prefill_secs": g.prefill_secs,
                "homer_stats": a.homer_stats,
                "documents": a.prompt.docs.iter().map(|d| serde_json::json!({"name": d.name, "path": d.path, "tokens": d.tokens})).collect::<Vec<_>>(),
                "kept_summary": summary,
                "trace": a.trace,
            }));
        }
    }
    if let Some(path) = trace {
        // One question: its object; several: an array of them, in order.
        let v = if several {
            serde_json::Value::Array(traces)
        } else {
            traces.pop().unwrap_or_default()
        };
        write_json(&path, &v)?;
        eprintln!("trace written to {}", path.display());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn prefill(
    prefix_file: PathBuf,
    context_file: PathBuf,
    suffix_file: PathBuf,
    model: ModelArgs,
    homer: HomerArgs,
    generate: usize,
    replay_kept: bool,
    json: bool,
) -> Result<(), String> {
    if replay_kept && generate == 0 {
        return Err("--replay-kept needs --generate N".into());
    }
    let (p, c, s) = (
        read_text(&prefix_file)?,
        read_text(&context_file)?,
        read_text(&suffix_file)?,
    );
    let engine = load(&model)?;
    let tok = &engine.tokenizer;
    let prompt = DocPrompt {
        prefix: tok.encode(&p, true).map_err(|e| e.to_string())?,
        context: tok.encode(&c, false).map_err(|e| e.to_string())?,
        suffix: tok.encode(&s, false).map_err(|e| e.to_string())?,
        question: None,
        docs: vec![],
    };
    let mut cfg = engine
        .homer_config(homer.chunk_len, homer.warmup_layers, &homer.bias)
        .map_err(|e| e.to_string())?;
    cfg.target_len = homer
        .budget
        .or_else(|| homer_engine::default_budget(&homer.selection));
    cfg.selection = homer.selection;
    let cancel = AtomicBool::new(false);
    let mut prog = progress_handler(model.quiet || json);
    let t0 = Instant::now();
    let out = engine
        .homer_prefill(&prompt, &cfg, &cancel, &mut prog)
        .map_err(|e| e.to_string())?;
    let secs = t0.elapsed().as_secs_f64();
    let top: Vec<_> = top_k(&out.logits, 20)
        .into_iter()
        .map(|(id, l)| serde_json::json!({"id": id, "token": tok.decode(&[id], false).unwrap_or_default(), "logit": l}))
        .collect();
    let cache_len = out.cache.len();
    let mut v = serde_json::json!({
        "prefix_tokens": prompt.prefix.len(), "context_tokens": prompt.context.len(), "suffix_tokens": prompt.suffix.len(),
        "backend": engine.device.backend, "ops": out.trace.ops,
        "chunk_len": cfg.chunk_len, "warmup_layers": cfg.warmup_layers, "scoring": out.trace.scoring,
        "chunks": out.plan.n_chunks, "tree_height": out.plan.height, "last_position_id": out.last_position_id,
        "cache_len": cache_len, "kept": out.trace.kept, "positions": out.positions, "top": top,
        "seconds": secs, "peak_live_rows": out.stats.peak_live_rows,
    });
    if generate > 0 {
        let params = GenerateParams {
            max_tokens: generate,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            stop_at_eos: false,
            loop_ngram: 0,
            penalise_prompt: false,
            // A raw diagnostic: the reference decodes on, whatever the position.
            stop_at_window: false,
        };
        let g = engine
            .decode(
                out.logits,
                out.cache,
                &prompt.concatenated(),
                &params,
                &cancel,
                &mut |_| {},
            )
            .map_err(|e| e.to_string())?;
        v["generated_ids"] = serde_json::json!(g.ids);
        v["generated_text"] = serde_json::json!(g.text);
        if replay_kept {
            let ids: Vec<u32> = prompt
                .prefix
                .iter()
                .copied()
                .chain(out.trace.kept.iter().map(|&i| prompt.context[i]))
                .chain(prompt.suffix.iter().copied())
                .collect();
            let r = engine
                .generate(&ids, &params, &cancel, &mut |_| {}, &mut |_| {})
                .map_err(|e| e.to_string())?;
            v["replay_tokens"] = serde_json::json!(ids.len());
            v["replay_text"] = serde_json::json!(r.text);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
    } else {
        println!(
            "{} chunks, tree height {}, last position {}, cache {} rows, {} of {} context tokens kept, {:.2}s ({} ops)",
            v["chunks"],
            v["tree_height"],
            v["last_position_id"],
            cache_len,
            out.trace.kept.len(),
            prompt.context.len(),
            secs,
            out.trace.ops
        );
        for t in v["top"].as_array().unwrap().iter().take(5) {
            println!(
                "{:>7} {:>10.4} {:?}",
                t["id"],
                t["logit"].as_f64().unwrap_or(0.0),
                t["token"].as_str().unwrap_or("")
            );
        }
        if let Some(text) = v.get("generated_text") {
            println!("continuation: {}", text.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

pub fn calibrate(
    model: ModelArgs,
    text: PathBuf,
    chunk_len: Option<usize>,
    samples: usize,
    out: PathBuf,
) -> Result<(), String> {
    let body = read_text(&text)?;
    let engine = load(&model)?;
    let c = chunk_len.unwrap_or(engine.model.config.max_position_embeddings / 2);
    let cancel = AtomicBool::new(false);
    let t0 = Instant::now();
    let quiet = model.quiet;
    let source = text
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let table = engine
        .calibrate(&body, &source, c, samples, &cancel, &mut |d, t| {
            if !quiet {
                eprintln!(
                    "calibration text {d}/{t} ({:.0}s)",
                    t0.elapsed().as_secs_f64()
                );
            }
        })
        .map_err(|e| e.to_string())?;
    table.save(&out).map_err(|e| e.to_string())?;
    let row = |l: usize| {
        let r = table.row(l);
        format!(
            "layer {l:>2}: d=0 {:+.2}  d=1 {:+.2}  d=16 {:+.2}  d={} {:+.2}",
            r[0],
            r[1],
            r[16.min(c - 1)],
            c - 1,
            r[c - 1]
        )
    };
    for l in [0, table.n_layers / 2, table.n_layers - 1] {
        println!("{}", row(l));
    }
    println!(
        "wrote {} ({} layers × {} distances, {} samples) in {:.0}s",
        out.display(),
        table.n_layers,
        table.distances,
        samples,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `homer bench kernels`: WGSL kernels vs the tensor-op oracle on the wgpu adapter, and with
/// `--share-tokens` the share of a HOMER prefill spent in the ops.
pub fn bench_kernels(
    mut model: ModelArgs,
    lengths: Vec<usize>,
    reps: usize,
    warmup: usize,
    share_tokens: Option<usize>,
    chunk_len: Option<usize>,
    json: bool,
) -> Result<(), String> {
    if model.backend == BackendKind::Auto {
        model.backend = BackendKind::Wgpu;
    }
    if model.backend != BackendKind::Wgpu {
        return Err(
            "`homer bench kernels` compares the WGSL kernels with the tensor ops on a wgpu \
                    adapter; run it with --backend wgpu (or auto)"
                .into(),
        );
    }
    if let Some(&n) = lengths.iter().find(|&&n| n < 64) {
        return Err(format!("--lengths: node sizes start at 64 rows, got {n}"));
    }
    let (device, info) = homer_model::backend::device(model.backend).map_err(|e| e.to_string())?;
    let wgsl = homer_wgpu::WgslOps::for_device(&info).map_err(|e| e.to_string())?;
    let params = homer_wgpu::bench::KernelBench {
        lengths,
        reps,
        warmup,
        ..Default::default()
    };
    if !json {
        eprintln!(
            "adapter: {} ({}, {}); shapes: {} layers, {}/{} heads, head dim {}, d_model {}; median of {} runs",
            info.adapter,
            info.graphics_api,
            info.device_type,
            params.layers,
            params.heads,
            params.kv_heads,
            params.head_dim,
            params.d_model,
            params.reps
        );
    }
    let rows = homer_wgpu::bench::run(&params, &wgsl, &device, &mut |r| {
        if !json {
            eprintln!(
                "{:<14} n {:>6}: oracle {:>9.3} ms  wgsl {:>9.3} ms  {:>5.2}x",
                r.op.split(' ').next().unwrap_or(""),
                r.rows,
                r.oracle_seconds * 1e3,
                r.wgsl_seconds * 1e3,
                r.speedup()
            )
        }
    })
    .map_err(|e| e.to_string())?;
    let mut share = Vec::new();
    if let Some(n) = share_tokens {
        if n < 64 {
            return Err(format!("--share-tokens: at least 64 tokens, got {n}"));
        }
        let mut engine = load(&model)?;
        let vocab = engine.model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| 100 + (i * 7919) % (vocab - 100))
            .collect();
        let prompt = homer_engine::DocPrompt {
            prefix: ids[..32].to_vec(),
            context: ids[32..n - 16].to_vec(),
            suffix: ids[n - 16..].to_vec(),
            question: None,
            docs: vec![],
        };
        let cfg = engine
            .homer_config(chunk_len, None, &BiasChoice::Default)
            .map_err(|e| e.to_string())?;
        for ops in [
            homer_engine::OpsChoice::Wgsl,
            homer_engine::OpsChoice::Tensor,
        ] {
            engine.homer_ops = ops;
            let (out, times, secs) = engine
                .homer_prefill_timed(&prompt, &cfg, &AtomicBool::new(false))
                .map_err(|e| e.to_string())?;
            let v = serde_json::json!({
                "ops": ops.to_string(), "tokens": n, "chunks": out.plan.n_chunks,
                "tree_height": out.plan.height, "prefill_seconds": secs, "op_times": times,
                "op_share": times.total_seconds() / secs,
            });
            if !json {
                eprintln!(
                    "HOMER prefill {n} tokens ({} chunks, height {}) with {ops} ops: {secs:.2}s, ops {:.3}s = {:.2}% (significance {:.3}s/{} calls, gather {:.3}s/{}, merge {:.3}s/{})",
                    out.plan.n_chunks,
                    out.plan.height,
                    times.total_seconds(),
                    100.0 * times.total_seconds() / secs,
                    times.significance.seconds,
                    times.significance.calls,
                    times.gather.seconds,
                    times.gather.calls,
                    times.merge.seconds,
                    times.merge.calls,
                );
            }
            share.push(v);
        }
    }
    if json {
        let v = serde_json::json!({"adapter": info.adapter, "device_type": info.device_type, "rows": rows, "share": share});
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
    } else {
        println!("| op | rows | oracle ms | wgsl ms | speed-up | wgsl GB/s | oracle GB/s |");
        println!("|---|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {:.3} | {:.3} | {:.2}x | {:.2} | {:.2} |",
                r.op,
                r.rows,
                r.oracle_seconds * 1e3,
                r.wgsl_seconds * 1e3,
                r.speedup(),
                r.wgsl_gb_per_s(),
                r.oracle_gb_per_s()
            );
        }
    }
    Ok(())
}
