//! The worker thread: it owns the engine (model, tokenizer) and does every slow thing — fetching
//! and loading the model, reading documents, counting tokens, prefilling and decoding — so the UI
//! thread never blocks. Commands go in over one channel, events come back over another, and each
//! event asks egui for a repaint. Cancellation is a shared flag the engine checks between layers
//! and between decoded tokens.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, Sender};

use eframe::egui;
use homer_engine::{
    Answer, AskParams, Document, Engine, ModelSummary, Progress, Skipped, citations,
};
use homer_model::{BackendKind, DeviceInfo};

/// Which model to load, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    /// None = the default model (fetched on first use).
    pub path: Option<PathBuf>,
    pub backend: BackendKind,
}

pub enum Command {
    Load(ModelChoice),
    /// Read a file (id chosen by the UI).
    Ingest {
        id: u64,
        path: PathBuf,
    },
    /// Count the tokens of a document read earlier (sent for every document after a load).
    Count {
        id: u64,
        doc: Arc<Document>,
    },
    Ask {
        question: String,
        docs: Vec<Arc<Document>>,
        params: Box<AskParams>,
    },
}

#[derive(Debug, Clone)]
pub struct Loaded {
    pub summary: ModelSummary,
    pub device: DeviceInfo,
    pub name: String,
}

/// Everything the UI keeps of one answered question.
#[derive(Debug, Clone)]
pub struct Finished {
    pub question: String,
    pub answer: Answer,
    pub docs: Vec<Arc<Document>>,
    pub citations: Vec<homer_engine::Citation>,
    /// The best-kept passages of every document (the kept-token view's "densest regions").
    pub dense: Vec<homer_engine::Citation>,
    /// (document, byte range) of every context token.
    pub token_bytes: Vec<(usize, std::ops::Range<usize>)>,
    /// The engine's document cache after the answer.
    pub doc_cache: homer_engine::DocCacheUsage,
}

pub enum Event {
    Fetch {
        message: String,
        done: u64,
        total: Option<u64>,
    },
    Loading {
        done: usize,
        total: usize,
    },
    Loaded(Box<Loaded>),
    LoadFailed(String),
    Ingested {
        id: u64,
        doc: Arc<Document>,
        tokens: Option<usize>,
    },
    Skipped {
        id: u64,
        skipped: Skipped,
    },
    /// Token counts of documents read before the model was loaded.
    Counted {
        id: u64,
        tokens: usize,
    },
    Prefill {
        done: usize,
        total: usize,
    },
    Homer(homer::HomerProgress),
    Token(String),
    Finished(Box<Finished>),
    /// The question was cancelled before its answer started.
    Cancelled,
    Failed(String),
}

/// How many citations an answer lists.
pub const CITATIONS: usize = 5;
/// How many dense regions the kept-token view offers (over all documents).
pub const DENSE: usize = 24;

pub struct Worker {
    pub tx: Sender<Command>,
    pub cancel: Arc<AtomicBool>,
}

impl Worker {
    /// `token_pace`: at least this long between streamed answer pieces (see
    /// [`crate::DeskOptions::token_pace`]).
    pub fn spawn(
        ctx: egui::Context,
        events: Sender<Event>,
        token_pace: Option<std::time::Duration>,
        doc_cache_dir: std::path::PathBuf,
    ) -> Worker {
        let (tx, rx) = std::sync::mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        std::thread::Builder::new()
            .name("homer-worker".into())
            .spawn(move || {
                run(
                    rx,
                    Out {
                        tx: events,
                        ctx,
                        token_pace,
                        doc_cache_dir,
                    },
                    c,
                )
            })
            .expect("spawning the worker thread");
        Worker { tx, cancel }
    }

    pub fn send(&self, c: Command) {
        // The worker only ends when the app drops its sender, so this cannot fail while the
        // app is alive.
        let _ = self.tx.send(c);
    }
}

struct Out {
    tx: Sender<Event>,
    ctx: egui::Context,
    token_pace: Option<std::time::Duration>,
    /// Where the engine keeps documents' leaves between runs of the app.
    doc_cache_dir: std::path::PathBuf,
}

impl Out {
    fn send(&self, e: Event) {
        let _ = self.tx.send(e);
        self.ctx.request_repaint();
    }
}

fn run(rx: Receiver<Command>, out: Out, cancel: Arc<AtomicBool>) {
    let mut engine: Option<Engine> = None;
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Load(choice) => {
                engine = None;
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Engine::load(choice.path.as_deref(), choice.backend, &mut |p| match p {
                        Progress::Fetch {
                            message,
                            done,
                            total,
                        } => out.send(Event::Fetch {
                            message,
                            done,
                            total,
                        }),
                        Progress::Load { done, total } => out.send(Event::Loading { done, total }),
                        _ => {}
                    })
                }));
                match result {
                    Ok(Ok(e)) => {
                        out.send(Event::Loaded(Box::new(Loaded {
                            name: e
                                .model_path
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                            summary: ModelSummary::from_config(
                                &e.model_path,
                                e.format.clone(),
                                &e.model.config,
                            ),
                            device: e.device.clone(),
                        })));
                        e.use_disk_cache(
                            out.doc_cache_dir.clone(),
                            homer_engine::DocCache::DEFAULT_DISK_BUDGET,
                        );
                        engine = Some(e);
                    }
                    Ok(Err(err)) => out.send(Event::LoadFailed(load_hint(&err.to_string()))),
                    Err(_) => out.send(Event::LoadFailed(
                        "loading the model crashed; check the file and try another backend".into(),
                    )),
                }
            }
            Command::Ingest { id, path } => match homer_engine::ingest(&path) {
                Ok(doc) => {
                    // Without a model the count comes with the next load (the app asks).
                    let doc = Arc::new(doc);
                    let tokens = engine.as_ref().and_then(|e| count(e, &doc));
                    out.send(Event::Ingested { id, doc, tokens });
                }
                Err(skipped) => out.send(Event::Skipped { id, skipped }),
            },
            Command::Count { id, doc } => {
                if let Some(tokens) = engine.as_ref().and_then(|e| count(e, &doc)) {
                    out.send(Event::Counted { id, tokens });
                }
            }
            Command::Ask {
                question,
                docs,
                params,
            } => {
                let Some(e) = engine.as_ref() else {
                    out.send(Event::Failed(
                        "no model is loaded yet: wait for it to load, or pick one in Settings"
                            .into(),
                    ));
                    continue;
                };
                ask(e, &out, &cancel, question, docs, &params);
            }
        }
    }
}

fn count(e: &Engine, doc: &Document) -> Option<usize> {
    e.tokenizer
        .encode(&doc.text, false)
        .ok()
        .map(|ids| ids.len())
}

fn ask(
    e: &Engine,
    out: &Out,
    cancel: &AtomicBool,
    question: String,
    docs: Vec<Arc<Document>>,
    params: &AskParams,
) {
    let owned: Vec<Document> = docs.iter().map(|d| (**d).clone()).collect();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.ask(
            &owned,
            &question,
            params,
            cancel,
            &mut |p| match p {
                Progress::Prefill { done, total } => out.send(Event::Prefill { done, total }),
                Progress::Homer(h) => out.send(Event::Homer(h)),
                _ => {}
            },
            &mut |t| {
                out.send(Event::Token(t.to_string()));
                if let Some(pace) = out.token_pace {
                    std::thread::sleep(pace);
                }
            },
        )
    }));
    match result {
        Ok(Ok(answer)) => {
            // The citations are the best of the dense regions (same ranking).
            let dense = answer
                .trace
                .as_ref()
                .map(|t| citations(&answer.prompt, &owned, t, DENSE))
                .unwrap_or_default();
            let cites = dense.iter().take(CITATIONS).cloned().collect();
            let token_bytes = homer_engine::citations::token_bytes(&answer.prompt, &owned);
            let doc_cache = e.doc_cache_lock().usage();
            out.send(Event::Finished(Box::new(Finished {
                question,
                answer,
                docs,
                citations: cites,
                dense,
                token_bytes,
                doc_cache,
            })));
        }
        Ok(Err(homer_engine::EngineError::Cancelled)) => out.send(Event::Cancelled),
        Ok(Err(err)) => out.send(Event::Failed(err.to_string())),
        Err(_) => out.send(Event::Failed(
            "answering crashed inside the engine; the model and documents are still loaded".into(),
        )),
    }
}

fn load_hint(msg: &str) -> String {
    if msg.contains("fetch") {
        format!(
            "{msg}\nThe default model is downloaded with pip from PyPI; check the network, or pick a GGUF file or HF directory in Settings."
        )
    } else {
        format!("{msg}\nPick another model file or backend in Settings.")
    }
}
