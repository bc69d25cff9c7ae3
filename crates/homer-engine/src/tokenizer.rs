//! Tokenisation through the `tokenizers` crate: from a Hugging Face `tokenizer.json`, or built
//! from GGUF metadata (`tokenizer.ggml.*`): GPT-2 style byte-level BPE with merges, or
//! llama/SentencePiece style with scores (BPE with byte fallback, merges ranked by score).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use homer_model::load::gguf::{GgufFile, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::error::{EngineError, Result};

/// The longest sentence unit, in tokens: longer sentences (or lines) are split.
pub const MAX_SENTENCE_TOKENS: usize = 64;

/// A tokenizer plus the facts generation and prompting need.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub source: PathBuf,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// Where [`Tokenizer::chat_template`] came from (a file, or a GGUF file's key).
    pub chat_template_origin: String,
    /// tokenizer.json carries its own post-processor (which adds BOS where the model wants it).
    post_processor: bool,
    /// `inner` with special-token matching off: for text that is data (documents, questions).
    plain: std::sync::OnceLock<tokenizers::Tokenizer>,
}

fn tok_err(path: &Path, what: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn strings(f: &GgufFile, key: &str) -> Result<Vec<String>> {
    let arr = f.get(key).and_then(|v| v.as_array()).ok_or_else(|| {
        tok_err(
            &f.path,
            format!("metadata `{key}` is missing or not an array"),
        )
    })?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| tok_err(&f.path, format!("`{key}` holds a non-string")))
        })
        .collect()
}

impl Tokenizer {
    /// Load `tokenizer.json` (and `tokenizer_config.json` for the chat template, if present).
    pub fn from_hf_dir(dir: &Path, bos_id: Option<u32>, eos_ids: Vec<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        // The tokenizers library panics on some malformed files (found by fuzzing): a refusal.
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(&path))
            .map_err(|_| {
                tok_err(
                    &path,
                    "malformed (the tokenizers library gave up on it); re-download the model's tokenizer.json",
                )
            })?
            .map_err(|e| tok_err(&path, e))?;
        let post_processor = inner.get_post_processor().is_some();
        let jinja = dir.join("chat_template.jinja");
        let mut chat_template = std::fs::read_to_string(&jinja).ok();
        let mut chat_template_origin = jinja.display().to_string();
        let mut add_bos = false;
        let cfg_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| tok_err(&cfg_path, format!("invalid JSON: {e}")))?;
            if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                chat_template = Some(t.to_string());
                chat_template_origin = format!("{}: chat_template", cfg_path.display());
            }
            add_bos = v
                .get("add_bos_token")
                .and_then(|b| b.as_bool())
                .unwrap_or(false);
        }
        Ok(Tokenizer {
            inner,
            source: path,
            bos_id,
            eos_ids,
            add_bos,
            chat_template,
            chat_template_origin,
            post_processor,
            plain: Default::default(),
        })
    }

    /// Build the tokenizer a GGUF file describes.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let path = &f.path;
        let model = f
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let tokens = strings(f, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match f
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => *x as i64,
                    other => other.as_u64().map(|x| x as i64).unwrap_or(1),
                })
                .collect(),
            None => vec![1; tokens.len()],
        };
        let id = |k: &str| f.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let mut eos_ids: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id") {
            if !eos_ids.contains(&eot) {
                eos_ids.push(eot);
            }
        }
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let (inner, default_add_bos) = match model {
            "gpt2" => {
                let merges: Vec<(String, String)> = strings(f, "tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| {
                        let (a, b) = m
                            .split_once(' ')
                            .ok_or_else(|| tok_err(path, format!("merge `{m}` has no space")))?;
                        Ok((a.to_string(), b.to_string()))
                    })
                    .collect::<Result<_>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(
                        vocab
                            .into_iter()
                            .collect::<tokenizers::models::bpe::Vocab>(),
                        merges,
                    )
                    .build()
                    .map_err(|e| tok_err(path, e))?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                let pre = f
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                t.with_pre_tokenizer(Some(gpt2_pre_tokenizer(pre).map_err(|e| tok_err(path, e))?));
                t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
                (t, false)
            }
            "llama" => {
                let scores: Vec<f32> = f
                    .get("tokenizer.ggml.scores")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect())
                    .unwrap_or_else(|| vec![0.0; tokens.len()]);
                let merges = merges_from_scores(&tokens, &scores, &vocab);
                let unk = id("tokenizer.ggml.unknown_token_id").map(|u| tokens[u as usize].clone());
                let mut b = BPE::builder()
                    .vocab_and_merges(
                        vocab
                            .into_iter()
                            .collect::<tokenizers::models::bpe::Vocab>(),
                        merges,
                    )
                    .byte_fallback(true);
                if let Some(u) = unk {
                    b = b.unk_token(u);
                }
                let bpe = b.build().map_err(|e| tok_err(path, e))?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                t.with_normalizer(Some(NormalizerWrapper::Sequence(
                    tokenizers::normalizers::Sequence::new(vec![
                        Prepend::new("▁".into()).into(),
                        Replace::new(" ", "▁").map_err(|e| tok_err(path, e))?.into(),
                    ]),
                )));
                t.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
                    DecoderWrapper::Replace(
                        tokenizers::normalizers::Replace::new("▁", " ")
                            .map_err(|e| tok_err(path, e))?
                            .into(),
                    ),
                    DecoderWrapper::ByteFallback(ByteFallback::default()),
                    DecoderWrapper::Fuse(Fuse::default()),
                    DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
                ]))));
                (t, true)
            }
            other => {
                return Err(tok_err(
                    path,
                    format!(
                        "tokenizer.ggml.model `{other}` is not supported (supported: gpt2, llama)"
                    ),
                ));
            }
        };
        let mut inner = inner;
        // Control (3) and user-defined (4) tokens are matched whole, before the model runs.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| **ty == 3 || **ty == 4)
            .map(|(t, ty)| AddedToken::from(t.clone(), *ty == 3))
            .collect();
        inner.add_special_tokens(&specials);
        let add_bos = f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(default_add_bos);
        let chat_template = f
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Ok(Tokenizer {
            inner,
            source: path.clone(),
            bos_id,
            eos_ids,
            add_bos,
            chat_template,
            chat_template_origin: format!("{}: tokenizer.chat_template", path.display()),
            post_processor: false,
            plain: Default::default(),
        })
    }

    /// Token ids of `text`. Special-token strings in `text` (e.g. `<|im_start|>`) become their
    /// single ids. A BOS is prepended when `add_special` and the model asks for one.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special && self.post_processor)
            .map_err(|e| tok_err(&self.source, e))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos && !self.post_processor {
            if let Some(b) = self.bos_id {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// The tokenizer with special-token matching off.
    fn plain(&self) -> &tokenizers::Tokenizer {
        self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        })
    }

    /// Token ids of `text` as data: special-token strings in it (`<|im_end|>`, `<s>`) become
    /// ordinary text tokens, never control tokens; no BOS.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .plain()
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` as data (as [`Tokenizer::encode_text`]) with each token's byte range
    /// in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self
            .plain()
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// The sentence unit of every token of a document ([`homer::select::sentence_units`], units
    /// of at most [`MAX_SENTENCE_TOKENS`] tokens), from each token's own text.
    pub fn sentence_units(&self, ids: &[u32]) -> Result<Vec<u32>> {
        let texts = ids
            .iter()
            .map(|&id| self.decode(&[id], false))
            .collect::<Result<Vec<_>>>()?;
        Ok(homer::select::sentence_units(&texts, MAX_SENTENCE_TOKENS))
    }

    pub fn token_str(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

/// Pre-tokenizer for GPT-2 style vocabularies by llama.cpp's `tokenizer.ggml.pre` name.
fn gpt2_pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre {
        // SmolLM: every digit on its own, then the GPT-2 regex.
        "smollm" | "smaug-bpe" | "starcoder" | "refact" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ]))
        }
        // Llama-3 style: split on its regex (numbers in groups of up to 3), then byte-level.
        "llama3" | "llama-bpe" => {
            let re = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
            let split = Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| e.to_string())?;
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ]))
        }
        _ => PreTokenizerWrapper::ByteLevel(byte_level),
    })
}

/// SentencePiece vocabularies carry scores, not merges. A merge (a, b) exists when a, b and
/// a+b are all tokens; it ranks by the merged token's score (higher first), then by its id.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        let chars: Vec<(usize, char)> = t.char_indices().collect();
        if chars.len() < 2 {
            continue;
        }
        for &(split, _) in &chars[1..] {
            let (a, b) = t.split_at(split);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    ia,
                    ib,
                    a.to_string(),
                    b.to_string(),
                ));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    merges.into_iter().map(|m| (m.3, m.4)).collect()
}

/// Incremental detokeniser: turns a growing list of ids into text pieces without dropping or
/// doubling spaces, and never splits a UTF-8 character (it waits while the tail decodes to U+FFFD).
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prev: usize,
    current: usize,
}

impl<'a> TokenStream<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        TokenStream {
            tok,
            ids: Vec::new(),
            prev: 0,
            current: 0,
        }
    }

    /// Add a token; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        let before = self.tok.decode(&self.ids[self.prev..self.current], true)?;
        self.ids.push(id);
        let after = self.tok.decode(&self.ids[self.prev..], true)?;
        if after.ends_with('\u{FFFD}') || after.len() <= before.len() {
            return Ok(None);
        }
        self.prev = self.current;
        self.current = self.ids.len();
        Ok(Some(text_after(&before, &after)))
    }

    /// Whatever is still held back at the end (an incomplete UTF-8 sequence decodes lossily).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self.tok.decode(&self.ids[self.prev..self.current], true)?;
        let after = self.tok.decode(&self.ids[self.prev..], true)?;
        self.prev = self.ids.len();
        self.current = self.ids.len();
        Ok((after.len() > before.len()).then(|| text_after(&before, &after)))
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// The part of `after` that follows `before`. Decoders normally only append; if one rewrote the
/// earlier text (cleanup rules), the new text starts after the longest common prefix of chars.
fn text_after(before: &str, after: &str) -> String {
    match after.strip_prefix(before) {
        Some(rest) => rest.to_string(),
        None => {
            let common = before
                .chars()
                .zip(after.chars())
                .take_while(|(a, b)| a == b)
                .count();
            after.chars().skip(common).collect()
        }
    }
}
