//! `homer`: the command-line front end. Thin: argument parsing, progress bars and printing;
//! everything else lives in homer-engine.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

mod eval_cmds;
mod homer_cmds;

/// Counts live heap bytes so `homer eval cost` measures peak memory (a thin wrapper around the
/// system allocator).
#[global_allocator]
static ALLOC: homer_eval::alloc::CountingAlloc = homer_eval::alloc::CountingAlloc;

use clap::{Args, Parser, Subcommand};
use homer_engine::{Engine, GenerateParams, Message, Progress, SamplingParams, top_k};
use homer_model::BackendKind;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "homer",
    version,
    about = "Llama-family models on wgpu, reading documents longer than their window"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF file or Hugging Face model directory (default: SmolLM2-135M-Instruct, fetched on first use)
    #[arg(long, global = true)]
    model: Option<PathBuf>,
    /// Compute backend: auto (a real GPU through wgpu, else the CPU), wgpu, or cpu
    #[arg(long, global = true, default_value = "auto")]
    backend: BackendKind,
    /// No progress bars
    #[arg(long, global = true)]
    quiet: bool,
    /// HOMER's significance/gather/merge: auto (WGSL kernels on wgpu, tensor ops on the CPU),
    /// wgsl, or tensor (burn tensor ops, the oracle)
    #[arg(long, global = true, default_value = "auto")]
    homer_ops: homer_engine::OpsChoice,
    /// Extend the window with a RoPE scaling: none, pi, ntk, dynamic-ntk or yarn (spec §8); the
    /// window becomes --rope-factor × native, and HOMER's default chunk half of that
    #[arg(long, global = true, default_value = "none")]
    rope_scaling: String,
    /// The RoPE scaling factor s (>= 1; default 2, and for `eval passkey` the smallest factor
    /// whose window holds the prompt)
    #[arg(long, global = true)]
    rope_factor: Option<f64>,
    /// Weight precision: native (the GGUF file's own Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks; other
    /// tensors f16 on the CPU, f32 on wgpu), f16, bf16 or f32. CPU backend: all, default
    /// native; wgpu: native (default) or f32
    #[arg(long, global = true)]
    dtype: Option<homer_model::WeightDtype>,
    /// KV cache precision: f32 (default) or f16 (half the cache's memory and the bandwidth
    /// decode spends on it at long context; the CPU backend, or a wgpu adapter with shader-f16)
    #[arg(long, global = true, default_value = "f32")]
    kv_dtype: homer_model::KvDtype,
}

#[derive(Args, Clone)]
struct SampleArgs {
    /// Tokens to generate at most
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = off
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// Stop when this text appears (repeatable)
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when the answer's last N tokens repeat earlier ones (the repeat is cut); 0 = off
    #[arg(long, default_value_t = homer_engine::DEFAULT_LOOP_NGRAM)]
    loop_ngram: usize,
    /// The repetition penalty also counts the prompt's tokens (transformers' behaviour; by
    /// default only the answer's)
    #[arg(long)]
    penalise_prompt: bool,
    /// Decode past the model's window (positions it was not trained for) instead of stopping
    /// there
    #[arg(long)]
    past_window: bool,
}

impl SampleArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            stop_strings: self.stop.clone(),
            stop_at_eos: !self.ignore_eos,
            loop_ngram: self.loop_ngram,
            penalise_prompt: self.penalise_prompt,
            stop_at_window: !self.past_window,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask a question about documents; HOMER merges them when they exceed the model's window
    Ask {
        /// The question (more with --question or --questions)
        question: Option<String>,
        /// Another question about the same documents (repeatable): each is answered in turn,
        /// and HOMER's question-independent work on the documents is done once for all
        #[arg(long = "question")]
        more_questions: Vec<String>,
        /// A file of questions, one a line (blank lines skipped), answered after the others
        #[arg(long)]
        questions: Option<PathBuf>,
        /// Memory the document cache may hold between questions, in MiB (default: a quarter of
        /// the available memory, at most 8 GiB; 0 keeps nothing and runs each question's prefill
        /// whole)
        #[arg(long)]
        doc_cache_mb: Option<usize>,
        /// Disk the document cache may fill under $HOMER_HOME/doc-cache, in MiB, so a later
        /// `homer ask` about the same documents starts from it (default 4096; 0: none)
        #[arg(long, default_value_t = 4096)]
        doc_cache_disk_mb: u64,
        /// A .txt or .md document (repeatable)
        #[arg(long = "doc", required = true)]
        docs: Vec<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        homer: homer_cmds::HomerArgs,
        #[command(flatten)]
        sample: SampleArgs,
        /// System message (default: the template's)
        #[arg(long)]
        system: Option<String>,
        /// Write the merge trace (kept tokens per node, scores) as JSON here
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Print sizes and timing to stderr even with --quiet
        #[arg(long)]
        stats: bool,
    },
    /// HOMER prefill of raw prefix/context/suffix files (no chat template), for parity checks
    Prefill {
        #[arg(long)]
        prefix_file: PathBuf,
        #[arg(long)]
        context_file: PathBuf,
        #[arg(long)]
        suffix_file: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        homer: homer_cmds::HomerArgs,
        /// Append a greedy continuation of this many tokens
        #[arg(long, default_value_t = 0)]
        generate: usize,
        /// Diagnostic: also run a plain prefill of prefix ++ the context tokens HOMER kept ++
        /// suffix (consecutive positions) and continue it greedily for --generate tokens; tells a
        /// bad selection from a bad merged cache
        #[arg(long)]
        replay_kept: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make a HOMER calibration table bias[layer][distance] from a text (spec §4.5)
    Calibrate {
        #[command(flatten)]
        model: ModelArgs,
        /// Calibration text (UTF-8)
        #[arg(long)]
        text: PathBuf,
        /// Chunk length C the table serves (default: half the model's window)
        #[arg(long)]
        chunk_len: Option<usize>,
        /// Windows of C tokens averaged, spread evenly over the text
        #[arg(long, default_value_t = 12)]
        samples: usize,
        /// Output .safetensors file
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluations
    #[command(subcommand)]
    Eval(eval_cmds::EvalCmd),
    /// Continue a plain-text prompt
    Generate {
        prompt: String,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sample: SampleArgs,
        /// Wrap the prompt as a user message in the model's chat template
        #[arg(long)]
        chat: bool,
        /// Print timing to stderr
        #[arg(long)]
        stats: bool,
    },
    /// Interactive chat (empty line or Ctrl-D ends it)
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sample: SampleArgs,
        /// System message
        #[arg(long)]
        system: Option<String>,
        /// Chat about these documents (repeatable): each line you type is a question answered
        /// from them (HOMER past the window), the documents read once for all questions; earlier
        /// turns are not part of later prompts
        #[arg(long = "doc")]
        docs: Vec<PathBuf>,
        #[command(flatten)]
        homer: homer_cmds::HomerArgs,
        /// Print sizes and timing to stderr after each answer even with --quiet
        #[arg(long)]
        stats: bool,
    },
    /// Next-token top-K ids, tokens and logits
    Logits {
        prompt: String,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 20)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// Write a random-weight GGUF model of a known shape (memory and speed at that scale)
    MakeModel {
        /// The shape: llama2-7b (32 layers, d 4096, FFN 11008, vocab 32000)
        #[arg(long, default_value = "llama2-7b")]
        shape: String,
        /// Block type of every matrix: q4_0, q8_0, or q4_k_m (Q4_K, with attn_v, ffn_down and
        /// the output in Q6_K as llama.cpp's Q4_K_M)
        #[arg(long = "type", default_value = "q4_0")]
        qtype: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Model facts, backend, adapter and limits
    Info {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        json: bool,
    },
    /// Prefill and decode speed; `bench kernels` for HOMER's WGSL kernels
    Bench {
        #[command(subcommand)]
        what: Option<BenchWhat>,
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt lengths to prefill
        #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
        lengths: Vec<usize>,
        /// Tokens to decode
        #[arg(long, default_value_t = 32)]
        decode: usize,
        /// Context lengths (prompt tokens prefilled, untimed) the decode is measured after
        #[arg(long, value_delimiter = ',', default_value = "128")]
        decode_context: Vec<usize>,
        /// Timed repetitions (the median is reported)
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Untimed runs first (the first call of each GPU kernel compiles it)
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Skip the decode measurement
        #[arg(long)]
        no_decode: bool,
        /// Prefill with HOMER instead (32-token prefix, 16-token suffix, the rest context)
        #[arg(long)]
        homer: bool,
        /// HOMER chunk length (default: half the window)
        #[arg(long)]
        chunk_len: Option<usize>,
        /// With --homer: time HOMER's own ops (significance, gather, merge) and report their
        /// share of the prefill (adds a device wait around each op)
        #[arg(long)]
        op_times: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// HOMER's WGSL kernels against the tensor-op oracle on the same adapter (wgpu), at the
    /// default model's shapes: significance, selection, gather, gather with turned keys, key rotation, merge
    Kernels {
        #[command(flatten)]
        model: ModelArgs,
        /// Node sizes in rows
        #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
        lengths: Vec<usize>,
        /// Timed repetitions (the median is reported)
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Untimed runs first (the first call of each kernel compiles it)
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Also run a HOMER prefill of this many tokens on the model with both op sets, and
        /// report the share of its time spent in the ops
        #[arg(long)]
        share_tokens: Option<usize>,
        /// HOMER chunk length for --share-tokens (default: half the window)
        #[arg(long)]
        chunk_len: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

fn progress_handler(quiet: bool) -> impl FnMut(Progress) {
    let bar: Option<ProgressBar> = None;
    let mut state = (bar, String::new());
    move |p: Progress| {
        if quiet {
            return;
        }
        let (label, done, total) = match &p {
            Progress::Fetch {
                message,
                done,
                total,
            } => (message.clone(), *done, *total),
            Progress::Load { done, total } => (
                "loading weights".to_string(),
                *done as u64,
                Some(*total as u64),
            ),
            Progress::Prefill { done, total } => (
                "prefill (tokens)".to_string(),
                *done as u64,
                Some(*total as u64),
            ),
            Progress::Homer(h) => ("HOMER prefill".to_string(), h.done, Some(h.total)),
        };
        if state.1 != label || state.0.is_none() {
            if let Some(b) = state.0.take() {
                b.finish_and_clear();
            }
            let b = match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            b.set_style(
                ProgressStyle::with_template("{msg:>18} [{bar:30}] {pos}/{len} {elapsed}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b.set_message(label.clone());
            state = (Some(b), label);
        }
        if let Some(b) = &state.0 {
            if let Progress::Homer(h) = &p {
                b.set_message(match h.leaf {
                    Some(i) => format!("HOMER leaf {}/{}", i + 1, h.n_chunks),
                    None => format!("HOMER merge {}/{}", h.height, h.tree_height),
                });
            }
            b.set_position(done);
            if total.is_some_and(|t| done >= t) {
                b.finish_and_clear();
                state.0 = None;
            }
        }
    }
}

fn load(m: &ModelArgs) -> Result<Engine, String> {
    let mut prog = progress_handler(m.quiet);
    let mut engine = Engine::load_with(m.model.as_deref(), m.backend, m.dtype, &mut prog)
        .map_err(|e| e.to_string())?;
    engine
        .model
        .set_kv_dtype(m.kv_dtype)
        .map_err(|e| e.to_string())?;
    engine.homer_ops = m.homer_ops;
    if m.rope_scaling != "none" {
        let native = engine.model.native_window();
        let scaling = homer_model::RopeScaling::from_choice(
            &m.rope_scaling,
            m.rope_factor.unwrap_or(2.0),
            native,
        )?;
        engine
            .model
            .set_rope_scaling(scaling)
            .map_err(|e| e.to_string())?;
    }
    // Refuse a bad choice now rather than after the document is read.
    engine.ops().map_err(|e| e.to_string())?;
    Ok(engine)
}

fn run(cli: Cli) -> Result<(), String> {
    let cancel = AtomicBool::new(false);
    match cli.command {
        Cmd::Ask {
            question,
            more_questions,
            questions,
            doc_cache_mb,
            doc_cache_disk_mb,
            docs,
            model,
            homer,
            sample,
            system,
            trace,
            stats,
        } => {
            let mut all: Vec<String> = question.into_iter().chain(more_questions).collect();
            if let Some(path) = questions {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    format!("cannot read the questions file {}: {e}", path.display())
                })?;
                all.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
            if all.is_empty() {
                return Err(
                    "no question: give one (`homer ask --doc FILE \"question\"`), --question, or \
                     --questions FILE"
                        .into(),
                );
            }
            homer_cmds::ask(
                all,
                docs,
                homer_cmds::AskOptions {
                    model,
                    homer,
                    sample,
                    system,
                    trace,
                    stats,
                    doc_cache_mb,
                    doc_cache_disk_mb,
                },
            )?
        }
        Cmd::Prefill {
            prefix_file,
            context_file,
            suffix_file,
            model,
            homer,
            generate,
            replay_kept,
            json,
        } => homer_cmds::prefill(
            prefix_file,
            context_file,
            suffix_file,
            model,
            homer,
            generate,
            replay_kept,
            json,
        )?,
        Cmd::Calibrate {
            model,
            text,
            chunk_len,
            samples,
            out,
        } => homer_cmds::calibrate(model, text, chunk_len, samples, out)?,
        Cmd::Eval(cmd) => eval_cmds::eval(cmd)?,
        Cmd::Generate {
            prompt,
            model,
            sample,
            chat,
            stats,
        } => {
            let engine = load(&model)?;
            let ids = if chat {
                engine
                    .chat_prompt(&[Message::new("user", prompt)])
                    .map_err(|e| e.to_string())?
            } else {
                engine
                    .tokenizer
                    .encode(&prompt, true)
                    .map_err(|e| e.to_string())?
            };
            let mut prog = progress_handler(model.quiet);
            let mut stdout = std::io::stdout();
            let g = engine
                .generate(&ids, &sample.params(), &cancel, &mut prog, &mut |t| {
                    let _ = stdout.write_all(t.as_bytes());
                    let _ = stdout.flush();
                })
                .map_err(|e| e.to_string())?;
            println!();
            if stats {
                eprintln!(
                    "prompt {} tokens, prefill {:.2}s ({:.1} tok/s); generated {} tokens, {:.2} tok/s; stop: {:?}",
                    g.prompt_tokens,
                    g.prefill_secs,
                    g.prompt_tokens as f64 / g.prefill_secs.max(1e-9),
                    g.ids.len(),
                    g.decode_tokens_per_sec(),
                    g.stop
                );
            }
        }
        Cmd::Chat {
            model,
            sample,
            system,
            docs,
            homer,
            stats,
        } if !docs.is_empty() => homer_cmds::chat_about(
            docs,
            homer_cmds::AskOptions {
                model,
                homer,
                sample,
                system,
                trace: None,
                stats,
                doc_cache_mb: None,
                doc_cache_disk_mb: homer_engine::DocCache::DEFAULT_DISK_BUDGET >> 20,
            },
        )?,
        Cmd::Chat {
            model,
            sample,
            system,
            ..
        } => {
            let engine = load(&model)?;
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(Message::new("system", s));
            }
            let stdin = std::io::stdin();
            loop {
                eprint!("> ");
                let _ = std::io::stderr().flush();
                let mut line = String::new();
                if stdin
                    .lock()
                    .read_line(&mut line)
                    .map_err(|e| e.to_string())?
                    == 0
                    || line.trim().is_empty()
                {
                    break;
                }
                messages.push(Message::new("user", line.trim_end()));
                let ids = engine.chat_prompt(&messages).map_err(|e| e.to_string())?;
                let mut stdout = std::io::stdout();
                let g = engine
                    .generate(&ids, &sample.params(), &cancel, &mut |_| {}, &mut |t| {
                        let _ = stdout.write_all(t.as_bytes());
                        let _ = stdout.flush();
                    })
                    .map_err(|e| e.to_string())?;
                println!();
                messages.push(Message::new("assistant", g.text));
            }
        }
        Cmd::Logits {
            prompt,
            model,
            top,
            json,
        } => {
            let engine = load(&model)?;
            let ids = engine
                .tokenizer
                .encode(&prompt, true)
                .map_err(|e| e.to_string())?;
            let logits = engine.next_logits(&ids).map_err(|e| e.to_string())?;
            let best = top_k(&logits, top);
            if json {
                let rows: Vec<_> = best
                    .iter()
                    .map(|&(id, l)| serde_json::json!({"id": id, "token": engine.tokenizer.decode(&[id], false).unwrap_or_default(), "logit": l}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"prompt": prompt, "ids": ids, "top": rows})
                );
            } else {
                for (id, l) in best {
                    println!(
                        "{id:>7} {l:>10.4} {:?}",
                        engine.tokenizer.decode(&[id], false).unwrap_or_default()
                    );
                }
            }
        }
        Cmd::MakeModel {
            shape,
            qtype,
            seed,
            out,
        } => {
            use homer_model::load::quant::GgmlType;
            let cfg = match shape.as_str() {
                "llama2-7b" => homer_model::load::synth::llama2_7b(),
                other => return Err(format!("unknown shape `{other}` (known: llama2-7b)").into()),
            };
            let ty = match qtype.to_ascii_lowercase().as_str() {
                "q4_0" => GgmlType::Q4_0,
                "q8_0" => GgmlType::Q8_0,
                "q4_k_m" => GgmlType::Q4K,
                other => {
                    return Err(
                        format!("unknown block type `{other}` (q4_0, q8_0 or q4_k_m)").into(),
                    );
                }
            };
            let bytes = homer_model::load::synth::write_random_model(&out, &cfg, ty, seed)?;
            println!(
                "{}: {shape} random weights, {}, {:.2} GB",
                out.display(),
                ty.name(),
                bytes as f64 / 1e9
            );
        }
        Cmd::Info { model, json } => {
            let engine = load(&model)?;
            let c = &engine.model.config;
            let v = serde_json::json!({
                "model": engine.model_path,
                "format": engine.format,
                "config": c,
                "parameters": c.n_params(),
                "weight_bytes": engine.model.weight_bytes(),
                "tokenizer": {"vocab": engine.tokenizer.vocab_size(), "bos": engine.tokenizer.bos_id, "eos": engine.tokenizer.eos_ids,
                              "add_bos": engine.tokenizer.add_bos, "chat_template": engine.tokenizer.chat_template.is_some()},
                "device": engine.device,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap());
            } else {
                println!(
                    "model      {} ({})",
                    engine.model_path.display(),
                    engine.format
                );
                println!(
                    "arch       llama: {} layers, d {}, {} heads / {} KV heads, head dim {}, ffn {}, vocab {}, window {}, rope θ {}, tied head {}",
                    c.num_hidden_layers,
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    c.intermediate_size,
                    c.vocab_size,
                    c.max_position_embeddings,
                    c.rope_theta,
                    c.tie_word_embeddings
                );
                println!(
                    "params     {:.1} M; resident weights {:.1} MB",
                    c.n_params() as f64 / 1e6,
                    engine.model.weight_bytes() as f64 / 1e6
                );
                let d = &engine.device;
                println!(
                    "backend    {} — {} ({}, {}) {}",
                    d.backend, d.adapter, d.graphics_api, d.device_type, d.driver
                );
                if let Some(m) = d.max_storage_buffer_binding_size {
                    println!(
                        "limits     max storage binding {} MiB, max buffer {} MiB, shader-f16 {}",
                        m >> 20,
                        d.max_buffer_size.unwrap_or(0) >> 20,
                        d.shader_f16
                    );
                }
                if let Some(c) = &d.tune_cache {
                    println!("autotune   kernel choices kept in {c}");
                }
            }
        }
        Cmd::Bench {
            what:
                Some(BenchWhat::Kernels {
                    model,
                    lengths,
                    reps,
                    warmup,
                    share_tokens,
                    chunk_len,
                    json,
                }),
            ..
        } => {
            homer_cmds::bench_kernels(model, lengths, reps, warmup, share_tokens, chunk_len, json)?
        }
        Cmd::Bench {
            what: None,
            model,
            lengths,
            decode,
            decode_context,
            reps,
            warmup,
            no_decode,
            homer,
            chunk_len,
            op_times,
            json,
        } => {
            let reps = reps.max(1);
            if op_times && !homer {
                return Err("--op-times needs --homer".into());
            }
            let engine = load(&model)?;
            // Deterministic pseudo-text ids, above the special tokens at the bottom of the vocab.
            let vocab = engine.model.config.vocab_size as u32;
            let (lo, span) = if vocab > 200 {
                (100, vocab - 100)
            } else {
                (0, vocab)
            };
            let pseudo =
                |n: usize| -> Vec<u32> { (0..n as u32).map(|i| lo + (i * 7919) % span).collect() };
            let mut rows = Vec::new();
            let mut op_rows = Vec::new();
            for &n in &lengths {
                if homer && n < 64 {
                    return Err(format!(
                        "--homer needs lengths of at least 64 tokens, got {n}"
                    ));
                }
                let ids = pseudo(n);
                let mut times = Vec::new();
                for r in 0..warmup + reps {
                    let t = Instant::now();
                    if homer {
                        let prompt = homer_engine::DocPrompt {
                            prefix: ids[..32].to_vec(),
                            context: ids[32..n - 16].to_vec(),
                            suffix: ids[n - 16..].to_vec(),
                            question: None,
                            docs: vec![],
                        };
                        let cfg = engine
                            .homer_config(chunk_len, None, &homer_engine::BiasChoice::Default)
                            .map_err(|e| e.to_string())?;
                        let out = if op_times {
                            let (out, times, secs) = engine
                                .homer_prefill_timed(&prompt, &cfg, &cancel)
                                .map_err(|e| e.to_string())?;
                            if r >= warmup {
                                op_rows.push(serde_json::json!({"tokens": n, "ops": out.trace.ops, "prefill_seconds": secs, "op_times": times, "op_share": times.total_seconds() / secs}));
                            }
                            if !json {
                                eprintln!(
                                    "HOMER {n}: {} ops {:.3}s of {secs:.2}s = {:.2}% (significance {:.3}s/{} calls, gather {:.3}s/{}, merge {:.3}s/{})",
                                    out.trace.ops,
                                    times.total_seconds(),
                                    100.0 * times.total_seconds() / secs,
                                    times.significance.seconds,
                                    times.significance.calls,
                                    times.gather.seconds,
                                    times.gather.calls,
                                    times.merge.seconds,
                                    times.merge.calls
                                );
                            }
                            out
                        } else {
                            engine
                                .homer_prefill(&prompt, &cfg, &cancel, &mut |_| {})
                                .map_err(|e| e.to_string())?
                        };
                        if !json && r == 0 {
                            eprintln!(
                                "HOMER {n}: {} chunks, height {}, cache {} rows, peak live rows {} in {} chunks",
                                out.plan.n_chunks,
                                out.plan.height,
                                out.cache.len(),
                                out.stats.peak_live_rows,
                                out.stats.peak_live_chunks
                            );
                        }
                    } else {
                        engine.next_logits(&ids).map_err(|e| e.to_string())?;
                    }
                    if r >= warmup {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                times.sort_by(f64::total_cmp);
                let med = times[times.len() / 2];
                let peak = peak_rss_bytes();
                rows.push(serde_json::json!({"kind": if homer { "homer_prefill" } else { "prefill" }, "tokens": n, "seconds": med, "tokens_per_sec": n as f64 / med, "peak_rss_bytes": peak}));
                if !json {
                    eprintln!(
                        "{}prefill {n:>6} tokens: {:.3}s  {:.1} tok/s  (process peak RSS so far {} MiB)",
                        if homer { "HOMER " } else { "" },
                        med,
                        n as f64 / med,
                        peak.map_or("?".to_string(), |b| (b >> 20).to_string())
                    );
                }
            }
            if no_decode {
                let out = serde_json::json!({"backend": engine.device.backend, "adapter": engine.device.adapter, "model": engine.model_path, "results": rows, "homer_op_times": op_rows});
                println!("{}", serde_json::to_string_pretty(&out).unwrap());
                return Ok(());
            }
            // Decode: greedy tokens after a prompt of each context length, EOS ignored, and no
            // loop stop (the answers' default: a looping pseudo-prompt would end the measurement
            // after a few tokens, and the cut tokens' time would still count).
            let params = GenerateParams {
                max_tokens: decode + 1,
                stop_at_eos: false,
                loop_ngram: 0,
                ..Default::default()
            };
            for &ctx in &decode_context {
                let prompt = pseudo(ctx.max(1));
                let mut tps = Vec::new();
                for r in 0..warmup + reps {
                    let g = engine
                        .generate(&prompt, &params, &cancel, &mut |_| {}, &mut |_| {})
                        .map_err(|e| e.to_string())?;
                    if g.ids.len() != decode + 1 {
                        return Err(format!(
                            "decode after a {ctx}-token context stopped after {} of {} tokens \
                             ({:?}): no rate to report",
                            g.ids.len(),
                            decode + 1,
                            g.stop
                        ));
                    }
                    if r >= warmup {
                        tps.push(g.decode_tokens_per_sec());
                    }
                }
                tps.sort_by(f64::total_cmp);
                let med = tps[tps.len() / 2];
                rows.push(serde_json::json!({"kind": "decode", "tokens": decode, "context": ctx, "tokens_per_sec": med}));
                if !json {
                    eprintln!("decode  {decode:>6} tokens: {med:.2} tok/s (context {ctx})");
                }
            }
            let out = serde_json::json!({"backend": engine.device.backend, "adapter": engine.device.adapter, "model": engine.model_path, "results": rows});
            if json {
                println!("{}", serde_json::to_string_pretty(&out).unwrap());
            } else {
                println!(
                    "| backend | adapter | test | tokens | context | tok/s |\n|---|---|---|---|---|---|"
                );
                for r in out["results"].as_array().unwrap() {
                    println!(
                        "| {} | {} | {} | {} | {} | {:.1} |",
                        engine.device.backend,
                        engine.device.adapter,
                        r["kind"].as_str().unwrap(),
                        r["tokens"],
                        r.get("context").map_or("".into(), |c| c.to_string()),
                        r["tokens_per_sec"].as_f64().unwrap()
                    );
                }
            }
        }
    }
    Ok(())
}

/// Peak resident set size of this process (Linux `VmHWM`), for memory curves.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() -> ExitCode {
    // HOMER_LOG picks the log levels; unset, homer's own warnings show (a corrupt cache file, a
    // missing calibration table), not its dependencies'.
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOMER_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "error,homer=warn,homer_model=warn,homer_engine=warn,homer_wgpu=warn,homer_eval=warn",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
