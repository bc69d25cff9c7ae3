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

/// Write a random model of shape `cfg` with `ty` blocks (Q4_0 or Q8_0; Q4_K for llama.cpp's
/// Q4_K_M mix: Q4_K matrices, the output and some layers' attn_v and ffn_down in Q6_K) to
/// `path`; returns the file's size in bytes.
pub fn write_random_model(
    path: &Path,
    cfg: &LlamaConfig,
    ty: GgmlType,
    seed: u64,
) -> Result<u64, String> {
    if !matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q4K) {
        return Err(format!(
            "random models are Q4_0, Q8_0 or Q4_K_M, not {}",
            ty.name()
        ));
    }
    let d = cfg.hidden_size;
    let width = ty.block().0;
    if d % width != 0 || cfg.intermediate_size % width != 0 || cfg.vocab_size < 300 {
        return Err(format!(
            "the shape needs d and ffn multiples of {width} and a vocabulary of ≥ 300"
        ));
    }
    // The block type of one matrix. Q4_K_M as llama.cpp's quantiser picks it: the output in
    // Q6_K, attn_v and ffn_down in Q6_K in the first and last eighth of the layers and every
    // third one between, the rest Q4_K.
    let n_layers = cfg.num_hidden_layers;
    let mat_ty = |name: &str| -> GgmlType {
        if ty != GgmlType::Q4K {
            return ty;
        }
        if name == "output.weight" {
            return GgmlType::Q6K;
        }
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let more_bits =
            |i: usize| i < n_layers / 8 || i >= 7 * n_layers / 8 || (i - n_layers / 8) % 3 == 2;
        match layer {
            Some(i)
                if (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
                    && more_bits(i) =>
            {
                GgmlType::Q6K
            }
            _ => GgmlType::Q4K,
        }
    };
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
            Value::U32(match ty {
                GgmlType::Q4_0 => 2,
                GgmlType::Q8_0 => 7,
                _ => 15, // MOSTLY_Q4_K_M
            }),
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
    let type_id = |t: GgmlType| match t {
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 8,
        GgmlType::Q4K => 12,
        _ => 14, // Q6_K
    };
    let headers: Vec<TensorHeader> = mats
        .iter()
        .map(|(name, r, c, q)| {
            let t = mat_ty(name);
            let (bw, bb) = t.block();
            TensorHeader {
                name: name.clone(),
                dims: if *r == 1 {
                    vec![*c as u64]
                } else {
                    vec![*c as u64, *r as u64]
                },
                type_id: if *q { type_id(t) } else { 0 },
                bytes: if *q {
                    (r * c / bw * bb) as u64
                } else {
                    4 * *c as u64
                },
            }
        })
        .collect();
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut fill = |i: usize, w: &mut dyn Write| -> std::io::Result<()> {
        let (name, rows, cols, q) = &mats[i];
        if !q {
            let ones: Vec<u8> = std::iter::repeat_n(1f32.to_le_bytes(), *cols)
                .flatten()
                .collect();
            return w.write_all(&ones);
        }
        // weights of standard deviation ≈ 1/√fan_in (the embedding: ≈ 1): random quants, the
        // block scales set so that q·scale has that spread
        let t = mat_ty(name);
        let (bw, bb) = t.block();
        let fan_in = if i == 0 { 1.0 } else { *cols as f32 };
        let target = 1.0 / fan_in.sqrt();
        // std of the quants (times the mean 6-bit / 7-bit sub-block scale for the K-quants)
        let spread = match t {
            GgmlType::Q4_0 => 4.6,
            GgmlType::Q8_0 => 73.0,
            GgmlType::Q4K => 4.6 * 32.0,
            _ => 18.5 * 64.0,
        };
        let d = f16::from_f32(target / spread).to_le_bytes();
        // Q4_K: a minimum near the quants' mean (7.5 · d · s with s ≈ m) keeps weights centred
        let dmin = f16::from_f32(7.5 * target / spread).to_le_bytes();
        let mut row = vec![0u8; cols / bw * bb];
        for _ in 0..*rows {
            for blk in row.chunks_exact_mut(bb) {
                for chunk in blk.chunks_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
                }
                match t {
                    GgmlType::Q4K => {
                        blk[..2].copy_from_slice(&d);
                        blk[2..4].copy_from_slice(&dmin);
                    }
                    GgmlType::Q6K => {
                        // positive 7-bit sub-block scales
                        for s in blk[192..208].iter_mut() {
                            *s = (*s & 127) | 1;
                        }
                        blk[208..210].copy_from_slice(&d);
                    }
                    _ => blk[..2].copy_from_slice(&d),
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
        cfg.hidden_size = 256;
        cfg.intermediate_size = 512;
        cfg.num_hidden_layers = 2;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = 2;
        cfg.head_dim = 64;
        let dir = tempfile::tempdir().unwrap();
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4K] {
            let path = dir.path().join(format!("m-{}.gguf", ty.name()));
            let size = write_random_model(&path, &cfg, ty, 3).unwrap();
            assert_eq!(size, std::fs::metadata(&path).unwrap().len());
            let src = crate::load::open(&path).unwrap();
            assert_eq!(src.config().hidden_size, 256);
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
            // every matrix stays blocks; Q4_K_M (2 layers: layer 1 is the last eighth) keeps
            // layer 1's q|k (Q4_K) and v (Q6_K) side by side, layer 0 all Q4_K
            for (i, l) in m.layers.iter().enumerate() {
                let six = ty == GgmlType::Q4K && i == 1;
                let qkv_parts = match &l.w_qkv {
                    crate::Weight::Quant(_) => 1,
                    crate::Weight::Cat(p) => p.len(),
                    other => panic!("{}: {other:?}", ty.name()),
                };
                assert_eq!(
                    qkv_parts,
                    if six { 2 } else { 1 },
                    "{} layer {i}",
                    ty.name()
                );
                match &l.w_down {
                    crate::Weight::Quant(q) => {
                        assert_eq!(q.ty(), if six { GgmlType::Q6K } else { ty })
                    }
                    other => panic!("{}: {other:?}", ty.name()),
                }
            }
            let (logits, _) = m.prefill(&[1, 5, 300, 7], crate::Logits::Last).unwrap();
            let v = crate::read_f32(logits).unwrap();
            assert_eq!(v.len(), 320);
            assert!(v.iter().all(|x| x.is_finite()));
            assert!(
                v.iter().any(|&x| x != v[0]),
                "logits should not be constant"
            );
        }
        assert!(write_random_model(&dir.path().join("x"), &cfg, GgmlType::Q6K, 1).is_err());
        cfg.intermediate_size = 544; // a multiple of 32, not of 256
        let e = write_random_model(&dir.path().join("x"), &cfg, GgmlType::Q4K, 1).unwrap_err();
        assert!(e.contains("256"), "{e}");
    }
}
