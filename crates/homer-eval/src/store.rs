//! JSON-lines records, one file per task, appended as cells finish and keyed so that a rerun
//! skips what is done.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{EvalError, Result};

pub struct Store {
    path: PathBuf,
    /// Every record's key, with the seed of the prompt it measured when the record says.
    keys: HashMap<String, Option<u64>>,
    /// Keys of cells recorded as skipped (`--skip`): not done, so a run without the skip
    /// measures them.
    skipped: HashSet<String>,
    records: Vec<Value>,
    /// The host the records appended now are measured on (`stamped`), written into each.
    machine: Option<String>,
}

/// Whether a record says its cell was skipped rather than run.
fn is_skip(v: &Value) -> bool {
    v.get("skipped").is_some_and(|s| !s.is_null())
}

/// The CPU threads this process may use (0 when the system does not say).
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The host a record is measured on: the CPU threads this process may use and the processor's
/// name, e.g. "2 × AMD EPYC" (written into each record, `Store::open_to_measure`).
pub fn host() -> String {
    format!("{} × {}", threads(), cpu_model())
}

/// The processor's name (Linux: /proc/cpuinfo), or "CPU".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "CPU".into())
}

impl Store {
    /// Open (or start) `<dir>/<task>.jsonl`. A line that does not parse is reported and left in
    /// the file, not dropped: the error names the file and the line.
    pub fn open(dir: &Path, task: &str) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| EvalError::Io(format!("{}: cannot create: {e}", dir.display())))?;
        let path = dir.join(format!("{task}.jsonl"));
        let mut keys = HashMap::new();
        let mut skipped = HashSet::new();
        let mut records = vec![];
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| EvalError::Io(format!("{}: cannot read: {e}", path.display())))?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line).map_err(|e| {
                    EvalError::Io(format!(
                        "{}:{}: not a JSON record ({e}); fix or delete the line to go on",
                        path.display(),
                        i + 1
                    ))
                })?;
                if let Some(k) = v["key"].as_str() {
                    if is_skip(&v) {
                        skipped.insert(k.to_string());
                    } else {
                        keys.insert(k.to_string(), v["sample_seed"].as_u64());
                    }
                }
                records.push(v);
            }
        }
        Ok(Store {
            path,
            keys,
            skipped,
            records,
            machine: None,
        })
    }

    /// `open`, stamped with the host this process runs on (`host`): how every command that
    /// measures opens its store.
    pub fn open_to_measure(dir: &Path, task: &str) -> Result<Store> {
        Ok(Store::open(dir, task)?.stamped(host()))
    }

    /// Write `machine` (the host: CPU threads and processor) into every record appended from
    /// now on that does not name one, so that times measured on different hosts of one store
    /// stay apart.
    pub fn stamped(mut self, machine: String) -> Store {
        self.machine = Some(machine);
        self
    }

    /// The host this store's new records are stamped with (`stamped`).
    pub fn machine(&self) -> Option<&str> {
        self.machine.as_deref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn has(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Whether the cell `key` is recorded as skipped.
    pub fn has_skip(&self, key: &str) -> bool {
        self.skipped.contains(key)
    }

    /// Whether the cell `key` is done for the prompt made from `sample_seed`. A record of the
    /// same key for another prompt is an error: a cell's seed follows its place in the
    /// `--depths` list, so a store made with another list holds other prompts under the same
    /// keys, and resuming into it would mix them.
    pub fn has_sample(&self, key: &str, sample_seed: u64) -> Result<bool> {
        match self.keys.get(key) {
            None => Ok(false),
            Some(Some(stored)) if *stored != sample_seed => Err(EvalError::Io(format!(
                "{}: the record `{key}` measured another prompt (sample seed {stored}, this run's \
                 is {sample_seed}): the store was made with another --depths list; give this run \
                 its own --out directory",
                self.path.display()
            ))),
            Some(_) => Ok(true),
        }
    }

    /// Append a record (it must carry its `key`), flushed at once.
    pub fn append(&mut self, mut record: Value) -> Result<()> {
        let key = record["key"]
            .as_str()
            .expect("records carry a key")
            .to_string();
        let skip = is_skip(&record);
        if let (Some(m), false, Some(o)) = (&self.machine, skip, record.as_object_mut()) {
            o.entry("machine").or_insert_with(|| Value::from(m.clone()));
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| EvalError::Io(format!("{}: cannot open: {e}", self.path.display())))?;
        let line = serde_json::to_string(&record).expect("records serialise");
        writeln!(f, "{line}")
            .and_then(|_| f.sync_data())
            .map_err(|e| EvalError::Io(format!("{}: cannot write: {e}", self.path.display())))?;
        if skip {
            self.skipped.insert(key);
        } else {
            self.keys.insert(key, record["sample_seed"].as_u64());
        }
        self.records.push(record);
        Ok(())
    }

    pub fn records(&self) -> &[Value] {
        &self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "t").unwrap();
        s.append(serde_json::json!({"key": "a", "x": 1})).unwrap();
        s.append(serde_json::json!({"key": "b", "x": 2})).unwrap();
        let s = Store::open(dir.path(), "t").unwrap();
        assert!(s.has("a") && s.has("b") && !s.has("c"));
        assert_eq!(s.records()[1]["x"], 2);
        std::fs::write(dir.path().join("t.jsonl"), "{\"key\":\"a\"}\nnot json\n").unwrap();
        let e = Store::open(dir.path(), "t").err().unwrap().to_string();
        assert!(e.contains("t.jsonl:2"), "{e}");
    }

    /// A cell's record names the prompt's seed: the same key for another prompt (a store made
    /// with another --depths list) stops the run; records without a seed (older) still count.
    #[test]
    fn a_record_of_another_prompt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "t").unwrap();
        s.append(serde_json::json!({"key": "cell", "sample_seed": 7}))
            .unwrap();
        s.append(serde_json::json!({"key": "old"})).unwrap();
        let s = Store::open(dir.path(), "t").unwrap();
        assert!(s.has_sample("cell", 7).unwrap());
        assert!(!s.has_sample("other", 7).unwrap());
        assert!(s.has_sample("old", 99).unwrap());
        let e = s.has_sample("cell", 8).err().unwrap().to_string();
        assert!(
            e.contains("t.jsonl") && e.contains("--depths") && e.contains("--out"),
            "{e}"
        );
    }

    #[test]
    fn a_stamped_store_names_the_host_in_each_record_it_measures() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "t")
            .unwrap()
            .stamped("2 × Some CPU".into());
        assert_eq!(s.machine(), Some("2 × Some CPU"));
        s.append(serde_json::json!({"key": "run"})).unwrap();
        s.append(serde_json::json!({"key": "elsewhere", "machine": "8 × Other"}))
            .unwrap();
        s.append(serde_json::json!({"key": "skip", "skipped": "too long"}))
            .unwrap();
        // as written to the file, not only as held
        let s = Store::open(dir.path(), "t").unwrap();
        let m: Vec<Option<&str>> = s.records().iter().map(|r| r["machine"].as_str()).collect();
        assert_eq!(m, vec![Some("2 × Some CPU"), Some("8 × Other"), None]);
        assert_eq!(s.machine(), None);
    }

    #[test]
    fn a_store_opened_to_measure_is_stamped_with_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_to_measure(dir.path(), "t").unwrap();
        let here = host();
        assert_eq!(s.machine(), Some(here.as_str()));
        let (n, cpu) = here.split_once(" × ").unwrap();
        assert_eq!(n.parse::<usize>().unwrap(), threads());
        assert!(threads() >= 1 && !cpu.trim().is_empty(), "{here}");
    }
}
