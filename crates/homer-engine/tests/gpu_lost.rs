//! A lost GPU, forced (issue 17, item 5): the wgpu device (lavapipe) is handed to burn, a question
//! is answered, then the device is destroyed under the engine (what a driver reset or an
//! unplugged GPU does). The next question must end in one error that says the device failed and
//! what to do, not a panic, a hang or garbage; the process stays usable (the CPU answers).

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use homer_engine::{AskParams, Document, Engine};
use homer_model::BackendKind;

#[test]
fn a_lost_device_is_an_error_with_a_remedy_and_the_cpu_still_answers() {
    let ours = common::share_device(|_| {});
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let doc = Document::from_text("d.txt", "The grass is green. The sky is blue.");
    let mut params = AskParams::default();
    params.generate.max_tokens = 4;
    let ask = |e: &Engine| {
        e.ask(
            std::slice::from_ref(&doc),
            "What colour is the grass?",
            &params,
            &AtomicBool::new(false),
            &mut |_| {},
            &mut |_| {},
        )
    };
    let gpu = Engine::load(Some(&model), BackendKind::Wgpu, &mut |_| {}).unwrap();
    assert!(!ask(&gpu).unwrap().generation.ids.is_empty());

    ours.destroy();
    let e = ask(&gpu).err().expect("the device is gone").to_string();
    assert!(
        e.starts_with("the GPU failed while computing (")
            && e.contains("may have been lost")
            && e.contains("--backend cpu")
            && !e.contains('\n'),
        "{e}"
    );
    // Asking again is the same error, not a hang or a crash.
    assert!(ask(&gpu).is_err());

    let cpu = Engine::load(Some(&model), BackendKind::Cpu, &mut |_| {}).unwrap();
    assert!(!ask(&cpu).unwrap().generation.ids.is_empty());
}
