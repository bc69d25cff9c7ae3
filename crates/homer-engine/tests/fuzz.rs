//! Mutation fuzzing of what homer reads from users (issue 17, item 1), run as a test: each case
//! is a deterministic mutation of a valid input (bit flips, truncation, huge declared sizes and
//! numbers, 0xFF bytes) or a hand-made hostile one (zip bombs, deeply nested or self-referencing
//! PDF objects, runaway templates). Every case must end in a value or a one-line error naming the
//! file, within a time limit, without a panic, and without allocating more than a small multiple
//! of the input's size (a counting allocator watches every case).
//!
//! Targets: a GGUF model (reader, config, tokenizer, weights); a Hugging Face model directory
//! (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, the chat template,
//! through `Engine::load`); a chat template rendered on its own; documents (txt, md, PDF, DOCX).
//!
//! `HOMER_FUZZ_CASES` (default 2,000 a target) and `HOMER_FUZZ_SEED` run longer or other streams
//! (`scripts/fuzz`); a failing input is kept under `$TMPDIR/homer-fuzz-failures`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};

/// Counts live heap bytes and their peak, so every case's allocation can be bounded.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The targets run one at a time: the allocation peak is process-wide.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Heap a case may use beyond `factor` × its input's size (the CPU device, thread stacks'
/// bookkeeping, the tokenizer's tables).
const SLACK: usize = 64 << 20;

/// What a case ended in.
enum Outcome {
    Value,
    Error(String),
    Panic,
    Hang,
}

type Run = Arc<dyn Fn(&Path) -> Result<(), String> + Send + Sync>;

/// Run `f` on its own thread with a time limit, catching panics.
fn guarded(limit: Duration, run: Run, path: PathBuf) -> Outcome {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&path)));
        let _ = tx.send(match r {
            Ok(Ok(())) => Outcome::Value,
            Ok(Err(e)) => Outcome::Error(e),
            Err(_) => Outcome::Panic,
        });
    });
    rx.recv_timeout(limit).unwrap_or(Outcome::Hang)
}

fn env(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// A mutation of `good` (case `case` of a seeded stream), touching its first `head` bytes.
fn mutate(good: &[u8], head: usize, case: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b = good.to_vec();
    let head = head.min(b.len()).max(1);
    match case % 5 {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..head);
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => b.truncate(rng.random_range(0..b.len())),
        2 if head > 8 => {
            let i = rng.random_range(0..head - 8);
            let v: u64 = [u64::MAX, 1 << 40, 1 << 31, 0, 0xffff_ffff][rng.random_range(0..5)];
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        3 => {
            // A decimal number in the text (JSON sizes, PDF lengths and counts) made huge,
            // negative, zero or fractional.
            let digits: Vec<usize> = (0..head).filter(|&i| b[i].is_ascii_digit()).collect();
            if let Some(&i) = digits.get(rng.random_range(0..digits.len().max(1))) {
                let mut j = i;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                let with = [
                    "18446744073709551615",
                    "4294967296",
                    "99999999999",
                    "-1",
                    "0",
                    "1e400",
                    "2.5",
                ][rng.random_range(0..7)];
                b.splice(i..j, with.bytes());
            }
        }
        _ => {
            let i = rng.random_range(0..head);
            b[i] = 0xff;
        }
    }
    b
}

/// A failing case's input, copied where it outlives the test.
fn keep(path: &Path) -> String {
    let dir = std::env::temp_dir().join("homer-fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let to = dir.join(path.file_name().unwrap_or_default());
    let _ = if path.is_dir() {
        copy_dir(path, &to)
    } else {
        std::fs::copy(path, &to).map(|_| ())
    };
    to.display().to_string()
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// One case: what the target reads (`path`), the file a refusal must name, and the input's size
/// (the allocation bound's unit).
struct Case {
    path: PathBuf,
    names: String,
    size: usize,
}

/// Run `cases` cases through `run`: each must end in a value or a one-line error naming its
/// file, within `limit`, allocating at most `factor` × its size + `slack`. Returns (values,
/// errors).
fn drive(
    target: &str,
    cases: usize,
    limit: Duration,
    (factor, slack): (usize, usize),
    run: Run,
    mut make: impl FnMut(usize) -> Case,
    mut restore: impl FnMut(usize),
) -> (usize, usize) {
    let t0 = Instant::now();
    let (mut values, mut errors, mut worst) = (0, 0, 0usize);
    for case in 0..cases {
        let c = make(case);
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        let outcome = guarded(limit, run.clone(), c.path.clone());
        let used = PEAK.load(Relaxed).saturating_sub(base);
        worst = worst.max(used);
        let bound = factor * c.size + slack;
        let fail = |what: String| -> ! {
            panic!(
                "{target} case {case}: {what}; input kept at {}",
                keep(&c.path)
            )
        };
        match outcome {
            Outcome::Value => values += 1,
            Outcome::Error(e) => {
                errors += 1;
                if !e.contains(&c.names) {
                    fail(format!("the error does not name {}: {e}", c.names));
                }
                if e.contains('\n') {
                    fail(format!("the error is not one line: {e:?}"));
                }
            }
            Outcome::Panic => fail("panicked".into()),
            Outcome::Hang => fail(format!("no answer within {} s", limit.as_secs())),
        }
        if used > bound {
            fail(format!(
                "allocated {} MiB at the peak for {} bytes of input (bound {} MiB)",
                used >> 20,
                c.size,
                bound >> 20
            ));
        }
        restore(case);
    }
    eprintln!(
        "{target}: {cases} cases in {:.1} s: {values} values, {errors} refused with an error; \
         peak heap of a case {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        worst as f64 / (1 << 20) as f64
    );
    // Not a degenerate run: mutations were both survived and refused.
    assert!(
        values > 0 && errors > 0,
        "{target}: {values} values, {errors} errors"
    );
    (values, errors)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn mutated_gguf_files_end_in_a_value_or_an_error_naming_the_file() {
    let _one = serial();
    let good = std::fs::read(fixtures().join("tiny-gguf/tiny-q8_0.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(env("HOMER_FUZZ_SEED", 17));
    let run: Run = Arc::new(|p: &Path| {
        let src = homer_model::load::open(p).map_err(|e| e.to_string())?;
        let file = homer_model::load::gguf::GgufFile::open(p).map_err(|e| e.to_string())?;
        homer_engine::Tokenizer::from_gguf(&file).map_err(|e| e.to_string())?;
        let dev = homer_model::backend::device(homer_model::BackendKind::Cpu)
            .map_err(|e| e.to_string())?
            .0;
        homer_model::Llama::load(src.as_ref(), &dev, None, &mut |_, _| {})
            .map_err(|e| e.to_string())?;
        Ok(())
    });
    let d = dir.path().to_path_buf();
    let (_, errors) = drive(
        "GGUF",
        env("HOMER_FUZZ_CASES", 2000) as usize,
        Duration::from_secs(20),
        (16, SLACK),
        run,
        |case| {
            let bytes = mutate(&good, 8192, case, &mut rng);
            let path = d.join(format!("case{case}.gguf"));
            std::fs::write(&path, &bytes).unwrap();
            Case {
                names: format!("case{case}.gguf"),
                size: bytes.len(),
                path,
            }
        },
        |case| {
            let _ = std::fs::remove_file(d.join(format!("case{case}.gguf")));
        },
    );
    assert!(errors > 100, "{errors} refusals");
}

/// The model directory's files and how far into each the parser reads sizes from.
const HF_FILES: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

#[test]
fn mutated_model_directories_end_in_a_value_or_an_error_naming_the_file() {
    let _one = serial();
    let src = fixtures().join("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let originals: Vec<Vec<u8>> = HF_FILES
        .iter()
        .map(|f| {
            let b = std::fs::read(src.join(f)).unwrap();
            std::fs::write(model.join(f), &b).unwrap();
            b
        })
        .collect();
    let total: usize = originals.iter().map(Vec::len).sum();
    // The safetensors header (8-byte length + JSON) is where sizes and offsets are.
    let st_head = 8 + u64::from_le_bytes(originals[1][..8].try_into().unwrap()) as usize;
    let mut rng = StdRng::seed_from_u64(env("HOMER_FUZZ_SEED", 17) + 1);
    let run: Run = Arc::new(|p: &Path| {
        let engine =
            homer_engine::Engine::load(Some(p), homer_model::BackendKind::Cpu, &mut |_| {})
                .map_err(|e| e.to_string())?;
        engine
            .template
            .render(&[homer_engine::Message::new("user", "Hi")], true)
            .map_err(|e| e.to_string())?;
        Ok(())
    });
    let m = model.clone();
    let which = std::cell::Cell::new(0);
    drive(
        "model directory",
        env("HOMER_FUZZ_CASES", 2000) as usize,
        Duration::from_secs(20),
        (16, SLACK),
        run,
        |case| {
            which.set(case % HF_FILES.len());
            let good = &originals[which.get()];
            let head = if which.get() == 1 {
                st_head
            } else {
                good.len()
            };
            std::fs::write(
                m.join(HF_FILES[which.get()]),
                mutate(good, head, case / 6, &mut rng),
            )
            .unwrap();
            Case {
                path: m.clone(),
                names: HF_FILES[which.get()].to_string(),
                size: total,
            }
        },
        |_| std::fs::write(m.join(HF_FILES[which.get()]), &originals[which.get()]).unwrap(),
    );
}

/// Templates written to run away: loops, recursion, huge strings, deep nesting.
const HOSTILE_TEMPLATES: [&str; 7] = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% set s = 'x' * 100000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    "{% for m in messages %}{% for i in range(100000) %}{{ m.content * 1000 }}{% endfor %}{% endfor %}",
    "{{ raise_exception('this template refuses every conversation') }}",
    "{{ messages[0]['content'].split('') }}",
];

#[test]
fn mutated_and_hostile_chat_templates_end_in_a_prompt_or_an_error_naming_their_source() {
    let _one = serial();
    let good = std::fs::read(fixtures().join("tiny-llama/chat_template.jinja")).unwrap();
    // The Llama-2 style template exercises more of the language (conditions, raise_exception).
    let llama2 = b"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
    let nested = format!(
        "{}x{}",
        "{% if true %}".repeat(5000),
        "{% endif %}".repeat(5000)
    );
    let mut rng = StdRng::seed_from_u64(env("HOMER_FUZZ_SEED", 17) + 2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let run: Run = Arc::new(|p: &Path| {
        let src = std::fs::read(p).map_err(|e| e.to_string())?;
        let src = String::from_utf8_lossy(&src);
        let origin = p.display().to_string();
        let t = homer_engine::ChatTemplate::from_source(Some(&src), &origin, "<s>", "</s>");
        let msgs = [
            homer_engine::Message::new("system", "Answer from the documents."),
            homer_engine::Message::new("user", "What is the pass key?"),
        ];
        t.render(&msgs, true).map_err(|e| e.to_string())?;
        Ok(())
    });
    drive(
        "chat template",
        env("HOMER_FUZZ_CASES", 2000) as usize,
        Duration::from_secs(20),
        // A template is a program: minijinja caps one string at 100 MB (`'x' * n`), and a
        // render holds at most two such values at once; the output itself is capped by us.
        (16, 256 << 20),
        run,
        |case| {
            let bytes: Vec<u8> = match case {
                c if c < HOSTILE_TEMPLATES.len() => HOSTILE_TEMPLATES[c].as_bytes().to_vec(),
                c if c == HOSTILE_TEMPLATES.len() => nested.as_bytes().to_vec(),
                c if c % 2 == 0 => mutate(&good, good.len(), c / 2, &mut rng),
                c => mutate(llama2, llama2.len(), c / 2, &mut rng),
            };
            let path = d.join(format!("case{case}.jinja"));
            std::fs::write(&path, &bytes).unwrap();
            Case {
                names: format!("case{case}.jinja"),
                size: bytes.len(),
                path,
            }
        },
        |case| {
            let _ = std::fs::remove_file(d.join(format!("case{case}.jinja")));
        },
    );
}

/// A zip container whose `word/document.xml` expands to `mib` MiB of one repeated byte.
fn zip_bomb(mib: usize) -> Vec<u8> {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(vec![]);
    let mut z = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.start_file("word/document.xml", opts).unwrap();
    let block = vec![b'<'; 1 << 20];
    for _ in 0..mib {
        z.write_all(&block).unwrap();
    }
    z.finish().unwrap();
    buf.into_inner()
}

/// Hand-made hostile PDFs: deeply nested arrays and dictionaries, a page tree whose kids hold
/// itself, huge counts and stream lengths.
fn hostile_pdfs() -> Vec<Vec<u8>> {
    let good = homer_engine::document::sample::pdf(&["Alpha page words", "Beta page words"]);
    let text = String::from_utf8_lossy(&good).into_owned();
    let mut out = vec![];
    let deep = |open: &str, close: &str, n: usize| {
        let body = format!("{}1{}", open.repeat(n), close.repeat(n));
        let obj = format!("%PDF-1.5\n1 0 obj\n{body}\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n");
        obj.into_bytes()
    };
    out.push(deep("[", "]", 100_000));
    out.push(deep("<< /A ", " >>", 50_000));
    // The page tree's kids point back at the tree.
    out.push(
        text.replacen(
            "/Type /Page /Parent",
            "/Type /Pages /Kids [2 0 R] /Parent",
            1,
        )
        .into_bytes(),
    );
    out.push(
        text.replacen("/Count 2", "/Count 9223372036854775807", 1)
            .into_bytes(),
    );
    out.push(
        text.replacen("/Length ", "/Length 9223372036854775807 /Old ", 1)
            .into_bytes(),
    );
    out
}

#[test]
fn mutated_and_hostile_documents_end_in_text_or_a_reason_naming_the_file() {
    let _one = serial();
    use homer_engine::document::sample;
    let txt = "In the beginning was the Word.\nÅngström — ナ 🙂\r\nThe pass key is 12345.\n"
        .repeat(20)
        .into_bytes();
    let md = b"# Title\n\n* item\n\n```\ncode\n```\n\n| a | b |\n|---|---|\n".repeat(20);
    let pdf = sample::pdf(&["First page words here.", "Second page words."]);
    let docx = sample::docx(&["Alpha paragraph.", "Beta paragraph.", "Gamma."]);
    let seeds: [(&str, &[u8]); 4] = [("txt", &txt), ("md", &md), ("pdf", &pdf), ("docx", &docx)];
    let mut hostile: Vec<(&str, Vec<u8>)> = vec![("docx", zip_bomb(64)), ("docx", zip_bomb(3))];
    hostile.extend(hostile_pdfs().into_iter().map(|b| ("pdf", b)));
    let mut rng = StdRng::seed_from_u64(env("HOMER_FUZZ_SEED", 17) + 3);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let run: Run = Arc::new(|p: &Path| {
        homer_engine::document::load_document(p).map_err(|e| e.to_string())?;
        Ok(())
    });
    drive(
        "documents",
        env("HOMER_FUZZ_CASES", 2000) as usize,
        // Above the engine's own parse limit, which must answer first.
        homer_engine::document::PARSE_TIME_LIMIT + Duration::from_secs(10),
        (16, SLACK),
        run,
        |case| {
            let (ext, bytes) = if case < hostile.len() {
                (hostile[case].0, hostile[case].1.clone())
            } else {
                let (ext, good) = seeds[case % seeds.len()];
                (ext, mutate(good, good.len(), case / 4, &mut rng))
            };
            let path = d.join(format!("case{case}.{ext}"));
            std::fs::write(&path, &bytes).unwrap();
            Case {
                names: format!("case{case}.{ext}"),
                size: bytes.len(),
                path,
            }
        },
        |_| {
            for e in std::fs::read_dir(&d).unwrap() {
                let _ = std::fs::remove_file(e.unwrap().path());
            }
        },
    );
}

#[test]
fn hostile_inputs_are_refused_with_their_reason() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let refused = |name: &str, bytes: &[u8]| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = homer_engine::document::load_document(&p)
            .expect_err(name)
            .to_string();
        assert!(e.contains(name) && !e.contains('\n'), "{e}");
        e
    };
    let e = refused("bomb.docx", &zip_bomb(64));
    assert!(e.contains("zip bomb") && e.contains("16 MiB"), "{e}");
    for (i, pdf) in hostile_pdfs().iter().enumerate() {
        refused(&format!("hostile{i}.pdf"), pdf);
    }
    // Templates: a runaway loop runs out of steps, unbounded output is cut, recursion is
    // bounded, and each error names where the template came from.
    let msgs = [homer_engine::Message::new("user", "Hi")];
    for (src, why) in [
        (HOSTILE_TEMPLATES[0], "fuel"),
        (HOSTILE_TEMPLATES[1], "writes more than"),
        (HOSTILE_TEMPLATES[2], "recursion"),
        (HOSTILE_TEMPLATES[3], "writes more than"),
        (HOSTILE_TEMPLATES[5], "refuses every conversation"),
    ] {
        let t =
            homer_engine::ChatTemplate::from_source(Some(src), "my/chat_template.jinja", "", "");
        let e = t.render(&msgs, true).unwrap_err().to_string();
        assert!(
            e.contains("my/chat_template.jinja") && e.contains(why),
            "{src}: {e}"
        );
    }
}
