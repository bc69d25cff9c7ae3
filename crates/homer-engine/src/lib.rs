//! homer-engine: what the apps call. It knows files, tokenizers and prompts; the model crate
//! knows tensors. Load a model (the default one is fetched on first use), tokenise, render chat
//! prompts, and generate with streaming, stop conditions and cancellation.

pub mod ask;
pub mod chat;
pub mod citations;
pub mod doc_cache;
pub mod doc_disk;
pub mod document;
pub mod error;
pub mod fetch;
pub mod history;
pub mod passkey;
pub mod sampling;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use homer_model::load;
use homer_model::load::gguf::GgufModel;
use homer_model::model::PREFILL_BLOCK;
use homer_model::{BackendKind, DeviceInfo, KvCache, Llama, Logits, WeightDtype, read_f32};
use serde::Serialize;

pub use ask::{
    Answer, AskParams, BiasChoice, DEFAULT_REREAD_BUDGET, DEFAULT_SELECTION, DocPrompt, HomerMode,
    default_budget, parse_selection,
};
pub use chat::{ChatTemplate, Message};
pub use citations::{Citation, citations};
pub use doc_cache::{DocCache, DocCacheUsage, DocKey, DocReuse, reuse_note};
pub use document::{DocKind, Document, SkipReason, Skipped, ingest, load_document};
pub use error::{EngineError, Result};
pub use history::{ChatHistory, Exchange};
pub use homer::{Positions, Prior, Query, Reread, Selection, Unit};
pub use sampling::{SamplingParams, top_k};
pub use tokenizer::{TokenStream, Tokenizer};

/// What a model costs before it is loaded: parameters and memory (weights are held as f32).
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub path: PathBuf,
    pub format: String,
    pub params: usize,
    pub weights_bytes: u64,
    /// K and V of every layer for one token, f32.
    pub kv_bytes_per_token: u64,
    pub window: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl ModelSummary {
    /// Read the config of the model at `path` (GGUF file or HF directory) without loading weights.
    pub fn of(path: &Path) -> Result<Self> {
        let src = load::open(path)?;
        Ok(Self::from_config(path, src.describe(), src.config()))
    }

    /// The summary of a model whose config is at hand (a loaded engine's, say).
    pub fn from_config(path: &Path, format: String, c: &homer_model::LlamaConfig) -> Self {
        ModelSummary {
            path: path.to_path_buf(),
            format,
            params: c.n_params(),
            weights_bytes: c.n_params() as u64 * 4,
            kv_bytes_per_token: (c.num_hidden_layers * 2 * c.kv_dim() * 4) as u64,
            window: c.max_position_embeddings,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
        }
    }

    /// Weights plus a KV cache of `tokens` rows.
    pub fn memory_estimate(&self, tokens: usize) -> u64 {
        self.weights_bytes + self.kv_bytes_per_token * tokens as u64
    }
}

/// Progress reported while loading or running.
#[derive(Debug, Clone)]
pub enum Progress {
    Fetch {
        message: String,
        done: u64,
        total: Option<u64>,
    },
    Load {
        done: usize,
        total: usize,
    },
    Prefill {
        done: usize,
        total: usize,
    },
    /// A HOMER prefill advanced by one layer of one node.
    Homer(homer::HomerProgress),
}

pub struct Engine {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub device: DeviceInfo,
    pub model_path: PathBuf,
    pub format: String,
    /// Which implementation of HOMER's significance/gather/merge a HOMER prefill uses.
    pub homer_ops: OpsChoice,
    /// Leaves of recent documents, reused by later questions ([`AskParams::reuse_document`]).
    pub doc_cache: std::sync::Mutex<DocCache>,
}

/// HOMER's backend operations: the WGSL kernels of `homer-wgpu` or burn tensor ops (the oracle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpsChoice {
    /// WGSL kernels on a wgpu device, tensor ops on the CPU backend.
    #[default]
    Auto,
    /// The WGSL kernels (wgpu devices only).
    Wgsl,
    /// burn tensor ops, any backend (the oracle the kernels are tested against).
    Tensor,
}

impl std::str::FromStr for OpsChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(OpsChoice::Auto),
            "wgsl" | "kernels" => Ok(OpsChoice::Wgsl),
            "tensor" | "oracle" => Ok(OpsChoice::Tensor),
            other => Err(format!(
                "unknown HOMER ops `{other}` (expected auto, wgsl or tensor)"
            )),
        }
    }
}

impl std::fmt::Display for OpsChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpsChoice::Auto => "auto",
            OpsChoice::Wgsl => "wgsl",
            OpsChoice::Tensor => "tensor",
        })
    }
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    /// Stop at the model's end-of-sequence ids.
    pub stop_at_eos: bool,
    /// Stop a degenerate loop: when the answer's last `loop_ngram` tokens already occurred
    /// earlier in the answer, the repeat is cut and generation ends ([`StopReason::Repeat`]).
    /// Streaming holds back that many tokens' text. 0 = off.
    pub loop_ngram: usize,
    /// The repetition penalty also counts the prompt's tokens (as transformers does); by
    /// default it looks at the answer only, so quoting the document is not penalised.
    pub penalise_prompt: bool,
    /// Stop before a position passes the model's window ([`StopReason::Window`]); the
    /// evaluation turns it off to score baselines that run past the window on purpose.
    pub stop_at_window: bool,
}

/// Default [`GenerateParams::loop_ngram`]: 16 tokens (two lines of a verse, a sentence) repeated
/// word for word is a loop in a short answer, not a quotation.
pub const DEFAULT_LOOP_NGRAM: usize = 16;

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            stop_at_eos: true,
            loop_ngram: DEFAULT_LOOP_NGRAM,
            penalise_prompt: false,
            stop_at_window: true,
        }
    }
}

/// Where `ids` ends in a repeat: when its last `n` tokens already occur earlier (an earlier start,
/// overlapping allowed), the number of tokens to keep (everything before that last n-gram).
pub fn repeat_cut(ids: &[u32], n: usize) -> Option<usize> {
    if n == 0 || ids.len() <= n {
        return None;
    }
    let start = ids.len() - n;
    let tail = &ids[start..];
    (0..start).any(|j| &ids[j..j + n] == tail).then_some(start)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    /// The answer started repeating itself ([`GenerateParams::loop_ngram`]); the repeat was cut.
    Repeat,
    MaxTokens,
    Cancelled,
    /// The next position would pass the model's window (scaled under RoPE scaling), which it was
    /// not trained for ([`GenerateParams::stop_at_window`]).
    Window,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    pub fn decode_tokens_per_sec(&self) -> f64 {
        if self.decode_secs > 0.0 {
            self.ids.len().saturating_sub(1) as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

impl Engine {
    /// Load `model` (a GGUF file or HF directory; the default model when None) on `backend`
    /// with the backend's default weight precision.
    pub fn load(
        model: Option<&Path>,
        backend: BackendKind,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Self> {
        Self::load_with(model, backend, None, progress)
    }

    /// [`Engine::load`] with a weight precision (`None`: the backend's default,
    /// [`homer_model::kernels::default_dtype`]).
    pub fn load_with(
        model: Option<&Path>,
        backend: BackendKind,
        dtype: Option<WeightDtype>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Self> {
        let path = match model {
            Some(p) => p.to_path_buf(),
            None => fetch::ensure_default_model(&mut |m, d, t| {
                progress(Progress::Fetch {
                    message: m.to_string(),
                    done: d,
                    total: t,
                })
            })?,
        };
        fetch::use_home_for_kernel_cache();
        let (device, info) = homer_model::backend::device(backend)?;
        if info.backend == "wgpu" {
            // The model's attention on wgpu runs as the WGSL flash-attention kernel.
            homer_wgpu::install_attention(&info)?;
        }
        let src = load::open(&path)?;
        let tokenizer = match src.as_any().downcast_ref::<GgufModel>() {
            Some(g) => Tokenizer::from_gguf(&g.file)?,
            None => {
                let cfg = src.config();
                Tokenizer::from_hf_dir(&path, cfg.bos_token_id, cfg.eos_token_ids.clone())?
            }
        };
        let dtype = dtype.unwrap_or_else(|| homer_model::kernels::default_dtype(&device));
        let model = Llama::load_with(
            src.as_ref(),
            &device,
            homer_model::backend::buffer_limit(&device),
            dtype,
            &mut |d, t| progress(Progress::Load { done: d, total: t }),
        )?;
        let bos = tokenizer
            .bos_id
            .map(|b| tokenizer.token_str(b))
            .unwrap_or_default();
        let eos = tokenizer
            .eos_ids
            .first()
            .map(|&e| tokenizer.token_str(e))
            .unwrap_or_default();
        let template = ChatTemplate::from_source(
            tokenizer.chat_template.as_deref(),
            &tokenizer.chat_template_origin,
            &bos,
            &eos,
        );
        Ok(Engine {
            model,
            tokenizer,
            template,
            device: info,
            model_path: path,
            format: src.describe(),
            homer_ops: OpsChoice::Auto,
            doc_cache: std::sync::Mutex::new(DocCache::new(DocCache::default_budget())),
        })
    }

    /// The HOMER ops `self.homer_ops` names for this engine's device.
    pub fn ops(&self) -> Result<std::sync::Arc<dyn homer::HomerOps>> {
        let wgpu = self.device.backend == "wgpu";
        Ok(match (self.homer_ops, wgpu) {
            (OpsChoice::Tensor, _) | (OpsChoice::Auto, false) => {
                std::sync::Arc::new(homer::TensorOps)
            }
            (OpsChoice::Wgsl | OpsChoice::Auto, true) => {
                std::sync::Arc::new(homer_wgpu::WgslOps::for_device(&self.device)?)
            }
            (OpsChoice::Wgsl, false) => {
                return Err(EngineError::Setting(format!(
                    "--homer-ops wgsl needs the wgpu backend; this engine runs on `{}` \
                     (use --backend wgpu, or --homer-ops tensor)",
                    self.device.backend
                )));
            }
        })
    }

    /// Prefill `ids` in blocks (reporting progress, checking `cancel` between blocks); returns
    /// the last row's logits and the cache.
    pub fn prefill(
        &self,
        ids: &[u32],
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Vec<f32>, KvCache)> {
        if ids.is_empty() {
            return Err(EngineError::Setting("the prompt is empty".into()));
        }
        let window = self.model.config.max_position_embeddings;
        if ids.len() > window {
            tracing::warn!(
                "prompt of {} tokens exceeds the model's window of {window}",
                ids.len()
            );
        }
        // Buffers sized for the prompt: the blocks append in place, no doubling.
        let mut cache = KvCache::with_capacity(self.model.n_layers(), ids.len());
        // Dynamic NTK takes its frequencies from the whole prompt, as one full forward would.
        self.model.set_rope_seq_len(ids.len());
        let last = self.forward_blocks(ids, &mut cache, ids.len(), true, cancel, progress)?;
        Ok((last.expect("at least one block"), cache))
    }

    /// `ids` through the model in blocks of [`PREFILL_BLOCK`] rows appended to `cache`, checking
    /// `cancel` between blocks and reporting progress out of `total`; with `logits`, the last
    /// row's logits (only the last block's last row goes through the LM head).
    pub(crate) fn forward_blocks(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        total: usize,
        logits: bool,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Option<Vec<f32>>> {
        let mut last = None;
        for (i, block) in ids.chunks(PREFILL_BLOCK).enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            let is_last = (i + 1) * PREFILL_BLOCK >= ids.len();
            let which = if is_last && logits {
                Logits::Last
            } else {
                Logits::None
            };
            let l = self.model.forward(block, None, cache, which)?;
            if is_last && logits {
                last = Some(read_f32(l)?);
            }
            progress(Progress::Prefill {
                done: (i * PREFILL_BLOCK + block.len()).min(ids.len()),
                total,
            });
        }
        Ok(last)
    }

    /// The document cache, locked (a question that panicked holding it leaves it usable: its
    /// entries are whole leaves, put after they were computed).
    pub fn doc_cache_lock(&self) -> std::sync::MutexGuard<'_, DocCache> {
        self.doc_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Next-token logits after `ids`.
    pub fn next_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.prefill(ids, &AtomicBool::new(false), &mut |_| {})?.0)
    }

    /// Generate from prompt ids, streaming text pieces to `on_text`.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        params.sampling.validate().map_err(EngineError::Setting)?;
        let t0 = Instant::now();
        let (logits, cache) = self.prefill(prompt, cancel, progress)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let mut g = self.decode(logits, cache, prompt, params, cancel, on_text)?;
        g.prefill_secs = prefill_secs;
        Ok(g)
    }

    /// Continue from a prefilled `cache` whose next-token logits are `logits`: sample, stream,
    /// stop at EOS / stop strings / a loop / `max_tokens` / cancellation. `history` is the
    /// prompt (the repetition penalty counts it with `penalise_prompt`). `prefill_secs` of the
    /// result is 0; callers fill it in.
    pub fn decode(
        &self,
        mut logits: Vec<f32>,
        mut cache: KvCache,
        history: &[u32],
        params: &GenerateParams,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        params.sampling.validate().map_err(EngineError::Setting)?;
        let t1 = Instant::now();
        // Room for the answer (at most a window of it): decoding appends in place, one copy of
        // the cache at most; a longer answer doubles the buffers past that.
        let budget = params
            .max_tokens
            .min(self.model.config.max_position_embeddings);
        cache.reserve_total(cache.len() + budget, &self.model.device);
        let mut sampler = sampling::Sampler::new(params.sampling.clone());
        let prompt_tokens = history.len();
        let prompt = history;
        let mut history = if params.penalise_prompt {
            history.to_vec()
        } else {
            Vec::new()
        };
        // Bytes of `text` after each generated token (ends[k] = after k tokens).
        let mut ends = vec![0usize];
        let mut stream = TokenStream::new(&self.tokenizer);
        let mut text = String::new();
        let mut out = Vec::new();
        let mut stop = StopReason::MaxTokens;
        let max_stop_len = params
            .stop_strings
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0);
        let mut emitted = 0usize; // bytes of `text` already given to on_text
        // NaN/∞ logits (a broken file, an overflowing precision) stop with an error naming the
        // layer, instead of sampling garbage.
        let finite = |logits: &[f32], out: &[u32]| -> Result<()> {
            if logits.iter().all(|v| v.is_finite()) {
                return Ok(());
            }
            let ids: Vec<u32> = prompt.iter().chain(out).copied().collect();
            Err(self.model.non_finite_error(&ids).into())
        };
        finite(&logits, &out)?;
        while out.len() < params.max_tokens {
            if cancel.load(Ordering::Relaxed) {
                stop = StopReason::Cancelled;
                break;
            }
            let next = sampler.sample(&mut logits, &history);
            if params.stop_at_eos && self.tokenizer.is_eos(next) {
                stop = StopReason::Eos;
                break;
            }
            out.push(next);
            history.push(next);
            if let Some(piece) = stream.push(next)? {
                text.push_str(&piece);
            }
            ends.push(text.len());
            if let Some(keep) = repeat_cut(&out, params.loop_ngram) {
                out.truncate(keep);
                text.truncate(ends[keep]);
                stop = StopReason::Repeat;
                break;
            }
            if let Some(pos) = params
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(pos);
                stop = StopReason::StopString;
                break;
            }
            // Hold back a tail that could still become a stop string, and the last
            // `loop_ngram` tokens' text, which a detected repeat would cut.
            let unsure = if params.loop_ngram > 0 {
                ends[out.len().saturating_sub(params.loop_ngram)]
            } else {
                text.len()
            };
            let safe = floor_char_boundary(
                &text,
                text.len()
                    .saturating_sub(max_stop_len.saturating_sub(1))
                    .min(unsure),
            );
            if safe > emitted {
                on_text(&text[emitted..safe]);
                emitted = safe;
            }
            if out.len() == params.max_tokens {
                break;
            }
            let window = self.model.config.max_position_embeddings;
            if params.stop_at_window && cache.next_position >= window {
                tracing::warn!(
                    "the answer stopped after {} tokens at position {}: the model's window is \
                     {window} positions; ask for a shorter answer, or let HOMER (`--homer auto`) \
                     or a smaller --budget leave room for it",
                    out.len(),
                    cache.next_position
                );
                stop = StopReason::Window;
                break;
            }
            logits = self.model.decode_step(next, &mut cache)?;
            finite(&logits, &out)?;
        }
        if !matches!(stop, StopReason::StopString | StopReason::Repeat) {
            if let Some(rest) = stream.finish()? {
                text.push_str(&rest);
            }
        }
        if text.len() > emitted {
            on_text(&text[emitted..]);
        }
        Ok(Generation {
            prompt_tokens,
            ids: out,
            text,
            stop,
            prefill_secs: 0.0,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }

    /// Render a chat with the model's template and tokenise it.
    /// Token ids of a chat: the template's control tokens around each message's content,
    /// which is data (special-token strings in it stay text).
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let texts: Vec<String> = messages.iter().map(|m| m.content.clone()).collect();
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message::new(&m.role, ask::marker(i)))
            .collect();
        let text = self.template.render(&marked, true)?;
        self.encode_marked(&text, &texts, true)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod loop_tests {
    use super::repeat_cut;

    #[test]
    fn repeat_cut_finds_the_last_ngram_earlier() {
        // a b c d a b c → the last 3 (a b c) occurred at 0: keep 4
        assert_eq!(repeat_cut(&[1, 2, 3, 4, 1, 2, 3], 3), Some(4));
        assert_eq!(repeat_cut(&[1, 2, 3, 4, 1, 2, 5], 3), None);
        // overlapping: x x x x with n 3 → the last 3 occurred at 0
        assert_eq!(repeat_cut(&[7, 7, 7, 7], 3), Some(1));
        assert_eq!(repeat_cut(&[7, 7, 7], 3), None);
        assert_eq!(repeat_cut(&[1, 2], 0), None);
        assert_eq!(repeat_cut(&[], 2), None);
    }
}
