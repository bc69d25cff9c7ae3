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
            // The paper's selection: this compares the paper's kernels with their oracle.
            "--selection",
            "paper",
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

/// `homer eval passkey` on the tiny model, one trial at depth 0.5, into `out`; `--method` is
/// after the first 12 arguments.
fn passkey_args<'a>(
    model: &'a str,
    out: &'a str,
    lengths: &'a str,
    methods: &'a str,
) -> Vec<&'a str> {
    vec![
        "eval",
        "passkey",
        "--model",
        model,
        "--backend",
        "cpu",
        "--lengths",
        lengths,
        "--depths",
        "0.5",
        "--trials",
        "1",
        "--method",
        methods,
        "--out",
        out,
    ]
}

#[test]
fn passkey_runs_every_baseline_method() {
    let model = fixtures().join("tiny-llama").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out_s = dir.path().display().to_string();
    let args = passkey_args(&model, &out_s, "600", "plain,truncation,yarn,homer+yarn");
    let (ok, stdout, err) = homer(&args);
    assert!(ok, "{err}");
    let rows = jsonl(&dir.path().join("passkey.jsonl"));
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
    // Truncation read at most the window (256) of the 600 tokens.
    assert!(rows[1]["read_tokens"].as_u64().unwrap() <= 256);
    assert!(rows[0]["read_tokens"].as_u64().unwrap() > 500);
    for m in ["plain", "truncation", "yarn", "homer+yarn"] {
        assert!(stdout.contains(&format!("| {m} | 600 |")), "{stdout}");
    }
    assert!(dir.path().join("results.md").exists() && dir.path().join("passkey.png").exists());
    assert!(dir.path().join("headline.png").exists());
    // The page counts the runs' time (a record that took another's run counts once) and names
    // the command and the machine.
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    let own = rows.iter().filter(|r| r["same_run_as"].is_null()).count();
    assert!(md.contains(&format!("| passkey | {own} | ")), "{md}");
    assert!(md.contains("- backend: cpu ("), "{md}");
    let meta = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("meta.json")).unwrap())
            .unwrap()
    };
    let commands = meta()["commands"].as_array().unwrap().clone();
    assert_eq!(commands.len(), 1);
    assert!(commands[0].as_str().unwrap().contains("eval passkey"));
    // A rerun finds every cell done and adds nothing, nor a second copy of its command.
    let (ok, _, err) = homer(&args);
    assert!(ok, "{err}");
    assert_eq!(jsonl(&dir.path().join("passkey.jsonl")).len(), 4);
    assert_eq!(meta()["commands"].as_array().unwrap().len(), 1);
    assert_eq!(meta()["machines"].as_array().unwrap().len(), 1);
}

/// The retrieval baseline on passkey prompts: past the window BM25 packs the passages that
/// match the question (the needle's) into the window and the plain model reads them; where the
/// prompt fits, it packs every passage, reads the plain prompt and takes plain's run.
#[test]
fn passkey_bm25_retrieves_the_needle_into_the_window() {
    let model = fixtures().join("tiny-llama").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out_s = dir.path().display().to_string();
    let args = passkey_args(&model, &out_s, "200,900", "plain,bm25");
    let (ok, stdout, err) = homer(&args);
    assert!(ok, "{err}");
    let rows = jsonl(&dir.path().join("passkey.jsonl"));
    let row = |len: u64, m: &str| {
        rows.iter()
            .find(|r| r["length"] == len && r["method"] == m)
            .unwrap_or_else(|| panic!("no {m} record at {len}: {rows:?}"))
    };
    let (short, long) = (row(200, "bm25"), row(900, "bm25"));
    assert_eq!(short["same_run_as"], "plain", "{short}");
    assert_eq!(short["read_tokens"], row(200, "plain")["read_tokens"]);
    assert_eq!(short["answer"], row(200, "plain")["answer"]);
    // 900 tokens past the 256-token window: at most the window less the 16 answer tokens read,
    // every needle token among them, its own run.
    assert!(long["same_run_as"].is_null(), "{long}");
    let read = long["read_tokens"].as_u64().unwrap();
    assert!(read <= 240 && read > 100, "{long}");
    assert_eq!(long["needle_tokens_kept"], 12, "{long}");
    assert!(row(900, "plain")["needle_tokens_kept"].is_null());
    assert!(stdout.contains("| bm25 | 900 |"), "{stdout}");
}

/// Where the prompt fits the window, YaRN's factor is 1 (the native RoPE), truncation cuts
/// nothing and HOMER + YaRN is HOMER: those records take plain's and HOMER's run of the prompt,
/// and say so; each is what the method computes when run alone. Past the window each runs.
#[test]
fn methods_that_compute_the_same_share_one_run() {
    let model = fixtures().join("tiny-llama").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out_s = dir.path().display().to_string();
    let methods = "plain,truncation,yarn,homer,homer+yarn";
    // A 250-row chunk and no warm-up: a plan for both lengths on the 3-layer model.
    let chunk = ["--chunk-len", "250", "--warmup-layers", "0"];
    let args = [
        &passkey_args(&model, &out_s, "200,600", methods)[..],
        &chunk,
    ]
    .concat();
    let (ok, stdout, err) = homer(&args);
    assert!(ok, "{err}");
    let rows = jsonl(&dir.path().join("passkey.jsonl"));
    let same: Vec<(u64, &str, &serde_json::Value)> = rows
        .iter()
        .map(|r| {
            (
                r["length"].as_u64().unwrap(),
                r["method"].as_str().unwrap(),
                &r["same_run_as"],
            )
        })
        .collect();
    let null = serde_json::Value::Null;
    let (plain, homer_) = (serde_json::json!("plain"), serde_json::json!("homer"));
    assert_eq!(
        same,
        [
            (200, "plain", &null),
            (200, "truncation", &plain),
            (200, "yarn", &plain),
            (200, "homer", &null),
            (200, "homer+yarn", &homer_),
            (600, "plain", &null),
            (600, "truncation", &null),
            (600, "yarn", &null),
            (600, "homer", &null),
            (600, "homer+yarn", &null),
        ]
    );
    assert!(
        stdout.contains("3 records are another method's run"),
        "{stdout}"
    );
    // Run alone, yarn and HOMER + YaRN at 200 tokens write what the shared records hold.
    let alone = tempfile::tempdir().unwrap();
    let alone_s = alone.path().display().to_string();
    let args = [
        &passkey_args(&model, &alone_s, "200", "yarn,homer+yarn")[..],
        &chunk,
    ]
    .concat();
    let (ok, _, err) = homer(&args);
    assert!(ok, "{err}");
    let own = jsonl(&alone.path().join("passkey.jsonl"));
    for (o, m) in own.iter().zip(["yarn", "homer+yarn"]) {
        let shared = rows
            .iter()
            .find(|r| r["method"] == m && r["length"] == 200)
            .unwrap();
        assert!(o["same_run_as"].is_null(), "{o}");
        for f in [
            "key",
            "answer",
            "needle_tokens_kept",
            "cache_rows",
            "read_tokens",
        ] {
            assert_eq!(o[f], shared[f], "{m} {f}");
        }
    }
}

/// `homer bench` decodes every token it is asked for (the answers' loop stop is off there: a
/// looping continuation had ended the measurement after a few tokens and still reported a
/// rate), and a decode that ends early — here at the tiny model's 256-position window — is an
/// error naming why, not a rate.
#[test]
fn bench_decodes_the_tokens_asked_for() {
    let model = fixtures().join("tiny-llama").display().to_string();
    let args = [
        "bench",
        "--model",
        &model,
        "--backend",
        "cpu",
        "--lengths",
        "16",
        "--decode",
        "40",
        "--decode-context",
        "16,64",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--json",
        "--quiet",
    ];
    let (ok, stdout, err) = homer(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let decode: Vec<&serde_json::Value> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "decode")
        .collect();
    assert_eq!(decode.len(), 2, "{stdout}");
    for r in decode {
        assert_eq!(r["tokens"], 40, "{r}");
        assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
    let mut past = args.to_vec();
    let at = past.iter().position(|a| *a == "--decode").unwrap() + 1;
    past[at] = "300";
    let (ok, _, err) = homer(&past);
    assert!(
        !ok && err.contains("stopped after") && err.contains("Window"),
        "{err}"
    );
}

/// `--skip METHOD@LENGTH`: the cell is recorded once as skipped with the reason, listed under
/// the table, and measured by a later run without the skip (which then drops it from the list).
#[test]
fn skipped_cells_are_recorded_listed_and_run_later() {
    let model = fixtures().join("tiny-llama").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out_s = dir.path().display().to_string();
    let args = passkey_args(&model, &out_s, "300,600", "plain,truncation");
    let skip = ["--skip", "plain@600", "--skip-reason", "too slow here"];
    let (ok, stdout, err) = homer(&[&args[..], &skip].concat());
    assert!(ok, "{err}");
    let rows = jsonl(&dir.path().join("passkey.jsonl"));
    let skipped: Vec<_> = rows.iter().filter(|r| r["skipped"].is_string()).collect();
    assert_eq!(skipped.len(), 1, "{rows:?}");
    assert_eq!(
        (
            &skipped[0]["method"],
            &skipped[0]["length"],
            &skipped[0]["skipped"]
        ),
        (
            &serde_json::json!("plain"),
            &serde_json::json!(600),
            &serde_json::json!("too slow here")
        )
    );
    assert_eq!(rows.iter().filter(|r| r["correct"].is_boolean()).count(), 3);
    // Each run record names the host it was measured on; a skip measured nothing.
    assert!(
        rows.iter()
            .filter(|r| r["correct"].is_boolean())
            .all(|r| r["machine"].as_str().is_some_and(|m| m.contains(" × "))),
        "{rows:?}"
    );
    assert!(skipped[0]["machine"].is_null(), "{rows:?}");
    assert!(!stdout.contains("| plain | 600 |"), "{stdout}");
    assert!(
        stdout.contains("- plain at 600 tokens (1 cell): too slow here"),
        "{stdout}"
    );
    // Skipped again: not recorded twice.
    let (ok, _, err) = homer(&[&args[..], &skip].concat());
    assert!(ok, "{err}");
    assert_eq!(jsonl(&dir.path().join("passkey.jsonl")).len(), 4);
    // Without the skip the cell runs and leaves the list.
    let (ok, stdout, err) = homer(&args);
    assert!(ok, "{err}");
    let rows = jsonl(&dir.path().join("passkey.jsonl"));
    assert_eq!(rows.iter().filter(|r| r["correct"].is_boolean()).count(), 4);
    assert!(stdout.contains("| plain | 600 |"), "{stdout}");
    assert!(!stdout.contains("Skipped"), "{stdout}");
    // A skip that names no method is refused with the value.
    let (ok, _, err) = homer(&[&args[..], &["--skip", "plain600"]].concat());
    assert!(
        !ok && err.contains("plain600") && err.contains("METHOD@LENGTH"),
        "{err}"
    );
}

/// `--reuse-leaves`: HOMER methods of one prompt share their leaves (the same chunks and
/// warm-up) and write the records a run without sharing writes, the shared count recorded and
/// their prefill times left out of the table.
#[test]
fn reused_leaves_give_the_same_records() {
    let model = fixtures().join("tiny-llama").display().to_string();
    let methods = "homer,homer:sentence+reread=all,homer:span4";
    // A 250-token chunk and no warm-up: four leaves on the 3-layer model.
    let plan = [
        "--depths",
        "0.3,0.7",
        "--chunk-len",
        "250",
        "--warmup-layers",
        "0",
    ];
    let mut runs = vec![];
    for reuse in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let out_s = dir.path().display().to_string();
        let mut args = passkey_args(&model, &out_s, "600", methods);
        args.retain(|a| *a != "--depths" && *a != "0.5");
        args.extend(plan);
        if reuse {
            args.push("--reuse-leaves");
        }
        let (ok, stdout, err) = homer(&args);
        assert!(ok, "{err}");
        runs.push((jsonl(&dir.path().join("passkey.jsonl")), stdout));
    }
    let ((alone, _), (shared, stdout)) = (&runs[0], &runs[1]);
    assert_eq!(alone.len(), 6);
    assert_eq!(shared.len(), 6);
    for (a, b) in alone.iter().zip(shared) {
        assert_eq!(a["key"], b["key"]);
        assert_eq!(a["chunks"], serde_json::json!(4), "{a}");
        for f in ["answer", "needle_tokens_kept", "cache_rows", "correct"] {
            assert_eq!(a[f], b[f], "{f} of {}", a["key"]);
        }
        assert_eq!(a["leaves_reused"], serde_json::json!(0));
    }
    // Per prompt: the first HOMER method computes the four leaves, the other two take them.
    let reused: Vec<u64> = shared
        .iter()
        .map(|r| r["leaves_reused"].as_u64().unwrap())
        .collect();
    assert_eq!(reused, [0, 4, 4, 0, 4, 4]);
    assert!(
        stdout.contains("leave out the 4 records whose HOMER leaves came from another method"),
        "{stdout}"
    );
    // Both span4 records took leaves: no time of its own to show.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| homer:unit=span4 | 600 |"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.ends_with("| – |"), "{row}");
}

/// A copy of the tiny model in `dir` whose window is `window` tokens (its 256 hold no two KJV
/// verses in its byte-level tokens).
fn tiny_with_window(dir: &Path, window: usize) -> PathBuf {
    let model = dir.join(format!("tiny{window}"));
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(fixtures().join("tiny-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    let wide = cfg.replace(
        "\"max_position_embeddings\": 256",
        &format!("\"max_position_embeddings\": {window}"),
    );
    assert_ne!(cfg, wide);
    std::fs::write(model.join("config.json"), wide).unwrap();
    model
}

fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `homer eval all --quick` on the tiny model given a 2,048-token window: every task writes its
/// records, tables and plots; measured values are real (perplexities, allocator peaks); HOMER
/// settings the 3-layer model cannot plan are recorded as refused, not fatal; a rerun resumes.
#[test]
fn eval_all_quick_writes_every_table_and_plot() {
    let home = tempfile::tempdir().unwrap();
    let model = tiny_with_window(home.path(), 2048);
    let out = home.path().join("results");
    let kjv = fixtures().join("../../assets/kjv-john.txt");
    let args = [
        "eval",
        "all",
        "--quick",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--chunk-len",
        "2048",
        "--warmup-layers",
        "0",
        "--text",
        kjv.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, stdout, err) = homer(&args);
    assert!(ok, "{err}");
    assert!(stdout.trim().ends_with("results.md"), "{stdout}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for h in [
        "## Passkey",
        "## Long-document perplexity",
        "## Document QA",
        "## Cost",
        "## Ablations",
        "## Compute time",
    ] {
        assert!(md.contains(h), "{h} missing:\n{md}");
    }
    for png in [
        "passkey.png",
        "perplexity.png",
        "qa.png",
        "cost.png",
        "headline.png",
    ] {
        let b = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&b[..4], b"\x89PNG", "{png}");
    }
    // Passkey: 8 methods × 2 lengths, one sample per length shared by all methods.
    let pk = jsonl(&out.join("passkey.jsonl"));
    assert_eq!(pk.len(), 16);
    for r in &pk {
        let same = pk.iter().find(|q| q["length"] == r["length"]).unwrap();
        assert_eq!(r["passkey"], same["passkey"]);
    }
    // Perplexity: every token after the first scored once per method; the first window is a
    // plain pass for plain, truncation and HOMER alike.
    let ppl = jsonl(&out.join("perplexity.jsonl"));
    let by = |m: &str| ppl.iter().find(|r| r["method"] == m).unwrap();
    let nll = |m: &str| -> Vec<f64> {
        by(m)["nll"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    for m in ["plain", "truncation", "homer"] {
        let v = nll(m);
        assert_eq!(v.len(), 4095, "{m}");
        assert!(v.iter().all(|x| x.is_finite() && *x > 0.0), "{m}");
        assert!(by(m)["perplexity"].as_f64().unwrap() > 1.0);
    }
    let (p, t, h) = (nll("plain"), nll("truncation"), nll("homer"));
    assert!(
        p[..2047]
            .iter()
            .zip(&t[..2047])
            .all(|(a, b)| (a - b).abs() < 2e-3)
    );
    assert!(
        p[..2047]
            .iter()
            .zip(&h[..2047])
            .all(|(a, b)| (a - b).abs() < 2e-3)
    );
    assert_ne!(
        p[3000..],
        h[3000..],
        "past the window HOMER reads a merged cache"
    );
    // QA: truncation, bm25, homer on one question.
    let qa = jsonl(&out.join("qa.jsonl"));
    assert_eq!(qa.len(), 3);
    assert!(
        qa.iter()
            .all(|r| r["label"] == qa[0]["label"] && r["f1"].is_f64())
    );
    assert!(qa[1]["retrieved"].is_boolean());
    // Cost: allocator-counted peaks that grow with the prompt.
    let cost = jsonl(&out.join("cost.jsonl"));
    let peak = |m: &str, l: u64| {
        cost.iter()
            .find(|r| r["method"] == m && r["length"] == l)
            .unwrap()["peak_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(peak("plain", 1024) > 1 << 20);
    assert!(peak("plain", 4096) > 2 * peak("plain", 1024));
    assert!(peak("homer", 4096) > 0);
    // Ablations: the three scorings ran; W=1 and C=512 cannot be planned on 3 layers.
    let abl = jsonl(&out.join("ablation.jsonl"));
    let ran: Vec<&str> = abl
        .iter()
        .filter(|r| r.get("refused").is_none())
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(ran, ["calibrated", "uncalibrated", "random", "W=0"]);
    assert!(
        md.contains("homer [C=512] at 4096 tokens: HOMER plan:"),
        "{md}"
    );
    // Resumed: nothing new on a rerun.
    let before = std::fs::read_to_string(out.join("passkey.jsonl")).unwrap();
    let (ok, _, err) = homer(&args);
    assert!(ok, "{err}");
    assert_eq!(
        before,
        std::fs::read_to_string(out.join("passkey.jsonl")).unwrap()
    );
}

/// Issue 16's disk tier across processes: a `homer ask` killed while writing a document-cache
/// file leaves a torn temporary file that the next run ignores (and removes); that run writes
/// every leaf, a third process takes them all from disk and answers the same, and a corrupted
/// file is noticed by its checksum and recomputed.
#[test]
fn a_killed_cache_write_is_ignored_and_later_runs_reuse_the_document_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let cache = home.join("doc-cache");
    let doc = dir.path().join("notes.txt");
    let text: String = (1..=14)
        .map(|i| format!("Note {i}: the code word is w{i}.\n"))
        .collect();
    std::fs::write(&doc, text).unwrap();
    let model = fixtures().join("tiny-llama").display().to_string();
    let doc = doc.display().to_string();
    let args = [
        "ask",
        "What is the code word of note 3?",
        "--doc",
        &doc,
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
    ];
    let files = |ext: &str| -> Vec<PathBuf> {
        std::fs::read_dir(&cache)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == ext))
                    .collect()
            })
            .unwrap_or_default()
    };
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_homer"))
            .args(args)
            .env("HOMER_HOME", &home)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
    };

    // 1. Killed halfway through writing its first leaf.
    let mut child = Command::new(env!("CARGO_BIN_EXE_homer"))
        .args(args)
        .env("HOMER_HOME", &home)
        .env("HOMER_DOC_CACHE_TEST_PAUSE_MS", "120000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while files("tmp").is_empty() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "no cache write began"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let torn = files("tmp");
    assert_eq!(torn.len(), 1);
    assert!(files("safetensors").is_empty());

    // 2. The next run ignores the torn file, computes every leaf and writes it whole.
    let (answer, stderr) = run();
    let n = files("safetensors").len();
    assert!(n >= 2, "{stderr}");
    assert!(files("tmp").is_empty(), "the torn file is removed");
    assert!(
        stderr.contains(&format!("0 of {n} leaves reused, {n} computed and kept")),
        "{stderr}"
    );

    // 3. A new process takes every leaf from disk and answers the same.
    let (again, stderr) = run();
    assert_eq!(again, answer);
    assert!(
        stderr.contains(&format!("{n} of {n} leaves reused, 0 computed")),
        "{stderr}"
    );

    // 4. A flipped byte in one file's data: that leaf is recomputed, the answer unchanged.
    let victim = &files("safetensors")[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x40;
    std::fs::write(victim, bytes).unwrap();
    let (again, stderr) = run();
    assert_eq!(again, answer);
    assert!(
        stderr.contains(&format!("{} of {n} leaves reused, 1 computed", n - 1)),
        "{stderr}"
    );
    assert!(stderr.contains("checksum"), "{stderr}");
}

/// `homer chat --doc`: every line is a question about the document, which is read once.
#[test]
fn chat_about_a_document_reads_it_once() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("notes.txt");
    let text: String = (1..=14)
        .map(|i| format!("Note {i}: the code word is w{i}.\n"))
        .collect();
    std::fs::write(&doc, text).unwrap();
    let model = fixtures().join("tiny-llama").display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_homer"))
        .args([
            "chat",
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
            "--quiet",
            "--stats",
        ])
        .env("HOMER_HOME", dir.path().join("home"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the code word of note 3?\nAnd of note 12?\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("document cache:"))
        .collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains(" 0 of 2 leaves reused, 2 computed"),
        "{stderr}"
    );
    assert!(
        lines[1].contains(" 2 of 2 leaves reused, 0 computed"),
        "{stderr}"
    );
}

#[test]
fn qa_methods_that_read_the_same_prompt_share_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_with_window(dir.path(), 2048).display().to_string();
    let kjv = fixtures().join("../../assets/kjv-john.txt");
    let out = dir.path().join("out").display().to_string();
    let args = [
        "eval",
        "qa",
        "--model",
        &model,
        "--backend",
        "cpu",
        "--text",
        kjv.to_str().unwrap(),
        "--lengths",
        "1200,4000",
        "--depths",
        "0.5",
        "--trials",
        "1",
        "--method",
        "plain,truncation,bm25",
        "--out",
        &out,
    ];
    let (ok, _, err) = homer(&args);
    assert!(ok, "{err}");
    let rows = jsonl(&dir.path().join("out/qa.jsonl"));
    let at = |len: u64, m: &str| {
        rows.iter()
            .find(|r| r["length"] == len && r["method"] == m)
            .unwrap_or_else(|| panic!("{m} at {len}: {rows:?}"))
            .clone()
    };
    // The 1,200-token document fits the 2,048-token window with its answer: truncation
    // cuts nothing and BM25 packs every passage, so both take plain's run.
    let plain = at(1200, "plain");
    assert!(plain["same_run_as"].is_null());
    for m in ["truncation", "bm25"] {
        let r = at(1200, m);
        assert_eq!(r["same_run_as"], "plain", "{r}");
        assert_eq!(r["answer"], plain["answer"]);
        assert_eq!(r["read_tokens"], plain["read_tokens"]);
    }
    // At 4,000 tokens each reads its own prompt and runs it.
    for m in ["truncation", "bm25"] {
        let r = at(4000, m);
        assert!(r["same_run_as"].is_null(), "{r}");
        assert!(
            r["read_tokens"].as_u64().unwrap() < at(4000, "plain")["read_tokens"].as_u64().unwrap()
        );
    }
    // The page counts the shared runs once.
    let md = std::fs::read_to_string(dir.path().join("out/results.md")).unwrap();
    assert!(md.contains("| qa | 4 | "), "{md}");
}

/// `homer eval cost` on wgpu runs an untimed prefill of each prompt first (burn's autotune and
/// shader compilation stay out of the measured time and device memory) and records the device
/// pools' growth; on the CPU there is nothing to warm up and no device column.
#[test]
fn cost_on_wgpu_warms_up_and_records_device_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_with_window(dir.path(), 2048);
    let out = dir.path().join("out");
    let kjv = fixtures().join("../../assets/kjv-john.txt");
    for backend in ["wgpu", "cpu"] {
        let (ok, _, err) = homer(&[
            "eval",
            "cost",
            "--model",
            model.to_str().unwrap(),
            "--backend",
            backend,
            "--chunk-len",
            "512",
            "--warmup-layers",
            "0",
            "--text",
            kjv.to_str().unwrap(),
            "--lengths",
            "700,1500",
            "--method",
            "plain,homer",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{backend}: {err}");
    }
    let rows = jsonl(&out.join("cost.jsonl"));
    assert_eq!(rows.len(), 8, "{rows:?}");
    for r in &rows {
        assert!(r["skipped"].is_null() && r["refused"].is_null(), "{r}");
        assert!(r["secs"].as_f64().unwrap() > 0.0, "{r}");
        // cost is the host's: measured again on another host, so the key names it
        let host = r["machine"].as_str().unwrap();
        assert!(
            r["key"].as_str().unwrap().contains(&format!("|{host}|")),
            "{r}"
        );
        match r["backend"].as_str().unwrap() {
            "wgpu" => {
                assert!(r["warmup_secs"].as_f64().unwrap() > 0.0, "{r}");
                let before = r["device_reserved_before"].as_u64().unwrap();
                let after = r["device_reserved_after"].as_u64().unwrap();
                assert!(after >= before, "{r}");
            }
            "cpu" => {
                assert!(r["warmup_secs"].is_null(), "{r}");
                assert!(r["device_reserved_after"].is_null(), "{r}");
                assert!(r["peak_bytes"].as_u64().unwrap() > 0, "{r}");
            }
            b => panic!("backend {b}"),
        }
    }
}
