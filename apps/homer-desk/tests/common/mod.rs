//! Helpers the app's test files share.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use homer_desk::{DeskApp, DeskOptions};
use homer_model::BackendKind;

/// The repository (the run-time CARGO_MANIFEST_DIR first: a binary built elsewhere).
pub fn repo() -> PathBuf {
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../..")
}

pub fn tiny() -> PathBuf {
    repo().join("tests/fixtures/tiny-llama")
}

/// Step the harness until `done` holds (the worker runs on its own thread).
pub fn wait(h: &mut Harness<'_, DeskApp>, what: &str, done: impl Fn(&DeskApp) -> bool) {
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

/// Type `question`, press Ask, wait for the answer (or its error).
pub fn ask(h: &mut Harness<'_, DeskApp>, question: &str) {
    h.state_mut().question = question.into();
    h.run_steps(1);
    h.get_by_label("Ask").click();
    h.run_steps(2);
    wait(h, "the answer or its error", |a| !a.busy());
}

#[path = "../../../../crates/homer-engine/tests/common/device.rs"]
mod device;
#[allow(unused_imports)] // not every test file asks for a device
pub use device::share_device;

/// The app on the tiny model and `backend`, keeping its data in `data`; `token_pace` slows the
/// streamed answer to a human pace.
pub fn app(
    data: &Path,
    backend: BackendKind,
    token_pace: Option<std::time::Duration>,
) -> Harness<'static, DeskApp> {
    let data = data.to_path_buf();
    Harness::builder()
        .with_size([1100.0, 700.0])
        .wgpu()
        // The tiny random model decodes to bytes that are not UTF-8 (shown as U+FFFD, which the
        // built-in fonts lack).
        .allow_missing_glyphs()
        .build_eframe(move |cc| {
            DeskApp::new(
                cc,
                DeskOptions {
                    model: Some(tiny()),
                    backend: Some(backend),
                    data_dir: data,
                    load_on_start: true,
                    hide_timings: true,
                    screenshot: None,
                    shot_tabs: vec![],
                    ask: None,
                    token_pace,
                },
            )
        })
}

/// The app on the tiny model and `backend`, keeping its data in `data`, 4-token answers
/// without HOMER.
pub fn desk(data: &Path, backend: BackendKind) -> Harness<'static, DeskApp> {
    let mut h = app(data, backend, None);
    let s = &mut h.state_mut().settings;
    s.max_tokens = 4;
    s.homer = "never".into();
    h
}
