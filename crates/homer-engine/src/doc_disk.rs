//! The document cache's disk tier (issue 16): leaves written under `$HOMER_HOME/doc-cache` as
//! safetensors files, so a restarted app or a new `homer ask` reopens a document without
//! recomputing it.
//!
//! A file is `<key>-<start>-<end>-<layers>.safetensors`: `key` is the SHA-256 of the
//! [`DocKey`] (model state, prefix and context tokens), the rest names the leaf. Its metadata
//! repeats the whole key hash, the leaf and the SHA-256 of the tensor bytes; a file whose name,
//! metadata, shapes or checksum disagree is stale or torn: it is ignored with a warning and
//! removed, never trusted. Files are written to a temporary name and renamed, so a process killed
//! mid-write leaves only a `*.tmp` file, which the next start removes.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use homer::LeafState;
use homer_model::{Device, LayerKv, Tensor, read_f32};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::doc_cache::DocKey;

const FORMAT: &str = "homer-doc-cache-1";

/// Leaves on disk, at most `budget` bytes of files (the oldest removed first).
pub struct DiskTier {
    dir: PathBuf,
    device: Device,
    budget: u64,
}

/// The SHA-256 of a document key, hex.
pub fn key_hash(key: &DocKey) -> String {
    let mut h = Sha256::new();
    h.update(key.model.as_bytes());
    h.update([0xff]);
    h.update((key.prefix.len() as u64).to_le_bytes());
    for t in key.prefix.iter().chain(&key.context) {
        h.update(t.to_le_bytes());
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Test hook: when set, a write pauses this many milliseconds halfway through (so a test can
/// kill the process mid-write).
const PAUSE_ENV: &str = "HOMER_DOC_CACHE_TEST_PAUSE_MS";

impl DiskTier {
    /// The tier in `dir` (created if missing); removes `*.tmp` files a killed writer left.
    pub fn open(dir: PathBuf, device: Device, budget: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                tracing::warn!(
                    "document cache: removing {}, an entry whose writing was interrupted",
                    p.display()
                );
                let _ = std::fs::remove_file(&p);
            }
        }
        Ok(DiskTier {
            dir,
            device,
            budget,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, hash: &str, context: &Range<usize>, layers: usize) -> PathBuf {
        self.dir.join(format!(
            "{}-{}-{}-{layers}.safetensors",
            &hash[..32],
            context.start,
            context.end
        ))
    }

    /// Bytes of entry files on disk.
    pub fn bytes(&self) -> u64 {
        self.entries().iter().map(|e| e.1).sum()
    }

    /// (path, size, modified) of every entry file.
    fn entries(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((e.path(), m.len(), m.modified().ok()?))
            })
            .collect()
    }

    /// The leaf from disk, or None (missing; or stale, torn or corrupt: then removed).
    pub fn load(&self, hash: &str, context: &Range<usize>, layers: usize) -> Option<LeafState> {
        let path = self.path(hash, context, layers);
        let bytes = std::fs::read(&path).ok()?;
        match self.parse(&bytes, hash, context, layers) {
            Ok(s) => {
                // Touch it: the oldest files go first when the disk budget is exceeded.
                if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                Some(s)
            }
            Err(why) => {
                tracing::warn!(
                    "document cache: ignoring and removing {}: {why}",
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn parse(
        &self,
        bytes: &[u8],
        hash: &str,
        context: &Range<usize>,
        layers: usize,
    ) -> Result<LeafState, String> {
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| format!("not a safetensors file: {e}"))?;
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
        let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
        let want = [
            ("format", FORMAT.to_string()),
            ("key_sha256", hash.to_string()),
            ("context", format!("{}..{}", context.start, context.end)),
            ("layers", layers.to_string()),
        ];
        for (k, v) in want {
            if meta.get(k) != Some(&v) {
                return Err(format!("its `{k}` is {:?}, not {v:?}", meta.get(k)));
            }
        }
        let dtype = |k: &str| match meta.get(k).map(String::as_str) {
            Some("f16") => Ok(DType::F16),
            Some("f32") => Ok(DType::F32),
            other => Err(format!("unknown `{k}` {other:?}")),
        };
        let (hidden_dtype, kv_dtype) = (dtype("hidden_dtype")?, dtype("kv_dtype")?);
        let mut names: Vec<String> = vec!["hidden".into()];
        for l in 0..layers {
            names.push(format!("k.{l}"));
            names.push(format!("v.{l}"));
        }
        let mut sum = Sha256::new();
        let mut tensors = vec![];
        for name in &names {
            let t = st.tensor(name).map_err(|_| format!("no tensor `{name}`"))?;
            if t.dtype() != Dtype::F32 {
                return Err(format!("tensor `{name}` is {:?}, not f32", t.dtype()));
            }
            sum.update(t.data());
            tensors.push((t.shape().to_vec(), t.data()));
        }
        let data_sum = hex(&sum.finalize());
        if meta.get("data_sha256") != Some(&data_sum) {
            return Err("its data does not match its checksum (torn or corrupt)".into());
        }
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (hs, hb) = &tensors[0];
        if hs.len() != 2 {
            return Err(format!("tensor `hidden` has shape {hs:?}"));
        }
        let rows = hs[0];
        let hidden =
            Tensor::<2>::from_data(TensorData::new(floats(hb), [hs[0], hs[1]]), &self.device)
                .cast(hidden_dtype);
        let mut kv = vec![];
        for pair in tensors[1..].chunks_exact(2) {
            let t3 = |(s, b): &(Vec<usize>, &[u8])| -> Result<Tensor<3>, String> {
                if s.len() != 3 || s[1] != rows {
                    return Err(format!("a K/V tensor has shape {s:?} for {rows} rows"));
                }
                Ok(Tensor::<3>::from_data(
                    TensorData::new(floats(b), [s[0], s[1], s[2]]),
                    &self.device,
                )
                .cast(kv_dtype))
            };
            kv.push(LayerKv {
                k: t3(&pair[0])?,
                v: t3(&pair[1])?,
            });
        }
        Ok(LeafState { hidden, kv })
    }

    /// Write the leaf (temporary file, then rename); then remove the oldest files beyond the
    /// budget. Failures are warnings: the disk tier is an optimisation.
    pub fn save(&self, hash: &str, context: &Range<usize>, layers: usize, s: &LeafState) {
        if let Err(e) = self.try_save(hash, context, layers, s) {
            tracing::warn!(
                "document cache: could not write a leaf to {}: {e}",
                self.dir.display()
            );
        }
        let mut files = self.entries();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort_by_key(|f| f.2);
        for (p, size, _) in files {
            if total <= self.budget {
                break;
            }
            let _ = std::fs::remove_file(&p);
            total -= size;
        }
    }

    fn try_save(
        &self,
        hash: &str,
        context: &Range<usize>,
        layers: usize,
        s: &LeafState,
    ) -> Result<(), String> {
        let bytes_of =
            |v: Vec<f32>| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let name = |d: DType| if d == DType::F16 { "f16" } else { "f32" };
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = vec![(
            "hidden".into(),
            s.hidden.dims().to_vec(),
            bytes_of(read_f32(s.hidden.clone()).map_err(|e| e.to_string())?),
        )];
        for (l, kv) in s.kv.iter().enumerate() {
            for (n, t) in [("k", &kv.k), ("v", &kv.v)] {
                blobs.push((
                    format!("{n}.{l}"),
                    t.dims().to_vec(),
                    bytes_of(read_f32(t.clone()).map_err(|e| e.to_string())?),
                ));
            }
        }
        let mut sum = Sha256::new();
        for b in &blobs {
            sum.update(&b.2);
        }
        let kv_dtype = s.kv.first().map_or(DType::F32, |l| l.k.dtype());
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("key_sha256", hash.to_string()),
            ("context", format!("{}..{}", context.start, context.end)),
            ("layers", layers.to_string()),
            ("hidden_dtype", name(s.hidden.dtype()).to_string()),
            ("kv_dtype", name(kv_dtype).to_string()),
            ("data_sha256", hex(&sum.finalize())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let views = blobs
            .iter()
            .map(|(n, shape, b)| {
                TensorView::new(Dtype::F32, shape.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())?;
        let path = self.path(hash, context, layers);
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            let half = bytes.len() / 2;
            f.write_all(&bytes[..half])?;
            if let Some(ms) = std::env::var(PAUSE_ENV).ok().and_then(|v| v.parse().ok()) {
                f.flush()?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            f.write_all(&bytes[half..])?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            e.to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        homer_model::backend::device(homer_model::BackendKind::Cpu)
            .unwrap()
            .0
    }

    fn state(dev: &Device, kv: DType) -> LeafState {
        let t2 = Tensor::<2>::from_data(
            TensorData::new((0..15).map(|i| i as f32 * 0.5 - 3.0).collect(), [5, 3]),
            dev,
        );
        let t3 = |s: f32| {
            Tensor::<3>::from_data(
                TensorData::new((0..20).map(|i| i as f32 * s).collect(), [2, 5, 2]),
                dev,
            )
            .cast(kv)
        };
        LeafState {
            hidden: t2,
            kv: vec![
                LayerKv {
                    k: t3(0.25),
                    v: t3(-1.0),
                },
                LayerKv {
                    k: t3(2.0),
                    v: t3(0.125),
                },
            ],
        }
    }

    fn key(c: u32) -> DocKey {
        DocKey {
            model: "m".into(),
            prefix: vec![1, 2],
            context: vec![c; 7],
        }
    }

    #[test]
    fn leaves_round_trip_and_bad_files_are_ignored_and_removed() {
        let dev = device();
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path().join("c"), dev.clone(), 1 << 30).unwrap();
        let (h1, h2) = (key_hash(&key(1)), key_hash(&key(2)));
        assert_ne!(h1, h2);
        for kv in [DType::F32, DType::F16] {
            let s = state(&dev, kv);
            tier.save(&h1, &(3..8), 2, &s);
            let got = tier.load(&h1, &(3..8), 2).expect("written");
            assert_eq!(got.kv.len(), 2);
            assert_eq!(got.kv[1].v.dtype(), kv);
            assert_eq!(
                read_f32(got.hidden).unwrap(),
                read_f32(s.hidden.clone()).unwrap()
            );
            for (a, b) in got.kv.iter().zip(&s.kv) {
                assert_eq!(
                    read_f32(a.k.clone()).unwrap(),
                    read_f32(b.k.clone()).unwrap()
                );
                assert_eq!(
                    read_f32(a.v.clone()).unwrap(),
                    read_f32(b.v.clone()).unwrap()
                );
            }
        }
        // Another leaf name or layer count is not this file.
        assert!(tier.load(&h1, &(3..9), 2).is_none());
        assert!(tier.load(&h1, &(3..8), 3).is_none());
        let path = tier.path(&h1, &(3..8), 2);
        // A file under the right name whose metadata names another key: stale, removed.
        std::fs::copy(&path, dir.path().join("keep")).unwrap();
        let renamed = tier.path(&h2, &(3..8), 2);
        std::fs::rename(&path, &renamed).unwrap();
        assert!(tier.load(&h2, &(3..8), 2).is_none());
        assert!(!renamed.exists());
        // A flipped data byte fails the checksum; a truncated file fails to parse.
        let good = std::fs::read(dir.path().join("keep")).unwrap();
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(tier.load(&h1, &(3..8), 2).is_none());
        assert!(!path.exists());
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(tier.load(&h1, &(3..8), 2).is_none());
        assert!(!path.exists());
        std::fs::write(&path, &good).unwrap();
        assert!(tier.load(&h1, &(3..8), 2).is_some());
        // A writer's leftover temporary file is removed when the tier opens.
        let tmp = dir.path().join("c").join("x.123.tmp");
        std::fs::write(&tmp, b"half").unwrap();
        let _ = DiskTier::open(dir.path().join("c"), dev.clone(), 1 << 30).unwrap();
        assert!(!tmp.exists());
        // Past the budget the oldest files go.
        let small = DiskTier::open(dir.path().join("c"), dev, good.len() as u64).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        small.save(&h2, &(0..3), 2, &state(&device(), DType::F32));
        assert!(!path.exists());
        assert!(small.load(&h2, &(0..3), 2).is_some());
    }
}
