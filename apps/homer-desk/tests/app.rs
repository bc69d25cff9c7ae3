//! The app driven through its accessibility tree (egui_kittest) with the tiny test model on the
//! CPU backend: drop files, see them listed with their token counts, ask, watch the answer stream
//! in, open the merge tree and the kept-token view, stop an answer, find the history again after a
//! restart. Screens are rendered on wgpu (lavapipe here) and compared with the PNGs in
//! `tests/snapshots/` (`UPDATE_SNAPSHOTS=1` rewrites them).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions};
use homer_desk::app::ModelState;
use homer_desk::{DeskApp, DeskOptions, Tab};
use homer_engine::{AskParams, Engine, GenerateParams, HomerMode};
use homer_model::BackendKind;

use common::{repo, tiny, wait};

/// The first verses of John 11: with the prompt around them, more than the tiny model's 256-token
/// window, and few enough for a tree the tiny model's 3 layers can hold (C 256, W 0).
fn long_text() -> String {
    let john = std::fs::read_to_string(repo().join("assets/kjv-john.txt")).unwrap();
    let start = john.find("John11:1 ").unwrap();
    let mut end = start + 420;
    while !john.is_char_boundary(end) {
        end += 1;
    }
    let end = start + john[start..end].rfind('\n').unwrap() + 1;
    john[start..end].to_string()
}

#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

fn harness(data_dir: &Path) -> Harness<'static, DeskApp> {
    // The tiny model answers within one frame on the CPU kernels; streaming and Stop are
    // observed at a human pace. The missing-model test below keeps kittest's panicking glyph
    // policy, so the app's own strings are still checked for missing glyphs.
    common::app(data_dir, BackendKind::Cpu, Some(Duration::from_millis(15)))
}

fn snapshot(h: &mut Harness<'_, DeskApp>, name: &str) {
    // CI renders on the same Mesa lavapipe as the machine that made the PNGs: kittest's default
    // tolerance (per-pixel colour distance 0.6, no failing pixel).
    h.snapshot_options(name, &SnapshotOptions::new());
}

fn drop_files(h: &mut Harness<'_, DeskApp>, files: &[PathBuf]) {
    h.input_mut().hovered_files = files
        .iter()
        .map(|p| egui::HoveredFile {
            path: Some(p.clone()),
            mime: String::new(),
        })
        .collect();
    h.run_steps(2);
    h.input_mut().hovered_files.clear();
    for f in files {
        h.input_mut()
            .dropped_files
            .push(Arc::new(Dropped(f.clone())));
    }
    h.run_steps(2);
}

#[test]
fn drop_ask_stream_views_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let doc_path = dir.path().join("john11.txt");
    let text = long_text();
    std::fs::write(&doc_path, &text).unwrap();
    let bin = dir.path().join("photo.bin");
    std::fs::write(&bin, b"\x89PNG\0\0\0").unwrap();
    let data = dir.path().join("data");

    // The expected answer and counts, from the engine directly.
    let engine = Engine::load(Some(&tiny()), BackendKind::Cpu, &mut |_| {}).unwrap();
    let doc_tokens = engine.tokenizer.encode(&text, false).unwrap().len();
    let question = "Whom did Jesus raise?";
    let params = AskParams {
        mode: HomerMode::Auto,
        chunk_len: Some(256),
        warmup_layers: Some(0),
        generate: GenerateParams {
            max_tokens: 24,
            ..GenerateParams::default()
        },
        ..AskParams::default()
    };
    let expected = engine
        .ask(
            &[homer_engine::ingest(&doc_path).unwrap()],
            question,
            &params,
            &AtomicBool::new(false),
            &mut |_| {},
            &mut |_| {},
        )
        .unwrap();
    assert!(
        expected.used_homer,
        "the document must not fit the tiny window"
    );
    let trace = expected.trace.clone().unwrap();

    let mut h = harness(&data);
    {
        let s = &mut h.state_mut().settings;
        s.max_tokens = 24;
        s.chunk_len = 256;
        s.warmup_layers = Some(0);
    }
    wait(&mut h, "the model", |a| {
        matches!(a.model, ModelState::Ready(_))
    });

    // Hovering shows the overlay; dropping adds the files.
    h.input_mut().hovered_files = vec![egui::HoveredFile {
        path: Some(doc_path.clone()),
        mime: String::new(),
    }];
    h.run_steps(2);
    snapshot(&mut h, "drop_overlay");
    drop_files(&mut h, &[doc_path.clone(), bin.clone()]);
    wait(&mut h, "the documents", |a| {
        a.docs.len() == 2
            && a.docs
                .iter()
                .all(|d| d.tokens.is_some() || d.skipped.is_some())
    });
    h.get_by_label_contains(&format!("· {doc_tokens} tokens"));
    h.get_by_label_contains(&format!(
        "{doc_tokens} tokens in 1 document(s) · window 256"
    ));
    h.get_by_label_contains("skipped: is a binary file");
    h.get_by_label_contains("HOMER will merge it");
    assert_eq!(h.state().token_total(), doc_tokens);

    // Ask; the answer streams in.
    h.get_by_label("Question").click();
    h.run_steps(1);
    h.get_by_label("Question").type_text(question);
    h.run_steps(1);
    h.get_by_label("Ask").click();
    h.run_steps(1);
    assert!(h.state().running.is_some(), "Ask started a run");
    let mut partial_lengths = vec![];
    let t0 = Instant::now();
    while h.state().running.is_some() {
        assert!(t0.elapsed() < Duration::from_secs(180), "answer timed out");
        if let Some(r) = &h.state().running {
            if partial_lengths.last() != Some(&r.partial.len()) {
                partial_lengths.push(r.partial.len());
            }
        }
        h.step();
        std::thread::sleep(Duration::from_millis(2));
    }
    h.run_steps(3);
    assert!(h.state().errors.is_empty(), "{:?}", h.state().errors);
    let ex = h.state().history.exchanges.last().unwrap().clone();
    assert_eq!(ex.answer, expected.generation.text);
    assert!(ex.used_homer);
    assert_eq!(ex.cache_len, expected.cache_len);
    assert!(
        partial_lengths.iter().filter(|&&l| l > 0).count() >= 2,
        "the answer arrived in pieces: {partial_lengths:?}"
    );
    h.get_by_label(&format!("Q: {question}"));
    snapshot(&mut h, "chat_answered");

    // The merge tree: every node is there; clicking a leaf selects it.
    h.get_by_label("Merge tree").click();
    h.run_steps(2);
    for n in &trace.nodes {
        let kind = if n.children.is_some() {
            "merge"
        } else {
            "leaf"
        };
        h.get_by_label(&format!("{kind} node {}", n.id));
    }
    h.get_by_label("leaf node 0").click();
    h.run_steps(2);
    assert_eq!(h.state().selected_node, Some(0));
    snapshot(&mut h, "merge_tree");

    // The kept-token view, first for the selected leaf, then for the final cache.
    h.get_by_label("Kept tokens").click();
    h.run_steps(2);
    h.get_by_label_contains("showing node 0");
    h.get_by_label("Show the final cache").click();
    h.run_steps(2);
    h.get_by_label(&format!(
        "{} of {} context tokens kept ({:.0}%)",
        trace.kept.len(),
        trace.context_len,
        100.0 * trace.kept.len() as f64 / trace.context_len as f64
    ));
    snapshot(&mut h, "kept_tokens");
    assert_eq!(h.state().tab, Tab::Kept);

    // A second question about the same document reuses the first's leaves, and says so.
    let n = trace.n_chunks;
    let first = h.state().history.exchanges[0]
        .doc_cache
        .clone()
        .unwrap_or_default();
    assert!(
        first.starts_with(&format!(
            "document read: {n} leaves kept for later questions"
        )),
        "{first}"
    );
    h.state_mut().question = "Who was sick?".into();
    h.run_steps(1);
    h.get_by_label("Chat").click();
    h.run_steps(1);
    h.get_by_label("Ask").click();
    h.run_steps(1);
    wait(&mut h, "the second answer", |a| !a.busy());
    assert!(h.state().errors.is_empty(), "{:?}", h.state().errors);
    let second = h.state().history.exchanges.last().unwrap().clone();
    assert_eq!(second.question, "Who was sick?");
    let note = second.doc_cache.clone().unwrap_or_default();
    assert!(
        note.starts_with(&format!(
            "document read once: {n} of {n} leaves from the cache"
        )),
        "{note}"
    );
    h.get_by_label_contains(&note);

    // A restart finds the history.
    drop(h);
    let mut h = harness(&data);
    h.run_steps(3);
    h.get_by_label(&format!("Q: {question}"));
    assert_eq!(h.state().history.exchanges.len(), 2);
}

#[test]
fn stop_cancels_an_answer_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("short.md");
    std::fs::write(&doc, "# Notes\n\nThe pass key is 4711. Remember it.\n").unwrap();
    let mut h = harness(&dir.path().join("data"));
    {
        let s = &mut h.state_mut().settings;
        s.max_tokens = 4096;
        s.temperature = 1.0;
        s.homer = "never".into();
    }
    wait(&mut h, "the model", |a| {
        matches!(a.model, ModelState::Ready(_))
    });
    drop_files(&mut h, std::slice::from_ref(&doc));
    wait(&mut h, "the document", |a| {
        a.docs.iter().all(|d| d.tokens.is_some())
    });
    h.state_mut().question = "What is the pass key?".into();
    h.run_steps(1);
    h.get_by_label("Ask").click();
    h.run_steps(1);
    wait(&mut h, "the first tokens", |a| {
        a.running.as_ref().is_some_and(|r| r.tokens >= 3)
    });
    h.get_by_label("Stop").click();
    h.run_steps(2);
    // The UI is free at once; the worker's tail only completes the record.
    assert!(
        h.state().running.is_none(),
        "Stop frees the UI in the same frame"
    );
    h.get_by_label("Ask");
    let ex = h.state().history.exchanges.last().unwrap().clone();
    assert_eq!(ex.stop, "cancelled");
    assert!(!ex.answer.is_empty());
    let t0 = Instant::now();
    wait(&mut h, "the worker to end the stopped run", |a| !a.busy());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the worker took {took:?} to stop"
    );
    let ex = h.state().history.exchanges.last().unwrap().clone();
    assert!(!ex.used_homer);
    assert!(
        ex.prompt_tokens > 0,
        "the record was completed from the worker's result"
    );
    // The next question runs normally.
    h.state_mut().settings.max_tokens = 6;
    h.state_mut().question = "And again?".into();
    h.run_steps(1);
    h.get_by_label("Ask").click();
    h.run_steps(1);
    wait(&mut h, "the second answer", |a| !a.busy());
    let hist = &h.state().history.exchanges;
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[1].question, "And again?");
    assert_ne!(hist[1].stop, "cancelled");
}

#[test]
fn a_missing_model_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut h = Harness::builder()
        .with_size([900.0, 500.0])
        .build_eframe(move |cc| {
            DeskApp::new(
                cc,
                DeskOptions {
                    model: Some(PathBuf::from("/nonexistent/model.gguf")),
                    backend: Some(BackendKind::Cpu),
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
    wait(&mut h, "the load error", |a| {
        matches!(a.model, ModelState::Failed(_))
    });
    h.get_by_label_contains("The model could not be loaded");
    h.get_by_label_contains("/nonexistent/model.gguf");
    // Documents can still be added and the app keeps running.
    let doc = dir.path().join("a.txt");
    std::fs::write(&doc, "hello").unwrap();
    h.state_mut().add_files(vec![doc]);
    wait(&mut h, "the document", |a| {
        a.docs.iter().all(|d| d.doc.is_some())
    });
    h.get_by_label_contains("… tokens");
    h.get_by_label_contains("model failed to load");
}
