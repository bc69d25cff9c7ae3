//! Choosing the compute backend at run time: burn-wgpu (the product) or burn's flex CPU
//! backend (fallback and oracle). wgpu is initialised once per process and its adapter
//! described, including the buffer limits the loader checks against.

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::Device;
use burn::tensor::wgpu::wgpu;

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// wgpu when the adapter is a real GPU; burn's CPU backend when there is none or the only
    /// adapter is a CPU emulation (lavapipe/llvmpipe, tens of times slower than the CPU backend on the same cores).
    Auto,
    /// burn-wgpu: Vulkan, Metal, DX12 (Mesa lavapipe on machines without a GPU).
    Wgpu,
    /// burn's CPU backend, burn-flex, with the project's CPU kernels.
    Cpu,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendKind::Auto),
            "wgpu" | "gpu" => Ok(BackendKind::Wgpu),
            "cpu" | "flex" => Ok(BackendKind::Cpu),
            other => Err(format!(
                "unknown backend `{other}` (expected auto, wgpu or cpu)"
            )),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cpu => "cpu",
        })
    }
}

/// What the user and the loader need to know about a device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub backend: String,
    pub adapter: String,
    pub driver: String,
    pub graphics_api: String,
    pub device_type: String,
    /// Largest storage-buffer binding the adapter allows (None on CPU backends).
    pub max_storage_buffer_binding_size: Option<u64>,
    pub max_buffer_size: Option<u64>,
    pub shader_f16: bool,
    /// Where autotune's choices for this device are kept (wgpu; None on the CPU backend or
    /// when CubeCL's persistent cache is turned off).
    pub tune_cache: Option<String>,
}

static WGPU: OnceLock<std::result::Result<(Device, DeviceInfo), String>> = OnceLock::new();

static CACHE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Where burn/CubeCL keep what they learn about a wgpu device: autotune's choice of kernel
/// variant per operation and shape class (timed on the device the first time a shape class
/// is met, a few seconds on lavapipe, then read back). The engine passes `$HOMER_HOME/cubecl`;
/// `HOMER_TUNE_CACHE=DIR` overrides it (the test command keeps one under the build's target dir,
/// so test processes share their tuning). Takes effect only before the first wgpu device of the
/// process is made; the first call wins. A `cubecl.toml` that names an `[environment] path` of
/// its own, or `CUBECL_AUTOTUNE_CACHE=0`, still decides (CubeCL's own configuration).
pub fn set_cache_dir(dir: PathBuf) {
    let _ = CACHE_DIR.set(dir);
}

/// Fix CubeCL's configuration before burn reads it: its own file and environment variables,
/// with the cache root moved from CubeCL's default (`target/environment` of the outermost Cargo
/// workspace above the current directory, else the user cache) to [`set_cache_dir`]'s.
fn configure_cubecl() {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        let dir = std::env::var_os("HOMER_TUNE_CACHE")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| CACHE_DIR.get().cloned());
        if let Some(dir) = dir
            && matches!(config.environment.path, CacheConfig::Target)
        {
            config.environment.path = CacheConfig::Directory(dir);
        }
        if !CubeClRuntimeConfig::try_set(config) {
            tracing::debug!("CubeCL's configuration was read before homer set its cache directory");
        }
    });
}

/// The directory CubeCL keeps its autotune results in, once its configuration is fixed.
fn cubecl_cache_root() -> Option<String> {
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let config = CubeClRuntimeConfig::get();
    (!config.autotune.disable_cache).then(|| config.environment.path.root().display().to_string())
}

/// The last error wgpu raised on burn's device thread: cubecl panics there (`wgpu error: Out of
/// Memory`), where the caller never sees it; the read-back that then fails only says its bytes
/// were never written. [`take_device_panic`] hands the cause to the error the user sees.
static DEVICE_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Record wgpu's errors from burn's device thread (a panic hook that keeps the previous one).
fn watch_device_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("");
            if msg.starts_with("wgpu error") {
                *DEVICE_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.to_string());
            }
            previous(info);
        }));
    });
}

/// The last wgpu error of burn's device thread since the previous call, if any.
pub fn take_device_panic() -> Option<String> {
    DEVICE_PANIC
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

fn init_wgpu() -> std::result::Result<(Device, DeviceInfo), String> {
    configure_cubecl();
    watch_device_panics();
    let result = std::panic::catch_unwind(|| Device::wgpu_options().init_with_setup());
    let (device, setup) = match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(format!("{e}")),
        Err(_) => return Err("the wgpu runtime panicked while acquiring an adapter".into()),
    };
    Ok((device, describe(&setup.adapter, &setup.device)))
}

/// Whether a forward pass on wgpu waits for the device after every layer: yes on a software
/// adapter (lavapipe), whose shaders run on the same CPU cores as the host. cubecl's task queue
/// holds 32 launches and its client busy-waits for a free slot, so without the wait the host
/// spins on one of the cores the shaders need (default model on this 2-core machine: decode
/// 1.35 → 2.2 tok/s, prefill 128 tokens 32.7 → 38.5 tok/s). A real GPU keeps the host encoding
/// ahead. `HOMER_LAYER_SYNC=0|1` overrides (measurements).
pub fn sync_each_layer() -> bool {
    static FORCED: OnceLock<Option<bool>> = OnceLock::new();
    let forced = FORCED.get_or_init(|| match std::env::var("HOMER_LAYER_SYNC").as_deref() {
        Ok("0") => Some(false),
        Ok("1") => Some(true),
        _ => None,
    });
    forced.unwrap_or_else(|| matches!(WGPU.get(), Some(Ok((_, info))) if info.device_type == "Cpu"))
}

/// Whether `device` stores and computes f16 tensors: the CPU backend always; a wgpu device when
/// its adapter has `shader-f16`.
pub fn supports_f16(device: &Device) -> bool {
    if *device == Device::flex() {
        return true;
    }
    matches!(WGPU.get(), Some(Ok((_, info))) if info.shader_f16)
}

/// After a layer's launches on `device`: wait for them where [`sync_each_layer`] says so (the
/// CPU kernels' path never queues). Errors surface at the read-back that follows.
pub fn layer_done(device: &Device) {
    if sync_each_layer() && !crate::kernels::fast_path(device) {
        let _ = device.sync();
    }
}

/// Hand an application's wgpu device (e.g. the one eframe renders with) to burn, so the model
/// runs on the same device instead of opening a second one. Must come before anything else
/// asks for a wgpu device in this process; later `device(BackendKind::Wgpu)` calls return it.
/// The device must have been created with the adapter's limits and features (burn's own
/// request): see `homer-desk`'s device descriptor.
pub fn share_wgpu(
    instance: wgpu::Instance,
    adapter: wgpu::Adapter,
    device: wgpu::Device,
    queue: wgpu::Queue,
) -> Result<(Device, DeviceInfo)> {
    if WGPU.get().is_some() {
        return Err(ModelError::Input(
            "a wgpu device was already set up in this process; the shared one was not used".into(),
        ));
    }
    configure_cubecl();
    watch_device_panics();
    let backend = adapter.get_info().backend;
    let info = describe(&adapter, &device);
    let setup = burn::tensor::wgpu::WgpuSetup {
        instance,
        adapter,
        device,
        queue,
        backend,
    };
    // On failure the slot stays empty, so a later `device(Wgpu)` opens burn's own device.
    let init = std::panic::AssertUnwindSafe(move || Device::wgpu_options().setup(setup).init());
    let shared = match std::panic::catch_unwind(init) {
        Ok(Ok(d)) => (d, info),
        Ok(Err(e)) => {
            return Err(ModelError::Input(format!(
                "burn refused the shared wgpu device: {e}"
            )));
        }
        Err(_) => {
            return Err(ModelError::Input(
                "burn panicked while taking the shared wgpu device".into(),
            ));
        }
    };
    let _ = WGPU.set(Ok(shared.clone()));
    Ok(shared)
}

fn describe(adapter: &wgpu::Adapter, device: &wgpu::Device) -> DeviceInfo {
    let info = adapter.get_info();
    let limits = device.limits();
    let features = device.features();
    DeviceInfo {
        backend: "wgpu".into(),
        adapter: info.name.clone(),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        graphics_api: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        max_storage_buffer_binding_size: Some(limits.max_storage_buffer_binding_size as u64),
        max_buffer_size: Some(limits.max_buffer_size),
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        tune_cache: cubecl_cache_root(),
    }
}

/// The largest buffer `device` can hold in one binding (the smaller of the adapter's
/// storage-binding and buffer limits) when it is this process's wgpu device; None on the CPU.
pub fn buffer_limit(device: &Device) -> Option<u64> {
    match WGPU.get() {
        Some(Ok((d, info))) if d == device => info
            .max_storage_buffer_binding_size
            .map(|b| b.min(info.max_buffer_size.unwrap_or(u64::MAX))),
        _ => None,
    }
}

/// What burn's memory pools hold on a GPU device, in bytes, all streams together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes of live tensors.
    pub in_use: u64,
    /// Bytes of device allocations the pools hold (live tensors, padding, free pages kept for
    /// reuse). The pools keep the pages a computation grew them by until a cleanup, so what is
    /// reserved right after a computation is its high-water mark.
    pub reserved: u64,
}

/// The device memory burn's pools hold on `device`; None on the CPU backend (its tensors are
/// in the process's heap).
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    use cubecl::MemoryScope;
    match device.as_dispatch() {
        burn::backend::DispatchDevice::Cube(d) => {
            let u = d.client().memory_report(MemoryScope::Device).usage();
            Some(DeviceMemory {
                in_use: u.bytes_in_use,
                reserved: u.bytes_reserved,
            })
        }
        _ => None,
    }
}

/// Memory available to the process now, in bytes (Linux: `MemAvailable` of /proc/meminfo;
/// None elsewhere).
pub fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The device for `kind`, created once per process and then cloned.
pub fn device(kind: BackendKind) -> Result<(Device, DeviceInfo)> {
    match kind {
        BackendKind::Auto => match WGPU.get_or_init(init_wgpu) {
            Ok((d, info)) if info.device_type != "Cpu" => Ok((d.clone(), info.clone())),
            Ok((_, info)) => {
                tracing::info!(
                    "the only wgpu adapter is a CPU emulation ({}); using the CPU backend (pass --backend wgpu to force it)",
                    info.adapter
                );
                device(BackendKind::Cpu)
            }
            Err(e) => {
                tracing::info!("no wgpu adapter ({e}); using the CPU backend");
                device(BackendKind::Cpu)
            }
        },
        BackendKind::Cpu => Ok((
            Device::flex(),
            DeviceInfo {
                backend: "cpu".into(),
                adapter: format!(
                    "burn flex{} on {} CPU threads",
                    if crate::kernels::fast_path(&Device::flex()) { " + homer kernels" } else { "" },
                    rayon::current_num_threads(),
                ),
                driver: format!("SIMD: {:?}", crate::cpu::simd_level()),
                graphics_api: "none".into(),
                device_type: "Cpu".into(),
                max_storage_buffer_binding_size: None,
                max_buffer_size: None,
                shader_f16: false,
                tune_cache: None,
            },
        )),
        BackendKind::Wgpu => WGPU.get_or_init(init_wgpu).clone().map_err(|e| {
            ModelError::Input(format!(
                "no wgpu adapter could be used ({e}). On a machine without a GPU install a CPU Vulkan \
                 driver (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`), or run with --backend cpu"
            ))
        }),
    }
}
