//! Tokenizers of the tiny fixtures (HF `tokenizer.json` and the same vocabulary rebuilt from GGUF
//! metadata) against transformers' ids, and CLI-free generation on the tiny model.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use homer_engine::{Engine, GenerateParams, SamplingParams, Tokenizer};
use homer_model::BackendKind;
use homer_model::load::gguf::GgufFile;

fn fixtures() -> PathBuf {
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../../tests/fixtures")
}

fn cases() -> Vec<serde_json::Value> {
    let p = fixtures().join("tiny-llama/reference.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["tokenizer_cases"].as_array().unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn hf_and_gguf_tokenizers_match_transformers() {
    let hf = Tokenizer::from_hf_dir(&fixtures().join("tiny-llama"), Some(1), vec![2]).unwrap();
    let gg =
        Tokenizer::from_gguf(&GgufFile::open(&fixtures().join("tiny-gguf/tiny-f32.gguf")).unwrap())
            .unwrap();
    let cases = cases();
    assert!(cases.len() >= 5);
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            hf.encode(text, true).unwrap(),
            ids(&c["ids"]),
            "hf with specials: {text:?}"
        );
        assert_eq!(
            hf.encode(text, false).unwrap(),
            ids(&c["ids_no_special"]),
            "hf: {text:?}"
        );
        // The GGUF says add_bos_token = true, as the HF post-processor does.
        assert_eq!(
            gg.encode(text, true).unwrap(),
            ids(&c["ids"]),
            "gguf: {text:?}"
        );
        assert_eq!(
            gg.decode(&ids(&c["ids_no_special"]), false).unwrap(),
            c["decoded"].as_str().unwrap()
        );
    }
    assert!(hf.chat_template.is_some() && gg.chat_template.is_some());
}

#[test]
fn generation_is_reproducible_and_respects_limits() {
    let e = Engine::load(
        Some(&fixtures().join("tiny-llama")),
        BackendKind::Cpu,
        &mut |_| {},
    )
    .unwrap();
    let prompt = e.tokenizer.encode("the quick brown fox", true).unwrap();
    let cancel = AtomicBool::new(false);
    let run = |seed| {
        let p = GenerateParams {
            max_tokens: 12,
            sampling: SamplingParams {
                temperature: 0.9,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.02,
                seed,
                ..Default::default()
            },
            stop_at_eos: false,
            ..Default::default()
        };
        e.generate(&prompt, &p, &cancel, &mut |_| {}, &mut |_| {})
            .unwrap()
    };
    let (a, b) = (run(1), run(1));
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.ids.len(), 12);
    assert_eq!(a.stop, homer_engine::StopReason::MaxTokens);
    let bad = GenerateParams {
        sampling: SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = e
        .generate(&prompt, &bad, &cancel, &mut |_| {}, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("top-p"), "{err}");
    let err = e
        .generate(
            &[],
            &GenerateParams::default(),
            &cancel,
            &mut |_| {},
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty"), "{err}");
    let err = e
        .generate(
            &[5000],
            &GenerateParams::default(),
            &cancel,
            &mut |_| {},
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("5000") && err.contains("vocabulary"), "{err}");
}

/// SentencePiece-style vocabulary (tokenizer.ggml.model = llama): merges ranked by score, `▁` for
/// spaces with a prefix space, byte fallback for unknown characters.
#[test]
fn sentencepiece_gguf_tokenizer_merges_by_score_and_falls_back_to_bytes() {
    use homer_model::load::gguf::Value;
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let base = tokens.len() as u32;
    for t in ["▁", "a", "b", "▁a", "ab", "▁ab"] {
        tokens.push(t.into());
    }
    let mut scores = vec![0f32; tokens.len()];
    let mut types = vec![1i32; tokens.len()];
    types[0] = 2;
    types[1] = 3;
    types[2] = 3;
    for t in types.iter_mut().take(259).skip(3) {
        *t = 6;
    }
    for (i, s) in [-3.0, -3.0, -3.0, -1.0, -2.0, -0.5].iter().enumerate() {
        scores[base as usize + i] = *s;
    }
    let meta = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("spm.gguf");
    std::fs::write(&p, homer_model::load::gguf_writer::encode(&meta, &[])).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
    let (sp_ab, a, b) = (base + 5, base + 1, base + 2);
    // "▁ab▁ab": (▁,a) then (▁a,b) by score order.
    assert_eq!(
        tok.encode("ab ab", true).unwrap(),
        vec![1, sp_ab, sp_ab],
        "BOS is added for llama vocabularies"
    );
    assert_eq!(tok.decode(&[sp_ab, sp_ab], true).unwrap(), "ab ab");
    // "é" is not in the vocabulary: its UTF-8 bytes C3 A9 via byte fallback.
    let ids = tok.encode("bé", false).unwrap();
    assert_eq!(ids, vec![base, b, 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "bé");
    assert_eq!(tok.encode("a", false).unwrap(), vec![base + 3]);
    let _ = a;
}

/// Issue 17, item 4: decoding stops before a position passes the model's window (256 here):
/// a 250-token prompt leaves room for 7 answer tokens (the last one read at position 255),
/// unless `stop_at_window` is off (the evaluation's baselines); on both backends.
#[test]
fn decoding_stops_at_the_window() {
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        decoding_stops_at_the_window_on(kind);
    }
}

fn decoding_stops_at_the_window_on(kind: BackendKind) {
    let e = Engine::load(Some(&fixtures().join("tiny-llama")), kind, &mut |_| {}).unwrap();
    let window = e.model.config.max_position_embeddings;
    assert_eq!(window, 256);
    let prompt: Vec<u32> = (0..250).map(|i| 5 + (i * 7) % 200).collect();
    let cancel = AtomicBool::new(false);
    let run = |stop_at_window| {
        let p = GenerateParams {
            max_tokens: 20,
            stop_at_eos: false,
            loop_ngram: 0,
            stop_at_window,
            ..Default::default()
        };
        e.generate(&prompt, &p, &cancel, &mut |_| {}, &mut |_| {})
            .unwrap()
    };
    let capped = run(true);
    assert_eq!(capped.stop, homer_engine::StopReason::Window, "{kind}");
    assert_eq!(capped.ids.len(), window - prompt.len() + 1, "{kind}");
    let free = run(false);
    assert_eq!(free.stop, homer_engine::StopReason::MaxTokens, "{kind}");
    assert_eq!(free.ids.len(), 20, "{kind}");
    assert_eq!(&free.ids[..capped.ids.len()], &capped.ids[..], "{kind}");
}
