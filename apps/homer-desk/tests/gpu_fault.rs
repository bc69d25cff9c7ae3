//! Issue 17, item 5, in the app: the GPU is lost while homer-desk has a document and a history.
//! The model runs on a wgpu device (lavapipe) this test hands to burn before the app starts, so
//! the test can destroy it (what a driver reset or an unplugged GPU does). The next question must
//! end in an error the app shows, with the document and the history kept and the app usable:
//! switching the backend to the CPU reloads the model and answers.

mod common;

use common::{ask, desk, share_device, wait};
use egui_kittest::kittest::Queryable;
use homer_desk::app::ModelState;
use homer_model::BackendKind;

#[test]
fn a_lost_gpu_leaves_the_app_usable_with_its_document_and_history() {
    let ours = share_device(|_| {});

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let doc = dir.path().join("notes.md");
    std::fs::write(&doc, "# Notes\n\nThe pass key is 4711. Remember it.\n").unwrap();
    let mut h = desk(&data, BackendKind::Wgpu);
    wait(&mut h, "the model", |a| {
        matches!(a.model, ModelState::Ready(_))
    });
    h.state_mut().add_files(vec![doc]);
    wait(&mut h, "the document", |a| {
        a.docs.iter().all(|d| d.tokens.is_some())
    });
    ask(&mut h, "What is the pass key?");
    assert_eq!(h.state().history.exchanges.len(), 1);
    let errors_before = h.state().errors.len();

    ours.destroy();
    ask(&mut h, "And again?");
    let app = h.state();
    let new: Vec<&String> = app.errors[errors_before..].iter().collect();
    assert!(
        new.iter()
            .any(|e| e.contains("the GPU failed while computing") && e.contains("--backend cpu")),
        "{new:?}"
    );
    assert_eq!(app.docs.len(), 1, "the document is kept");
    assert_eq!(
        app.history.exchanges[0].question, "What is the pass key?",
        "the history is kept"
    );
    h.get_by_label("Ask");

    // The remedy works from the app: the CPU backend reloads the model and answers.
    h.state_mut().settings.backend = "cpu".into();
    h.state_mut().load_model();
    wait(&mut h, "the model on the CPU", |a| {
        matches!(a.model, ModelState::Ready(_))
    });
    let n = h.state().history.exchanges.len();
    ask(&mut h, "Once more?");
    let hist = &h.state().history.exchanges;
    assert_eq!(hist.len(), n + 1);
    assert_eq!(hist[n].question, "Once more?");
    assert!(!hist[n].answer.is_empty() || hist[n].stop == "eos");
}
