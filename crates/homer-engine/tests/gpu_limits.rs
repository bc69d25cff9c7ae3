//! GPU limits, forced (issue 17, item 5): the wgpu device (lavapipe here) is opened with its
//! buffer limits lowered below the test model's tensors, and handed to burn the way homer-desk
//! hands it its own device. Loading must refuse with the limit and a remedy, not crash the driver
//! (cubecl reports a buffer above the limits as a validation error on its server thread, where
//! the caller never sees it), and the process must stay usable: the same model then loads on
//! the CPU and answers.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

#[test]
fn a_model_above_the_gpus_buffer_limit_is_refused_with_a_remedy_and_the_cpu_still_answers() {
    common::share_device(|l| {
        l.max_storage_buffer_binding_size = 16 << 10;
        l.max_buffer_size = 64 << 10;
    });
    let (_, info) = homer_model::backend::device(homer_model::BackendKind::Wgpu).unwrap();
    assert_eq!(info.max_storage_buffer_binding_size, Some(16 << 10));

    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let e = homer_engine::Engine::load(Some(&model), homer_model::BackendKind::Wgpu, &mut |_| {})
        .err()
        .expect("the embedding (300 x 64 f32, 76,800 bytes) is above the 16 KiB binding limit")
        .to_string();
    assert!(
        e.contains("model.embed_tokens.weight")
            && e.contains("76800 bytes")
            && e.contains("allows 16384")
            && e.contains("--backend cpu"),
        "{e}"
    );

    // The process is still usable: the CPU backend loads the same model and answers.
    let engine =
        homer_engine::Engine::load(Some(&model), homer_model::BackendKind::Cpu, &mut |_| {})
            .unwrap();
    let mut params = homer_engine::AskParams::default();
    params.generate.max_tokens = 4;
    let a = engine
        .ask(
            &[homer_engine::Document::from_text(
                "d.txt",
                "The pass key is 12345.",
            )],
            "What is the pass key?",
            &params,
            &AtomicBool::new(false),
            &mut |_| {},
            &mut |_| {},
        )
        .unwrap();
    assert!(!a.generation.ids.is_empty());
}
