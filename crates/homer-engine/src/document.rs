//! Documents a user hands to homer: plain text and Markdown read as UTF-8, PDF text layers (page
//! by page, through `pdf-extract`) and DOCX text (through `docx-lite`). A file that cannot be
//! read is skipped with a [`SkipReason`] that names what is wrong and what to do.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocKind {
    Text,
    Markdown,
    Pdf,
    Docx,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub path: PathBuf,
    /// File name shown to the model and the user.
    pub name: String,
    /// The text, with CRLF line ends turned into LF.
    pub text: String,
    pub kind: DocKind,
    /// Size of the file on disk (0 for text handed over in memory).
    pub file_bytes: u64,
    /// Byte offset in `text` where each page starts (PDFs; empty for other kinds).
    pub pages: Vec<usize>,
}

/// Why a file was not added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum SkipReason {
    /// Missing, a directory, no permission, or a broken PDF/DOCX container.
    Unreadable(String),
    Empty,
    Binary,
    NotUtf8 {
        offset: usize,
    },
    /// A PDF whose pages carry no text (scanned images).
    NoTextLayer {
        pages: usize,
    },
    /// An extension homer does not read (.doc, .odt, images, ...).
    Unsupported(String),
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::Unreadable(e) => write!(f, "cannot be read: {e}"),
            SkipReason::Empty => f.write_str("is empty: there is nothing to read"),
            SkipReason::Binary => f.write_str(
                "is a binary file, not text; homer reads .txt, .md, .pdf (with a text layer) and .docx",
            ),
            SkipReason::NotUtf8 { offset } => write!(
                f,
                "is not UTF-8 text (invalid byte at offset {offset}); convert it to UTF-8 first"
            ),
            SkipReason::NoTextLayer { pages } => write!(
                f,
                "has no text layer ({pages} page(s) of images, e.g. a scan); run OCR on it first"
            ),
            SkipReason::Unsupported(ext) => write!(
                f,
                "has the extension .{ext}, which homer does not read; save it as .txt, .md, .pdf or .docx"
            ),
        }
    }
}

/// A file that was not added, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: SkipReason,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.path.display(), self.reason)
    }
}

impl Document {
    pub fn from_text(name: &str, text: &str) -> Self {
        Document {
            path: PathBuf::from(name),
            name: name.to_string(),
            text: text.replace("\r\n", "\n"),
            kind: DocKind::Text,
            file_bytes: 0,
            pages: vec![],
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

    /// 1-based page of byte offset `at` (PDFs), None for documents without pages.
    pub fn page_of(&self, at: usize) -> Option<usize> {
        if self.pages.is_empty() {
            return None;
        }
        Some(self.pages.partition_point(|&p| p <= at).max(1))
    }
}

/// Read `path` as a document; a refusal is an [`EngineError::File`] naming the file and reason.
pub fn load_document(path: &Path) -> Result<Document> {
    ingest(path).map_err(|s| EngineError::File {
        path: s.path,
        what: s.reason.to_string(),
    })
}

/// Read `path` as a document, or say why it was skipped.
pub fn ingest(path: &Path) -> std::result::Result<Document, Skipped> {
    let skip = |reason| Skipped {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| skip(SkipReason::Unreadable(e.to_string())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let (kind, text, pages) = match ext.as_str() {
        "pdf" => {
            let (text, pages) = pdf_text(&bytes).map_err(skip)?;
            (DocKind::Pdf, text, pages)
        }
        "docx" => (DocKind::Docx, docx_text(&bytes).map_err(skip)?, vec![]),
        "doc" | "odt" | "rtf" | "pages" | "epub" | "xlsx" | "xls" | "pptx" | "png" | "jpg"
        | "jpeg" | "gif" | "zip" | "gz" => return Err(skip(SkipReason::Unsupported(ext))),
        "md" | "markdown" => (DocKind::Markdown, plain_text(&bytes).map_err(skip)?, vec![]),
        _ => (DocKind::Text, plain_text(&bytes).map_err(skip)?, vec![]),
    };
    if text.trim().is_empty() {
        return Err(skip(SkipReason::Empty));
    }
    Ok(Document {
        path: path.to_path_buf(),
        name,
        text,
        kind,
        file_bytes: bytes.len() as u64,
        pages,
    })
}

fn plain_text(bytes: &[u8]) -> std::result::Result<String, SkipReason> {
    if bytes.contains(&0) {
        return Err(SkipReason::Binary);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| SkipReason::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    Ok(text
        .strip_prefix('\u{feff}')
        .unwrap_or(text)
        .replace("\r\n", "\n"))
}

/// The text layer of a PDF, pages joined by blank lines, and each page's start offset.
fn pdf_text(bytes: &[u8]) -> std::result::Result<(String, Vec<usize>), SkipReason> {
    if !bytes.starts_with(b"%PDF") {
        return Err(SkipReason::Unreadable(
            "not a PDF file (no %PDF header)".into(),
        ));
    }
    let pages = parse_guarded("PDF", || pdf_extract::extract_text_from_mem_by_pages(bytes))?;
    if pages.iter().all(|p| p.trim().is_empty()) {
        return Err(SkipReason::NoTextLayer { pages: pages.len() });
    }
    let mut text = String::new();
    let mut starts = Vec::with_capacity(pages.len());
    for p in &pages {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        starts.push(text.len());
        text.push_str(p.trim_matches('\n').replace("\r\n", "\n").as_str());
    }
    Ok((text, starts))
}

fn docx_text(bytes: &[u8]) -> std::result::Result<String, SkipReason> {
    if !bytes.starts_with(b"PK") {
        return Err(SkipReason::Unreadable(
            "not a DOCX file (not a zip container)".into(),
        ));
    }
    let text = parse_guarded("DOCX", || docx_lite::extract_text_from_bytes(bytes))?;
    Ok(text.replace("\r\n", "\n"))
}

/// Run a format parser; its error or its panic (pdf-extract panics on some malformed files) is a
/// skip naming the format, not a crash.
fn parse_guarded<T, E: std::fmt::Display>(
    format: &str,
    parse: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, SkipReason> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse))
        .map_err(|_| {
            SkipReason::Unreadable(format!("the {format} is malformed (its parser gave up)"))
        })?
        .map_err(|e| SkipReason::Unreadable(format!("the {format} could not be parsed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn reason(p: &Path) -> SkipReason {
        ingest(p).unwrap_err().reason
    }

    /// A PDF whose pages show `pages[i]` in a standard font (no text operators when empty).
    fn pdf(pages: &[&str]) -> Vec<u8> {
        use pdf_extract::content::{Content, Operation};
        use pdf_extract::{Object, Stream, dictionary};
        let mut doc = pdf_extract::Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let font = doc.add_object(dictionary! {
            "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Courier",
        });
        let resources = doc.add_object(dictionary! { "Font" => dictionary! { "F1" => font } });
        let mut kids: Vec<Object> = vec![];
        for text in pages {
            let operations = if text.is_empty() {
                vec![]
            } else {
                vec![
                    Operation::new("BT", vec![]),
                    Operation::new("Tf", vec!["F1".into(), 12.into()]),
                    Operation::new("Td", vec![72.into(), 700.into()]),
                    Operation::new("Tj", vec![Object::string_literal(*text)]),
                    Operation::new("ET", vec![]),
                ]
            };
            let body = Content { operations }.encode().unwrap();
            let contents = doc.add_object(Stream::new(dictionary! {}, body));
            let page = doc.add_object(dictionary! {
                "Type" => "Page", "Parent" => pages_id, "Contents" => contents,
            });
            kids.push(page.into());
        }
        doc.objects.insert(
            pages_id,
            Object::Dictionary(dictionary! {
                "Type" => "Pages",
                "Kids" => kids,
                "Count" => pages.len() as i64,
                "Resources" => resources,
                "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
            }),
        );
        let catalog = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
        doc.trailer.set("Root", catalog);
        let mut out = vec![];
        doc.save_to(&mut out).unwrap();
        out
    }

    /// A DOCX container whose body has one paragraph per entry of `paragraphs`.
    fn docx(paragraphs: &[&str]) -> Vec<u8> {
        use std::io::Write;
        let mut buf = std::io::Cursor::new(vec![]);
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default();
        z.start_file("[Content_Types].xml", opts).unwrap();
        z.write_all(
            br#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#,
        )
        .unwrap();
        z.start_file("word/document.xml", opts).unwrap();
        let body: String = paragraphs
            .iter()
            .map(|p| format!("<w:p><w:r><w:t>{p}</w:t></w:r></w:p>"))
            .collect();
        write!(
            z,
            r#"<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>{body}</w:body></w:document>"#
        )
        .unwrap();
        z.finish().unwrap();
        buf.into_inner()
    }

    #[test]
    fn text_and_markdown() {
        let dir = tempfile::tempdir().unwrap();
        let ok = ingest(&write(
            dir.path(),
            "a.md",
            b"\xef\xbb\xbfline one\r\nline two\r\n",
        ))
        .unwrap();
        assert_eq!(ok.text, "line one\nline two\n");
        assert_eq!((ok.kind, ok.file_bytes), (DocKind::Markdown, 23));
        assert_eq!(
            (
                ok.name.as_str(),
                ok.line_of(9),
                ok.line_of(0),
                ok.page_of(3)
            ),
            ("a.md", 2, 1, None)
        );
        let t = ingest(&write(dir.path(), "notes", b"no extension is text")).unwrap();
        assert_eq!(
            (t.kind, t.text.as_str()),
            (DocKind::Text, "no extension is text")
        );
    }

    #[test]
    fn every_skip_reason_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(reason(&write(d, "b.txt", b"  \n\t")), SkipReason::Empty);
        assert_eq!(reason(&write(d, "c.bin", b"ab\0cd")), SkipReason::Binary);
        assert_eq!(
            reason(&write(d, "d.txt", b"ok \xff\xfe")),
            SkipReason::NotUtf8 { offset: 3 }
        );
        assert!(matches!(
            reason(&d.join("none.txt")),
            SkipReason::Unreadable(_)
        ));
        assert!(
            matches!(reason(d), SkipReason::Unreadable(_)),
            "a directory"
        );
        assert_eq!(
            reason(&write(d, "e.odt", b"PK...")),
            SkipReason::Unsupported("odt".into())
        );
        assert!(
            matches!(reason(&write(d, "f.pdf", b"hello")), SkipReason::Unreadable(m) if m.contains("%PDF"))
        );
        assert!(matches!(
            reason(&write(d, "g.pdf", b"%PDF-1.4 garbage")),
            SkipReason::Unreadable(_)
        ));
        assert!(
            matches!(reason(&write(d, "h.docx", b"plain")), SkipReason::Unreadable(m) if m.contains("zip"))
        );
        assert!(matches!(
            reason(&write(d, "i.docx", b"PK\x03\x04junk")),
            SkipReason::Unreadable(_)
        ));
        assert_eq!(
            reason(&write(d, "scan.pdf", &pdf(&["", ""]))),
            SkipReason::NoTextLayer { pages: 2 }
        );
        assert_eq!(
            reason(&write(d, "blank.docx", &docx(&[" "]))),
            SkipReason::Empty
        );
        // The error form used by the CLI names the file and the reason.
        let e = load_document(&d.join("c.bin")).unwrap_err().to_string();
        assert!(e.contains("c.bin") && e.contains("binary"), "{e}");
        let e = load_document(&d.join("none.txt")).unwrap_err().to_string();
        assert!(
            e.contains("none.txt") && e.contains("cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn pdf_pages_and_docx_paragraphs() {
        let dir = tempfile::tempdir().unwrap();
        let p = ingest(&write(
            dir.path(),
            "two.pdf",
            &pdf(&["First page words", "Second page words"]),
        ))
        .unwrap();
        assert_eq!(p.kind, DocKind::Pdf);
        assert_eq!(p.pages.len(), 2);
        let second = p.text.find("Second").expect("second page text");
        assert!(p.text.contains("First page words"), "{:?}", p.text);
        assert_eq!((p.page_of(0), p.page_of(second)), (Some(1), Some(2)));
        assert!(p.pages[1] <= second && p.pages[1] > 0);

        let w = ingest(&write(
            dir.path(),
            "w.docx",
            &docx(&["Alpha paragraph.", "Beta paragraph."]),
        ))
        .unwrap();
        assert_eq!(w.kind, DocKind::Docx);
        let (a, b) = (w.text.find("Alpha").unwrap(), w.text.find("Beta").unwrap());
        assert!(a < b && w.line_of(b) > w.line_of(a), "{:?}", w.text);
    }
}
