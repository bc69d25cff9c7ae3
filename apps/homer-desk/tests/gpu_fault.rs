//! Issue 17, item 5, in the app: the GPU is lost while homer-desk has a document and a history.
//! The model runs on a wgpu device (lavapipe) this test hands to burn before the app starts, so
//! the test can destroy it (what a driver reset or an unplugged GPU does). The next question must
//! end in an error the app shows, with the document and the history kept and the app usable:
//! switching the backend to the CPU reloads the model and answers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use homer_desk::app::ModelState;
use homer_desk::{DeskApp, DeskOptions};
use homer_model::BackendKind;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

fn wait(h: &mut Harness<'_, DeskApp>, what: &str, done: impl Fn(&DeskApp) -> bool) {
    let t0 = Instant::now();
    while !done(h.state()) {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "timed out waiting for {what}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    h.run_steps(3);
}

fn ask(h: &mut Harness<'_, DeskApp>, question: &str) {
    h.state_mut().question = question.into();
    h.run_steps(1);
    h.get_by_label("Ask").click();
    h.run_steps(2);
    wait(h, "the answer or its error", |a| !a.busy());
}

#[test]
fn a_lost_gpu_leaves_the_app_usable_with_its_document_and_history() {
    use eframe::wgpu;
    let instance = wgpu::Instance::default();
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))
        .expect("a wgpu adapter (lavapipe)");
    let (device, queue) = pollster::block_on(
        adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("to be lost"),
            required_features: adapter
                .features()
                .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            required_limits: adapter.limits(),
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            trace: wgpu::Trace::Off,
            // SAFETY: the request burn's own device makes (as the app's).
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
        }),
    )
    .expect("a device");
    let ours = device.clone();
    homer_model::backend::share_wgpu(instance, adapter, device, queue).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let doc = dir.path().join("notes.md");
    std::fs::write(&doc, "# Notes\n\nThe pass key is 4711. Remember it.\n").unwrap();
    let mut h = Harness::builder()
        .with_size([1100.0, 700.0])
        .wgpu()
        .allow_missing_glyphs()
        .build_eframe(move |cc| {
            DeskApp::new(
                cc,
                DeskOptions {
                    model: Some(tiny()),
                    backend: Some(BackendKind::Wgpu),
                    data_dir: data,
                    load_on_start: true,
                    hide_timings: true,
                    screenshot: None,
                    shot_tabs: vec![],
                    ask: None,
                    token_pace: None,
                },
            )
        });
    {
        let s = &mut h.state_mut().settings;
        s.max_tokens = 4;
        s.homer = "never".into();
    }
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
