//! A GPU out of memory, forced (issue 17, item 5): lavapipe's device memory is the process's, so
//! once the model is loaded the process's address space is capped (RLIMIT_AS) at what it uses
//! plus 256 MiB, and a forward is asked for K/V buffers of 6 × 128 MB. The allocation fails in
//! the driver; the user must get one error that says the GPU ran out of memory and what to do,
//! not a panic or garbage, and the engine must still answer a small question after.
//! (Linux only: the cap is the kernel's.)

#![cfg(target_os = "linux")]

use std::path::Path;

use homer_engine::Engine;
use homer_model::{BackendKind, KvCache, Logits, read_f32};

#[test]
fn a_gpu_out_of_memory_is_an_error_with_a_remedy() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let gpu = Engine::load(Some(&model), BackendKind::Wgpu, &mut |_| {}).unwrap();
    let ids: Vec<u32> = (5..45).collect();
    let answer = |cache: &mut KvCache| {
        gpu.model
            .forward(&ids, None, cache, Logits::Last)
            .and_then(read_f32)
    };
    let fine = answer(&mut KvCache::new(gpu.model.n_layers())).unwrap();

    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize");
    let cap = (vm_kb << 10) + (256 << 20);
    let lim = libc::rlimit {
        rlim_cur: cap,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct; the cap applies to this test process only.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);

    // 1,000,000 positions x 2 heads x 16 dims x 4 bytes = 128 MB for each K and V of 3 layers:
    // within the adapter's buffer limit, beyond the memory left.
    let mut big = KvCache::new(gpu.model.n_layers());
    big.initial_capacity = 1_000_000;
    let e = answer(&mut big).err().expect("out of memory").to_string();
    let lift = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_AS, &lift) };
    assert!(
        e.starts_with("the GPU failed while computing (wgpu error: Out of Memory")
            && e.contains("ran out of memory")
            && e.contains("--chunk-len")
            && e.contains("--backend cpu")
            && !e.contains('\n'),
        "{e}"
    );
    drop(big);
    let again = answer(&mut KvCache::new(gpu.model.n_layers()));
    eprintln!(
        "after the failure, a small forward: {:?}",
        again.as_ref().map(|v| v.len())
    );
    let again = again.expect("the engine answers after an out-of-memory");
    assert!(
        again.iter().zip(&fine).all(|(a, b)| (a - b).abs() < 1e-4),
        "the same logits as before"
    );
}
