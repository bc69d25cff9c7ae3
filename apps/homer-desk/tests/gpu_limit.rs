//! Issue 17, item 5, in the app: a GPU whose buffer limit the model's tensors exceed (lavapipe
//! opened with a 16 KiB binding limit, handed to burn before the app starts). Loading is refused
//! with the limit and the remedy, shown by the app; documents can still be added, and switching
//! the backend to the CPU loads the model and answers.

mod common;

use common::{ask, desk, share_device, wait};
use egui_kittest::kittest::Queryable;
use homer_desk::app::ModelState;
use homer_model::BackendKind;

#[test]
fn a_gpu_below_the_models_buffer_sizes_is_reported_and_the_cpu_answers() {
    share_device(|l| {
        l.max_storage_buffer_binding_size = 16 << 10;
        l.max_buffer_size = 64 << 10;
    });
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("notes.md");
    std::fs::write(&doc, "# Notes\n\nThe pass key is 4711. Remember it.\n").unwrap();
    let mut h = desk(&dir.path().join("data"), BackendKind::Wgpu);
    wait(&mut h, "the load error", |a| {
        matches!(a.model, ModelState::Failed(_))
    });
    let ModelState::Failed(m) = &h.state().model else {
        unreachable!()
    };
    assert!(
        m.contains("model.embed_tokens.weight")
            && m.contains("allows 16384")
            && m.contains("--backend cpu"),
        "{m}"
    );
    h.get_by_label_contains("The model could not be loaded");
    h.state_mut().add_files(vec![doc]);
    wait(&mut h, "the document", |a| {
        a.docs.iter().all(|d| d.doc.is_some())
    });

    h.state_mut().settings.backend = "cpu".into();
    h.state_mut().load_model();
    wait(&mut h, "the model on the CPU", |a| {
        matches!(a.model, ModelState::Ready(_))
    });
    wait(&mut h, "the document's tokens", |a| {
        a.docs.iter().all(|d| d.tokens.is_some())
    });
    ask(&mut h, "What is the pass key?");
    let hist = &h.state().history.exchanges;
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].question, "What is the pass key?");
    assert_eq!(h.state().docs.len(), 1);
}
