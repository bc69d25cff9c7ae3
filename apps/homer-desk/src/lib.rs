//! homer-desk: ask a local model about documents longer than its window, and see what HOMER kept.
//! The app is thin: the engine (homer-engine) reads files, tokenises, runs HOMER and decodes on a
//! worker thread; this crate draws the documents, the chat, the merge tree and the kept tokens.

pub mod app;
pub mod views;
pub mod worker;

pub use app::{DeskApp, DeskOptions, Settings, Tab};

/// eframe's native options: the wgpu renderer with a device that has the adapter's limits and
/// features, the ones burn itself would ask for, so the model can run on the same device.
pub fn native_options() -> eframe::NativeOptions {
    use eframe::egui_wgpu::{WgpuConfiguration, WgpuSetup, WgpuSetupCreateNew};
    use eframe::wgpu;
    let mut setup = WgpuSetupCreateNew::without_display_handle();
    setup.device_descriptor =
        std::sync::Arc::new(|adapter: &wgpu::Adapter| wgpu::DeviceDescriptor {
            label: Some("homer-desk"),
            required_features: adapter
                .features()
                .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            required_limits: adapter.limits(),
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            trace: wgpu::Trace::Off,
            // SAFETY: the same request burn's own device makes (cubecl-wgpu's WGSL path); it enables
            // the experimental features cubecl may use, nothing the renderer relies on.
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
        });
    eframe::NativeOptions {
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("homer — ask your documents")
            .with_inner_size([1200.0, 800.0])
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        wgpu_options: WgpuConfiguration {
            wgpu_setup: WgpuSetup::CreateNew(setup),
            ..Default::default()
        },
        ..Default::default()
    }
}
