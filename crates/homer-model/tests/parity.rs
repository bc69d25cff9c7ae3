//! Reference parity and loader error paths. The references come from HF transformers via
//! `tests/fixtures/make_fixtures.py`. Every parity test runs on both backends: the CPU backend
//! (burn-flex with homer's CPU kernels) and burn-wgpu (lavapipe on machines without a GPU). The wgpu tests fail, not skip,
//! when no adapter is found.

use std::path::{Path, PathBuf};

use homer_model::load::{self, WeightSource};
use homer_model::{BackendKind, Device, KvCache, Llama, Logits, ModelError, read_f32};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../../tests/fixtures")
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    positions: Option<Vec<usize>>,
    logits: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
    greedy: Option<Greedy>,
}

#[derive(Deserialize)]
struct Greedy {
    ids: Vec<u32>,
    generated: Vec<u32>,
}

fn reference(path: &Path) -> Reference {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn device(kind: BackendKind) -> (Device, Option<u64>) {
    match homer_model::backend::device(kind) {
        Ok((d, info)) => (d, info.max_storage_buffer_binding_size),
        Err(e) => panic!("{kind} backend unavailable: {e}"),
    }
}

fn load_model(path: &Path, kind: BackendKind) -> Llama {
    let src = load::open(path).unwrap_or_else(|e| panic!("{e}"));
    let (dev, limit) = device(kind);
    Llama::load(src.as_ref(), &dev, limit, &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// Largest |a − b| over all logits of all positions.
fn check_cases(model: &Llama, r: &Reference, tol: f32, what: &str) {
    for (ci, c) in r.cases.iter().enumerate() {
        let mut cache = KvCache::new(model.n_layers());
        let logits = model
            .forward(&c.ids, c.positions.as_deref(), &mut cache, Logits::All)
            .unwrap();
        let [n, v] = logits.dims();
        assert_eq!(
            (n, v),
            (c.ids.len(), c.logits[0].len()),
            "{what} case {ci}: shape"
        );
        let got = read_f32(logits).unwrap();
        let mut worst = 0f32;
        for (i, row) in c.logits.iter().enumerate() {
            for (j, &want) in row.iter().enumerate() {
                worst = worst.max((got[i * v + j] - want).abs());
            }
        }
        assert!(
            worst <= tol,
            "{what} case {ci} (len {}): max |Δlogit| = {worst} > {tol}",
            c.ids.len()
        );
    }
}

fn tiny_hf(kind: BackendKind) {
    let dir = fixtures().join("tiny-llama");
    let model = load_model(&dir, kind);
    assert_eq!(model.config.num_key_value_heads, 2);
    let r = reference(&dir.join("reference.json"));
    assert!(
        r.cases.iter().any(|c| c.positions.is_some()),
        "fixture must include a non-monotone positions case"
    );
    check_cases(&model, &r, 1e-4, &format!("tiny-llama/{kind}"));

    // Incremental decode equals the all-at-once prefill, and greedy matches transformers.
    let g = r.greedy.expect("greedy reference");
    let (logits, mut cache) = model.prefill(&g.ids, Logits::Last).unwrap();
    let mut logits = read_f32(logits).unwrap();
    let mut out = vec![];
    for _ in 0..g.generated.len() {
        let next = argmax(&logits);
        out.push(next);
        logits = model.decode_step(next, &mut cache).unwrap();
    }
    assert_eq!(
        out, g.generated,
        "{kind}: greedy continuation differs from transformers"
    );
}

fn argmax(v: &[f32]) -> u32 {
    let mut b = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[b] {
            b = i;
        }
    }
    b as u32
}

#[test]
fn tiny_llama_hf_matches_transformers_cpu() {
    tiny_hf(BackendKind::Cpu);
}

#[test]
fn tiny_llama_hf_matches_transformers_wgpu() {
    tiny_hf(BackendKind::Wgpu);
}

fn tied(kind: BackendKind) {
    let dir = fixtures().join("tiny-llama-tied");
    let model = load_model(&dir, kind);
    assert!(model.config.tie_word_embeddings);
    assert_eq!(
        model.config.num_key_value_heads,
        model.config.num_attention_heads
    );
    check_cases(
        &model,
        &reference(&dir.join("reference.json")),
        1e-4,
        &format!("tiny-llama-tied/{kind}"),
    );
}

#[test]
fn tiny_llama_tied_mha_f16_matches_transformers_cpu() {
    tied(BackendKind::Cpu);
}

#[test]
fn tiny_llama_tied_mha_f16_matches_transformers_wgpu() {
    tied(BackendKind::Wgpu);
}

fn gguf_variants(kind: BackendKind) {
    let dir = fixtures().join("tiny-gguf");
    let mut seen = 0;
    for ty in [
        "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "q4_k_m",
    ] {
        let file = dir.join(format!("tiny-{ty}.gguf"));
        let model = load_model(&file, kind);
        check_cases(
            &model,
            &reference(&dir.join(format!("reference-{ty}.json"))),
            1e-4,
            &format!("tiny-{ty}/{kind}"),
        );
        seen += 1;
    }
    assert_eq!(seen, 9);
}

#[test]
fn tiny_gguf_all_dtypes_match_transformers_cpu() {
    gguf_variants(BackendKind::Cpu);
}

#[test]
fn tiny_gguf_all_dtypes_match_transformers_wgpu() {
    gguf_variants(BackendKind::Wgpu);
}

/// `--dtype native` on the CPU backend: the block fixtures stay blocks (every projection and the
/// head; Q4_K_M's fused q|k|v as a Q4_K and a Q6_K part) and still match their references at
/// the f32 tolerance.
#[test]
fn tiny_gguf_native_blocks_match_transformers_cpu() {
    let dir = fixtures().join("tiny-gguf");
    let (dev, limit) = device(BackendKind::Cpu);
    for ty in ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "q4_k_m"] {
        let src = load::open(&dir.join(format!("tiny-{ty}.gguf"))).unwrap();
        let model = Llama::load_with(
            src.as_ref(),
            &dev,
            limit,
            homer_model::WeightDtype::Native,
            &mut |_, _| {},
        )
        .unwrap();
        for l in &model.layers {
            for w in [&l.w_qkv, &l.wo, &l.w_gate_up, &l.w_down] {
                let blocks = match w {
                    homer_model::Weight::Quant(_) => true,
                    homer_model::Weight::Cat(p) => {
                        ty == "q4_k_m"
                            && p.len() == 2
                            && p.iter().all(|p| matches!(p, homer_model::Weight::Quant(_)))
                    }
                    _ => false,
                };
                assert!(
                    blocks,
                    "tiny-{ty}: a projection was not kept as blocks: {w:?}"
                );
            }
            if ty == "q4_k_m" {
                assert!(matches!(l.w_qkv, homer_model::Weight::Cat(_)));
            }
        }
        let f32_model = load_model(&dir.join(format!("tiny-{ty}.gguf")), BackendKind::Cpu);
        assert!(model.weight_bytes() * 3 < f32_model.weight_bytes());
        check_cases(
            &model,
            &reference(&dir.join(format!("reference-{ty}.json"))),
            1e-4,
            &format!("tiny-{ty}/native"),
        );
    }
}

#[test]
fn blocked_attention_equals_one_block_and_cpu_equals_wgpu() {
    // A prompt longer than one prefill block, fed in one call and in uneven pieces, gives the same
    // last logits (query blocking and cache prefix are exact).
    let dir = fixtures().join("tiny-llama");
    let cpu = load_model(&dir, BackendKind::Cpu);
    let ids: Vec<u32> = (0..700u32).map(|i| (i * 37 + 11) % 300).collect();
    let whole = read_f32(cpu.prefill(&ids, Logits::Last).unwrap().0).unwrap();
    let mut cache = KvCache::new(cpu.n_layers());
    let mut last = vec![];
    for piece in [&ids[..1], &ids[1..300], &ids[300..699], &ids[699..]] {
        last = read_f32(cpu.forward(piece, None, &mut cache, Logits::Last).unwrap()).unwrap();
    }
    assert_eq!(cache.len(), 700);
    let worst = whole
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "pieces vs whole: {worst}");
    let gpu = load_model(&dir, BackendKind::Wgpu);
    let g = read_f32(gpu.prefill(&ids, Logits::Last).unwrap().0).unwrap();
    let worst = whole
        .iter()
        .zip(&g)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "cpu vs wgpu at 700 tokens: {worst}");
}

#[test]
fn last_query_logits_match_attention_scores_gqa() {
    use homer_model::attention::last_query_logits;
    let dir = fixtures().join("tiny-llama");
    let m = load_model(&dir, BackendKind::Cpu);
    let ids = [5u32, 17, 42, 99, 250, 3];
    let pos = [0usize, 1, 2, 3, 2, 5];
    let x = m.embed(&ids).unwrap();
    let (cos, sin) = m.rope_tables(&pos);
    let a = m.layers[0].attend(x, &cos, &sin, None);
    let logits = read_f32(last_query_logits(a.q_last.clone(), &a.kv.k)).unwrap();
    let q = read_f32(a.q_last).unwrap();
    let k = read_f32(a.kv.k).unwrap();
    let (h, kvh, hd, n) = (4, 2, 16, ids.len());
    for head in 0..h {
        let g = head / (h / kvh);
        for j in 0..n {
            let dot: f32 = (0..hd)
                .map(|e| q[head * hd + e] * k[(g * n + j) * hd + e])
                .sum();
            let want = dot / (hd as f32).sqrt();
            assert!(
                (logits[head * n + j] - want).abs() < 1e-5,
                "head {head} key {j}"
            );
        }
    }
}

// ---- loader error paths -------------------------------------------------------------------

fn err_of(path: &Path) -> ModelError {
    match load::open(path) {
        Err(e) => e,
        Ok(src) => {
            let (dev, lim) = device(BackendKind::Cpu);
            Llama::load(src.as_ref(), &dev, lim, &mut |_, _| {})
                .err()
                .expect("load should fail")
        }
    }
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("tiny-gguf/tiny-q4_1.gguf")).unwrap();
    let p = tmp.path().join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err_of(&p).to_string();
    assert!(
        e.contains("cut.gguf") && e.contains("truncated") && e.contains("tensor `"),
        "{e}"
    );
    std::fs::write(&p, &bytes[..100]).unwrap();
    let e = err_of(&p).to_string();
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    std::fs::write(&p, b"PK\x03\x04 not a model").unwrap();
    let e = err_of(&p).to_string();
    assert!(e.contains("cut.gguf") && e.contains("GGUF"), "{e}");
}

use homer_model::load::gguf::Value;
use homer_model::load::gguf_writer::{RawTensor, encode};

fn write_gguf(path: &Path, meta: &[(&str, Value)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) {
    let tensors: Vec<RawTensor> = tensors
        .iter()
        .map(|(n, d, t, b)| RawTensor {
            name: n.to_string(),
            dims: d.clone(),
            type_id: *t,
            data: b.clone(),
        })
        .collect();
    std::fs::write(path, encode(meta, &tensors)).unwrap();
}

fn llama_meta(kv_heads: u32) -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.feed_forward_length", Value::U32(64)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
    ]
}

#[test]
fn gguf_unknown_dtype_missing_tensor_shape_and_config_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.gguf");
    // Q5_0 (type 6) embedding: not supported.
    write_gguf(
        &p,
        &llama_meta(2),
        &[("token_embd.weight", vec![32, 8], 6, vec![0; 8 * 22])],
    );
    let e = err_of(&p).to_string();
    assert!(
        e.contains("m.gguf") && e.contains("token_embd.weight") && e.contains("Q5_0"),
        "{e}"
    );
    // F32 embedding present, everything else missing.
    write_gguf(
        &p,
        &llama_meta(2),
        &[("token_embd.weight", vec![32, 8], 0, vec![0; 32 * 8 * 4])],
    );
    let e = err_of(&p).to_string();
    assert!(
        e.contains("m.gguf") && e.contains("missing") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );
    // Embedding of the wrong width for embedding_length = 32.
    write_gguf(
        &p,
        &llama_meta(2),
        &[("token_embd.weight", vec![16, 8], 0, vec![0; 16 * 8 * 4])],
    );
    let e = err_of(&p).to_string();
    assert!(
        e.contains("m.gguf") && e.contains("token_embd.weight") && e.contains("[8, 16]"),
        "{e}"
    );
    assert!(e.contains("shape") && e.contains("[8, 32]"), "{e}");
    // 4 heads cannot share 3 KV heads.
    write_gguf(
        &p,
        &llama_meta(3),
        &[("token_embd.weight", vec![32, 8], 0, vec![0; 32 * 8 * 4])],
    );
    let e = err_of(&p).to_string();
    assert!(
        e.contains("m.gguf") && e.contains("num_key_value_heads"),
        "{e}"
    );
    // Not a llama.
    let mut meta = llama_meta(2);
    meta[0] = ("general.architecture", Value::String("falcon".into()));
    write_gguf(&p, &meta, &[]);
    let e = err_of(&p).to_string();
    assert!(
        e.contains("falcon") && e.contains("general.architecture"),
        "{e}"
    );
}

#[test]
fn hf_dir_missing_tensor_bad_config_and_missing_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-llama");
    let d = tmp.path();
    // Config that promises a wider model than the weights hold.
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["intermediate_size"] = serde_json::json!(96);
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    let e = err_of(d).to_string();
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[96, 64]") && e.contains("[128, 64]"),
        "{e}"
    );
    // A safetensors file lacking one tensor.
    std::fs::write(d.join("config.json"), &cfg).unwrap();
    let full = load::safetensors::HfDir::open(&src).unwrap();
    let names = load::llama_tensor_names(full.config());
    let kept: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .filter(|(n, _)| n != "model.layers.1.self_attn.v_proj.weight")
        .map(|(n, _)| {
            let t = full.load(n).unwrap();
            (
                n.clone(),
                t.shape,
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &d.join("model.safetensors")).unwrap();
    let e = err_of(d).to_string();
    assert!(
        e.contains("model.layers.1.self_attn.v_proj.weight") && e.contains("missing"),
        "{e}"
    );
    // No weights at all; broken JSON config.
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = err_of(d).to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = err_of(d).to_string();
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
}

#[test]
fn device_limit_is_reported_not_crashed_into() {
    let src = load::open(&fixtures().join("tiny-llama")).unwrap();
    let (dev, _) = device(BackendKind::Cpu);
    let e = Llama::load(src.as_ref(), &dev, Some(4096), &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("embed_tokens") && e.contains("4096") && e.contains("--backend cpu"),
        "{e}"
    );
}
