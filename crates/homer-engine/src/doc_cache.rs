//! The document cache (issue 16): HOMER's question-independent work kept between questions.
//!
//! A HOMER leaf is `prefix ++ context slice ++ suffix`. Attention is causal and the suffix (the
//! question) comes last, so the prefix and context rows of a leaf are the same for every question
//! up to the layer where the leaf prunes; [`homer::homer_prefill_with_store`] takes them from a
//! [`homer::LeafStore`] and runs only the question's rows through those layers. This module is
//! that store: entries keyed by the model state and the prompt's prefix and context tokens, each
//! holding the [`homer::LeafState`] of its leaves, under a byte budget with least-recently-used
//! eviction of whole documents.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;

use homer::{LeafState, LeafStore};

use crate::doc_disk::{DiskTier, key_hash};

/// What a cached leaf's rows depend on besides its own context range and layer count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocKey {
    /// The model state the rows were computed under (weights, RoPE scaling, KV precision).
    pub model: String,
    pub prefix: Vec<u32>,
    pub context: Vec<u32>,
}

struct Entry {
    key: DocKey,
    /// [`key_hash`] of the key (the disk tier's name for it).
    hash: String,
    leaves: HashMap<(Range<usize>, usize), LeafState>,
    bytes: usize,
}

/// Cached leaves of recent documents, most recently used last.
pub struct DocCache {
    budget: usize,
    entries: Vec<Entry>,
    evictions: usize,
    disk: Option<DiskTier>,
}

/// How full the cache is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct DocCacheUsage {
    pub documents: usize,
    pub leaves: usize,
    pub bytes: usize,
    pub budget: usize,
    /// Documents evicted since the cache was made.
    pub evictions: usize,
}

impl DocCache {
    /// A cache holding at most `budget` bytes of tensor data (0: nothing is kept).
    pub fn new(budget: usize) -> Self {
        DocCache {
            budget,
            entries: vec![],
            evictions: 0,
            disk: None,
        }
    }

    /// Also keep leaves on disk in `dir` (at most `budget` bytes of files), and look there for
    /// leaves memory does not hold. Torn, stale or corrupt files there are ignored and removed.
    pub fn set_disk(&mut self, dir: PathBuf, device: homer_model::Device, budget: u64) {
        self.disk = match DiskTier::open(dir.clone(), device, budget) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(
                    "document cache: cannot use {} ({e}); keeping leaves in memory only",
                    dir.display()
                );
                None
            }
        };
    }

    /// Bytes of the disk tier's files (0 without one).
    pub fn disk_bytes(&self) -> u64 {
        self.disk.as_ref().map_or(0, DiskTier::bytes)
    }

    /// The disk tier's default budget: 4 GiB of files.
    pub const DEFAULT_DISK_BUDGET: u64 = 4 << 30;

    /// The default budget: a quarter of the memory available now, at most 8 GiB (256 MiB when
    /// the available memory cannot be read).
    pub fn default_budget() -> usize {
        const GIB: usize = 1 << 30;
        match homer_model::backend::available_memory() {
            Some(m) => (m / 4).min(8 * GIB),
            None => GIB / 4,
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// A new budget; evicts the least recently used documents until the cache fits it.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.evict(0, false);
    }

    pub fn usage(&self) -> DocCacheUsage {
        DocCacheUsage {
            documents: self.entries.len(),
            leaves: self.entries.iter().map(|e| e.leaves.len()).sum(),
            bytes: self.bytes(),
            budget: self.budget,
            evictions: self.evictions,
        }
    }

    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Cached leaves of the document `key` (0 when it is not cached).
    pub fn leaves_of(&self, key: &DocKey) -> usize {
        self.entries
            .iter()
            .find(|e| &e.key == key)
            .map_or(0, |e| e.leaves.len())
    }

    /// The store a prefill of the document `key` reads and fills; marks it most recently used.
    pub fn store(&mut self, key: DocKey) -> DocStore<'_> {
        let at = match self.entries.iter().position(|e| e.key == key) {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    hash: key_hash(&key),
                    key,
                    leaves: HashMap::new(),
                    bytes: 0,
                });
                self.entries.len() - 1
            }
        };
        let e = self.entries.remove(at);
        // Documents whose leaves all went (or never fitted) are forgotten.
        self.entries.retain(|e| !e.leaves.is_empty());
        self.entries.push(e);
        DocStore { cache: self }
    }

    /// Evict least recently used documents (the current, last, one too unless
    /// `keep_current`) until `extra` more bytes fit the budget.
    fn evict(&mut self, extra: usize, keep_current: bool) {
        let keep = usize::from(keep_current);
        while self.bytes() + extra > self.budget && self.entries.len() > keep {
            self.entries.remove(0);
            self.evictions += 1;
        }
    }
}

/// [`DocCache::store`]: the most recently used entry of a cache, as a [`LeafStore`].
pub struct DocStore<'a> {
    cache: &'a mut DocCache,
}

impl DocStore<'_> {
    fn entry(&mut self) -> &mut Entry {
        self.cache
            .entries
            .last_mut()
            .expect("store() made the entry")
    }
}

impl LeafStore for DocStore<'_> {
    fn get(&mut self, context: &Range<usize>, layers: usize) -> Option<LeafState> {
        if let Some(s) = self.entry().leaves.get(&(context.clone(), layers)) {
            return Some(s.clone());
        }
        let hash = self.entry().hash.clone();
        let s = self.cache.disk.as_ref()?.load(&hash, context, layers)?;
        self.keep(context, layers, &s);
        Some(s)
    }

    fn put(&mut self, context: &Range<usize>, layers: usize, state: &LeafState) {
        self.keep(context, layers, state);
        let hash = self.entry().hash.clone();
        if let Some(d) = &self.cache.disk {
            d.save(&hash, context, layers, state);
        }
    }
}

impl DocStore<'_> {
    /// Hold `state` in memory if the budget allows (evicting older documents first).
    fn keep(&mut self, context: &Range<usize>, layers: usize, state: &LeafState) {
        let bytes = state.bytes();
        let budget = self.cache.budget;
        // Older documents make room first; a leaf that cannot fit even then is not kept.
        let others: usize = self.cache.entries[..self.cache.entries.len() - 1]
            .iter()
            .map(|e| e.bytes)
            .sum();
        let own = self.entry().bytes;
        if own + bytes > budget {
            tracing::debug!(
                "document cache: a leaf of {bytes} bytes does not fit the budget of {budget} \
                 beside this document's {own}; not kept"
            );
            return;
        }
        if others + own + bytes > budget {
            self.cache.evict(bytes, true);
        }
        let e = self.entry();
        if let Some(old) = e.leaves.insert((context.clone(), layers), state.clone()) {
            e.bytes -= old.bytes();
        }
        e.bytes += bytes;
    }
}

/// What the document cache did for one answer: of its `parts` (HOMER's leaves, or 1 for a plain
/// prompt's document prefix), how many came from the cache and how many were computed into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct DocReuse {
    pub parts: usize,
    pub reused: usize,
    pub stored: usize,
    /// A plain prompt (no HOMER): the part is the documents' KV prefix.
    pub plain: bool,
}

impl DocReuse {
    /// A HOMER prefill's use of the cache, from its stats.
    pub fn of_homer(stats: &homer::HomerStats, n_chunks: usize) -> Self {
        DocReuse {
            parts: n_chunks,
            reused: stats.leaves_reused,
            stored: stats.leaves_stored,
            plain: false,
        }
    }
}

/// One line on what the document cache did for an answer (None when its prefill did not go
/// through the cache): how many leaves (or the plain prompt's document prefix) came from it or
/// went into it, and how much it holds; with `first_secs`, the prefill time of the question that
/// read the document, set beside this one's (`this_secs`).
pub fn reuse_note(
    r: &DocReuse,
    usage: &DocCacheUsage,
    first_secs: Option<f64>,
    this_secs: f64,
) -> Option<String> {
    let held = format!("{} held", human_bytes(usage.bytes));
    let n_chunks = r.parts;
    if r.plain {
        return if r.reused > 0 {
            let mut s = format!("document read once: its prefix from the cache ({held})");
            if let Some(first) = first_secs {
                s += &format!("; this question {this_secs:.0} s instead of {first:.0} s");
            }
            Some(s)
        } else if r.stored > 0 {
            Some(format!(
                "document read: its prefix kept for later questions ({held})"
            ))
        } else {
            None
        };
    }
    if r.reused > 0 {
        let mut s = format!(
            "document read once: {} of {n_chunks} leaves from the cache ({held})",
            r.reused
        );
        if let Some(first) = first_secs {
            s += &format!("; this question {this_secs:.0} s instead of {first:.0} s");
        }
        Some(s)
    } else if r.stored > 0 {
        let kept = usage.leaves.min(r.stored);
        Some(if kept < r.stored {
            format!(
                "document read: {kept} of {n_chunks} leaves kept for later questions; the cache's \
                 budget ({}) holds no more",
                human_bytes(usage.budget)
            )
        } else {
            format!("document read: {kept} leaves kept for later questions ({held})")
        })
    } else {
        None
    }
}

/// `b` bytes in KiB, MiB or GiB.
pub fn human_bytes(b: usize) -> String {
    const MIB: f64 = (1 << 20) as f64;
    let b = b as f64;
    if b < MIB {
        format!("{:.0} KiB", b / 1024.0)
    } else if b < 1024.0 * MIB {
        format!("{:.0} MiB", b / MIB)
    } else {
        format!("{:.1} GiB", b / (1024.0 * MIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homer_model::{LayerKv, Tensor, read_f32};

    fn state(rows: usize, fill: f32) -> LeafState {
        let dev = homer_model::backend::device(homer_model::backend::BackendKind::Cpu)
            .expect("cpu")
            .0;
        let t2 = |r: usize| Tensor::<2>::ones([r, 4], &dev).mul_scalar(fill);
        let t3 = |r: usize| Tensor::<3>::ones([1, r, 2], &dev).mul_scalar(fill);
        LeafState {
            hidden: t2(rows),
            kv: vec![LayerKv {
                k: t3(rows),
                v: t3(rows),
            }],
        }
    }

    fn key(c: u32) -> DocKey {
        DocKey {
            model: "m".into(),
            prefix: vec![1],
            context: vec![c; 3],
        }
    }

    #[test]
    fn keeps_counts_and_evicts_the_least_recently_used_document() {
        // One leaf of 10 rows: 10·4 + 2·10·2 = 80 f32 = 320 bytes.
        let one = state(10, 1.0).bytes();
        assert_eq!(one, 320);
        let mut c = DocCache::new(2 * one);
        c.store(key(1)).put(&(0..10), 1, &state(10, 1.0));
        c.store(key(2)).put(&(0..10), 1, &state(10, 2.0));
        assert_eq!(c.usage().bytes, 2 * one);
        assert_eq!(c.leaves_of(&key(1)), 1);
        // Touch document 1, then a third evicts document 2 (least recently used).
        assert!(c.store(key(1)).get(&(0..10), 1).is_some());
        c.store(key(3)).put(&(0..10), 1, &state(10, 3.0));
        assert_eq!(c.usage().evictions, 1);
        assert_eq!(c.leaves_of(&key(2)), 0);
        assert_eq!(c.leaves_of(&key(1)), 1);
        assert_eq!(c.leaves_of(&key(3)), 1);
        assert!(c.bytes() <= c.budget());
        // The stored rows come back as stored, under their own (range, layers) name only.
        let mut s = c.store(key(3));
        let got = s.get(&(0..10), 1).expect("cached");
        let v = read_f32(got.hidden).unwrap();
        assert!(v.iter().all(|&x| x == 3.0));
        assert!(s.get(&(0..10), 2).is_none());
        assert!(s.get(&(0..9), 1).is_none());
    }

    #[test]
    fn the_note_says_what_the_cache_did() {
        let usage = DocCacheUsage {
            documents: 1,
            leaves: 8,
            bytes: 849 << 20,
            budget: 4096 << 20,
            evictions: 0,
        };
        let stats = |stored, reused| DocReuse {
            parts: 8,
            stored,
            reused,
            plain: false,
        };
        assert_eq!(
            reuse_note(&stats(0, 8), &usage, Some(139.1), 33.8).unwrap(),
            "document read once: 8 of 8 leaves from the cache (849 MiB held); this question 34 s \
             instead of 139 s"
        );
        assert_eq!(
            reuse_note(&stats(8, 0), &usage, None, 139.1).unwrap(),
            "document read: 8 leaves kept for later questions (849 MiB held)"
        );
        let full = DocCacheUsage { leaves: 3, ..usage };
        assert_eq!(
            reuse_note(&stats(8, 0), &full, None, 139.1).unwrap(),
            "document read: 3 of 8 leaves kept for later questions; the cache's budget (4.0 GiB) \
             holds no more"
        );
        assert_eq!(reuse_note(&stats(0, 0), &usage, None, 1.0), None);
        let plain = DocReuse {
            parts: 1,
            reused: 1,
            stored: 0,
            plain: true,
        };
        assert_eq!(
            reuse_note(&plain, &usage, Some(60.0), 2.0).unwrap(),
            "document read once: its prefix from the cache (849 MiB held); this question 2 s \
             instead of 60 s"
        );
    }

    #[test]
    fn a_leaf_larger_than_the_budget_is_not_kept_and_a_smaller_budget_evicts() {
        let one = state(10, 1.0).bytes();
        let mut c = DocCache::new(one - 1);
        c.store(key(1)).put(&(0..10), 1, &state(10, 1.0));
        assert_eq!(c.usage().leaves, 0);
        assert_eq!(c.bytes(), 0);
        let mut c = DocCache::new(3 * one);
        c.store(key(1)).put(&(0..10), 1, &state(10, 1.0));
        c.store(key(2)).put(&(0..10), 1, &state(10, 1.0));
        c.set_budget(one);
        assert_eq!(c.usage().documents, 1);
        assert_eq!(c.leaves_of(&key(2)), 1);
        // Storing the same leaf twice counts it once.
        c.store(key(2)).put(&(0..10), 1, &state(10, 5.0));
        assert_eq!(c.bytes(), one);
    }
}
