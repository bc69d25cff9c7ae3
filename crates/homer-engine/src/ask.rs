//! Questions about documents: the prompt layout HOMER needs (spec §1, §9.3) — prefix = the chat
//! template up to the document, context = the documents, suffix = the question and the assistant
//! header, each tokenised on its own — and `Engine::ask`, which runs HOMER when the prompt does not
//! fit the model's window (or always / never, as asked) and then streams the answer.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use homer::{BiasTable, HomerConfig, HomerInput, HomerStats, MergeTrace, Plan};
use homer_model::read_f32;
use serde::Serialize;

use crate::chat::Message;
use crate::document::Document;
use crate::error::{EngineError, Result};
use crate::{Engine, GenerateParams, Generation, Progress};

/// Stands for the documents while the chat template renders; must survive rendering verbatim.
const DOC_MARKER: &str = "\u{27e6}HOMER-DOCUMENT\u{27e7}";

/// The instruction in front of the documents.
pub const DOC_INSTRUCTION: &str =
    "Read the document below, then answer the question that follows it.";

/// One document's place in the context token list.
#[derive(Debug, Clone, Serialize)]
pub struct DocSpan {
    pub name: String,
    pub path: PathBuf,
    /// Context token indices of this document (its header line included).
    pub tokens: Range<usize>,
    /// Byte offset in the document text of each of its tokens (header tokens map to 0).
    pub offsets: Vec<usize>,
}

/// A document prompt split the way HOMER consumes it.
#[derive(Debug, Clone, Serialize)]
pub struct DocPrompt {
    pub prefix: Vec<u32>,
    pub context: Vec<u32>,
    pub suffix: Vec<u32>,
    /// The question alone, for what matches words against the document (the lexical prior of
    /// [`homer::Prior::Lexical`]); `None`: the suffix's text (template and all) stands for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    pub docs: Vec<DocSpan>,
}

impl DocPrompt {
    pub fn total_len(&self) -> usize {
        self.prefix.len() + self.context.len() + self.suffix.len()
    }
    pub fn concatenated(&self) -> Vec<u32> {
        [&self.prefix[..], &self.context, &self.suffix].concat()
    }
    /// The prompt cut to `budget` tokens by dropping the start of the context (the truncation
    /// baseline): prefix and suffix stay whole, the document spans follow the kept tail.
    pub fn truncated(&self, budget: usize) -> DocPrompt {
        let keep = budget
            .saturating_sub(self.prefix.len() + self.suffix.len())
            .min(self.context.len());
        let cut = self.context.len() - keep;
        let docs = self
            .docs
            .iter()
            .filter(|d| d.tokens.end > cut)
            .map(|d| {
                let start = d.tokens.start.max(cut);
                DocSpan {
                    name: d.name.clone(),
                    path: d.path.clone(),
                    tokens: start - cut..d.tokens.end - cut,
                    offsets: d.offsets[start - d.tokens.start..].to_vec(),
                }
            })
            .collect();
        DocPrompt {
            prefix: self.prefix.clone(),
            context: self.context[cut..].to_vec(),
            suffix: self.suffix.clone(),
            question: self.question.clone(),
            docs,
        }
    }

    /// (document index, byte offset in it) of context token `i`.
    pub fn locate(&self, i: usize) -> Option<(usize, usize)> {
        self.docs
            .iter()
            .position(|d| d.tokens.contains(&i))
            .map(|k| (k, self.docs[k].offsets[i - self.docs[k].tokens.start]))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HomerMode {
    /// HOMER when the prompt plus the answer budget exceeds the model's window.
    #[default]
    Auto,
    Always,
    Never,
}

impl std::str::FromStr for HomerMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(HomerMode::Auto),
            "always" => Ok(HomerMode::Always),
            "never" => Ok(HomerMode::Never),
            _ => Err(format!("`{s}`: expected auto, always or never")),
        }
    }
}

/// Which calibration table HOMER subtracts (spec §4.5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BiasChoice {
    /// The table shipped for the default model when that model is loaded, else zeros.
    #[default]
    Default,
    /// Uncalibrated.
    Zeros,
    Path(PathBuf),
}

impl std::str::FromStr for BiasChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "default" => BiasChoice::Default,
            "zeros" | "none" => BiasChoice::Zeros,
            p => BiasChoice::Path(PathBuf::from(p)),
        })
    }
}

/// The selection `homer ask`, `homer prefill` and homer-desk use unless told otherwise (issue
/// 15): whole sentences, ranked by attention fused with their lexical match to the question,
/// and the kept prompt read again as one plain prompt (with [`DEFAULT_REREAD_BUDGET`] rows), the
/// sentences that match the question first.
/// The paper's algorithm is `--selection paper`. Measured in docs/results/selection.
pub const DEFAULT_SELECTION: homer::Selection = homer::Selection {
    unit: homer::Unit::Sentence {
        agg: homer::Agg::Max,
    },
    query: homer::Query::Last,
    positions: homer::Positions::Local,
    reread: homer::Reread::All,
    prior: homer::Prior::Lexical,
    order: homer::Order::PriorFirst,
    sep: homer::Sep::None,
};

/// The root budget, in rows, of a selection that reads its kept tokens again as one plain prompt
/// (`reread=all`) when no budget is given: the kept prompt is read like any short prompt, and the
/// default model reads a needle among a few hundred tokens far better than among thousands
/// (issue 15's replay bench, docs/results/selection). 640 rather than 512: the same QA F1 on the
/// dev questions and passkeys within noise, and room for the verse a question asks about next
/// to the ones that match it (docs/results/selection/NOTES.md, "sixth session").
pub const DEFAULT_REREAD_BUDGET: usize = 640;

/// The root budget `selection` runs with when none is given: [`DEFAULT_REREAD_BUDGET`] under
/// `reread=all`, else None (the chunk length, the paper's).
pub fn default_budget(selection: &homer::Selection) -> Option<usize> {
    (selection.reread == homer::Reread::All).then_some(DEFAULT_REREAD_BUDGET)
}

/// A selection as `--selection` spells it: `default` ([`DEFAULT_SELECTION`]), `paper`, or knobs.
pub fn parse_selection(s: &str) -> std::result::Result<homer::Selection, String> {
    match s.trim() {
        "default" | "" => Ok(DEFAULT_SELECTION),
        k => k.parse(),
    }
}

#[derive(Debug, Clone)]
pub struct AskParams {
    pub mode: HomerMode,
    /// C; None = half the model's window.
    pub chunk_len: Option<usize>,
    /// W; None = 12 of 32 layers scaled to the model's depth.
    pub warmup_layers: Option<usize>,
    pub bias: BiasChoice,
    /// Which rows HOMER's nodes keep (issue 15; default [`DEFAULT_SELECTION`]).
    pub selection: homer::Selection,
    /// The root's budget in rows; None = [`default_budget`] of the selection.
    pub budget: Option<usize>,
    /// System message; None = the template's default.
    pub system: Option<String>,
    pub generate: GenerateParams,
    /// Keep HOMER's question-independent work on the documents in the engine's document cache
    /// and reuse it for later questions about them (issue 16; the answer is the same).
    pub reuse_document: bool,
}

impl Default for AskParams {
    fn default() -> Self {
        AskParams {
            mode: HomerMode::default(),
            chunk_len: None,
            warmup_layers: None,
            bias: BiasChoice::default(),
            selection: DEFAULT_SELECTION,
            budget: None,
            system: None,
            generate: GenerateParams::default(),
            reuse_document: true,
        }
    }
}

/// What `Engine::ask` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub generation: Generation,
    pub prompt: DocPrompt,
    pub used_homer: bool,
    /// Present when HOMER ran.
    pub trace: Option<MergeTrace>,
    pub plan: Option<Plan>,
    pub homer_stats: Option<HomerStats>,
    /// Rows in the cache decoding started from.
    pub cache_len: usize,
    /// What the document cache did ([`AskParams::reuse_document`]); None when it was not used.
    pub doc_reuse: Option<crate::DocReuse>,
}

/// The table shipped in `assets/bias/` for the default model, calibrated at C = 4096 on the King
/// James Bible (see `assets/bias/README.md` for the command that made it).
pub const DEFAULT_BIAS_FILE: &str = "smollm2-135m-instruct-q4_1.c4096.safetensors";
static DEFAULT_BIAS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/bias/smollm2-135m-instruct-q4_1.c4096.safetensors"
));

/// The shipped calibration table of the default model.
pub fn default_bias() -> Result<BiasTable> {
    Ok(BiasTable::from_bytes(
        DEFAULT_BIAS,
        std::path::Path::new(DEFAULT_BIAS_FILE),
    )?)
}

/// Stand-ins for user text in a rendered chat template: `\u{E000}<index>\u{E001}` (private-use
/// characters, removed from the user text itself).
const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';

pub(crate) fn marker(i: usize) -> String {
    format!("{MARK_OPEN}{i}{MARK_CLOSE}")
}

impl Engine {
    /// Token ids of a rendered template piece `s` whose user texts stand as [`marker`]s: the
    /// template's own text with special-token matching on (its control tokens), each marker's
    /// text (`texts[i]`) as data ([`crate::Tokenizer::encode_text`]). A space that ends the
    /// template text before a marker goes with the user text, as one tokenisation would put it.
    /// `add_special`: a BOS first where the model wants one.
    pub(crate) fn encode_marked(
        &self,
        s: &str,
        texts: &[String],
        add_special: bool,
    ) -> Result<Vec<u32>> {
        let mut ids = vec![];
        let mut rest = s;
        let mut first = true;
        loop {
            let Some(open) = rest.find(MARK_OPEN) else {
                if !rest.is_empty() || (first && add_special) {
                    ids.extend(self.tokenizer.encode(rest, first && add_special)?);
                }
                return Ok(ids);
            };
            let body = open + MARK_OPEN.len_utf8();
            let close = rest[body..]
                .find(MARK_CLOSE)
                .map(|j| body + j)
                .ok_or_else(|| EngineError::Template("a text marker lost its end".into()))?;
            let i: usize = rest[body..close]
                .parse()
                .map_err(|_| EngineError::Template("a text marker was altered".into()))?;
            let text = texts
                .get(i)
                .ok_or_else(|| EngineError::Template(format!("no text for marker {i}")))?;
            let (mut tmpl, mut user) = (&rest[..open], String::new());
            if let Some(t) = tmpl.strip_suffix(' ') {
                tmpl = t;
                user.push(' ');
            }
            user.extend(text.chars().filter(|c| *c != MARK_OPEN && *c != MARK_CLOSE));
            if !tmpl.is_empty() || (first && add_special) {
                ids.extend(self.tokenizer.encode(tmpl, first && add_special)?);
            }
            first = false;
            ids.extend(self.tokenizer.encode_text(&user)?);
            rest = &rest[close + MARK_CLOSE.len_utf8()..];
        }
    }

    /// Split a question about `docs` into HOMER's prefix, context and suffix.
    pub fn document_prompt(
        &self,
        docs: &[Document],
        question: &str,
        system: Option<&str>,
    ) -> Result<DocPrompt> {
        if docs.is_empty() {
            return Err(EngineError::Setting("no document given".into()));
        }
        if question.trim().is_empty() {
            return Err(EngineError::Setting("the question is empty".into()));
        }
        // The system message and the question are data: rendered as markers, tokenised with
        // special-token matching off (issue 17), so text in them cannot end the turn.
        let mut messages = vec![];
        let mut texts = vec![];
        if let Some(s) = system {
            messages.push(Message::new("system", marker(texts.len())));
            texts.push(s.to_string());
        }
        messages.push(Message::new(
            "user",
            format!(
                "{DOC_INSTRUCTION}\n\n{DOC_MARKER}\n\nQuestion: {}",
                marker(texts.len())
            ),
        ));
        texts.push(question.trim().to_string());
        let rendered = self.template.render(&messages, true)?;
        let mut parts = rendered.split(DOC_MARKER);
        let (Some(before), Some(after), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(EngineError::Template(
                "the chat template did not keep the document marker exactly once".into(),
            ));
        };
        let prefix = self.encode_marked(before, &texts, true)?;
        let suffix = self.encode_marked(after, &texts, false)?;
        let mut context = vec![];
        let mut spans = vec![];
        for (k, d) in docs.iter().enumerate() {
            let start = context.len();
            let header = if docs.len() > 1 {
                format!("Document {}: {}\n", k + 1, d.name)
            } else {
                String::new()
            };
            let mut offsets = vec![];
            if !header.is_empty() {
                let h = self.tokenizer.encode(&header, false)?;
                offsets.extend(std::iter::repeat_n(0, h.len()));
                context.extend(h);
            }
            let body = if k + 1 < docs.len() {
                format!("{}\n\n", d.text.trim_end())
            } else {
                d.text.trim_end().to_string()
            };
            let (ids, offs) = self.tokenizer.encode_with_offsets(&body)?;
            offsets.extend(offs.iter().map(|o| o.0.min(d.text.len())));
            context.extend(ids);
            spans.push(DocSpan {
                name: d.name.clone(),
                path: d.path.clone(),
                tokens: start..context.len(),
                offsets,
            });
        }
        Ok(DocPrompt {
            prefix,
            context,
            suffix,
            question: Some(question.to_string()),
            docs: spans,
        })
    }

    /// The HOMER settings for this model: C (default half the window), W, the bias table.
    pub fn homer_config(
        &self,
        chunk_len: Option<usize>,
        warmup_layers: Option<usize>,
        bias: &BiasChoice,
    ) -> Result<HomerConfig> {
        let mut cfg = HomerConfig::for_model(&self.model.config);
        if let Some(c) = chunk_len {
            cfg.chunk_len = c;
        }
        if let Some(w) = warmup_layers {
            cfg.warmup_layers = w;
        }
        cfg.bias = match bias {
            BiasChoice::Zeros => None,
            BiasChoice::Path(p) => Some(Arc::new(BiasTable::load(p)?)),
            BiasChoice::Default => {
                if self.is_default_model() {
                    let t = default_bias()?;
                    if t.distances >= cfg.chunk_len {
                        Some(Arc::new(t))
                    } else {
                        tracing::warn!(
                            "the shipped bias table covers chunk lengths up to {}; running uncalibrated at {}",
                            t.distances,
                            cfg.chunk_len
                        );
                        None
                    }
                } else {
                    tracing::warn!(
                        "no calibration table ships for {}; HOMER runs uncalibrated (make one with `homer calibrate`)",
                        self.model_path.display()
                    );
                    None
                }
            }
        };
        Ok(cfg)
    }

    /// Whether the loaded model is the default model (whose bias table ships with homer).
    pub fn is_default_model(&self) -> bool {
        self.model_path.file_name().and_then(|n| n.to_str())
            == Some(crate::fetch::DEFAULT_MODEL_FILE)
    }

    /// HOMER prefill of a split prompt.
    pub fn homer_prefill(
        &self,
        prompt: &DocPrompt,
        config: &HomerConfig,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<homer::HomerOutput> {
        self.run_homer(
            prompt,
            config,
            self.ops()?.as_ref(),
            None,
            cancel,
            &mut |p| progress(Progress::Homer(p.clone())),
        )
    }

    /// [`Engine::homer_prefill`] through the engine's document cache: leaves already computed
    /// for this prompt's prefix and context (by an earlier question) are reused, new ones kept.
    pub fn homer_prefill_cached(
        &self,
        prompt: &DocPrompt,
        config: &HomerConfig,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<homer::HomerOutput> {
        let key = self.doc_key(prompt);
        let mut cache = self.doc_cache_lock();
        let mut store = cache.store(key);
        self.run_homer(
            prompt,
            config,
            self.ops()?.as_ref(),
            Some(&mut store),
            cancel,
            &mut |p| progress(Progress::Homer(p.clone())),
        )
    }

    /// Keep the document cache's leaves on disk in `dir` too (at most `budget` bytes of files),
    /// so a later process reopens a document without recomputing it.
    pub fn use_disk_cache(&self, dir: std::path::PathBuf, budget: u64) {
        self.doc_cache_lock()
            .set_disk(dir, self.model.device.clone(), budget);
    }

    /// The document cache's key for `prompt`: the model state its leaves' rows depend on (the
    /// weights' file and format, RoPE, KV precision) and the prefix and context tokens.
    pub fn doc_key(&self, prompt: &DocPrompt) -> crate::DocKey {
        let c = &self.model.config;
        let kv = self.model.layers.first().map(|l| l.kv_dtype);
        crate::DocKey {
            model: format!(
                "{}|{}|{}|{:?}|{}|{:?}|{}",
                self.model_path.display(),
                self.format,
                c.rope_theta,
                c.rope_scaling,
                c.max_position_embeddings,
                kv,
                self.device.backend
            ),
            prefix: prompt.prefix.clone(),
            context: prompt.context.clone(),
        }
    }

    /// [`homer::Prior::Lexical`]'s prior: the BM25 score (the `bm25` crate, English stemming and
    /// stop words) of every selection unit's text against the question ([`DocPrompt::question`],
    /// else the suffix's text), given
    /// to each token of the unit; 0 where the unit shares no word with the question.
    fn lexical_prior(
        &self,
        prompt: &DocPrompt,
        unit: homer::Unit,
        units: Option<&[u32]>,
    ) -> Result<Vec<f32>> {
        let n = prompt.context.len();
        let unit_of: Vec<u32> = match (unit, units) {
            (homer::Unit::Sentence { .. }, Some(u)) => u.to_vec(),
            (homer::Unit::Span { len, .. }, _) => (0..n).map(|i| (i / len.max(1)) as u32).collect(),
            _ => {
                return Err(EngineError::Setting(format!(
                    "prior=lexical needs whole units (sentence or spanL), not unit={unit}"
                )));
            }
        };
        // Unit ids ascend along the context: each unit is one run of tokens.
        let runs = homer::select::unit_runs(&unit_of);
        let corpus = runs
            .iter()
            .map(|r| self.tokenizer.decode(&prompt.context[r.clone()], true))
            .collect::<Result<Vec<String>>>()?;
        let question = match &prompt.question {
            Some(q) => q.clone(),
            None => self.tokenizer.decode(&prompt.suffix, true)?,
        };
        let search =
            bm25::SearchEngineBuilder::<u32>::with_corpus(bm25::Language::English, corpus).build();
        let mut prior = vec![0f32; n];
        for hit in search.search(&question, runs.len()) {
            let r = &runs[hit.document.id as usize];
            prior[r.clone()].fill(hit.score.max(0.0));
        }
        Ok(prior)
    }

    fn run_homer(
        &self,
        prompt: &DocPrompt,
        config: &HomerConfig,
        ops: &dyn homer::HomerOps,
        store: Option<&mut dyn homer::LeafStore>,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(&homer::HomerProgress),
    ) -> Result<homer::HomerOutput> {
        // HOMER's chunks use local positions; dynamic NTK follows them (no whole-prompt length).
        self.model.set_rope_seq_len(0);
        let t0 = Instant::now();
        let units = if config.selection.unit.needs_units() {
            Some(self.tokenizer.sentence_units(&prompt.context)?)
        } else {
            None
        };
        let t1 = Instant::now();
        let prior = match config.selection.prior {
            homer::Prior::None => None,
            homer::Prior::Lexical => {
                Some(self.lexical_prior(prompt, config.selection.unit, units.as_deref())?)
            }
        };
        let separator = match config.selection.sep {
            homer::Sep::None => None,
            homer::Sep::Newline => Some(self.tokenizer.encode_text("\n")?),
        };
        tracing::debug!(
            "sentence units {:.2}s, lexical prior {:.2}s",
            (t1 - t0).as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        Ok(homer::homer_prefill_with_store(
            &self.model,
            HomerInput {
                prefix: &prompt.prefix,
                context: &prompt.context,
                suffix: &prompt.suffix,
                units: units.as_deref(),
                prior: prior.as_deref(),
                separator: separator.as_deref(),
            },
            config,
            ops,
            store,
            cancel,
            progress,
        )?)
    }

    /// HOMER prefill with every op timed (see `homer::TimedOps`): the output, the ops' times and
    /// the wall time of the whole prefill. For `homer bench kernels`.
    pub fn homer_prefill_timed(
        &self,
        prompt: &DocPrompt,
        config: &HomerConfig,
        cancel: &AtomicBool,
    ) -> Result<(homer::HomerOutput, homer::OpTimes, f64)> {
        let ops = self.ops()?;
        let timed = homer::TimedOps::new(ops.as_ref());
        let t0 = std::time::Instant::now();
        let out = self.run_homer(prompt, config, &timed, None, cancel, &mut |_| {})?;
        Ok((out, timed.times(), t0.elapsed().as_secs_f64()))
    }

    /// Answer `question` about `docs`, streaming the answer to `on_text`.
    pub fn ask(
        &self,
        docs: &[Document],
        question: &str,
        params: &AskParams,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        let prompt = self.document_prompt(docs, question, params.system.as_deref())?;
        self.answer(prompt, params, cancel, progress, on_text)
    }

    /// Run a split prompt with HOMER or plainly (per `params.mode`) and decode.
    pub fn answer(
        &self,
        prompt: DocPrompt,
        params: &AskParams,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        params
            .generate
            .sampling
            .validate()
            .map_err(EngineError::Setting)?;
        let window = self.model.config.max_position_embeddings;
        let use_homer = match params.mode {
            HomerMode::Always => true,
            HomerMode::Never => false,
            HomerMode::Auto => prompt.total_len() + params.generate.max_tokens > window,
        };
        let t0 = Instant::now();
        let all = prompt.concatenated();
        let mut doc_reuse = None;
        let (logits, cache, trace, plan, stats) = if use_homer {
            let mut cfg =
                self.homer_config(params.chunk_len, params.warmup_layers, &params.bias)?;
            cfg.selection = params.selection;
            cfg.target_len = params.budget.or_else(|| default_budget(&params.selection));
            let out = if params.reuse_document {
                self.homer_prefill_cached(&prompt, &cfg, cancel, progress)?
            } else {
                self.homer_prefill(&prompt, &cfg, cancel, progress)?
            };
            if params.reuse_document {
                doc_reuse = Some(crate::DocReuse::of_homer(&out.stats, out.plan.n_chunks));
            }
            (
                out.logits,
                out.cache,
                Some(out.trace),
                Some(out.plan),
                Some(out.stats),
            )
        } else if params.reuse_document
            && !prompt.context.is_empty()
            // Dynamic NTK takes its frequencies from the whole prompt's length, which differs
            // from question to question: nothing to share.
            && !matches!(
                self.model.config.rope_scaling,
                homer_model::RopeScaling::DynamicNtk { .. }
            )
        {
            let (l, c, r) = self.prefill_reusing(&prompt, cancel, progress)?;
            doc_reuse = Some(r);
            (l, c, None, None, None)
        } else {
            let (l, c) = self.prefill(&all, cancel, progress)?;
            (l, c, None, None, None)
        };
        let prefill_secs = t0.elapsed().as_secs_f64();
        let cache_len = cache.len();
        let mut generation = self.decode(logits, cache, &all, &params.generate, cancel, on_text)?;
        generation.prefill_secs = prefill_secs;
        generation.prompt_tokens = all.len();
        Ok(Answer {
            generation,
            prompt,
            used_homer: use_homer,
            trace,
            plan,
            homer_stats: stats,
            cache_len,
            doc_reuse,
        })
    }

    /// A plain prefill whose document prefix (prefix + context rows, every layer's K/V) comes from
    /// the document cache when an earlier question about the same documents left it there, else
    /// is computed and kept; then the suffix runs over it.
    fn prefill_reusing(
        &self,
        prompt: &DocPrompt,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Vec<f32>, homer_model::KvCache, crate::DocReuse)> {
        let all = prompt.concatenated();
        let n_doc = prompt.prefix.len() + prompt.context.len();
        let layers = self.model.n_layers();
        let name = 0..prompt.context.len();
        let mut key = self.doc_key(prompt);
        key.model.push_str("|plain prefix");
        let mut guard = self.doc_cache_lock();
        let mut store = guard.store(key);
        let stored = homer::LeafStore::get(&mut store, &name, layers)
            .filter(|s| s.kv.len() == layers && s.rows() == n_doc);
        // Dynamic NTK takes its frequencies from the whole prompt, as one full forward would.
        self.model.set_rope_seq_len(all.len());
        let mut reuse = crate::DocReuse {
            parts: 1,
            plain: true,
            ..Default::default()
        };
        let mut cache = match stored {
            Some(s) => {
                reuse.reused = 1;
                homer_model::KvCache::from_rows(s.kv, n_doc)
            }
            None => {
                let mut cache = homer_model::KvCache::with_capacity(layers, all.len());
                self.forward_blocks(
                    &all[..n_doc],
                    &mut cache,
                    all.len(),
                    false,
                    cancel,
                    progress,
                )?;
                let kv = cache
                    .layers
                    .iter()
                    .map(|b| b.as_ref().map(|b| b.filled()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        EngineError::Setting("internal: a layer cached no rows".into())
                    })?;
                // Only the K/V are used; the hidden rows are a one-column placeholder.
                let hidden = homer_model::Tensor::<2>::zeros([n_doc, 1], &self.model.device);
                homer::LeafStore::put(&mut store, &name, layers, &homer::LeafState { hidden, kv });
                reuse.stored = 1;
                cache
            }
        };
        drop(guard);
        let logits =
            self.model
                .forward(&all[n_doc..], None, &mut cache, homer_model::Logits::Last)?;
        progress(Progress::Prefill {
            done: all.len(),
            total: all.len(),
        });
        Ok((read_f32(logits)?, cache, reuse))
    }

    /// Calibrate HOMER's significance for this model (spec §4.5) on `samples` windows of
    /// `chunk_len` tokens spread evenly over `text`.
    pub fn calibrate(
        &self,
        text: &str,
        source: &str,
        chunk_len: usize,
        samples: usize,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<BiasTable> {
        if samples == 0 || chunk_len < 2 {
            return Err(EngineError::Setting(
                "calibration needs at least one sample of at least 2 tokens".into(),
            ));
        }
        if chunk_len > self.model.config.max_position_embeddings {
            return Err(EngineError::Setting(format!(
                "chunk length {chunk_len} exceeds the model's window of {}",
                self.model.config.max_position_embeddings
            )));
        }
        let ids = self.tokenizer.encode(text, false)?;
        if ids.len() < chunk_len {
            return Err(EngineError::Setting(format!(
                "{source}: {} tokens, fewer than the chunk length {chunk_len}; give a longer text",
                ids.len()
            )));
        }
        let span = ids.len() - chunk_len;
        let texts: Vec<Vec<u32>> = (0..samples)
            .map(|i| {
                let start = if samples == 1 {
                    0
                } else {
                    span * i / (samples - 1)
                };
                ids[start..start + chunk_len].to_vec()
            })
            .collect();
        let mut table = homer::calibrate::calibrate(
            &self.model,
            &texts,
            self.ops()?.as_ref(),
            cancel,
            progress,
        )?;
        let model = self
            .model_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        table.metadata.insert("model".into(), model);
        table.metadata.insert("source".into(), source.into());
        table
            .metadata
            .insert("source_tokens".into(), ids.len().to_string());
        table.metadata.insert(
            "rope_scaling".into(),
            format!("{:?}", self.model.config.rope_scaling),
        );
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_tail_and_follows_the_spans() {
        let span = |name: &str, tokens: Range<usize>| DocSpan {
            name: name.into(),
            path: name.into(),
            offsets: tokens.clone().map(|i| i * 10).collect(),
            tokens,
        };
        let p = DocPrompt {
            prefix: vec![1, 2],
            context: (100..120).collect(),
            suffix: vec![3],
            question: None,
            docs: vec![span("a", 0..12), span("b", 12..20)],
        };
        let t = p.truncated(10);
        assert_eq!((t.prefix.clone(), t.suffix.clone()), (vec![1, 2], vec![3]));
        assert_eq!(t.context, (113..120).collect::<Vec<u32>>());
        assert_eq!(t.total_len(), 10);
        assert_eq!(t.docs.len(), 1);
        assert_eq!(
            (t.docs[0].name.as_str(), t.docs[0].tokens.clone()),
            ("b", 0..7)
        );
        assert_eq!(
            t.docs[0].offsets,
            (13..20).map(|i| i * 10).collect::<Vec<_>>()
        );
        // A budget that holds everything changes nothing; one below the affixes keeps no context.
        assert_eq!(p.truncated(100).context, p.context);
        assert!(p.truncated(2).context.is_empty());
    }
}
