//! The real binary in a real (virtual) X display: `homer-desk --screenshot` under Xvfb with eframe's
//! wgpu renderer (lavapipe on machines without a GPU) opens its window, hands its wgpu device to
//! burn, loads the tiny model on it, answers a question, writes a PNG of two tabs and exits. Needs `xvfb-run` (Debian: `xvfb`, `xauth`);
//! `.ci/run` installs them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../..")
}

#[test]
fn the_binary_renders_a_frame_under_xvfb() {
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("window.png");
    let doc = dir.path().join("notes.txt");
    std::fs::write(&doc, "The pass key is 4711.\n").unwrap();
    let mut child = Command::new("xvfb-run")
        .args(["-a", "-s", "-screen 0 1280x900x24"])
        .arg(env!("CARGO_BIN_EXE_homer-desk"))
        .arg("--model")
        .arg(repo().join("tests/fixtures/tiny-llama"))
        .args(["--backend", "wgpu", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--screenshot")
        .arg(&shot)
        .args(["--tabs", "chat,kept", "--ask", "What is the pass key?"])
        .arg(&doc)
        .env("WGPU_BACKEND", "vulkan")
        .env("HOMER_LOG", "info")
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .expect("xvfb-run must be installed (Debian: apt-get install xvfb xauth)");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(400) {
            let _ = child.kill();
            panic!("homer-desk did not exit within 400 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(status.success(), "homer-desk exited with {status}:\n{log}");
    // One device: the model ran on the renderer's wgpu device, not a second one.
    assert!(
        log.contains("burn shares the window's wgpu device"),
        "the renderer's device was not shared:\n{log}"
    );
    for tab in ["chat", "kept"] {
        let p = dir.path().join(format!("window-{tab}.png"));
        let img = image::open(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .to_rgba8();
        assert_eq!(
            (img.width(), img.height()),
            (1200, 800),
            "the window's size"
        );
        let mut colours: Vec<[u8; 4]> = img.pixels().map(|p| p.0).collect();
        colours.sort_unstable();
        colours.dedup();
        assert!(
            colours.len() > 20,
            "{tab}: a rendered UI has text and panels: {} colours",
            colours.len()
        );
    }
    // The question was asked and answered by the real binary: the history has it.
    let history = std::fs::read_to_string(dir.path().join("data/history.json")).unwrap();
    let h: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(h["exchanges"][0]["question"], "What is the pass key?");
    assert_eq!(h["exchanges"][0]["docs"][0], "notes.txt");
}
