//! Documents a user hands to `homer ask`: plain text and Markdown files, read as UTF-8 with
//! clear refusals (missing, unreadable, empty, binary, not UTF-8). Other formats (PDF, DOCX)
//! come with the desktop app's ingestion.

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub path: PathBuf,
    /// File name shown to the model and the user.
    pub name: String,
    /// The text, with CRLF line ends turned into LF.
    pub text: String,
}

impl Document {
    pub fn from_text(name: &str, text: &str) -> Self {
        Document {
            path: PathBuf::from(name),
            name: name.to_string(),
            text: text.replace("\r\n", "\n"),
        }
    }

    /// 1-based line number of byte offset `at` in the text.
    pub fn line_of(&self, at: usize) -> usize {
        let at = at.min(self.text.len());
        self.text.as_bytes()[..at]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
}

pub fn load_document(path: &Path) -> Result<Document> {
    let err = |what: String| EngineError::File {
        path: path.to_path_buf(),
        what,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read the document: {e}")))?;
    if bytes.contains(&0) {
        return Err(err(
            "is a binary file, not text; homer reads plain text and Markdown (.txt, .md)".into(),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        err(format!(
            "is not UTF-8 text (invalid byte at offset {}); convert it to UTF-8 first",
            e.utf8_error().valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(err("is empty: there is nothing to read".into()));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(Document {
        path: path.to_path_buf(),
        name,
        text: text
            .strip_prefix('\u{feff}')
            .unwrap_or(&text)
            .replace("\r\n", "\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_file_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let ok = load_document(&w("a.md", b"\xef\xbb\xbfline one\r\nline two\r\n")).unwrap();
        assert_eq!(ok.text, "line one\nline two\n");
        assert_eq!(
            (ok.name.as_str(), ok.line_of(9), ok.line_of(0)),
            ("a.md", 2, 1)
        );
        let e = load_document(&w("b.txt", b"  \n\t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.txt") && e.contains("empty"), "{e}");
        let e = load_document(&w("c.bin", b"ab\0cd"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.bin") && e.contains("binary"), "{e}");
        let e = load_document(&w("d.txt", b"ok \xff\xfe"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not UTF-8") && e.contains("offset 3"), "{e}");
        let e = load_document(&dir.path().join("none.txt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.txt") && e.contains("cannot read"), "{e}");
    }
}
