//! From a HOMER trace back to the documents: which passages the model kept. A passage is a run of
//! whole lines of one document (at least `min_tokens` context tokens, a long line is cut); it is
//! ranked by the share of its tokens that reached the final cache, then by how well it matches the
//! question (BM25, when the prompt has one: selections that keep whole sentences keep many
//! passages whole, and the ones the question is about should lead), then by the mean significance
//! of its kept tokens. The desktop app shows the best ones as citations and as "densest regions".

use std::borrow::Borrow;
use std::ops::Range;
use std::path::PathBuf;

use homer::MergeTrace;
use serde::{Deserialize, Serialize};

use crate::ask::DocPrompt;
use crate::document::Document;

/// Passages are at least this many context tokens (up to 4× on one long line).
pub const PASSAGE_TOKENS: usize = 24;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Citation {
    /// Index of the document in the prompt.
    pub doc: usize,
    pub name: String,
    pub path: PathBuf,
    /// Byte range in the document's text.
    pub bytes: Range<usize>,
    /// Context token range.
    pub tokens: Range<usize>,
    /// 1-based first line, and page for PDFs.
    pub line: usize,
    pub page: Option<usize>,
    /// Tokens of the passage that reached the final cache.
    pub kept: usize,
    /// Mean significance of the kept tokens that were scored (None when none was).
    pub mean_score: Option<f32>,
    /// BM25 score of the passage against the prompt's question, among the passages HOMER kept
    /// some of (None: the prompt has no question; 0: no word in common).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_match: Option<f32>,
    /// The passage, trimmed and cut to 240 characters.
    pub text: String,
}

impl Citation {
    pub fn density(&self) -> f32 {
        self.kept as f32 / self.tokens.len().max(1) as f32
    }
}

/// Byte range in its document of every context token: (document index, range).
/// Header tokens of multi-document prompts map to an empty range at 0.
pub fn token_bytes<D: Borrow<Document>>(
    prompt: &DocPrompt,
    docs: &[D],
) -> Vec<(usize, Range<usize>)> {
    let mut out = vec![(0, 0..0); prompt.context.len()];
    for (k, span) in prompt.docs.iter().enumerate() {
        let len = docs.get(k).map_or(0, |d| d.borrow().text.len());
        let offs = &span.offsets;
        for (j, i) in span.tokens.clone().enumerate() {
            let start = offs[j].min(len);
            let end = offs
                .get(j + 1)
                .copied()
                .unwrap_or(len)
                .clamp(start, len.max(start));
            if i < out.len() {
                out[i] = (k, start..end);
            }
        }
    }
    out
}

/// Cut every document of `prompt` into passages of whole lines.
pub fn passages<D: Borrow<Document>>(
    prompt: &DocPrompt,
    docs: &[D],
    min_tokens: usize,
) -> Vec<(usize, Range<usize>)> {
    let bytes = token_bytes(prompt, docs);
    let mut out = vec![];
    for (k, span) in prompt.docs.iter().enumerate() {
        let Some(doc) = docs.get(k).map(|d| d.borrow()) else {
            continue;
        };
        let mut start = span.tokens.start;
        for i in span.tokens.clone() {
            let n = i + 1 - start;
            let r = &bytes[i].1;
            let ends_line = doc.text[r.clone()].contains('\n');
            if (ends_line && n >= min_tokens) || n >= 4 * min_tokens || i + 1 == span.tokens.end {
                out.push((k, start..i + 1));
                start = i + 1;
            }
        }
    }
    out
}

/// The `n` passages whose tokens HOMER kept most (see the module doc). Empty when the trace kept
/// every context token (nothing to tell apart).
pub fn citations<D: Borrow<Document>>(
    prompt: &DocPrompt,
    docs: &[D],
    trace: &MergeTrace,
    n: usize,
) -> Vec<Citation> {
    if trace.kept.len() >= trace.context_len {
        return vec![];
    }
    let kept = trace.kept_mask();
    let scores = trace.last_scores();
    let bytes = token_bytes(prompt, docs);
    let mut all: Vec<Citation> = passages(prompt, docs, PASSAGE_TOKENS)
        .into_iter()
        .filter_map(|(k, toks)| {
            let doc = docs[k].borrow();
            let n_kept = toks.clone().filter(|&i| kept[i]).count();
            if n_kept == 0 {
                return None;
            }
            let scored: Vec<f32> = toks
                .clone()
                .filter(|&i| kept[i])
                .filter_map(|i| scores[i].filter(|s| s.is_finite()))
                .collect();
            let mean_score =
                (!scored.is_empty()).then(|| scored.iter().sum::<f32>() / scored.len() as f32);
            // Line, page and text (a scan of the document each) only for the passages chosen.
            Some(Citation {
                doc: k,
                name: doc.name.clone(),
                path: doc.path.clone(),
                line: 0,
                page: None,
                text: String::new(),
                bytes: bytes[toks.start].1.start..bytes[toks.end - 1].1.end,
                tokens: toks,
                kept: n_kept,
                mean_score,
                question_match: None,
            })
        })
        .collect();
    if let Some(q) = prompt.question.as_deref().filter(|q| !q.trim().is_empty()) {
        let corpus: Vec<String> = all
            .iter()
            .map(|c| docs[c.doc].borrow().text[c.bytes.clone()].to_string())
            .collect();
        let search =
            bm25::SearchEngineBuilder::<u32>::with_corpus(bm25::Language::English, corpus).build();
        for c in &mut all {
            c.question_match = Some(0.0);
        }
        for hit in search.search(q, all.len()) {
            all[hit.document.id as usize].question_match = Some(hit.score.max(0.0));
        }
    }
    all.sort_by(|a, b| {
        b.density()
            .total_cmp(&a.density())
            .then(
                b.question_match
                    .unwrap_or(0.0)
                    .total_cmp(&a.question_match.unwrap_or(0.0)),
            )
            .then(
                b.mean_score
                    .unwrap_or(f32::NEG_INFINITY)
                    .total_cmp(&a.mean_score.unwrap_or(f32::NEG_INFINITY)),
            )
            .then(a.tokens.start.cmp(&b.tokens.start))
    });
    all.truncate(n);
    for c in &mut all {
        let doc = docs[c.doc].borrow();
        c.line = doc.line_of(c.bytes.start);
        c.page = doc.page_of(c.bytes.start);
        c.text = snippet(&doc.text[c.bytes.clone()], 240);
    }
    all
}

fn snippet(text: &str, max_chars: usize) -> String {
    let t = text.trim();
    match t.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ask::DocSpan;

    /// One document of `lines` lines of 30 five-byte tokens each ("wNNN " ... "wNNN\n").
    fn setup(lines: usize) -> (DocPrompt, Vec<Document>) {
        let mut text = String::new();
        let mut offsets = vec![];
        for l in 0..lines {
            for t in 0..30 {
                offsets.push(text.len());
                text.push_str(&format!("w{:03}{}", l, if t == 29 { '\n' } else { ' ' }));
            }
        }
        let n = offsets.len();
        let doc = Document::from_text("doc.txt", &text);
        let prompt = DocPrompt {
            prefix: vec![1],
            context: vec![5; n],
            suffix: vec![2],
            question: None,
            docs: vec![DocSpan {
                name: "doc.txt".into(),
                path: "doc.txt".into(),
                tokens: 0..n,
                offsets,
            }],
        };
        (prompt, vec![doc])
    }

    fn trace(context_len: usize, kept: Vec<usize>) -> MergeTrace {
        MergeTrace {
            prefix_len: 1,
            context_len,
            suffix_len: 1,
            chunk_len: 64,
            warmup_layers: 0,
            n_layers: 2,
            n_chunks: 2,
            height: 1,
            last_position_id: 10,
            final_len: kept.len() + 2,
            scoring: "uncalibrated".into(),
            ops: "tensor".into(),
            nodes: vec![],
            kept,
            reread_order: None,
        }
    }

    #[test]
    fn passages_are_whole_lines_and_cover_every_token() {
        let (p, d) = setup(5);
        let ps = passages(&p, &d, PASSAGE_TOKENS);
        assert_eq!(ps.len(), 5);
        assert!(ps.iter().all(|(_, r)| r.len() == 30));
        assert_eq!(ps.last().unwrap().1.end, 150);
        // A single long line is cut at 4× the minimum.
        let one = Document::from_text("x", &"ab ".repeat(200));
        let prompt = DocPrompt {
            prefix: vec![],
            context: vec![0; 200],
            suffix: vec![],
            question: None,
            docs: vec![DocSpan {
                name: "x".into(),
                path: "x".into(),
                tokens: 0..200,
                offsets: (0..200).map(|i| i * 3).collect(),
            }],
        };
        let ps = passages(&prompt, &[one], 10);
        assert_eq!(ps.iter().map(|p| p.1.len()).collect::<Vec<_>>(), [40; 5]);
    }

    #[test]
    fn the_densest_kept_passage_comes_first_with_its_line() {
        let (p, d) = setup(6);
        // All of line 4 (tokens 90..120), a third of line 2, one token of line 6.
        let mut kept: Vec<usize> = (90..120).collect();
        kept.extend(30..40);
        kept.push(170);
        kept.sort();
        let c = citations(&p, &d, &trace(180, kept), 10);
        assert_eq!(c.len(), 3);
        assert_eq!(
            (c[0].line, c[0].kept, c[0].tokens.clone()),
            (4, 30, 90..120)
        );
        assert_eq!(&d[0].text[c[0].bytes.clone()], c[0].text.clone() + "\n");
        assert!(c[0].text.starts_with("w003 w003"));
        assert_eq!((c[1].line, c[1].kept), (2, 10));
        assert_eq!((c[2].line, c[2].kept), (6, 1));
        assert_eq!(c[0].page, None);
        // Everything kept: nothing to cite.
        assert!(citations(&p, &d, &trace(180, (0..180).collect()), 5).is_empty());
    }

    #[test]
    fn whole_passages_the_question_matches_come_first() {
        let (mut p, d) = setup(6);
        // Lines 2, 4 and 5 kept whole (w001, w003, w004), a third of line 6.
        let mut kept: Vec<usize> = (30..60).chain(90..150).collect();
        kept.extend(150..160);
        let t = trace(180, kept);
        // Without a question: the whole lines in document order (no scores to tell them apart).
        let lines = |c: &[Citation]| c.iter().map(|c| c.line).collect::<Vec<_>>();
        let c = citations(&p, &d, &t, 10);
        assert_eq!(lines(&c), [2, 4, 5, 6]);
        assert!(c.iter().all(|c| c.question_match.is_none()));
        // A question about w004 puts line 5 first; the partly kept line stays behind the whole ones.
        p.question = Some("What is said about w004?".into());
        let c = citations(&p, &d, &t, 10);
        assert_eq!(lines(&c), [5, 2, 4, 6]);
        assert!(c[0].question_match.unwrap() > 0.0);
        assert_eq!(c[1].question_match, Some(0.0));
    }
}
