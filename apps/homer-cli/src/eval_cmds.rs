//! `homer eval …`: argument plumbing and printing; the evaluation is in homer-eval.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use clap::{Args, Subcommand};
use homer_engine::passkey::{Method, PasskeyFormat};
use homer_eval::EvalMethod;
use homer_eval::passkey::PasskeySpec;
use homer_eval::qa::QaSpec;
use homer_eval::report::AllSpec;
use homer_eval::store::Store;
use homer_eval::{HomerVariant, Settings};

use crate::homer_cmds::HomerArgs;
use crate::{ModelArgs, load};

#[derive(Args, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    homer: HomerArgs,
    /// Results directory: records (*.jsonl, resumed on rerun), tables, plots, results.md
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Hold the baselines to this window instead of the model's native one (truncation and
    /// retrieval budgets, RoPE factors, HOMER's default chunk): for smoke tests and
    /// short-window studies
    #[arg(long)]
    window: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Cells not to run, as METHOD@LENGTH (comma-separated, e.g. plain@32768,yarn@32768):
    /// recorded as skipped with --skip-reason and listed under the table; a later run without
    /// the skip measures them
    #[arg(long, value_delimiter = ',')]
    skip: Vec<homer_eval::Skip>,
    /// Why the --skip cells were not run (shown in the tables)
    #[arg(long, default_value = "left out of this run")]
    skip_reason: String,
    /// HOMER methods of one prompt share the leaves they compute alike (same chunks, warm-up
    /// and RoPE, e.g. homer and homer:default) instead of computing them again: the same kept
    /// tokens and logits to float rounding, less time; the records' prefill times then are not
    /// each method's own (`leaves_reused` says how many leaves a record took)
    #[arg(long)]
    reuse_leaves: bool,
}

const TEXT_HELP: &str = "KJV verse text (one verse a line, as scripts/fetch-kjv writes it)";

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Passkey retrieval: find a 5-digit key hidden at a depth of a long filler text
    Passkey {
        #[command(flatten)]
        args: EvalArgs,
        /// Prompt lengths in tokens
        #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
        lengths: Vec<usize>,
        /// Needle depths in [0, 1]
        #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
        depths: Vec<f64>,
        /// Trials per (length, depth) cell; each has its own key
        #[arg(long, default_value_t = 4)]
        trials: usize,
        /// Methods: plain (one prefill, even past the window), truncation (the tail that fits),
        /// pi, ntk, dynamic-ntk, yarn (RoPE scaling, factor = --rope-factor or the smallest that
        /// holds the prompt), homer, homer+<scaling> (e.g. homer+yarn), homer:<selection knobs
        /// joined by +> (homer:sentence, homer:pool7+query=suffix, homer:span16+budget=2048),
        /// bm25 (passages of whole sentences, at most 64 tokens each, ranked by BM25 against the
        /// question, the best packed into the window and read by the plain model)
        #[arg(long, value_delimiter = ',', default_value = "plain,homer")]
        method: Vec<EvalMethod>,
        /// raw: plain text ending "The pass key is" (default); chat: one turn of the chat template
        #[arg(long, default_value = "raw")]
        format: PasskeyFormat,
        /// classic ("The grass is green. …"), or a KJV text file (scripts/fetch-kjv): its
        /// verses, one a line, without labels
        #[arg(long, default_value = "classic")]
        filler: String,
    },
    /// Long-document perplexity (spec §9.4): cumulative perplexity of a KJV text per method
    Perplexity {
        #[command(flatten)]
        args: EvalArgs,
        #[arg(long, help = TEXT_HELP)]
        text: PathBuf,
        /// Tokens scored
        #[arg(long, default_value_t = 16384)]
        length: usize,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "plain,truncation,yarn,homer,homer+yarn"
        )]
        method: Vec<Method>,
    },
    /// Document QA: quote a KJV verse found at a depth of a long run of verses
    Qa {
        #[command(flatten)]
        args: EvalArgs,
        #[arg(long, help = TEXT_HELP)]
        text: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
        lengths: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
        depths: Vec<f64>,
        #[arg(long, default_value_t = 2)]
        trials: usize,
        /// The model's methods (as for passkey) and bm25 (BM25 passages packed into the window)
        #[arg(long, value_delimiter = ',', default_value = "truncation,bm25,homer")]
        method: Vec<EvalMethod>,
    },
    /// Wall time and peak memory (allocator-counted) of plain vs HOMER prefill
    Cost {
        #[command(flatten)]
        args: EvalArgs,
        #[arg(long, help = TEXT_HELP)]
        text: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "4096,8192,16384")]
        lengths: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "plain,homer")]
        method: Vec<Method>,
    },
    /// Every task, then results.md and the plots (missing cells only: rerun to resume)
    All {
        #[command(flatten)]
        args: EvalArgs,
        #[arg(long, help = TEXT_HELP)]
        text: PathBuf,
        /// Minutes, not hours: one trial per cell and short prompts (pair with --window for a
        /// big model)
        #[arg(long)]
        quick: bool,
        /// Passkey trials per cell in the full run (QA gets a quarter, ablations half)
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Tasks to run: passkey, perplexity, qa, cost, ablation
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "passkey,perplexity,qa,cost,ablation"
        )]
        tasks: Vec<String>,
        /// Passkey lengths instead of the plan's (e.g. to run the short ones first)
        #[arg(long, value_delimiter = ',')]
        passkey_lengths: Option<Vec<usize>>,
        /// QA lengths instead of the plan's
        #[arg(long, value_delimiter = ',')]
        qa_lengths: Option<Vec<usize>>,
        /// Cost lengths instead of the plan's
        #[arg(long, value_delimiter = ',')]
        cost_lengths: Option<Vec<usize>>,
        /// Perplexity length instead of the plan's
        #[arg(long)]
        perplexity_length: Option<usize>,
        /// Passkey (and ablation) depths instead of the plan's
        #[arg(long, value_delimiter = ',')]
        depths: Option<Vec<f64>>,
        /// Passkey methods instead of the plan's (all eight)
        #[arg(long, value_delimiter = ',')]
        passkey_methods: Option<Vec<EvalMethod>>,
        /// Perplexity methods instead of the plan's
        #[arg(long, value_delimiter = ',')]
        perplexity_methods: Option<Vec<Method>>,
        /// QA methods instead of the plan's
        #[arg(long, value_delimiter = ',')]
        qa_methods: Option<Vec<EvalMethod>>,
        /// QA depths instead of the plan's
        #[arg(long, value_delimiter = ',')]
        qa_depths: Option<Vec<f64>>,
        /// QA trials per cell instead of the plan's
        #[arg(long)]
        qa_trials: Option<usize>,
        /// Ablation length instead of the plan's (two windows)
        #[arg(long)]
        ablation_length: Option<usize>,
    },
    /// Readability bench (issue 15): the plain model reads HOMER's kept set and other
    /// selections of each passkey prompt at HOMER's budget (or fractions of it)
    Replay {
        #[command(flatten)]
        args: EvalArgs,
        #[arg(long, value_delimiter = ',', default_value = "16384,32768")]
        lengths: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "0.1,0.3,0.5,0.7,0.9")]
        depths: Vec<f64>,
        #[arg(long, default_value_t = 1)]
        trials: usize,
        /// classic ("The grass is green. …"), or a KJV text file (scripts/fetch-kjv): its
        /// verses, one a line, without labels
        #[arg(long, default_value = "classic")]
        filler: String,
        /// homer (HOMER's kept set), whole (needle + whole sentences), shredded (needle + 1–2
        /// token runs), or a selection unit: token, poolK, spanL, sentence (-mean for a mean)
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "homer,whole,shredded,token,pool7,span16,sentence"
        )]
        selections: Vec<String>,
        /// Budgets as fractions of HOMER's final kept context
        #[arg(long, value_delimiter = ',', default_value = "1,0.25")]
        budgets: Vec<f64>,
        /// The HOMER that runs: homer (the paper) or homer:<selection knobs joined by +>
        #[arg(long = "homer-method", default_value = "homer")]
        homer: Method,
    },
    /// Rebuild results.md and the plots from the records in --out
    Report {
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
}

fn settings(engine: &homer_engine::Engine, a: &EvalArgs) -> Result<Settings, String> {
    let native = engine.model.native_window();
    let window = a.window.unwrap_or(native);
    if window < 16 || window > native {
        return Err(format!(
            "--window {window}: must lie between 16 and the model's native window {native}"
        ));
    }
    Ok(Settings {
        out_dir: a.out.clone(),
        window,
        chunk_len: a.homer.chunk_len,
        warmup_layers: a.homer.warmup_layers,
        bias: a.homer.bias.clone(),
        rope_factor: a.model.rope_factor,
        seed: a.seed,
        verbose: !a.model.quiet,
        skip: a.skip.clone(),
        skip_reason: a.skip_reason.clone(),
        reuse_leaves: a.reuse_leaves,
    })
}

fn command_line() -> String {
    std::env::args()
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

fn engine_for(a: &EvalArgs) -> Result<homer_engine::Engine, String> {
    if a.model.rope_scaling != "none" {
        return Err(
            "`homer eval` sets the RoPE scaling per method; use --method yarn (etc.) and \
             --rope-factor instead of --rope-scaling"
                .into(),
        );
    }
    load(&a.model)
}

fn finish(out: &std::path::Path, task: &str) -> Result<(), String> {
    let p = homer_eval::report::write(out).map_err(|e| e.to_string())?;
    let st = Store::open(out, task).map_err(|e| e.to_string())?;
    eprintln!(
        "{} records in {}; report: {}",
        st.records().len(),
        st.path().display(),
        p.display()
    );
    Ok(())
}

pub fn eval(cmd: EvalCmd) -> Result<(), String> {
    let cancel = AtomicBool::new(false);
    let e = |x: homer_eval::EvalError| x.to_string();
    match cmd {
        EvalCmd::Passkey {
            args,
            lengths,
            depths,
            trials,
            method,
            format,
            filler,
        } => {
            let mut engine = engine_for(&args)?;
            let s = settings(&engine, &args)?;
            homer_eval::report::write_meta(&engine, &s, &command_line()).map_err(e)?;
            let spec = PasskeySpec {
                lengths,
                depths,
                trials,
                methods: method,
                format,
                filler: filler_arg(&filler)?,
                variants: vec![(String::new(), HomerVariant::default())],
            };
            let mut st = Store::open_to_measure(&s.out_dir, "passkey").map_err(e)?;
            homer_eval::passkey::run(&mut engine, &s, &spec, &mut st, &cancel).map_err(e)?;
            let order: Vec<String> = spec.methods.iter().map(|m| m.to_string()).collect();
            print!("{}", homer_eval::passkey::table(st.records(), &order));
            finish(&s.out_dir, "passkey")
        }
        EvalCmd::Perplexity {
            args,
            text,
            length,
            method,
        } => {
            let mut engine = engine_for(&args)?;
            let s = settings(&engine, &args)?;
            homer_eval::report::write_meta(&engine, &s, &command_line()).map_err(e)?;
            let verses = homer_eval::text::read_verses(&text).map_err(e)?;
            let tokens = homer_eval::report::text_tokens(&engine, &verses, length).map_err(e)?;
            let mut st = Store::open_to_measure(&s.out_dir, "perplexity").map_err(e)?;
            let source = file_name(&text);
            homer_eval::perplexity::run(
                &mut engine,
                &s,
                &tokens,
                &source,
                length,
                &method,
                &mut st,
                &cancel,
            )
            .map_err(e)?;
            let order: Vec<String> = method.iter().map(|m| m.to_string()).collect();
            print!(
                "{}",
                homer_eval::perplexity::table(
                    st.records(),
                    &[length / 4, length / 2, length - 1],
                    &order
                )
            );
            finish(&s.out_dir, "perplexity")
        }
        EvalCmd::Qa {
            args,
            text,
            lengths,
            depths,
            trials,
            method,
        } => {
            let mut engine = engine_for(&args)?;
            let s = settings(&engine, &args)?;
            homer_eval::report::write_meta(&engine, &s, &command_line()).map_err(e)?;
            let verses = homer_eval::text::read_verses(&text).map_err(e)?;
            let spec = QaSpec {
                lengths,
                depths,
                trials,
                methods: method,
            };
            let mut st = Store::open_to_measure(&s.out_dir, "qa").map_err(e)?;
            homer_eval::qa::run(
                &mut engine,
                &s,
                &verses,
                &file_name(&text),
                &spec,
                &mut st,
                &cancel,
            )
            .map_err(e)?;
            let order: Vec<String> = spec.methods.iter().map(|m| m.to_string()).collect();
            print!("{}", homer_eval::qa::table(st.records(), &order));
            finish(&s.out_dir, "qa")
        }
        EvalCmd::Cost {
            args,
            text,
            lengths,
            method,
        } => {
            let mut engine = engine_for(&args)?;
            let s = settings(&engine, &args)?;
            homer_eval::report::write_meta(&engine, &s, &command_line()).map_err(e)?;
            let verses = homer_eval::text::read_verses(&text).map_err(e)?;
            let max = lengths.iter().copied().max().unwrap_or(0);
            let tokens = homer_eval::report::text_tokens(&engine, &verses, max).map_err(e)?;
            let mut st = Store::open_to_measure(&s.out_dir, "cost").map_err(e)?;
            homer_eval::cost::run(
                &mut engine,
                &s,
                &tokens,
                &file_name(&text),
                &lengths,
                &method,
                &mut st,
                &cancel,
            )
            .map_err(e)?;
            let order: Vec<String> = method.iter().map(|m| m.to_string()).collect();
            print!("{}", homer_eval::cost::table(st.records(), &order));
            finish(&s.out_dir, "cost")
        }
        EvalCmd::All {
            args,
            text,
            quick,
            trials,
            tasks,
            passkey_lengths,
            qa_lengths,
            cost_lengths,
            perplexity_length,
            depths,
            passkey_methods,
            perplexity_methods,
            qa_methods,
            qa_depths,
            qa_trials,
            ablation_length,
        } => {
            let mut engine = engine_for(&args)?;
            let s = settings(&engine, &args)?;
            let layers = engine.model.n_layers();
            let mut spec = if quick {
                AllSpec::quick(s.window, layers)
            } else {
                AllSpec::full(s.window, layers, trials)
            };
            if let Some(l) = passkey_lengths {
                spec.passkey.lengths = l;
            }
            if let Some(l) = qa_lengths {
                spec.qa.lengths = l;
            }
            if let Some(l) = cost_lengths {
                spec.cost_lengths = l;
            }
            if let Some(l) = perplexity_length {
                spec.perplexity_length = l;
            }
            if let Some(d) = depths {
                spec.passkey.depths = d.clone();
                spec.ablation.depths = d;
            }
            if let Some(m) = passkey_methods {
                spec.passkey.methods = m;
            }
            if let Some(m) = perplexity_methods {
                spec.perplexity_methods = m;
            }
            if let Some(m) = qa_methods {
                spec.qa.methods = m;
            }
            if let Some(d) = qa_depths {
                spec.qa.depths = d;
            }
            if let Some(t) = qa_trials {
                spec.qa.trials = t;
            }
            if let Some(l) = ablation_length {
                spec.ablation.lengths = vec![l];
            }
            let p = homer_eval::report::run_all(
                &mut engine,
                &s,
                &spec,
                &tasks,
                &text,
                &command_line(),
                &cancel,
            )
            .map_err(e)?;
            println!("{}", p.display());
            Ok(())
        }
        EvalCmd::Replay {
            args,
            lengths,
            depths,
            trials,
            filler,
            selections,
            budgets,
            homer,
        } => {
            if !homer.uses_homer() || matches!(homer, Method::HomerRope(_)) {
                return Err(format!(
                    "--homer-method {homer}: expected homer or homer:<selection knobs>"
                ));
            }
            let mut engine = engine_for(&args)?;
            let s = settings(&engine, &args)?;
            homer_eval::report::write_meta(&engine, &s, &command_line()).map_err(e)?;
            if let Some(b) = budgets.iter().find(|&&b| !(b > 0.0 && b <= 1.0)) {
                return Err(format!("--budgets {b}: each must lie in (0, 1]"));
            }
            let filler = filler_arg(&filler)?;
            let spec = homer_eval::replay::ReplaySpec {
                lengths,
                depths,
                trials,
                filler,
                selections,
                budgets,
                homer,
            };
            let mut st = Store::open_to_measure(&s.out_dir, "replay").map_err(e)?;
            homer_eval::replay::run(&mut engine, &s, &spec, &mut st, &cancel).map_err(e)?;
            print!("{}", homer_eval::replay::table(st.records()));
            finish(&s.out_dir, "replay")
        }
        EvalCmd::Report { out } => {
            let p = homer_eval::report::write(&out).map_err(e)?;
            println!("{}", p.display());
            Ok(())
        }
    }
}

/// `classic`, or a KJV text file whose verses (without labels) become the filler lines.
fn filler_arg(filler: &str) -> Result<homer_engine::passkey::Filler, String> {
    if filler == "classic" {
        return Ok(homer_engine::passkey::Filler::Classic);
    }
    let verses =
        homer_eval::text::read_verses(std::path::Path::new(filler)).map_err(|e| e.to_string())?;
    Ok(homer_engine::passkey::Filler::Lines(std::sync::Arc::new(
        verses.into_iter().map(|v| v.text).collect(),
    )))
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
