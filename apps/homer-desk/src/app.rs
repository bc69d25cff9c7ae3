//! The app: state, event handling and layout. Thin by design — every slow or file-touching step
//! is a [`Command`] to the worker; this file only draws and routes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use eframe::egui::{self, Color32, RichText, Ui};
use homer_engine::{
    AskParams, BiasChoice, ChatHistory, Document, Exchange, GenerateParams, HomerMode,
    SamplingParams, Skipped,
};
use homer_model::BackendKind;
use serde::{Deserialize, Serialize};

use crate::views::{self, KeptView};
use crate::worker::{Command, Event, Finished, Loaded, ModelChoice, Worker};

/// How the app is started (command line, tests).
#[derive(Debug, Clone)]
pub struct DeskOptions {
    /// Model on the command line; overrides the saved setting.
    pub model: Option<PathBuf>,
    pub backend: Option<BackendKind>,
    /// Where settings and the chat history live.
    pub data_dir: PathBuf,
    /// Load the model as soon as the app opens.
    pub load_on_start: bool,
    /// Hide timings (seconds, tokens/s) so screenshots are reproducible.
    pub hide_timings: bool,
    /// Take a screenshot once everything has settled (model loaded, documents read, the `ask`
    /// question answered), write it here as PNG and quit. With several `shot_tabs`, one PNG per
    /// tab: `NAME-chat.png`, `NAME-tree.png`, `NAME-kept.png`.
    pub screenshot: Option<PathBuf>,
    pub shot_tabs: Vec<Tab>,
    /// Ask this question once the model and the documents are ready.
    pub ask: Option<String>,
    /// Hold each streamed answer piece at least this long (the UI tests, whose tiny model
    /// answers faster than frames are drawn; None in the app).
    pub token_pace: Option<std::time::Duration>,
}

impl Default for DeskOptions {
    fn default() -> Self {
        DeskOptions {
            model: None,
            backend: None,
            data_dir: homer_engine::history::desk_dir(),
            load_on_start: true,
            hide_timings: false,
            screenshot: None,
            shot_tabs: vec![],
            ask: None,
            token_pace: None,
        }
    }
}

/// Settings the user changes in the Settings panel; saved as JSON beside the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Empty = the default model.
    pub model: String,
    /// auto, wgpu or cpu.
    pub backend: String,
    /// auto, always or never.
    pub homer: String,
    /// 0 = half the model's window.
    pub chunk_len: usize,
    /// None = the default for the model's depth.
    pub warmup_layers: Option<usize>,
    /// default, zeros or a path.
    pub bias: String,
    /// HOMER's selection: `default` (the engine's), `paper`, or knobs as `homer --selection`.
    pub selection: String,
    /// HOMER's root budget in rows; 0 = the selection's default (`homer_engine::default_budget`).
    pub budget: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            model: String::new(),
            backend: "auto".into(),
            homer: "auto".into(),
            chunk_len: 0,
            warmup_layers: None,
            bias: "default".into(),
            selection: "default".into(),
            budget: 0,
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: 256,
        }
    }
}

impl Settings {
    fn model_choice(&self) -> ModelChoice {
        ModelChoice {
            path: (!self.model.trim().is_empty()).then(|| PathBuf::from(self.model.trim())),
            backend: self.backend.parse().unwrap_or(BackendKind::Auto),
        }
    }

    fn ask_params(&self) -> AskParams {
        AskParams {
            mode: self.homer.parse().unwrap_or(HomerMode::Auto),
            chunk_len: (self.chunk_len > 0).then_some(self.chunk_len),
            warmup_layers: self.warmup_layers,
            bias: self.bias.parse().unwrap_or(BiasChoice::Default),
            selection: homer_engine::parse_selection(&self.selection)
                .unwrap_or(homer_engine::DEFAULT_SELECTION),
            budget: (self.budget > 0).then_some(self.budget),
            system: None,
            generate: GenerateParams {
                max_tokens: self.max_tokens.max(1),
                sampling: SamplingParams {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    ..SamplingParams::default()
                },
                ..GenerateParams::default()
            },
            reuse_document: true,
        }
    }
}

pub enum ModelState {
    Idle,
    Loading {
        message: String,
        fraction: Option<f32>,
    },
    Ready(Box<Loaded>),
    Failed(String),
}

pub struct DocEntry {
    pub id: u64,
    pub name: String,
    pub doc: Option<Arc<Document>>,
    pub tokens: Option<usize>,
    pub skipped: Option<Skipped>,
}

/// The question being answered.
pub struct Running {
    pub question: String,
    pub partial: String,
    pub started: Instant,
    pub first_token: Option<Instant>,
    pub tokens: usize,
    pub progress: Option<(f32, String)>,
    /// Names of the documents asked about.
    pub docs: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tab {
    Chat,
    Tree,
    Kept,
}

impl Tab {
    pub fn name(self) -> &'static str {
        match self {
            Tab::Chat => "chat",
            Tab::Tree => "tree",
            Tab::Kept => "kept",
        }
    }
}

impl std::str::FromStr for Tab {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "chat" => Ok(Tab::Chat),
            "tree" => Ok(Tab::Tree),
            "kept" => Ok(Tab::Kept),
            _ => Err(format!("`{s}`: expected chat, tree or kept")),
        }
    }
}

pub struct DeskApp {
    pub opts: DeskOptions,
    pub settings: Settings,
    pub model: ModelState,
    pub docs: Vec<DocEntry>,
    pub question: String,
    pub history: ChatHistory,
    pub running: Option<Running>,
    /// The last answered question (tree and kept-token views), with a counter for caches.
    pub last: Option<(u64, Box<Finished>)>,
    pub tab: Tab,
    pub selected_node: Option<usize>,
    pub view_doc: usize,
    pub errors: Vec<String>,
    pub show_settings: bool,
    /// Names of the wgpu adapters eframe found, and whether burn shares the renderer's device.
    pub adapters: Vec<String>,
    pub shared_device: Option<Result<String, String>>,
    kept_view: KeptView,
    /// Stopped runs whose last events are still to come from the worker, with the history
    /// entry each one completes (None when it was stopped before its answer began).
    stale: std::collections::VecDeque<Option<usize>>,
    /// The summary of the model file named in Settings, read once per path.
    model_info: Option<(String, Option<homer_engine::ModelSummary>)>,
    worker: Worker,
    events: Receiver<Event>,
    files_tx: Sender<Vec<PathBuf>>,
    files_rx: Receiver<Vec<PathBuf>>,
    next_id: u64,
    frames: u64,
    asked: bool,
    shots: Option<Vec<(Tab, PathBuf)>>,
    shot_frames: u32,
    screenshot_requested: bool,
    shot: Arc<std::sync::Mutex<Option<Arc<egui::ColorImage>>>>,
    /// The documents (by name) the last question that read them whole was about, and its
    /// prefill seconds: what later questions' document-cache notes compare with.
    read_once: Option<(Vec<String>, f64)>,
}

impl DeskApp {
    pub fn new(cc: &eframe::CreationContext<'_>, opts: DeskOptions) -> Self {
        let mut errors = vec![];
        let mut settings: Settings = std::fs::read_to_string(opts.data_dir.join("settings.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        if let Some(m) = &opts.model {
            settings.model = m.display().to_string();
        }
        if let Some(b) = opts.backend {
            settings.backend = b.to_string();
        }
        let history = match ChatHistory::load(&opts.data_dir.join("history.json")) {
            Ok(h) => h,
            Err(e) => {
                errors.push(e.to_string());
                ChatHistory::default()
            }
        };
        // One GPU device: hand the renderer's wgpu device to burn (unless the CPU is asked for).
        let mut adapters = vec![];
        let mut shared_device = None;
        if let Some(rs) = &cc.wgpu_render_state {
            adapters = rs
                .available_adapters
                .iter()
                .map(|a| {
                    let i = a.get_info();
                    format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
                })
                .collect();
            if settings.backend != "cpu" {
                let name = rs.adapter.get_info().name;
                homer_engine::fetch::use_home_for_kernel_cache();
                shared_device = Some(
                    homer_model::backend::share_wgpu(
                        rs.instance.clone(),
                        rs.adapter.clone(),
                        rs.device.clone(),
                        rs.queue.clone(),
                    )
                    .map(|_| name)
                    .map_err(|e| e.to_string()),
                );
                match &shared_device {
                    Some(Ok(n)) => tracing::info!("burn shares the window's wgpu device ({n})"),
                    Some(Err(e)) => tracing::warn!("burn opens its own wgpu device: {e}"),
                    None => {}
                }
            }
        }
        let (etx, erx) = std::sync::mpsc::channel();
        let worker = Worker::spawn(
            cc.egui_ctx.clone(),
            etx,
            opts.token_pace,
            opts.data_dir.join("doc-cache"),
        );
        let (files_tx, files_rx) = std::sync::mpsc::channel();
        let mut app = DeskApp {
            settings,
            model: ModelState::Idle,
            docs: vec![],
            question: String::new(),
            history,
            running: None,
            last: None,
            tab: Tab::Chat,
            selected_node: None,
            view_doc: 0,
            errors,
            show_settings: false,
            adapters,
            shared_device,
            kept_view: KeptView::default(),
            stale: Default::default(),
            read_once: None,
            model_info: None,
            worker,
            events: erx,
            files_tx,
            files_rx,
            next_id: 0,
            frames: 0,
            asked: false,
            shots: None,
            shot_frames: 0,
            screenshot_requested: false,
            shot: Default::default(),
            opts,
        };
        if app.opts.load_on_start {
            app.load_model();
        }
        app
    }

    pub fn load_model(&mut self) {
        self.model = ModelState::Loading {
            message: "starting".into(),
            fraction: None,
        };
        self.worker
            .send(Command::Load(self.settings.model_choice()));
        self.save_settings();
    }

    fn save_settings(&mut self) {
        let p = self.opts.data_dir.join("settings.json");
        let r = std::fs::create_dir_all(&self.opts.data_dir).and_then(|_| {
            std::fs::write(
                &p,
                serde_json::to_string_pretty(&self.settings).unwrap_or_default(),
            )
        });
        if let Err(e) = r {
            self.errors
                .push(format!("{}: cannot save the settings: {e}", p.display()));
        }
    }

    /// Queue files for reading (drop, file dialog, tests).
    pub fn add_files(&mut self, paths: Vec<PathBuf>) {
        for path in paths {
            let id = self.next_id;
            self.next_id += 1;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            self.docs.push(DocEntry {
                id,
                name,
                doc: None,
                tokens: None,
                skipped: None,
            });
            self.worker.send(Command::Ingest { id, path });
        }
    }

    pub fn ask(&mut self) {
        let question = self.question.trim().to_string();
        let docs: Vec<Arc<Document>> = self.docs.iter().filter_map(|d| d.doc.clone()).collect();
        if question.is_empty() || self.running.is_some() {
            return;
        }
        if docs.is_empty() {
            self.errors
                .push("add a document first: drop files on the window or use Add files…".into());
            return;
        }
        if !matches!(self.model, ModelState::Ready(_)) {
            self.errors
                .push("the model is not loaded yet; wait for it or pick one in Settings".into());
            return;
        }
        self.running = Some(Running {
            question: question.clone(),
            partial: String::new(),
            started: Instant::now(),
            first_token: None,
            tokens: 0,
            progress: None,
            docs: docs.iter().map(|d| d.name.clone()).collect(),
        });
        self.question.clear();
        // Cleared here, not in the worker: a Stop pressed while the question still waits in
        // the worker's queue must not be lost.
        self.worker.cancel.store(false, Ordering::Relaxed);
        self.worker.send(Command::Ask {
            question,
            docs,
            params: Box::new(self.settings.ask_params()),
        });
        self.save_settings();
    }

    /// Stop the running question. The UI is free at once: the answer so far goes into the
    /// history, and the worker's remaining events for that run (it ends within one layer or one
    /// token) only complete its record.
    pub fn stop(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        self.worker.cancel.store(true, Ordering::Relaxed);
        if r.partial.is_empty() {
            self.errors
                .push(format!("Stopped before the answer began: “{}”", r.question));
            self.stale.push_back(None);
        } else {
            self.history.exchanges.push(Exchange {
                question: r.question,
                answer: r.partial,
                docs: r.docs,
                used_homer: false,
                prompt_tokens: 0,
                cache_len: 0,
                stop: "cancelled".into(),
                prefill_secs: r.first_token.map_or(0.0, |t| (t - r.started).as_secs_f64()),
                decode_tokens_per_sec: r.first_token.map_or(0.0, |t| {
                    r.tokens.saturating_sub(1) as f64 / t.elapsed().as_secs_f64().max(1e-9)
                }),
                citations: vec![],
                when: homer_engine::history::now(),
                doc_cache: None,
            });
            self.save_history();
            self.stale.push_back(Some(self.history.exchanges.len() - 1));
        }
    }

    /// Whether the worker is still answering (a running question, or a stopped one finishing).
    pub fn busy(&self) -> bool {
        self.running.is_some() || !self.stale.is_empty()
    }

    pub fn token_total(&self) -> usize {
        self.docs.iter().filter_map(|d| d.tokens).sum()
    }

    fn handle(&mut self, e: Event) {
        if !self.stale.is_empty() {
            match e {
                // Progress of a stopped run: nothing to show.
                Event::Prefill { .. } | Event::Homer(_) | Event::Token(_) => return,
                Event::Finished(f) => {
                    // Complete the stopped exchange's record; keep its trace for the views.
                    if let Some(Some(i)) = self.stale.pop_front() {
                        if let Some(ex) = self.history.exchanges.get_mut(i) {
                            let g = &f.answer.generation;
                            ex.used_homer = f.answer.used_homer;
                            ex.prompt_tokens = g.prompt_tokens;
                            ex.cache_len = f.answer.cache_len;
                            ex.prefill_secs = g.prefill_secs;
                            ex.citations = f.citations.clone();
                        }
                        self.save_history();
                        let n = self.last.as_ref().map_or(0, |l| l.0 + 1);
                        self.last = Some((n, f));
                        self.selected_node = None;
                        self.view_doc = 0;
                    }
                    return;
                }
                Event::Cancelled | Event::Failed(_) => {
                    self.stale.pop_front();
                    return;
                }
                _ => {}
            }
        }
        match e {
            Event::Fetch {
                message,
                done,
                total,
            } => {
                self.model = ModelState::Loading {
                    message,
                    fraction: total.map(|t| done as f32 / t.max(1) as f32),
                }
            }
            Event::Loading { done, total } => {
                self.model = ModelState::Loading {
                    message: "loading weights".into(),
                    fraction: Some(done as f32 / total.max(1) as f32),
                }
            }
            Event::Loaded(l) => {
                self.model = ModelState::Ready(l);
                // Token counts belong to a tokenizer: (re)count every document read so far.
                for d in &self.docs {
                    if let Some(doc) = &d.doc {
                        self.worker.send(Command::Count {
                            id: d.id,
                            doc: doc.clone(),
                        });
                    }
                }
            }
            Event::LoadFailed(m) => {
                self.errors
                    .push(format!("The model could not be loaded: {m}"));
                self.model = ModelState::Failed(m);
            }
            Event::Ingested { id, doc, tokens } => {
                if let Some(d) = self.docs.iter_mut().find(|d| d.id == id) {
                    d.name = doc.name.clone();
                    d.doc = Some(doc);
                    d.tokens = tokens;
                }
            }
            Event::Skipped { id, skipped } => {
                if let Some(d) = self.docs.iter_mut().find(|d| d.id == id) {
                    d.skipped = Some(skipped);
                }
            }
            Event::Counted { id, tokens } => {
                if let Some(d) = self.docs.iter_mut().find(|d| d.id == id) {
                    d.tokens = Some(tokens);
                }
            }
            Event::Prefill { done, total } => {
                if let Some(r) = &mut self.running {
                    r.progress = Some((
                        done as f32 / total.max(1) as f32,
                        format!("reading the prompt: {done} / {total} tokens"),
                    ));
                }
            }
            Event::Homer(h) => {
                if let Some(r) = &mut self.running {
                    let what = match h.leaf {
                        Some(l) => format!("leaf {} / {}", l + 1, h.n_chunks),
                        None => format!("merge level {} / {}", h.height, h.tree_height),
                    };
                    r.progress = Some((
                        h.done as f32 / h.total.max(1) as f32,
                        format!(
                            "HOMER: {what}, layer {}, rows {} -> {}",
                            h.layer, h.rows_in, h.rows_out
                        ),
                    ));
                }
            }
            Event::Token(t) => {
                if let Some(r) = &mut self.running {
                    r.first_token.get_or_insert_with(Instant::now);
                    r.tokens += 1;
                    r.partial.push_str(&t);
                }
            }
            Event::Finished(f) => {
                let g = &f.answer.generation;
                let names: Vec<String> = f.docs.iter().map(|d| d.name.clone()).collect();
                let note = f.answer.doc_reuse.and_then(|r| {
                    // The question that read the documents sets the time later ones beat.
                    if r.stored > 0 && r.reused == 0 {
                        self.read_once = Some((names.clone(), g.prefill_secs));
                    }
                    let first = self
                        .read_once
                        .as_ref()
                        .filter(|(d, _)| *d == names && !self.opts.hide_timings)
                        .map(|(_, secs)| *secs);
                    homer_engine::reuse_note(&r, &f.doc_cache, first, g.prefill_secs)
                });
                let stop = serde_json::to_value(g.stop)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                self.history.exchanges.push(Exchange {
                    question: f.question.clone(),
                    answer: g.text.clone(),
                    docs: f.docs.iter().map(|d| d.name.clone()).collect(),
                    used_homer: f.answer.used_homer,
                    prompt_tokens: g.prompt_tokens,
                    cache_len: f.answer.cache_len,
                    stop,
                    prefill_secs: g.prefill_secs,
                    decode_tokens_per_sec: g.decode_tokens_per_sec(),
                    citations: f.citations.clone(),
                    when: homer_engine::history::now(),
                    doc_cache: note,
                });
                self.save_history();
                let n = self.last.as_ref().map_or(0, |l| l.0 + 1);
                self.last = Some((n, f));
                self.selected_node = None;
                self.view_doc = 0;
                self.running = None;
            }
            Event::Cancelled => {
                if let Some(r) = self.running.take() {
                    self.errors
                        .push(format!("Stopped before the answer began: “{}”", r.question));
                }
            }
            Event::Failed(m) => {
                self.running = None;
                self.errors.push(m);
            }
        }
    }

    fn save_history(&mut self) {
        if let Err(e) = self.history.save(&self.opts.data_dir.join("history.json")) {
            self.errors.push(e.to_string());
        }
    }

    fn pick_files(&self) {
        let tx = self.files_tx.clone();
        // rfd's dialog blocks its thread; never the UI thread.
        std::thread::spawn(move || {
            if let Some(files) = rfd::FileDialog::new()
                .add_filter("Documents", &["txt", "md", "markdown", "pdf", "docx"])
                .add_filter("All files", &["*"])
                .pick_files()
            {
                let _ = tx.send(files);
            }
        });
    }

    fn pick_model(&self, ctx: &egui::Context) {
        let ctx = ctx.clone();
        let tx = self.files_tx.clone();
        std::thread::spawn(move || {
            if let Some(f) = rfd::FileDialog::new()
                .add_filter("GGUF model", &["gguf"])
                .pick_file()
            {
                // A single path marked by an empty sentinel first: see `poll_files`.
                let _ = tx.send(vec![PathBuf::new(), f]);
                ctx.request_repaint();
            }
        });
    }

    fn poll(&mut self, ctx: &egui::Context) {
        while let Ok(e) = self.events.try_recv() {
            self.handle(e);
        }
        while let Ok(files) = self.files_rx.try_recv() {
            if files.first().is_some_and(|p| p.as_os_str().is_empty()) {
                if let Some(m) = files.get(1) {
                    self.settings.model = m.display().to_string();
                }
            } else {
                self.add_files(files);
            }
        }
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .collect()
        });
        if !dropped.is_empty() {
            self.add_files(dropped);
        }
    }
}

impl eframe::App for DeskApp {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        self.poll(&ctx);
        self.frames += 1;

        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        if !self.errors.is_empty() {
            egui::Panel::top("errors").show(ui, |ui| self.error_list(ui));
        }
        egui::Panel::left("documents")
            .default_size(280.0)
            .resizable(true)
            .show(ui, |ui| self.documents(ui));
        if self.show_settings {
            egui::Panel::right("settings")
                .default_size(300.0)
                .show(ui, |ui| self.settings_panel(ui));
        }
        if self.tab == Tab::Chat {
            egui::Panel::bottom("ask").show(ui, |ui| self.ask_bar(ui));
        }
        egui::CentralPanel::default().show(ui, |ui| match self.tab {
            Tab::Chat => self.chat(ui),
            Tab::Tree => self.tree_tab(ui),
            Tab::Kept => self.kept_tab(ui),
        });
        self.drop_overlay(&ctx);
        self.ask_on_start();
        self.screenshot(&ctx);
        if self.running.is_some() {
            ctx.request_repaint_after(std::time::Duration::from_millis(250));
        }
    }
}

impl DeskApp {
    fn top_bar(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            ui.heading("homer");
            ui.separator();
            ui.selectable_value(&mut self.tab, Tab::Chat, "Chat");
            ui.selectable_value(&mut self.tab, Tab::Tree, "Merge tree");
            ui.selectable_value(&mut self.tab, Tab::Kept, "Kept tokens");
            ui.separator();
            ui.toggle_value(&mut self.show_settings, "Settings");
            ui.separator();
            match &self.model {
                ModelState::Idle => {
                    ui.label("no model loaded");
                }
                ModelState::Loading { message, fraction } => {
                    ui.spinner();
                    match fraction {
                        Some(f) => ui.add(
                            egui::ProgressBar::new(*f)
                                .desired_width(160.0)
                                .text(format!("model: {message}")),
                        ),
                        None => ui.label(format!("model: {message}")),
                    };
                }
                ModelState::Ready(l) => {
                    ui.label(format!(
                        "{} · {} params · {} on {} · window {}",
                        l.name,
                        count(l.summary.params),
                        l.device.backend,
                        l.device.adapter,
                        l.summary.window
                    ));
                }
                ModelState::Failed(_) => {
                    ui.colored_label(Color32::RED, "model failed to load (see above)");
                }
            }
        });
    }

    fn error_list(&mut self, ui: &mut Ui) {
        let mut close = None;
        for (i, e) in self.errors.iter().enumerate() {
            ui.horizontal(|ui| {
                if ui.small_button("×").on_hover_text("Dismiss").clicked() {
                    close = Some(i);
                }
                ui.colored_label(Color32::from_rgb(220, 90, 60), e.as_str());
            });
        }
        if let Some(i) = close {
            self.errors.remove(i);
        }
    }

    fn documents(&mut self, ui: &mut Ui) {
        ui.heading("Documents");
        ui.horizontal(|ui| {
            if ui.button("Add files…").clicked() {
                self.pick_files();
            }
            if ui
                .add_enabled(!self.docs.is_empty(), egui::Button::new("Clear"))
                .clicked()
            {
                self.docs.clear();
            }
        });
        ui.label(RichText::new("or drop .txt, .md, .pdf, .docx files on the window").weak());
        ui.separator();
        let mut remove = None;
        egui::ScrollArea::vertical()
            .id_salt("doc-list")
            .max_height(ui.available_height() - 60.0)
            .show(ui, |ui| {
                for (i, d) in self.docs.iter().enumerate() {
                    ui.horizontal(|ui| {
                        if ui.small_button("×").on_hover_text("Remove").clicked() {
                            remove = Some(i);
                        }
                        match (&d.doc, &d.skipped) {
                            (_, Some(s)) => {
                                ui.colored_label(Color32::from_rgb(220, 90, 60), &d.name)
                                    .on_hover_text(s.to_string());
                            }
                            (Some(doc), None) => {
                                ui.label(&d.name);
                                ui.label(
                                    RichText::new(format!(
                                        "{} · {}",
                                        size(doc.file_bytes.max(doc.text.len() as u64)),
                                        match d.tokens {
                                            Some(t) => format!("{t} tokens"),
                                            None => "… tokens".into(),
                                        }
                                    ))
                                    .weak(),
                                );
                            }
                            (None, None) => {
                                ui.spinner();
                                ui.label(&d.name);
                            }
                        }
                    });
                    if let Some(s) = &d.skipped {
                        ui.label(
                            RichText::new(format!("skipped: {}", s.reason))
                                .small()
                                .color(Color32::from_rgb(220, 90, 60)),
                        );
                    }
                }
            });
        if let Some(i) = remove {
            self.docs.remove(i);
        }
        ui.separator();
        let total = self.token_total();
        if let ModelState::Ready(l) = &self.model {
            let window = l.summary.window;
            let text = format!(
                "{total} tokens in {} document(s) · window {window}",
                self.docs.iter().filter(|d| d.doc.is_some()).count()
            );
            // HOMER's auto mode: the documents plus the answer budget must fit the window
            // (the instruction and question add a few dozen tokens more).
            let budget = self.settings.max_tokens;
            ui.label(text);
            match self.settings.homer.as_str() {
                "never" => {
                    ui.label(RichText::new("HOMER off: the prompt is read as one").weak());
                }
                "always" => {
                    ui.label(RichText::new("HOMER on for every question").weak());
                }
                _ if total > window => {
                    ui.label(
                        RichText::new(format!(
                            "{:.1}× the window: HOMER will merge it",
                            total as f64 / window as f64
                        ))
                        .color(Color32::from_rgb(230, 160, 40)),
                    );
                }
                _ if total + budget > window => {
                    ui.label(
                        RichText::new(format!(
                            "with a {budget}-token answer it exceeds the window: HOMER will merge it"
                        ))
                        .color(Color32::from_rgb(230, 160, 40)),
                    );
                }
                _ => {
                    ui.label(RichText::new("fits in the window").weak());
                }
            }
        } else {
            ui.label(format!("{total} tokens"));
        }
    }

    fn ask_bar(&mut self, ui: &mut Ui) {
        if let Some(r) = &self.running {
            if let Some((f, what)) = &r.progress {
                if r.first_token.is_none() {
                    ui.add(egui::ProgressBar::new(*f).text(what.as_str()));
                }
            } else if r.first_token.is_none() {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("preparing the prompt…");
                });
            }
            if let Some(t0) = r.first_token {
                let secs = t0.elapsed().as_secs_f64();
                if self.opts.hide_timings {
                    ui.label(format!("answering: {} tokens", r.tokens));
                } else {
                    ui.label(format!(
                        "answering: {} tokens · {:.1} tokens/s",
                        r.tokens,
                        if secs > 0.0 {
                            r.tokens as f64 / secs
                        } else {
                            0.0
                        }
                    ));
                }
            }
        }
        ui.horizontal(|ui| {
            let label = ui.label("Question");
            let running = self.running.is_some();
            let edit = ui
                .add_sized(
                    [ui.available_width() - 80.0, 24.0],
                    egui::TextEdit::singleline(&mut self.question)
                        .hint_text("Ask about the documents…"),
                )
                .labelled_by(label.id);
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if running {
                if ui.button("Stop").clicked() {
                    self.stop();
                }
            } else if ui
                .add_enabled(!self.question.trim().is_empty(), egui::Button::new("Ask"))
                .clicked()
                || enter
            {
                self.ask();
            }
        });
    }

    fn chat(&mut self, ui: &mut Ui) {
        let n = self.history.exchanges.len();
        let last_run = self.last.as_ref().map(|l| l.0);
        let mut jump = None;
        let mut clear = false;
        egui::ScrollArea::vertical()
            .id_salt("chat")
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                if n == 0 && self.running.is_none() {
                    ui.label("Add documents on the left, then ask a question below. When the documents are longer than the model's window, HOMER merges them chunk by chunk; the Merge tree and Kept tokens tabs then show what the model kept.");
                }
                for (i, ex) in self.history.exchanges.iter().enumerate() {
                    ui.label(RichText::new(format!("Q: {}", ex.question)).strong());
                    ui.label(&ex.answer);
                    let mut meta = format!(
                        "{} · {} prompt tokens -> {} cache rows{} · stop: {}",
                        ex.docs.join(", "),
                        ex.prompt_tokens,
                        ex.cache_len,
                        if ex.used_homer { " (HOMER)" } else { "" },
                        ex.stop
                    );
                    if !self.opts.hide_timings {
                        meta += &format!(
                            " · prefill {:.1} s · {:.1} tokens/s",
                            ex.prefill_secs, ex.decode_tokens_per_sec
                        );
                    }
                    if let Some(note) = &ex.doc_cache {
                        meta += &format!(" · {note}");
                    }
                    ui.label(RichText::new(meta).small().weak());
                    if !ex.citations.is_empty() {
                        ui.label(RichText::new("Passages the model kept most of (those matching the question first):").small());
                        let live = i + 1 == n && last_run.is_some();
                        for c in &ex.citations {
                            let place = match c.page {
                                Some(p) => format!("{} p. {} line {}", c.name, p, c.line),
                                None => format!("{} line {}", c.name, c.line),
                            };
                            let text = format!(
                                "{place} · {:.0}% kept — {}",
                                c.density() * 100.0,
                                c.text
                            );
                            if ui
                                .add_enabled(live, egui::Button::new(RichText::new(text).small()).wrap())
                                .on_hover_text("Show this passage in the Kept tokens view")
                                .clicked()
                            {
                                jump = Some((c.doc, c.bytes.start));
                            }
                        }
                    }
                    ui.separator();
                }
                if let Some(r) = &self.running {
                    ui.label(RichText::new(format!("Q: {}", r.question)).strong());
                    ui.label(if r.partial.is_empty() { "…" } else { r.partial.as_str() });
                }
                if n > 0 && !self.busy() && ui.small_button("Clear history").clicked() {
                    clear = true;
                }
            });
        if let Some((doc, at)) = jump {
            self.tab = Tab::Kept;
            self.selected_node = None;
            self.view_doc = doc;
            self.kept_view.scroll_to = Some(at);
        }
        if clear {
            self.history.exchanges.clear();
            self.save_history();
        }
    }

    fn tree_tab(&mut self, ui: &mut Ui) {
        let Some((_, run)) = &self.last else {
            ui.label("Ask a question first: the merge tree of its prefill appears here.");
            return;
        };
        if let Some(sel) = self.selected_node {
            ui.horizontal(|ui| {
                ui.label(format!("selected: node {sel}"));
                if ui.small_button("Show its tokens").clicked() {
                    self.tab = Tab::Kept;
                }
                if ui.small_button("Clear selection").clicked() {
                    self.selected_node = None;
                }
            });
        }
        egui::ScrollArea::both().id_salt("tree").show(ui, |ui| {
            if let Some(c) = views::tree(ui, run, self.selected_node) {
                self.selected_node = if self.selected_node == Some(c) {
                    None
                } else {
                    Some(c)
                };
            }
        });
    }

    fn kept_tab(&mut self, ui: &mut Ui) {
        let Some((run_id, run)) = &self.last else {
            ui.label("Ask a question first: the document, coloured by what the model kept, appears here.");
            return;
        };
        let run_id = *run_id;
        if self.view_doc >= run.docs.len() {
            self.view_doc = 0;
        }
        ui.horizontal(|ui| {
            if run.docs.len() > 1 {
                egui::ComboBox::from_label("Document")
                    .selected_text(run.docs[self.view_doc].name.clone())
                    .show_ui(ui, |ui| {
                        for (i, d) in run.docs.iter().enumerate() {
                            ui.selectable_value(&mut self.view_doc, i, &d.name);
                        }
                    });
            }
            match self.selected_node {
                Some(n) => {
                    ui.label(format!("showing node {n}: green = kept by it, red = dropped by it, grey = not under it"));
                    if ui.small_button("Show the final cache").clicked() {
                        self.selected_node = None;
                    }
                }
                None => {
                    ui.label("green = in the final cache (brighter = higher significance), red = dropped");
                }
            }
        });
        if let Some(trace) = &run.answer.trace {
            let kept = trace.kept.len();
            ui.label(format!(
                "{kept} of {} context tokens kept ({:.0}%)",
                trace.context_len,
                100.0 * kept as f64 / trace.context_len.max(1) as f64
            ));
            let dense: Vec<_> = run
                .dense
                .iter()
                .filter(|c| c.doc == self.view_doc)
                .take(8)
                .collect();
            if !dense.is_empty() {
                ui.horizontal_wrapped(|ui| {
                    ui.label("Densest kept regions:");
                    for c in dense {
                        if ui
                            .small_button(format!("line {} ({:.0}%)", c.line, c.density() * 100.0))
                            .on_hover_text(&c.text)
                            .clicked()
                        {
                            self.kept_view.scroll_to = Some(c.bytes.start);
                        }
                    }
                });
            }
        }
        ui.separator();
        let (doc, node) = (self.view_doc, self.selected_node);
        if let Some((_, run)) = &self.last {
            self.kept_view.show(ui, run, doc, node, run_id);
        }
    }

    fn settings_panel(&mut self, ui: &mut Ui) {
        ui.heading("Settings");
        egui::ScrollArea::vertical().id_salt("settings").show(ui, |ui| {
            ui.label(RichText::new("Model").strong());
            let mut pick = false;
            ui.horizontal(|ui| {
                let l = ui.label("File");
                ui.add(
                    egui::TextEdit::singleline(&mut self.settings.model)
                        .hint_text("default: SmolLM2-135M-Instruct")
                        .desired_width(170.0),
                )
                .labelled_by(l.id);
                pick = ui.small_button("…").on_hover_text("Pick a GGUF file").clicked();
            });
            if pick {
                self.pick_model(ui.ctx());
            }
            ui.label(RichText::new("A GGUF file or a Hugging Face model directory; empty = the default model (fetched on first use).").small().weak());
            let path = self.settings.model.trim().to_string();
            if self.model_info.as_ref().is_none_or(|(p, _)| *p != path) {
                let s = (!path.is_empty())
                    .then(|| homer_engine::ModelSummary::of(std::path::Path::new(&path)).ok())
                    .flatten();
                self.model_info = Some((path, s));
            }
            match self.model_info.as_ref().and_then(|(_, s)| s.as_ref()) {
                Some(s) => {
                    ui.label(format!(
                        "{} parameters · {} · about {} for weights + a full {}-token cache",
                        count(s.params),
                        s.format,
                        size(s.memory_estimate(s.window)),
                        s.window
                    ));
                }
                _ => {
                    if let ModelState::Ready(l) = &self.model {
                        ui.label(format!(
                            "loaded: {} parameters · about {} for weights + a full {}-token cache",
                            count(l.summary.params),
                            size(l.summary.memory_estimate(l.summary.window)),
                            l.summary.window
                        ));
                    }
                }
            }
            ui.label(RichText::new("Backend").strong());
            ui.horizontal(|ui| {
                for (v, t) in [("auto", "Auto"), ("wgpu", "GPU (wgpu)"), ("cpu", "CPU")] {
                    ui.radio_value(&mut self.settings.backend, v.to_string(), t);
                }
            });
            match &self.shared_device {
                Some(Ok(name)) => {
                    ui.label(RichText::new(format!("wgpu shares the window's device: {name}")).small());
                }
                Some(Err(e)) => {
                    ui.label(RichText::new(format!("wgpu opens its own device ({e})")).small());
                }
                None => {}
            }
            if !self.adapters.is_empty() {
                ui.collapsing("Adapters found", |ui| {
                    for a in &self.adapters {
                        ui.label(RichText::new(a).small());
                    }
                });
            }
            if ui.button("Load model").clicked() {
                self.load_model();
            }
            ui.separator();
            ui.label(RichText::new("HOMER").strong());
            ui.horizontal(|ui| {
                for v in ["auto", "always", "never"] {
                    ui.radio_value(&mut self.settings.homer, v.to_string(), v);
                }
            });
            ui.horizontal(|ui| {
                ui.label("Chunk length");
                ui.add(egui::DragValue::new(&mut self.settings.chunk_len).range(0..=131072));
                ui.label(RichText::new("0 = half the window").small().weak());
            });
            ui.horizontal(|ui| {
                let mut custom = self.settings.warmup_layers.is_some();
                ui.checkbox(&mut custom, "Warm-up layers");
                if custom {
                    let mut w = self.settings.warmup_layers.unwrap_or(0);
                    ui.add(egui::DragValue::new(&mut w).range(0..=256));
                    self.settings.warmup_layers = Some(w);
                } else {
                    self.settings.warmup_layers = None;
                    ui.label(RichText::new("default for the model's depth").small().weak());
                }
            });
            ui.horizontal(|ui| {
                let l = ui.label("Bias");
                ui.add(egui::TextEdit::singleline(&mut self.settings.bias).desired_width(150.0))
                    .labelled_by(l.id);
            });
            ui.label(RichText::new("default (the shipped table), zeros, or a .safetensors path from `homer calibrate`").small().weak());
            ui.horizontal(|ui| {
                let l = ui.label("Selection");
                ui.add(egui::TextEdit::singleline(&mut self.settings.selection).desired_width(150.0))
                    .labelled_by(l.id);
            });
            match homer_engine::parse_selection(&self.settings.selection) {
                Ok(s) => ui.label(RichText::new(format!("which tokens merging keeps: {s} (default, paper, or knobs such as sentence,query=suffix)")).small().weak()),
                Err(e) => ui.label(RichText::new(e).small().color(egui::Color32::from_rgb(200, 60, 60))),
            };
            ui.horizontal(|ui| {
                ui.label("Budget");
                ui.add(egui::DragValue::new(&mut self.settings.budget).range(0..=131072));
                ui.label(RichText::new(format!("tokens HOMER keeps in the end; 0 = the selection's default ({})", homer_engine::parse_selection(&self.settings.selection).ok().and_then(|s| homer_engine::default_budget(&s)).map_or("the chunk length".to_string(), |b| b.to_string()))).small().weak());
            });
            ui.separator();
            ui.label(RichText::new("Sampling").strong());
            ui.add(egui::Slider::new(&mut self.settings.temperature, 0.0..=2.0).text("temperature (0 = greedy)"));
            ui.add(egui::Slider::new(&mut self.settings.top_p, 0.05..=1.0).text("top-p"));
            ui.add(egui::Slider::new(&mut self.settings.max_tokens, 1..=4096).text("max tokens").logarithmic(true));
        });
    }

    fn drop_overlay(&self, ctx: &egui::Context) {
        let hovering = ctx.input(|i| !i.raw.hovered_files.is_empty());
        if !hovering {
            return;
        }
        let screen = ctx.content_rect();
        let painter = ctx.layer_painter(egui::LayerId::new(
            egui::Order::Foreground,
            egui::Id::unique("drop-overlay"),
        ));
        painter.rect_filled(screen, 0.0, Color32::from_black_alpha(190));
        let names: Vec<String> = ctx.input(|i| {
            i.raw
                .hovered_files
                .iter()
                .filter_map(|f| f.path.as_ref())
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect()
        });
        painter.text(
            screen.center(),
            egui::Align2::CENTER_CENTER,
            format!(
                "Drop to add {}",
                if names.is_empty() {
                    "the files".into()
                } else {
                    names.join(", ")
                }
            ),
            egui::FontId::proportional(26.0),
            Color32::WHITE,
        );
    }

    /// Whether the model, the documents and the `ask` question are all done.
    fn settled(&self) -> bool {
        let model = !matches!(self.model, ModelState::Loading { .. } | ModelState::Idle)
            || !self.opts.load_on_start;
        let docs = self.docs.iter().all(|d| {
            d.skipped.is_some()
                || (d.doc.is_some()
                    && (d.tokens.is_some() || !matches!(self.model, ModelState::Ready(_))))
        });
        let asked = self.opts.ask.is_none()
            || (self.asked && !self.busy())
            || matches!(self.model, ModelState::Failed(_));
        model && docs && asked
    }

    /// `--ask`: put the question once the model is ready and the documents are read.
    fn ask_on_start(&mut self) {
        if self.asked || self.running.is_some() {
            return;
        }
        let Some(q) = self.opts.ask.clone() else {
            return;
        };
        let docs_read = !self.docs.is_empty()
            && self
                .docs
                .iter()
                .all(|d| d.skipped.is_some() || d.tokens.is_some());
        if matches!(self.model, ModelState::Ready(_)) && docs_read {
            self.asked = true;
            self.question = q;
            self.ask();
        }
    }

    /// `--screenshot`: once settled, capture each requested tab, write the PNGs and close.
    fn screenshot(&mut self, ctx: &egui::Context) {
        let Some(path) = self.opts.screenshot.clone() else {
            return;
        };
        if !self.settled() || self.frames < 5 {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
            return;
        }
        let shots = self.shots.get_or_insert_with(|| {
            let tabs = if self.opts.shot_tabs.is_empty() {
                vec![self.tab]
            } else {
                self.opts.shot_tabs.clone()
            };
            let many = tabs.len() > 1;
            tabs.into_iter()
                .map(|t| {
                    let p = if many {
                        let stem = path
                            .file_stem()
                            .map_or("shot".into(), |s| s.to_string_lossy().into_owned());
                        path.with_file_name(format!("{stem}-{}.png", t.name()))
                    } else {
                        path.clone()
                    };
                    (t, p)
                })
                .collect()
        });
        let Some((tab, out)) = shots.first().cloned() else {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return;
        };
        let taken = self.shot.lock().expect("screenshot slot").take();
        if let Some(img) = taken {
            let [w, h] = img.size;
            let bytes: Vec<u8> = img.pixels.iter().flat_map(|p| p.to_array()).collect();
            if let Err(e) =
                image::save_buffer(&out, &bytes, w as u32, h as u32, image::ColorType::Rgba8)
            {
                eprintln!("{}: cannot write the screenshot: {e}", out.display());
            }
            shots.remove(0);
            self.screenshot_requested = false;
            self.shot_frames = 0;
            ctx.request_repaint();
            return;
        }
        if self.screenshot_requested {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
            return;
        }
        self.tab = tab;
        // A few frames on the tab first, so its layout (and scroll areas) settle.
        self.shot_frames += 1;
        if self.shot_frames < 4 {
            ctx.request_repaint();
            return;
        }
        self.screenshot_requested = true;
        let slot = self.shot.clone();
        let c = ctx.clone();
        ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
            egui::ScreenshotCallback::new(move |img| {
                *slot.lock().expect("screenshot slot") = Some(img);
                c.request_repaint();
            }),
        ));
        ctx.request_repaint();
    }
}

/// 135M, 1.7B, 105K.
fn count(n: usize) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.1}B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.0}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.0}K", f / 1e3)
    } else {
        n.to_string()
    }
}

fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} KB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}
