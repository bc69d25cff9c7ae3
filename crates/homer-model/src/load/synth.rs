//! Random-weight GGUF models of a given shape (memory and speed at a scale this machine cannot
//! download, e.g. Llama-2-7B's): every projection, the embedding and the output as Q4_0 or Q8_0
//! blocks with scales sized for unit-variance activations, norms of ones, and a SentencePiece
//! style vocabulary (`<unk>`, `<s>`, `</s>`, 256 byte tokens, then `▁w<i>` pieces) that llama.cpp
//! and homer both load. Written as a stream, never held in memory.

use std::io::Write;
use std::path::Path;

use half::f16;

use super::gguf::Value;
use super::gguf_writer::{TensorHeader, write_streaming};
use super::quant::GgmlType;
use crate::config::LlamaConfig;

/// Llama-2-7B's shapes (32 layers, d 4096, 32 heads, FFN 11008, vocab 32000, window 4096).
pub fn llama2_7b() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32000,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        rope_scaling: Default::default(),
    }
}

/// Write a random model of shape `cfg` with `ty` blocks (Q4_0 or Q8_0) to `path`; returns the
/// file's size in bytes.
pub fn write_random_model(
    path: &Path,
    cfg: &LlamaConfig,
    ty: GgmlType,
    seed: u64,
) -> Result<u64, String> {
    if !matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0) {
        return Err(format!("random models are Q4_0 or Q8_0, not {}", ty.name()));
    }
    let d = cfg.hidden_size;
    if d % 32 != 0 || cfg.intermediate_size % 32 != 0 || cfg.vocab_size < 300 {
        return Err("the shape needs d and ffn multiples of 32 and a vocabulary of ≥ 300".into());
    }
    let arch = "llama";
    let key = |k: &str| format!("{arch}.{k}");
    let n_vocab = cfg.vocab_size;
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    let mut scores = Vec::with_capacity(n_vocab);
    for (t, ty) in [("<unk>", 2i32), ("<s>", 3), ("</s>", 3)] {
        tokens.push(Value::String(t.into()));
        types.push(Value::I32(ty));
        scores.push(Value::F32(0.0));
    }
    for b in 0..256 {
        tokens.push(Value::String(format!("<0x{b:02X}>")));
        types.push(Value::I32(6));
        scores.push(Value::F32(0.0));
    }
    for i in tokens.len()..n_vocab {
        tokens.push(Value::String(format!("\u{2581}w{i}")));
        types.push(Value::I32(1));
        scores.push(Value::F32(-(i as f32)));
    }
    let keys: Vec<String> = [
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.dimension_count",
        "attention.layer_norm_rms_epsilon",
        "rope.freq_base",
    ]
    .iter()
    .map(|k| key(k))
    .collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(arch.into())),
        (
            "general.name",
            Value::String("homer random-weight model".into()),
        ),
        (
            "general.file_type",
            Value::U32(if ty == GgmlType::Q4_0 { 2 } else { 7 }),
        ),
        (&keys[0], Value::U32(cfg.max_position_embeddings as u32)),
        (&keys[1], Value::U32(d as u32)),
        (&keys[2], Value::U32(cfg.num_hidden_layers as u32)),
        (&keys[3], Value::U32(cfg.intermediate_size as u32)),
        (&keys[4], Value::U32(cfg.num_attention_heads as u32)),
        (&keys[5], Value::U32(cfg.num_key_value_heads as u32)),
        (&keys[6], Value::U32(cfg.head_dim as u32)),
        (&keys[7], Value::F32(cfg.rms_norm_eps as f32)),
        (&keys[8], Value::F32(cfg.rope_theta as f32)),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    // (name, rows, cols, fan_in) in llama.cpp's order; norms are F32 rows of ones.
    let (qd, kvd, ff) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let mut mats: Vec<(String, usize, usize, bool)> =
        vec![("token_embd.weight".into(), n_vocab, d, true)];
    for l in 0..cfg.num_hidden_layers {
        let b = |n: &str| format!("blk.{l}.{n}");
        mats.push((b("attn_norm.weight"), 1, d, false));
        mats.push((b("attn_q.weight"), qd, d, true));
        mats.push((b("attn_k.weight"), kvd, d, true));
        mats.push((b("attn_v.weight"), kvd, d, true));
        mats.push((b("attn_output.weight"), d, qd, true));
        mats.push((b("ffn_norm.weight"), 1, d, false));
        mats.push((b("ffn_gate.weight"), ff, d, true));
        mats.push((b("ffn_up.weight"), ff, d, true));
        mats.push((b("ffn_down.weight"), d, ff, true));
    }
    mats.push(("output_norm.weight".into(), 1, d, false));
    mats.push(("output.weight".into(), n_vocab, d, true));
    let (_, bb) = ty.block();
    let headers: Vec<TensorHeader> = mats
        .iter()
        .map(|(name, r, c, q)| TensorHeader {
            name: name.clone(),
            dims: if *r == 1 {
                vec![*c as u64]
            } else {
                vec![*c as u64, *r as u64]
            },
            type_id: if *q {
                if ty == GgmlType::Q4_0 { 2 } else { 8 }
            } else {
                0
            },
            bytes: if *q {
                (r * c / 32 * bb) as u64
            } else {
                4 * *c as u64
            },
        })
        .collect();
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut fill = |i: usize, w: &mut dyn Write| -> std::io::Result<()> {
        let (_, rows, cols, q) = &mats[i];
        if !q {
            let ones: Vec<u8> = std::iter::repeat_n(1f32.to_le_bytes(), *cols)
                .flatten()
                .collect();
            return w.write_all(&ones);
        }
        // weights of standard deviation ≈ 1/√fan_in (the embedding: ≈ 1)
        let fan_in = if i == 0 { 1.0 } else { *cols as f32 };
        let spread = if ty == GgmlType::Q4_0 { 4.6 } else { 73.0 }; // std of the quants
        let scale = f16::from_f32(1.0 / (spread * fan_in.sqrt())).to_le_bytes();
        let mut row = vec![0u8; cols / 32 * bb];
        for _ in 0..*rows {
            for blk in row.chunks_exact_mut(bb) {
                blk[..2].copy_from_slice(&scale);
                for chunk in blk[2..].chunks_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
                }
            }
            w.write_all(&row)?;
        }
        Ok(())
    };
    let total = write_streaming(&mut w, &metadata, &headers, &mut fill)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    w.flush().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_random_model_loads_and_runs() {
        let mut cfg = llama2_7b();
        cfg.vocab_size = 320;
        cfg.hidden_size = 64;
        cfg.intermediate_size = 96;
        cfg.num_hidden_layers = 2;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = 2;
        cfg.head_dim = 16;
        let dir = tempfile::tempdir().unwrap();
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            let path = dir.path().join(format!("m-{}.gguf", ty.name()));
            let size = write_random_model(&path, &cfg, ty, 3).unwrap();
            assert_eq!(size, std::fs::metadata(&path).unwrap().len());
            let src = crate::load::open(&path).unwrap();
            assert_eq!(src.config().hidden_size, 64);
            assert_eq!(src.config().num_key_value_heads, 2);
            let dev = crate::backend::device(crate::BackendKind::Cpu).unwrap().0;
            let m = crate::Llama::load_with(
                src.as_ref(),
                &dev,
                None,
                crate::WeightDtype::Native,
                &mut |_, _| {},
            )
            .unwrap();
            let (logits, _) = m.prefill(&[1, 5, 300, 7], crate::Logits::Last).unwrap();
            let v = crate::read_f32(logits).unwrap();
            assert_eq!(v.len(), 320);
            assert!(v.iter().all(|x| x.is_finite()));
            assert!(
                v.iter().any(|&x| x != v[0]),
                "logits should not be constant"
            );
        }
        assert!(write_random_model(&dir.path().join("x"), &cfg, GgmlType::Q4K, 1).is_err());
    }
}
