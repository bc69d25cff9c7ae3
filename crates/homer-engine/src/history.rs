//! The chat history of the desktop app, kept between runs as JSON in the data directory
//! (`$HOMER_HOME/desk/history.json`). Written atomically (temp file + rename), so a crash
//! mid-write never loses the previous history; a file that cannot be parsed is set aside, not
//! overwritten.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::citations::Citation;
use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub question: String,
    pub answer: String,
    /// Names of the documents the question was about.
    pub docs: Vec<String>,
    pub used_homer: bool,
    pub prompt_tokens: usize,
    pub cache_len: usize,
    /// Why decoding stopped ("eos", "max_tokens", "cancelled", ...).
    pub stop: String,
    pub prefill_secs: f64,
    pub decode_tokens_per_sec: f64,
    pub citations: Vec<Citation>,
    /// Seconds since the Unix epoch.
    pub when: u64,
    /// What the document cache did for this answer ([`crate::reuse_note`]), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_cache: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatHistory {
    pub version: u32,
    pub exchanges: Vec<Exchange>,
}

const VERSION: u32 = 1;

impl ChatHistory {
    /// The history at `path`; empty when there is none. A file that does not parse is renamed
    /// to `*.unreadable-<time>.json` and reported in the error, so nothing is lost.
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(EngineError::File {
                    path: path.into(),
                    what: format!("cannot read the chat history: {e}"),
                });
            }
        };
        serde_json::from_str(&text).map_err(|e| {
            let aside = path.with_extension(format!("unreadable-{}.json", now()));
            let moved = std::fs::rename(path, &aside).is_ok();
            EngineError::File {
                path: path.into(),
                what: format!(
                    "the chat history is not valid ({e}); {}",
                    if moved {
                        format!("it was moved to {} and a new one started", aside.display())
                    } else {
                        "it was left in place".into()
                    }
                ),
            }
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |what: String| EngineError::File {
            path: path.into(),
            what,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| err(format!("cannot write the chat history: {e}")))?;
        let mut h = self.clone();
        h.version = VERSION;
        serde_json::to_writer_pretty(&mut tmp, &h)
            .map_err(|e| err(format!("cannot write the chat history: {e}")))?;
        tmp.persist(path)
            .map_err(|e| err(format!("cannot write the chat history: {e}")))?;
        Ok(())
    }
}

/// Where the desktop app keeps its files: `$HOMER_HOME/desk`.
pub fn desk_dir() -> PathBuf {
    crate::fetch::homer_home().join("desk")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corrupt_file_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/history.json");
        assert_eq!(ChatHistory::load(&p).unwrap(), ChatHistory::default());
        let mut h = ChatHistory::default();
        h.exchanges.push(Exchange {
            question: "Q?".into(),
            answer: "A.".into(),
            docs: vec!["a.txt".into()],
            used_homer: true,
            prompt_tokens: 10,
            cache_len: 5,
            stop: "eos".into(),
            prefill_secs: 1.5,
            decode_tokens_per_sec: 3.0,
            citations: vec![],
            when: 7,
            doc_cache: None,
        });
        h.save(&p).unwrap();
        let back = ChatHistory::load(&p).unwrap();
        assert_eq!(back.exchanges, h.exchanges);
        assert_eq!(back.version, 1);

        std::fs::write(&p, "{ not json").unwrap();
        let e = ChatHistory::load(&p).unwrap_err().to_string();
        assert!(e.contains("history.json") && e.contains("moved to"), "{e}");
        assert!(!p.exists(), "the bad file was set aside");
        let aside: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(aside.iter().any(|n| n.contains("unreadable")), "{aside:?}");
    }
}
