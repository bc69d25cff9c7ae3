//! The passkey retrieval task (Mohtashami & Jaggi; spec §9.3), adapted to the model's chat
//! template: an instruction, a long run of filler sentences with one "The pass key is NNNNN"
//! line at a chosen depth, and the question. The answer is right when the first run of digits in
//! it equals the key.

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::Engine;
use crate::ask::DocPrompt;
use crate::chat::Message;
use crate::error::{EngineError, Result};

pub const INSTRUCTION: &str = "There is an important info hidden inside a lot of irrelevant text. \
Find it and memorize it. I will quiz you about the important information there.";
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
pub const QUESTION: &str = "What is the pass key?";
const MARKER: &str = "\u{27e6}PASSKEY-CONTEXT\u{27e7}";

/// How the task is put to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PasskeyFormat {
    /// Plain text, the classic form: instruction, text, "What is the pass key? The pass key is"
    /// — the model completes the number. SmolLM2-135M-Instruct retrieves a key from 4.6K tokens
    /// this way and not through its chat template.
    #[default]
    Raw,
    /// One user turn in the model's chat template (spec §9.3 with Llama-2-chat); the assistant
    /// answers freely.
    Chat,
}

impl std::str::FromStr for PasskeyFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(PasskeyFormat::Raw),
            "chat" => Ok(PasskeyFormat::Chat),
            _ => Err(format!("`{s}`: expected raw or chat")),
        }
    }
}

/// The text the needle hides in.
#[derive(Debug, Clone, Default)]
pub enum Filler {
    /// "The grass is green. The sky is blue. …" repeated (the classic task).
    #[default]
    Classic,
    /// Consecutive lines of a text (KJV verses), from a start drawn from the seed; the needle is
    /// a line of its own between two of them.
    Lines(std::sync::Arc<Vec<String>>),
}

impl Filler {
    /// A short name for records and tables: "classic" or "lines".
    pub fn name(&self) -> &'static str {
        match self {
            Filler::Classic => "classic",
            Filler::Lines(_) => "lines",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PasskeySample {
    pub prompt: DocPrompt,
    pub passkey: String,
    /// Requested depth (0 = start of the context, 1 = end).
    pub depth: f64,
    /// Context token index where the needle line starts.
    pub needle_token: usize,
    /// Context token index just past the needle line.
    pub needle_end: usize,
}

/// The first run of ASCII digits in `text`.
pub fn first_number(text: &str) -> Option<&str> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

impl Engine {
    /// A passkey prompt of about `length` tokens in all (prefix + context + suffix) with the
    /// needle at `depth`, reproducible from `seed`.
    pub fn passkey_sample(
        &self,
        length: usize,
        depth: f64,
        seed: u64,
        format: PasskeyFormat,
    ) -> Result<PasskeySample> {
        self.passkey_sample_in(length, depth, seed, format, &Filler::Classic)
    }

    /// [`Engine::passkey_sample`] with the needle hidden in `filler`.
    pub fn passkey_sample_in(
        &self,
        length: usize,
        depth: f64,
        seed: u64,
        format: PasskeyFormat,
        filler: &Filler,
    ) -> Result<PasskeySample> {
        if !(0.0..=1.0).contains(&depth) {
            return Err(EngineError::Setting(format!(
                "passkey depth {depth} must lie in [0, 1]"
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let passkey = rng.random_range(10000u32..100000).to_string();
        let (prefix, suffix) = match format {
            PasskeyFormat::Raw => (
                self.tokenizer.encode(&format!("{INSTRUCTION}\n\n"), true)?,
                self.tokenizer
                    .encode(&format!("\n\n{QUESTION} The pass key is"), false)?,
            ),
            PasskeyFormat::Chat => {
                let rendered = self.template.render(
                    &[Message::new(
                        "user",
                        format!("{INSTRUCTION}\n\n{MARKER}\n\n{QUESTION}"),
                    )],
                    true,
                )?;
                let (before, after) = rendered.split_once(MARKER).ok_or_else(|| {
                    EngineError::Template("the chat template dropped the passkey marker".into())
                })?;
                // The suffix ends with the assistant header: priming the answer with "The pass
                // key is" made SmolLM2 define the word instead (1/2 right at 2K tokens).
                (
                    self.tokenizer.encode(before, true)?,
                    self.tokenizer.encode(after, false)?,
                )
            }
        };
        let needle = format!("The pass key is {passkey}. Remember it. {passkey} is the pass key.");
        let budget = length.saturating_sub(prefix.len() + suffix.len());
        let needle_len = self.tokenizer.encode(&needle, false)?.len();
        // `pieces` units of filler with the needle after `before` of them: the text and the
        // needle's byte range in it.
        let lines: Vec<String>;
        let (unit, pieces_max, build): (
            usize,
            usize,
            Box<dyn Fn(usize, usize) -> (String, usize)>,
        ) = match filler {
            Filler::Classic => (
                self.tokenizer.encode(FILLER, false)?.len().max(1),
                usize::MAX,
                Box::new(|pieces, before| {
                    let head = FILLER.repeat(before);
                    let text = format!("{head}{needle} {}", FILLER.repeat(pieces - before));
                    (text.trim_end().to_string(), head.len())
                }),
            ),
            Filler::Lines(all) => {
                if all.is_empty() {
                    return Err(EngineError::Setting(
                        "the passkey filler text has no lines".into(),
                    ));
                }
                // Enough consecutive lines (wrapping around) for the budget at ≥ 1 token
                // a line, from a seeded start.
                let start = rng.random_range(0..all.len());
                let want = budget.min(all.len() * 4).max(1);
                lines = (0..want)
                    .map(|i| all[(start + i) % all.len()].clone())
                    .collect();
                let sample_tokens = self
                    .tokenizer
                    .encode(&lines[..lines.len().min(64)].join("\n"), false)?
                    .len();
                let per_line = sample_tokens.div_ceil(lines.len().min(64)).max(1);
                let lines = &lines;
                let needle = needle.as_str();
                (
                    per_line,
                    lines.len(),
                    Box::new(move |pieces, before| {
                        let mut head = lines[..before].join("\n");
                        if before > 0 {
                            head.push('\n');
                        }
                        let mut text = format!("{head}{needle}");
                        for l in &lines[before..pieces] {
                            text.push('\n');
                            text.push_str(l);
                        }
                        (text, head.len())
                    }),
                )
            }
        };
        let mut repeats = (budget.saturating_sub(needle_len) / unit).min(pieces_max);
        // Tokenise the real text and trim pieces until it fits the budget (big steps first).
        loop {
            let before_n = ((repeats as f64) * depth).round() as usize;
            let (text, head_len) = build(repeats, before_n);
            let (context, offsets) = self.tokenizer.encode_with_offsets(&text)?;
            if context.len() <= budget || repeats == 0 {
                // The first token that reaches into the needle, and the first past it.
                let needle_token = offsets.iter().position(|o| o.1 > head_len).unwrap_or(0);
                let needle_end = offsets
                    .iter()
                    .position(|o| o.0 >= head_len + needle.len())
                    .unwrap_or(context.len());
                return Ok(PasskeySample {
                    prompt: DocPrompt {
                        prefix,
                        context,
                        suffix,
                        question: None,
                        docs: vec![],
                    },
                    passkey,
                    depth,
                    needle_token,
                    needle_end,
                });
            }
            let over = context.len() - budget;
            repeats = repeats.saturating_sub((over / unit / 2).max(1));
        }
    }
}

/// How a passkey prompt is run: the baselines of the evaluation and HOMER (spec §8, §9.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// One prefill of the whole prompt, even past the window.
    Plain,
    /// Keep the prefix, the suffix and the tail of the context that fits the window.
    Truncation,
    /// The whole prompt with a RoPE scaling: pi, ntk, dynamic-ntk or yarn.
    Rope(String),
    /// HOMER with the native RoPE.
    Homer,
    /// HOMER on a RoPE-scaled model (`homer+yarn`, ...): the chunk length becomes half the
    /// scaled window.
    HomerRope(String),
    /// HOMER with another selection policy and/or root budget (issue 15), spelt
    /// `homer:<knobs joined by +>`: `homer:sentence`, `homer:pool7+query=suffix`,
    /// `homer:sentence+budget=2048` (the knobs of `--selection`, and budget=N rows; none = the
    /// chunk length); `homer:default` is the engine's default selection and budget, spelt out.
    HomerWith {
        selection: homer::Selection,
        budget: Option<usize>,
    },
}

const ROPE_KINDS: [&str; 4] = ["pi", "ntk", "dynamic-ntk", "yarn"];

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let rope = |k: &str| ROPE_KINDS.contains(&k).then(|| k.to_string());
        Ok(match s {
            "plain" => Method::Plain,
            "truncation" | "truncate" => Method::Truncation,
            "homer" => Method::Homer,
            // The engine's default, spelt out (records keep their meaning if the default moves).
            "homer:default" => Method::homer_with(
                crate::DEFAULT_SELECTION,
                crate::default_budget(&crate::DEFAULT_SELECTION),
            ),
            _ if s.starts_with("homer:") => {
                // budget=N is the method's; every other knob is `--selection`'s, parsed once.
                let mut budget = None;
                let mut knobs = vec![];
                for knob in s["homer:".len()..].split('+') {
                    match knob.strip_prefix("budget=") {
                        Some(b) => {
                            budget = Some(b.parse::<usize>().map_err(|_| {
                                format!("method `{s}`: budget=N needs a number of rows")
                            })?)
                        }
                        None => knobs.push(knob),
                    }
                }
                let selection: homer::Selection = if knobs.is_empty() {
                    homer::Selection::default()
                } else {
                    knobs
                        .join(",")
                        .parse()
                        .map_err(|e| format!("method `{s}`: {e}"))?
                };
                Method::homer_with(selection, budget)
            }
            _ => match s.strip_prefix("homer+") {
                Some(k) => Method::HomerRope(rope(k).ok_or_else(|| bad(s))?),
                None => Method::Rope(rope(s).ok_or_else(|| bad(s))?),
            },
        })
    }
}

fn bad(s: &str) -> String {
    format!(
        "method `{s}`: expected plain, truncation, pi, ntk, dynamic-ntk, yarn, homer, homer+<one of the RoPE scalings> or homer:<selection knobs joined by +>"
    )
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::Plain => f.write_str("plain"),
            Method::Truncation => f.write_str("truncation"),
            Method::Rope(k) => f.write_str(k),
            Method::Homer => f.write_str("homer"),
            Method::HomerRope(k) => write!(f, "homer+{k}"),
            Method::HomerWith { selection, budget } => {
                let mut knobs = vec![];
                if !selection.is_paper() {
                    knobs.push(selection.to_string().replace(',', "+"));
                }
                if let Some(b) = budget {
                    knobs.push(format!("budget={b}"));
                }
                write!(f, "homer:{}", knobs.join("+"))
            }
        }
    }
}

impl Method {
    /// HOMER with `selection` and `budget`: [`Method::Homer`] for the paper's.
    pub fn homer_with(selection: homer::Selection, budget: Option<usize>) -> Method {
        if selection.is_paper() && budget.is_none() {
            Method::Homer
        } else {
            Method::HomerWith { selection, budget }
        }
    }

    /// The RoPE scaling the method runs a `total`-token prompt with: `factor` when given, else
    /// the smallest whole factor whose scaled window holds the prompt.
    pub fn rope_scaling(
        &self,
        total: usize,
        native: usize,
        factor: Option<f64>,
    ) -> std::result::Result<homer_model::RopeScaling, String> {
        match self {
            Method::Plain | Method::Truncation | Method::Homer | Method::HomerWith { .. } => {
                Ok(homer_model::RopeScaling::None)
            }
            Method::Rope(k) | Method::HomerRope(k) => {
                let s = factor.unwrap_or_else(|| (total as f64 / native as f64).ceil().max(1.0));
                homer_model::RopeScaling::from_choice(k, s, native)
            }
        }
    }

    pub fn uses_homer(&self) -> bool {
        matches!(
            self,
            Method::Homer | Method::HomerRope(_) | Method::HomerWith { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_pick_their_rope() {
        use homer_model::RopeScaling;
        let m: Vec<Method> = [
            "plain",
            "truncation",
            "yarn",
            "homer",
            "homer+yarn",
            "dynamic-ntk",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(m[2], Method::Rope("yarn".into()));
        assert_eq!(m[4].to_string(), "homer+yarn");
        assert!("homer+rope".parse::<Method>().is_err() && "bm25".parse::<Method>().is_err());
        // 16,400 tokens on an 8K model: factor 3 unless one is given.
        assert_eq!(
            m[0].rope_scaling(16400, 8192, None).unwrap(),
            RopeScaling::None
        );
        assert_eq!(
            m[2].rope_scaling(16400, 8192, None).unwrap(),
            RopeScaling::Yarn {
                factor: 3.0,
                original_max_position_embeddings: 8192
            }
        );
        assert_eq!(
            m[5].rope_scaling(16400, 8192, Some(2.0)).unwrap(),
            RopeScaling::DynamicNtk {
                factor: 2.0,
                original_max_position_embeddings: 8192
            }
        );
        assert!(m[4].uses_homer() && !m[2].uses_homer());
        // HOMER with another selection: knobs joined by +, spelt back the same way.
        let w: Method = "homer:sentence+query=suffix+budget=2048".parse().unwrap();
        assert_eq!(
            w,
            Method::HomerWith {
                selection: homer::Selection {
                    unit: homer::Unit::Sentence {
                        agg: homer::Agg::Max
                    },
                    query: homer::Query::Suffix,
                    positions: homer::Positions::Local,
                    reread: homer::Reread::None,
                    prior: homer::Prior::None,
                    order: homer::Order::Document,
                    sep: homer::Sep::None,
                },
                budget: Some(2048),
            }
        );
        assert_eq!(
            w.to_string(),
            "homer:unit=sentence+query=suffix+budget=2048"
        );
        assert_eq!(w.to_string().parse::<Method>().unwrap(), w);
        assert!(w.uses_homer());
        assert_eq!(
            w.rope_scaling(16400, 8192, None).unwrap(),
            RopeScaling::None
        );
        assert_eq!("homer:paper".parse::<Method>().unwrap(), Method::Homer);
        // The default is spelt out: its record keys name the configuration that ran.
        let d: Method = "homer:default".parse().unwrap();
        assert_eq!(
            d,
            Method::homer_with(
                crate::DEFAULT_SELECTION,
                crate::default_budget(&crate::DEFAULT_SELECTION)
            )
        );
        assert_ne!(d.to_string(), "homer:default");
        assert_eq!(d.to_string().parse::<Method>().unwrap(), d);
        assert!("homer:span0".parse::<Method>().is_err());
        assert!("homer:budget=lots".parse::<Method>().is_err());
    }

    #[test]
    fn first_number_is_the_first_digit_run() {
        assert_eq!(first_number(" 12345. Remember 999"), Some("12345"));
        assert_eq!(first_number("no digits"), None);
        assert_eq!(first_number("x7"), Some("7"));
    }
}
