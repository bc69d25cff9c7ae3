//! The `homer` binary end to end on the tiny fixture model (CPU backend): `prefill --json` and
//! `ask --trace`, plus the error a user sees for a missing document.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../../tests/fixtures")
}

fn homer(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_homer"))
        .args(args)
        .env(
            "HOMER_HOME",
            std::env::temp_dir().join("homer-cli-test-home"),
        )
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn prefill_json_reports_the_plan_and_kept_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let context: String = (0..15).map(|i| format!("item {i} is blue. ")).collect();
    let (p, c, s) = (
        w("p.txt", "Read this."),
        w("c.txt", &context),
        w("s.txt", " What is item 7?"),
    );
    let model = fixtures().join("tiny-llama").display().to_string();
    let (ok, stdout, stderr) = homer(&[
        "prefill",
        "--model",
        &model,
        "--backend",
        "cpu",
        "--prefix-file",
        &p,
        "--context-file",
        &c,
        "--suffix-file",
        &s,
        "--chunk-len",
        "96",
        "--warmup-layers",
        "0",
        "--bias",
        "zeros",
        "--generate",
        "3",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ctx = v["context_tokens"].as_u64().unwrap() as usize;
    let (pl, sl) = (
        v["prefix_tokens"].as_u64().unwrap() as usize,
        v["suffix_tokens"].as_u64().unwrap() as usize,
    );
    let chunks = v["chunks"].as_u64().unwrap() as usize;
    assert!(chunks >= 2, "{v}");
    assert_eq!(1usize << v["tree_height"].as_u64().unwrap(), chunks);
    let kept = v["kept"].as_array().unwrap();
    assert_eq!(
        v["cache_len"].as_u64().unwrap() as usize,
        pl + kept.len() + sl
    );
    assert!(v["cache_len"].as_u64().unwrap() <= 96);
    assert!(kept.iter().all(|k| (k.as_u64().unwrap() as usize) < ctx));
    // Positions never reach the chunk length (spec §2.3).
    assert!(v["last_position_id"].as_u64().unwrap() < 96);
    assert_eq!(v["top"].as_array().unwrap().len(), 20);
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 3);
}

/// On wgpu, `prefill` uses the WGSL kernels by default; `--homer-ops tensor` selects the oracle
/// ops and must keep the same tokens with the same next-token logits.
#[test]
fn prefill_on_wgpu_uses_the_wgsl_kernels_and_matches_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let context: String = (0..15).map(|i| format!("item {i} is red. ")).collect();
    let (p, c, s) = (
        w("p.txt", "Read this."),
        w("c.txt", &context),
        w("s.txt", " What is item 9?"),
    );
    let model = fixtures().join("tiny-llama").display().to_string();
    let run = |ops: &str| {
        let mut args = vec![
            "prefill",
            "--model",
            &model,
            "--backend",
            "wgpu",
            "--prefix-file",
            &p,
            "--context-file",
            &c,
            "--suffix-file",
            &s,
            "--chunk-len",
            "96",
            "--warmup-layers",
            "0",
            "--bias",
            "zeros",
            "--json",
        ];
        if !ops.is_empty() {
            args.extend(["--homer-ops", ops]);
        }
        let (ok, stdout, stderr) = homer(&args);
        assert!(ok, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let kernels = run("");
    let oracle = run("tensor");
    assert_eq!(kernels["backend"], "wgpu");
    assert_eq!(kernels["ops"], "wgsl");
    assert_eq!(oracle["ops"], "tensor");
    assert!(kernels["chunks"].as_u64().unwrap() >= 2);
    assert_eq!(kernels["kept"], oracle["kept"]);
    assert_eq!(kernels["positions"], oracle["positions"]);
    let top = |v: &serde_json::Value| -> Vec<(u64, f64)> {
        v["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["id"].as_u64().unwrap(), t["logit"].as_f64().unwrap()))
            .collect()
    };
    for ((ia, la), (ib, lb)) in top(&kernels).into_iter().zip(top(&oracle)) {
        assert_eq!(ia, ib);
        assert!((la - lb).abs() < 1e-4, "{la} vs {lb}");
    }
    // The kernels need a wgpu device.
    let (ok, _, stderr) = homer(&[
        "prefill",
        "--model",
        &model,
        "--backend",
        "cpu",
        "--homer-ops",
        "wgsl",
        "--prefix-file",
        &p,
        "--context-file",
        &c,
        "--suffix-file",
        &s,
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--homer-ops wgsl needs the wgpu backend"),
        "{stderr}"
    );
}

#[test]
fn ask_writes_a_trace_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("notes.txt");
    let text: String = (1..=14)
        .map(|i| format!("Note {i}: the code word is w{i}.\n"))
        .collect();
    std::fs::write(&doc, text).unwrap();
    let trace = dir.path().join("trace.json");
    let model = fixtures().join("tiny-llama").display().to_string();
    let (ok, _stdout, stderr) = homer(&[
        "ask",
        "What is the code word of note 3?",
        "--doc",
        &doc.display().to_string(),
        "--model",
        &model,
        "--backend",
        "cpu",
        "--homer",
        "always",
        "--chunk-len",
        "256",
        "--warmup-layers",
        "0",
        "--max-tokens",
        "4",
        "--trace",
        &trace.display().to_string(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("HOMER:"), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert_eq!(v["used_homer"], true);
    let t = &v["trace"];
    assert!(t["n_chunks"].as_u64().unwrap() >= 2);
    let nodes = t["nodes"].as_array().unwrap();
    assert_eq!(nodes.len() as u64, 2 * t["n_chunks"].as_u64().unwrap() - 1);
    assert!(
        v["kept_summary"][0]["top_lines"][0]["line"]
            .as_u64()
            .unwrap()
            >= 1
    );

    let (ok, _, stderr) = homer(&[
        "ask",
        "q?",
        "--doc",
        "/nonexistent/doc.txt",
        "--model",
        &model,
        "--backend",
        "cpu",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/doc.txt") && stderr.contains("cannot be read"),
        "{stderr}"
    );
}

#[test]
fn rope_scaling_extends_the_window_and_bad_choices_are_refused() {
    let model = fixtures().join("tiny-llama").display().to_string();
    let base = ["info", "--json", "--model", &model, "--backend", "cpu"];
    let (ok, out, err) =
        homer(&[&base[..], &["--rope-scaling", "yarn", "--rope-factor", "4"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["config"]["max_position_embeddings"], 1024);
    assert_eq!(v["config"]["rope_scaling"]["type"], "yarn");
    assert_eq!(
        v["config"]["rope_scaling"]["original_max_position_embeddings"],
        256
    );
    let (ok, out, _) = homer(
        &[
            &base[..],
            &["--rope-scaling", "dynamic-ntk", "--rope-factor", "2"],
        ]
        .concat(),
    );
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["config"]["rope_scaling"]["type"], "dynamic");
    assert_eq!(v["config"]["max_position_embeddings"], 512);
    let (ok, _, err) = homer(&[&base[..], &["--rope-scaling", "rope2"]].concat());
    assert!(!ok && err.contains("--rope-scaling rope2"), "{err}");
    let (ok, _, err) =
        homer(&[&base[..], &["--rope-scaling", "pi", "--rope-factor", "0.5"]].concat());
    assert!(!ok && err.contains("--rope-factor 0.5"), "{err}");
}

#[test]
fn passkey_runs_every_baseline_method() {
    let model = fixtures().join("tiny-llama").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pk.json");
    let out_s = out.display().to_string();
    let args = [
        "eval",
        "passkey",
        "--model",
        &model,
        "--backend",
        "cpu",
        "--lengths",
        "600",
        "--depths",
        "0.5",
        "--trials",
        "1",
        "--method",
        "plain,truncation,yarn,homer+yarn",
        "--out",
        &out_s,
    ];
    let (ok, stdout, err) = homer(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = v["trials"].as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["plain", "truncation", "yarn", "homer+yarn"]);
    // Every method saw the same sample.
    assert!(rows.iter().all(|r| r["passkey"] == rows[0]["passkey"]));
    assert!(
        rows[3]["needle_tokens_kept"].is_u64(),
        "homer+yarn ran HOMER"
    );
    assert!(
        rows[2]["needle_tokens_kept"].is_null(),
        "yarn alone did not"
    );
    for m in ["plain", "truncation", "yarn", "homer+yarn"] {
        assert!(stdout.contains(&format!("| {m} | 600 |")), "{stdout}");
    }
    let (ok, _, err) = homer(&[&args[..12], &["--method", "bm25"]].concat());
    assert!(!ok && err.contains("bm25"), "{err}");
}
