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

/// The widest field a cross-reference stream may declare (`/W [1 4 2]`: bytes per field; 8
/// holds any offset). The PDF parser allocates by these widths, so a corrupt one is refused here.
const MAX_XREF_FIELD: u64 = 8;

/// Refuse a PDF whose cross-reference streams declare impossible field widths (found by
/// fuzzing: `/W [1 4294967296 2]` in 757 bytes made the parser allocate 4 GiB).
fn check_xref_widths(bytes: &[u8]) -> std::result::Result<(), SkipReason> {
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut at = 0;
    while let Some(i) = find(&bytes[at..], b"/XRef") {
        let x = at + i;
        at = x + 5;
        // The dictionary around it: back to the object's start, on to its stream.
        let start = bytes[..x]
            .windows(3)
            .rposition(|w| w == b"obj")
            .unwrap_or(0);
        let end = find(&bytes[x..], b"stream").map_or(bytes.len(), |e| x + e);
        let dict = &bytes[start..end];
        let Some(w) = find(dict, b"/W") else { continue };
        let rest = &dict[w + 2..];
        let Some(open) = rest.iter().position(|&c| c == b'[') else {
            continue;
        };
        let close = rest[open..]
            .iter()
            .position(|&c| c == b']')
            .map_or(rest.len(), |c| open + c);
        for field in String::from_utf8_lossy(&rest[open + 1..close]).split_whitespace() {
            let ok = field.parse::<u64>().is_ok_and(|n| n <= MAX_XREF_FIELD);
            if !ok {
                return Err(SkipReason::Unreadable(format!(
                    "the PDF's cross-reference stream declares a field width of {} (at most \
                     {MAX_XREF_FIELD} bytes); the file is corrupt",
                    one_line(&field.chars().take(24).collect::<String>())
                )));
            }
        }
    }
    Ok(())
}

/// The text layer of a PDF, pages joined by blank lines, and each page's start offset.
fn pdf_text(bytes: &[u8]) -> std::result::Result<(String, Vec<usize>), SkipReason> {
    if !bytes.starts_with(b"%PDF") {
        return Err(SkipReason::Unreadable(
            "not a PDF file (no %PDF header)".into(),
        ));
    }
    check_xref_widths(bytes)?;
    let pages = parse_guarded("PDF", bytes, |b| {
        pdf_extract::extract_text_from_mem_by_pages(b)
    })?;
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
    check_zip_expansion(bytes)?;
    let text = parse_guarded("DOCX", bytes, |b| docx_lite::extract_text_from_bytes(b))?;
    Ok(text.replace("\r\n", "\n"))
}

/// The most a DOCX may expand to, as a multiple of its own size (within [`ZIP_MIN_LIMIT`,
/// `ZIP_MAX_LIMIT`]): Word's XML compresses 5–20×; zip bombs expand thousands of times.
const ZIP_MAX_RATIO: u64 = 100;
const ZIP_MIN_LIMIT: u64 = 16 << 20;
const ZIP_MAX_LIMIT: u64 = 1 << 30;

/// Decompress every part of a zip container into nothing, stopping at the expansion limit, so
/// that the parser (which reads parts whole into memory) never meets a zip bomb.
fn check_zip_expansion(bytes: &[u8]) -> std::result::Result<(), SkipReason> {
    use std::io::Read;
    let bad = |e: &dyn std::fmt::Display| {
        SkipReason::Unreadable(format!("the DOCX is not a readable zip container: {e}"))
    };
    let limit = (bytes.len() as u64)
        .saturating_mul(ZIP_MAX_RATIO)
        .clamp(ZIP_MIN_LIMIT, ZIP_MAX_LIMIT);
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(&e))?;
    let mut total = 0u64;
    for i in 0..z.len() {
        let mut part = z.by_index(i).map_err(|e| bad(&e))?;
        let left = limit - total;
        total += std::io::copy(&mut (&mut part).take(left + 1), &mut std::io::sink())
            .map_err(|e| bad(&e))?;
        if total > limit {
            return Err(SkipReason::Unreadable(format!(
                "the DOCX expands to more than {} MiB, over {ZIP_MAX_RATIO} times its own size \
                 (a zip bomb?); homer does not read it",
                limit >> 20
            )));
        }
    }
    Ok(())
}

/// How long a format parser may take on one file before homer gives up on it.
pub const PARSE_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Run a format parser on its own thread (a large stack for deeply nested files, a time limit);
/// its error, its panic (pdf-extract panics on some malformed files) or its running past
/// [`PARSE_TIME_LIMIT`] is a skip naming the format, not a crash or a hang. A parser past the
/// limit is left to finish in the background; its result is dropped.
fn parse_guarded<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    format: &'static str,
    bytes: &[u8],
    parse: impl FnOnce(&[u8]) -> std::result::Result<T, E> + Send + 'static,
) -> std::result::Result<T, SkipReason> {
    let bytes = bytes.to_vec();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("homer-parse-{format}"))
        .stack_size(256 << 20)
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&bytes)));
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        return Err(SkipReason::Unreadable(format!(
            "cannot start the {format} parser: {e}"
        )));
    }
    match rx.recv_timeout(PARSE_TIME_LIMIT) {
        Ok(Ok(Ok(t))) => Ok(t),
        Ok(Ok(Err(e))) => Err(SkipReason::Unreadable(format!(
            "the {format} could not be parsed: {}",
            one_line(&e.to_string())
        ))),
        Ok(Err(_)) => Err(SkipReason::Unreadable(format!(
            "the {format} is malformed (its parser gave up)"
        ))),
        Err(_) => Err(SkipReason::Unreadable(format!(
            "the {format} took more than {} s to parse; homer gave up on it",
            PARSE_TIME_LIMIT.as_secs()
        ))),
    }
}

/// A parser's message on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Small valid PDF and DOCX files built in memory, for tests and the fuzzing harness's seeds.
#[doc(hidden)]
pub mod sample {
    /// A PDF whose pages show `pages[i]` in a standard font (no text operators when empty).
    pub fn pdf(pages: &[&str]) -> Vec<u8> {
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
            let body = Content { operations }
                .encode()
                .expect("an in-memory sample");
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
        doc.save_to(&mut out).expect("an in-memory sample");
        out
    }

    /// A DOCX container whose body has one paragraph per entry of `paragraphs`.
    pub fn docx(paragraphs: &[&str]) -> Vec<u8> {
        use std::io::Write;
        let mut buf = std::io::Cursor::new(vec![]);
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default();
        z.start_file("[Content_Types].xml", opts)
            .expect("an in-memory sample");
        z.write_all(
            br#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#,
        )
        .expect("an in-memory sample");
        z.start_file("word/document.xml", opts)
            .expect("an in-memory sample");
        let body: String = paragraphs
            .iter()
            .map(|p| format!("<w:p><w:r><w:t>{p}</w:t></w:r></w:p>"))
            .collect();
        write!(
            z,
            r#"<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>{body}</w:body></w:document>"#
        )
        .expect("an in-memory sample");
        z.finish().expect("an in-memory sample");
        buf.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::sample::{docx, pdf};
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn reason(p: &Path) -> SkipReason {
        ingest(p).unwrap_err().reason
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
