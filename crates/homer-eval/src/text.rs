//! Text helpers shared by the tasks: the King James Bible's verse lines, answer normalisation,
//! token F1.

use std::path::Path;

use crate::{EvalError, Result};

/// One verse line of the KJV text made by `scripts/fetch-kjv` ("John11:35 Jesus wept.").
#[derive(Debug, Clone, PartialEq)]
pub struct Verse {
    /// "John11:35"
    pub label: String,
    /// "Jesus wept."
    pub text: String,
}

/// Read the verse lines of a KJV text; an empty or unrecognised file is an error naming it and
/// the script that makes one.
pub fn read_verses(path: &Path) -> Result<Vec<Verse>> {
    let body = std::fs::read_to_string(path).map_err(|e| {
        EvalError::Io(format!(
            "{}: cannot read the KJV text ({e}); make it with `scripts/fetch-kjv {}`",
            path.display(),
            path.display()
        ))
    })?;
    let verses: Vec<Verse> = body.lines().filter_map(parse_verse).collect();
    if verses.is_empty() {
        return Err(EvalError::Io(format!(
            "{}: no verse lines like \"John11:35 Jesus wept.\"; make the text with scripts/fetch-kjv",
            path.display()
        )));
    }
    Ok(verses)
}

fn parse_verse(line: &str) -> Option<Verse> {
    let (label, text) = line.split_once(' ')?;
    let colon = label.find(':')?;
    let verse = &label[colon + 1..];
    let ok = !verse.is_empty()
        && verse.chars().all(|c| c.is_ascii_digit())
        && label[..colon].ends_with(|c: char| c.is_ascii_digit());
    (ok && !text.trim().is_empty()).then(|| Verse {
        label: label.to_string(),
        text: text.trim().to_string(),
    })
}

/// Lower-case words of letters and digits.
pub fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// SQuAD-style token F1 between an answer and the reference (bag of words).
pub fn f1(answer: &str, reference: &str) -> f64 {
    let a = words(answer);
    let r = words(reference);
    if a.is_empty() || r.is_empty() {
        return if a.is_empty() && r.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut pool: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for w in &r {
        *pool.entry(w).or_default() += 1;
    }
    let mut common = 0;
    for w in &a {
        if let Some(n) = pool.get_mut(w.as_str()) {
            if *n > 0 {
                *n -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / a.len() as f64;
    let rc = common as f64 / r.len() as f64;
    2.0 * p * rc / (p + rc)
}

/// Exact match after normalisation (case, punctuation, spacing).
pub fn exact(answer: &str, reference: &str) -> bool {
    words(answer) == words(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verse_lines_parse_and_other_lines_do_not() {
        assert_eq!(
            parse_verse("John11:35 Jesus wept."),
            Some(Verse {
                label: "John11:35".into(),
                text: "Jesus wept.".into()
            })
        );
        assert_eq!(
            parse_verse("1Co13:4 Charity suffereth long").unwrap().label,
            "1Co13:4"
        );
        assert_eq!(parse_verse("Chapter 11"), None);
        assert_eq!(parse_verse("John11: x"), None);
        assert_eq!(parse_verse("John11:35 "), None);
    }

    #[test]
    fn f1_and_exact_score_words() {
        assert_eq!(f1("Jesus wept.", "Jesus wept."), 1.0);
        assert!(exact("jesus  WEPT", "Jesus wept."));
        assert_eq!(f1("nothing here", "Jesus wept."), 0.0);
        // 1 common word: precision 1/2, recall 1/2.
        assert!((f1("Jesus said", "Jesus wept") - 0.5).abs() < 1e-12);
        // Repeats count once per reference occurrence.
        assert!((f1("wept wept wept", "Jesus wept") - 0.4).abs() < 1e-12);
        assert_eq!(f1("", "x"), 0.0);
    }
}
