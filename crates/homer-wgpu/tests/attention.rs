//! `shaders/attention.wgsl` (the model's attention on wgpu) against the tensor-op oracle
//! (`homer_model::attention::causal_attention`) on random inputs of awkward shapes: GQA groups of
//! 1 to 64 heads, head dims 4 to 128, query blocks that are not multiples of a workgroup's rows,
//! a past in the buffer, a NaN-filled unfilled tail (never read into a sum) and NaN-poisoned
//! outputs (every element written); then whole models, installed as the process's attention,
//! against the CPU kernels.

use burn::tensor::{DType, Tensor, TensorData};
use homer_model::attention::{BufferAttention, causal_attention};
use homer_model::{
    BackendKind, Device, DeviceInfo, KvCache, KvDtype, Llama, LlamaConfig, Logits, WeightDtype,
    read_f32,
};
use homer_wgpu::{LaunchCfg, SplitMode, WgslAttention};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn wgpu() -> (Device, DeviceInfo) {
    homer_model::backend::device(BackendKind::Wgpu).unwrap_or_else(|e| {
        panic!("these tests need a wgpu adapter (install mesa-vulkan-drivers on a machine without a GPU): {e}")
    })
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A [kv, cap, hd] buffer whose rows past `filled` are NaN.
fn buffer(
    rng: &mut StdRng,
    kv: usize,
    cap: usize,
    hd: usize,
    filled: usize,
    dev: &Device,
) -> Tensor<3> {
    let mut data = Vec::with_capacity(kv * cap * hd);
    for _ in 0..kv {
        for r in 0..cap {
            for _ in 0..hd {
                data.push(if r < filled {
                    rng.random_range(-2.0f32..2.0)
                } else {
                    f32::NAN
                });
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [kv, cap, hd]), dev)
}

#[test]
fn wgsl_attention_matches_oracle() {
    let (dev, info) = wgpu();
    let mut rng = StdRng::seed_from_u64(11);
    let mut checked = 0;
    // (heads, kv heads, head dim)
    for &(h, kv, hd) in &[
        (9, 3, 64),
        (8, 8, 128),
        (4, 1, 12),
        (6, 2, 4),
        (64, 1, 8),
        (5, 5, 36),
    ] {
        // the one-pass kernel at two workgroup sizes, and split-key attention (decode: up to 4
        // new rows, spans of 32..256 keys) where it applies
        for &(wg, split) in &[
            (64u32, SplitMode::Never),
            (32, SplitMode::Never),
            (64, SplitMode::Auto),
        ] {
            let kernel = WgslAttention::for_device(&info)
                .unwrap()
                .with_split(split)
                .with_launch(LaunchCfg {
                    workgroup_size: wg,
                    max_workgroups: 4096,
                    poison: true,
                });
            for &(past, n, spare) in &[
                (0usize, 1usize, 0usize),
                (0, 2, 3),
                (1, 23, 9),
                (77, 130, 0),
                (300, 1, 5),
                (31, 1, 0),
                (1000, 3, 40),
                (2100, 1, 0),
                (5000, 4, 7),
            ] {
                if split == SplitMode::Auto && n > 4 {
                    continue; // the one-pass kernel, checked above
                }
                let cap = past + n + spare;
                let q: Tensor<3> = Tensor::from_data(
                    TensorData::new(
                        (0..h * n * hd)
                            .map(|_| rng.random_range(-2.0f32..2.0))
                            .collect::<Vec<_>>(),
                        [h, n, hd],
                    ),
                    &dev,
                );
                let k = buffer(&mut rng, kv, cap, hd, past + n, &dev);
                let v = buffer(&mut rng, kv, cap, hd, past + n, &dev);
                let what =
                    format!("h {h} kv {kv} hd {hd} wg {wg} {split:?} past {past} n {n} cap {cap}");
                if h / kv > wg as usize {
                    let why = kernel.refusal(&q, &k, past);
                    assert!(
                        why.is_some(),
                        "{what}: a group above the workgroup must be declined"
                    );
                    assert!(kernel.attend(&q, &k, &v, past).is_none());
                    continue;
                }
                // the f32 buffers, then an f16 KV buffer (`--kv-dtype f16`) under the f32 query:
                // the same sums over the f16-rounded keys and values (NaN tail included)
                let (k16, v16) = (k.clone().cast(DType::F16), v.clone().cast(DType::F16));
                for (kb, vb, dtype) in [(&k, &v, "f32"), (&k16, &v16, "f16")] {
                    let what = format!("{what} {dtype} KV");
                    let got = kernel.attend(&q, kb, vb, past);
                    if dtype == "f16" && !info.shader_f16 {
                        assert!(
                            got.is_none(),
                            "{what}: f16 without shader-f16 must be declined"
                        );
                        continue;
                    }
                    let got = read_f32(got.expect(&what)).unwrap();
                    let filled = |t: &Tensor<3>| {
                        t.clone()
                            .slice([0..kv, 0..past + n, 0..hd])
                            .cast(DType::F32)
                    };
                    let want =
                        read_f32(causal_attention(q.clone(), &filled(kb), &filled(vb))).unwrap();
                    assert_eq!(got.len(), n * h * hd, "{what}");
                    assert!(
                        got.iter().all(|x| x.is_finite()),
                        "{what}: unwritten or NaN output"
                    );
                    let e = max_err(&got, &want);
                    assert!(e < 1e-4, "{what}: max error {e}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 200, "only {checked} cases ran");
}

#[test]
fn wgsl_attention_declines_what_it_cannot_take() {
    let (dev, info) = wgpu();
    let kernel = WgslAttention::for_device(&info).unwrap();
    let zeros = |s: [usize; 3], d: &Device| Tensor::<3>::zeros(s, d);
    // head dim not a multiple of 4
    assert!(
        kernel
            .refusal(&zeros([2, 3, 6], &dev), &zeros([1, 8, 6], &dev), 0)
            .is_some()
    );
    // more rows than the buffer holds
    assert!(
        kernel
            .refusal(&zeros([2, 3, 8], &dev), &zeros([1, 8, 8], &dev), 6)
            .is_some()
    );
    // not a wgpu device
    let flex = homer_model::backend::device(BackendKind::Cpu).unwrap().0;
    assert!(
        kernel
            .refusal(&zeros([2, 3, 8], &flex), &zeros([1, 8, 8], &flex), 0)
            .is_some()
    );
    // and a shape it takes
    assert_eq!(
        kernel.refusal(&zeros([2, 3, 8], &dev), &zeros([1, 8, 8], &dev), 5),
        None
    );
}

fn config(heads: usize, kv: usize, hd: usize, d: usize, tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 301,
        hidden_size: d,
        intermediate_size: 2 * d,
        num_hidden_layers: 3,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hd,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![],
        rope_scaling: Default::default(),
    }
}

/// Logits of a prompt run in pieces (attention over a partly filled, growing buffer), then 3
/// decode steps.
fn run(model: &Llama, pieces: &[usize]) -> Vec<f32> {
    let total: usize = pieces.iter().sum();
    let all: Vec<u32> = (0..total as u32).map(|i| (i * 7919 + 13) % 301).collect();
    let mut cache = KvCache::new(model.n_layers());
    let mut logits = vec![];
    let mut at = 0;
    for &p in pieces {
        let l = model
            .forward(&all[at..at + p], None, &mut cache, Logits::All)
            .unwrap();
        logits.extend(read_f32(l).unwrap());
        at += p;
    }
    for t in [5u32, 17, 250] {
        logits.extend(model.decode_step(t, &mut cache).unwrap());
    }
    logits
}

#[test]
fn model_with_wgsl_attention_matches_cpu_kernels() {
    let (gpu, info) = wgpu();
    homer_wgpu::install_attention(&info).unwrap();
    assert!(homer_model::attention::buffer_attention().is_some());
    let flex = homer_model::backend::device(BackendKind::Cpu).unwrap().0;
    for &(h, kv, hd, d, tied, pieces) in &[
        (9, 3, 16, 48, true, &[7usize, 1, 70][..]),
        (4, 4, 12, 40, false, &[150][..]),
    ] {
        let cfg = config(h, kv, hd, d, tied);
        let cpu = Llama::random_on_path(cfg.clone(), 5, &flex, WeightDtype::F32, true);
        let gpu_model = Llama::random_on_path(cfg, 5, &gpu, WeightDtype::F32, false);
        let e = max_err(&run(&gpu_model, pieces), &run(&cpu, pieces));
        assert!(e < 2e-4, "h {h} kv {kv} hd {hd} pieces {pieces:?}: {e}");
    }
}

/// `--kv-dtype f16` on wgpu: the cache holds f16 (written once per row, read by the WGSL
/// attention under f32 queries). Against the CPU kernels' f16 cache: both round the same keys and
/// values, so they agree about as closely as the f32 paths; against the f32 cache it moves the
/// logits by about f16's rounding.
#[test]
fn f16_kv_cache_on_wgpu_matches_cpu_kernels() {
    let (gpu, info) = wgpu();
    homer_wgpu::install_attention(&info).unwrap();
    let flex = homer_model::backend::device(BackendKind::Cpu).unwrap().0;
    let cfg = config(9, 3, 16, 48, true);
    let pieces = &[7usize, 1, 70][..];
    let mut cpu = Llama::random_on_path(cfg.clone(), 5, &flex, WeightDtype::F32, true);
    let mut gpu16 = Llama::random_on_path(cfg.clone(), 5, &gpu, WeightDtype::F32, false);
    let gpu32 = Llama::random_on_path(cfg, 5, &gpu, WeightDtype::F32, false);
    if !info.shader_f16 {
        let e = gpu16.set_kv_dtype(KvDtype::F16).unwrap_err().to_string();
        assert!(e.contains("shader-f16"), "{e}");
        return;
    }
    gpu16.set_kv_dtype(KvDtype::F16).unwrap();
    cpu.set_kv_dtype(KvDtype::F16).unwrap();
    let (a16, c16, a32) = (run(&gpu16, pieces), run(&cpu, pieces), run(&gpu32, pieces));
    let scale = a32.iter().map(|x| x.abs()).fold(0.0, f32::max);
    let e = max_err(&a16, &c16);
    assert!(
        e < 1e-3 * scale,
        "wgpu vs CPU, both f16 KV: {e} (scale {scale})"
    );
    let e = max_err(&a16, &a32);
    assert!(
        e < 5e-3 * scale && e > 0.0,
        "f16 vs f32 KV on wgpu: {e} (scale {scale})"
    );
    let mut cache = KvCache::new(gpu16.n_layers());
    gpu16
        .forward(&[1, 2, 3], None, &mut cache, Logits::None)
        .unwrap();
    let kv = cache.layer(0).unwrap();
    assert_eq!((kv.k.dtype(), kv.v.dtype()), (DType::F16, DType::F16));
}
