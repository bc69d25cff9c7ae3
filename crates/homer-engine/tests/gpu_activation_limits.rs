//! GPU limits, forced (issue 17, item 5): lavapipe opened with a 16 MiB buffer limit (cubecl's
//! memory pages are 8 MiB, so a device below that cannot run burn at all). The test model's
//! weights fit; a forward whose logits or K/V buffers would not is refused before anything is
//! allocated, with the limit and a remedy (wgpu would report the buffer on cubecl's server thread,
//! where the caller never sees it, and answer garbage); the device still computes right after.

mod common;

use std::path::Path;

use homer_engine::Engine;
use homer_model::{BackendKind, KvCache, Logits};

const LIMIT: u64 = 16 << 20;

#[test]
fn a_forward_whose_buffers_exceed_the_device_limit_is_refused_and_the_device_goes_on() {
    common::share_device(|l| {
        l.max_storage_buffer_binding_size = LIMIT;
        l.max_buffer_size = LIMIT;
    });

    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let gpu = Engine::load(Some(&model), BackendKind::Wgpu, &mut |_| {}).unwrap();
    // The CPU at f32 too (its default for a safetensors model is f16 weights).
    let cpu = Engine::load_with(
        Some(&model),
        BackendKind::Cpu,
        Some(homer_model::WeightDtype::F32),
        &mut |_| {},
    )
    .unwrap();
    let last = |e: &Engine, ids: &[u32]| -> Vec<f32> {
        let (l, _) = e.model.prefill(ids, Logits::Last).unwrap();
        l.into_data().try_to_vec::<f32>().unwrap()
    };
    let short: Vec<u32> = (0..40).map(|i| 5 + (i * 7) % 250).collect();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-3);
    let (g, c) = (last(&gpu, &short), last(&cpu, &short));
    let worst = g
        .iter()
        .zip(&c)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        g.len() == 300 && close(&g, &c),
        "the lowered device computes right: {worst}"
    );

    // Every row's logits: 14,000 rows x 300 tokens x 4 bytes = 16.8 MB > 16 MiB.
    let long: Vec<u32> = (0..14_000).map(|i| 5 + (i * 7) % 250).collect();
    let e = gpu
        .model
        .prefill(&long, Logits::All)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("the logits of 14000 rows × 300 tokens")
            && e.contains("needs 16800000 bytes")
            && e.contains(&format!("allows {LIMIT}"))
            && e.contains("--backend cpu"),
        "{e}"
    );
    // A cache made for 140,000 positions: 2 heads x 16 dims x 4 bytes each = 17.9 MB a layer.
    let mut cache = KvCache::new(gpu.model.n_layers());
    cache.initial_capacity = 140_000;
    let e = gpu
        .model
        .forward(&short, None, &mut cache, Logits::Last)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("a layer's keys for 140000 positions")
            && e.contains("needs 17920000 bytes")
            && e.contains("--kv-dtype f16"),
        "{e}"
    );
    // The device was never handed those buffers: it still computes right.
    assert!(close(&last(&gpu, &short), &c));
}
