//! A lavapipe device with lowered limits for tests, shared by the engine's and homer-desk's test
//! helpers (homer-desk includes this file by path).

/// A lavapipe device with limits changed by `lower`, handed to burn the way homer-desk hands it
/// its own device (later `Engine::load(…, Wgpu)` runs on it); the caller keeps a handle to it.
pub fn share_device(lower: impl FnOnce(&mut wgpu::Limits)) -> wgpu::Device {
    let instance = wgpu::Instance::default();
    let Ok(adapter) = pollster::block_on(instance.request_adapter(&Default::default())) else {
        panic!("no wgpu adapter: install mesa-vulkan-drivers (lavapipe)");
    };
    let mut limits = adapter.limits();
    lower(&mut limits);
    let (device, queue) = pollster::block_on(
        adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("a test's device"),
            required_features: adapter
                .features()
                .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            required_limits: limits,
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            trace: wgpu::Trace::Off,
            // SAFETY: the request burn's own device makes (as homer-desk's).
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
        }),
    )
    .expect("a device");
    let ours = device.clone();
    homer_model::backend::share_wgpu(instance, adapter, device, queue).unwrap();
    ours
}
