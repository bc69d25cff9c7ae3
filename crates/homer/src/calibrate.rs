//! Calibration of the significance (spec §4.5, the reconstruction it recommends): run plain
//! prefills of texts of length C, and at every layer record the same statistic HOMER prunes by
//! (max over heads of the last token's raw scaled logits) against each earlier token, indexed by
//! the distance `(C − 1) − j`. The mean over texts is bias[layer][distance]: how much attention a
//! token gets just for being at that distance, which HOMER subtracts.

use std::sync::atomic::{AtomicBool, Ordering};

use homer_model::Llama;

use crate::bias::BiasTable;
use crate::error::{HomerError, Result};
use crate::ops::{HomerOps, SignificanceInput};

/// Average the last-token statistic over `texts` (each exactly `len` tokens). `progress` gets
/// (texts done, texts in all).
pub fn calibrate(
    model: &Llama,
    texts: &[Vec<u32>],
    ops: &dyn HomerOps,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BiasTable> {
    let len = texts.first().map_or(0, Vec::len);
    if texts.is_empty() || len < 2 {
        return Err(HomerError::Input(
            "calibration needs at least one text of at least 2 tokens".into(),
        ));
    }
    if let Some(t) = texts.iter().find(|t| t.len() != len) {
        return Err(HomerError::Input(format!(
            "calibration texts must have equal length ({len}), one has {}",
            t.len()
        )));
    }
    let n_layers = model.n_layers();
    let mut sum = vec![0f64; n_layers * len];
    let positions: Vec<usize> = (0..len).collect();
    let prunable = vec![true; len];
    let (cos, sin) = model.rope_tables(&positions);
    for (ti, ids) in texts.iter().enumerate() {
        let mut x = model.embed(ids)?;
        for (l, layer) in model.layers.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(HomerError::Cancelled);
            }
            let a = layer.attend(x, &cos, &sin, None);
            let raw = ops.significance(&SignificanceInput {
                q_last: &a.q_last,
                keys: &a.kv.k,
                positions: &positions,
                prunable: &prunable,
                bias: None,
                last_position: len - 1,
            })?;
            for (j, r) in raw.iter().enumerate() {
                sum[l * len + (len - 1 - j)] += *r as f64;
            }
            x = layer.feed_forward(a.hidden);
        }
        progress(ti + 1, texts.len());
    }
    let mut table = BiasTable::zeros(n_layers, len);
    for (o, s) in table.data.iter_mut().zip(&sum) {
        *o = (*s / texts.len() as f64) as f32;
    }
    table.metadata.clear();
    table
        .metadata
        .insert("texts".into(), texts.len().to_string());
    table.metadata.insert("chunk_len".into(), len.to_string());
    table
        .metadata
        .insert("statistic".into(), "max_head_last_query_logit".into());
    Ok(table)
}
