//! `homer-desk`: the desktop app. `homer-desk --help` for the options.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use homer_desk::{DeskApp, DeskOptions};
use homer_model::BackendKind;

#[derive(Parser)]
#[command(
    name = "homer-desk",
    version,
    about = "Ask a local model about documents longer than its window, and see what it kept"
)]
struct Cli {
    /// GGUF file or Hugging Face model directory (default: the saved setting, else SmolLM2-135M-Instruct)
    #[arg(long)]
    model: Option<PathBuf>,
    /// auto, wgpu or cpu (default: the saved setting, else auto)
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Where settings and the chat history are kept (default: $HOMER_HOME/desk)
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Documents to add at start
    docs: Vec<PathBuf>,
    /// Write a PNG of the first settled frame here, then quit (for tests and docs)
    #[arg(long)]
    screenshot: Option<PathBuf>,
    /// With --screenshot: one PNG per tab (chat, tree, kept), named NAME-TAB.png
    #[arg(long, value_delimiter = ',')]
    tabs: Vec<homer_desk::Tab>,
    /// Ask this question about the documents as soon as the model is loaded
    #[arg(long)]
    ask: Option<String>,
    /// Do not load the model at start
    #[arg(long)]
    no_load: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOMER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut opts = DeskOptions {
        model: cli.model,
        backend: cli.backend,
        load_on_start: !cli.no_load,
        screenshot: cli.screenshot,
        shot_tabs: cli.tabs,
        ask: cli.ask,
        ..DeskOptions::default()
    };
    if let Some(d) = cli.data_dir {
        opts.data_dir = d;
    }
    let docs = cli.docs;
    let result = eframe::run_native(
        "homer-desk",
        homer_desk::native_options(),
        Box::new(move |cc| {
            let mut app = DeskApp::new(cc, opts);
            app.add_files(docs);
            Ok(Box::new(app))
        }),
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "homer-desk could not open its window: {e}\n\
                 It needs a display (X11 or Wayland) and a wgpu adapter (a GPU driver, or Mesa's \
                 lavapipe: `apt-get install mesa-vulkan-drivers`)."
            );
            ExitCode::FAILURE
        }
    }
}
