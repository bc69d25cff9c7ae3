//! Calibration tables bias[layer][distance] (spec §4.5), stored as safetensors: one f32 tensor
//! `bias` of shape [layers, distances] and string metadata (model, chunk length, source text,
//! texts averaged). A table of zeros is HOMER uncalibrated.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

use crate::error::{HomerError, Result};

pub const FORMAT: &str = "homer-bias-v1";

#[derive(Debug, Clone, PartialEq)]
pub struct BiasTable {
    pub n_layers: usize,
    pub distances: usize,
    /// Row-major [layer][distance].
    pub data: Vec<f32>,
    pub metadata: HashMap<String, String>,
}

impl BiasTable {
    pub fn zeros(n_layers: usize, distances: usize) -> Self {
        BiasTable {
            n_layers,
            distances,
            data: vec![0.0; n_layers * distances],
            metadata: HashMap::from([("kind".to_string(), "zeros".to_string())]),
        }
    }

    pub fn row(&self, layer: usize) -> &[f32] {
        &self.data[layer * self.distances..(layer + 1) * self.distances]
    }

    pub fn is_zero(&self) -> bool {
        self.data.iter().all(|&x| x == 0.0)
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Check that the table serves a model of `n_layers` layers whose positions reach
    /// `max_distance`.
    pub fn check_fits(&self, n_layers: usize, max_distance: usize) -> Result<()> {
        if self.n_layers != n_layers {
            return Err(HomerError::BiasMismatch(format!(
                "it has {} layers, the model has {n_layers}; calibrate this model with `homer calibrate`",
                self.n_layers
            )));
        }
        if self.distances <= max_distance {
            return Err(HomerError::BiasMismatch(format!(
                "it covers distances 0..{}, this run needs up to {max_distance}; use a chunk length \
                 of at most {} or calibrate with a longer one",
                self.distances - 1,
                self.distances
            )));
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let bytes: Vec<u8> = self.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![self.n_layers, self.distances], &bytes)
            .map_err(|e| HomerError::Input(format!("bias table: {e}")))?;
        let mut meta = self.metadata.clone();
        meta.insert("format".into(), FORMAT.into());
        safetensors::serialize([("bias", view)], Some(meta))
            .map_err(|e| HomerError::Input(format!("bias table: {e}")))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| HomerError::Bias {
                path: path.to_path_buf(),
                what: format!("cannot write: {e}"),
            })
    }

    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let err = |what: String| HomerError::Bias {
            path: path.to_path_buf(),
            what,
        };
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let t = st
            .tensor("bias")
            .map_err(|_| err("no tensor named `bias` (expected [layers, distances] f32)".into()))?;
        if t.dtype() != Dtype::F32 || t.shape().len() != 2 {
            return Err(err(format!(
                "tensor `bias` is {:?} {:?}, expected f32 [layers, distances]",
                t.dtype(),
                t.shape()
            )));
        }
        let (n_layers, distances) = (t.shape()[0], t.shape()[1]);
        if n_layers == 0 || distances == 0 {
            return Err(err("tensor `bias` is empty".into()));
        }
        let data: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(bad) = data.iter().position(|x| !x.is_finite()) {
            return Err(err(format!(
                "entry {bad} (layer {}, distance {}) is not finite",
                bad / distances,
                bad % distances
            )));
        }
        Ok(BiasTable {
            n_layers,
            distances,
            data,
            metadata: header.metadata().clone().unwrap_or_default(),
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| HomerError::Bias {
            path: path.to_path_buf(),
            what: format!("cannot read: {e}"),
        })?;
        Self::from_bytes(&bytes, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.safetensors");
        let mut t = BiasTable::zeros(3, 5);
        for (i, x) in t.data.iter_mut().enumerate() {
            *x = i as f32 * 0.25 - 1.0;
        }
        t.metadata.insert("model".into(), "tiny".into());
        t.save(&path).unwrap();
        let u = BiasTable::load(&path).unwrap();
        assert_eq!(u.data, t.data);
        assert_eq!((u.n_layers, u.distances), (3, 5));
        assert_eq!(u.meta("model"), Some("tiny"));
        assert_eq!(u.meta("format"), Some(FORMAT));
        assert_eq!(u.row(1), &t.data[5..10]);
        assert!(u.check_fits(3, 4).is_ok());
        assert!(
            u.check_fits(4, 4)
                .unwrap_err()
                .to_string()
                .contains("3 layers")
        );
        assert!(
            u.check_fits(3, 5)
                .unwrap_err()
                .to_string()
                .contains("distances 0..4")
        );

        std::fs::write(&path, b"not safetensors").unwrap();
        let e = BiasTable::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("b.safetensors") && e.contains("not a safetensors"),
            "{e}"
        );
        let e = BiasTable::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
