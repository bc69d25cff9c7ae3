//! GGUF blocks on wgpu (`shaders/qgemv.wgsl`, `shaders/dequant.wgsl`) against the host: the
//! dequantiser (`homer_model::load::quant`, itself checked against gguf-py) and an f64 matmul on
//! random blocks with edge values (zero, −0, subnormal, smallest-normal and largest f16 scales,
//! all-zero and all-max quants, Q8_0's −128), awkward shapes, 1 to 5 activation rows (5 takes the
//! dequantise + matmul path), NaN-poisoned outputs, weights split into row chunks by a lowered
//! binding limit; then the tiny GGUF fixtures loaded with `--dtype native` against transformers.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use homer_model::kernels::DeviceBlocks;
use homer_model::load::quant::GgmlType;
use homer_model::qcpu::{QMatrix, random_blocks as blocks};
use homer_model::{BackendKind, Device, DeviceInfo, KvCache, Llama, Logits, WeightDtype, read_f32};
use homer_wgpu::{LaunchCfg, WgslBlocks};
use serde::Deserialize;

fn wgpu() -> (Device, DeviceInfo) {
    homer_model::backend::device(BackendKind::Wgpu).unwrap_or_else(|e| {
        panic!("these tests need a wgpu adapter (install mesa-vulkan-drivers on a machine without a GPU): {e}")
    })
}

fn acts(m: usize, k: usize, seed: u32) -> Vec<f32> {
    (0..m * k)
        .map(|i| {
            let v = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32;
            (v - 0.5) * 4.0
        })
        .collect()
}

#[test]
fn block_kernels_match_the_host() {
    let (dev, info) = wgpu();
    let limit = info.max_storage_buffer_binding_size.unwrap();
    let cfg = LaunchCfg {
        workgroup_size: 64,
        max_workgroups: 7,
        poison: true,
    };
    let mut checked = 0;
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ] {
        let shapes: &[(usize, usize)] = if ty.block().0 == 256 {
            &[(1, 256), (33, 768), (70, 512), (129, 256)]
        } else {
            &[(1, 32), (33, 96), (70, 576), (129, 160)]
        };
        for &(out, k) in shapes {
            let q = QMatrix::from_gguf(ty, out, k, &blocks(ty, out, k, out as u64)).unwrap();
            let mut wf = vec![0f32; out * k];
            q.dequantize_rows(0, out, &mut wf);
            // one chunk with 4 rows per matrix-vector workgroup (GPUs), and chunks of 10 rows
            // (a lowered binding limit) with one row per invocation (software adapters)
            for (max_binding, gemv_rows) in [(limit, 4), (4 * k as u64 * 10, 64)] {
                let w = WgslBlocks::upload(&q, &dev, max_binding, cfg, gemv_rows).unwrap();
                assert_eq!(w.rows(), out);
                let deq = read_f32(w.dequantize()).unwrap();
                for (i, (a, b)) in deq.iter().zip(&wf).enumerate() {
                    assert!(
                        a == b,
                        "{} [{out}, {k}] dequant element {i}: {a} vs host {b}",
                        ty.name()
                    );
                }
                for m in 1..=5 {
                    let x = acts(m, k, (m + out) as u32);
                    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &dev);
                    let y = read_f32(w.apply(xt)).unwrap();
                    assert_eq!(y.len(), m * out);
                    for r in 0..m {
                        for o in 0..out {
                            let terms = (0..k).map(|j| wf[o * k + j] as f64 * x[r * k + j] as f64);
                            let (want, abs) =
                                terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                            let got = y[r * out + o] as f64;
                            assert!(
                                got.is_finite() && (got - want).abs() <= 1e-5 * abs + 1e-6,
                                "{} [{out}, {k}] m {m} chunk limit {max_binding}, {gemv_rows} rows a group: y[{r}, {o}] = {got}, host {want}",
                                ty.name()
                            );
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 5 * 4 * 2 * 5);
}

#[test]
fn blocks_are_refused_for_types_without_a_kernel() {
    let (dev, info) = wgpu();
    let limit = info.max_storage_buffer_binding_size.unwrap();
    let q = QMatrix::from_gguf(GgmlType::Q8_0, 2, 64, &blocks(GgmlType::Q8_0, 2, 64, 1)).unwrap();
    // a binding limit below one f32 row cannot hold the scratch
    let e = WgslBlocks::upload(&q, &dev, 100, LaunchCfg::default(), 4).unwrap_err();
    assert!(e.contains("binding limit"), "{e}");
    let e = WgslBlocks::upload(&q, &dev, limit, LaunchCfg::default(), 3).unwrap_err();
    assert!(e.contains("power of two"), "{e}");
    assert!(WgslBlocks::upload(&q, &dev, limit, LaunchCfg::default(), 4).is_ok());
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    positions: Option<Vec<usize>>,
    logits: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn tiny_gguf_native_blocks_match_transformers_wgpu() {
    let (dev, info) = wgpu();
    homer_wgpu::install_attention(&info).unwrap();
    let dir = fixtures().join("tiny-gguf");
    for ty in ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "q4_k_m"] {
        let src = homer_model::load::open(&dir.join(format!("tiny-{ty}.gguf"))).unwrap();
        let model = Llama::load_with(
            src.as_ref(),
            &dev,
            info.max_storage_buffer_binding_size,
            WeightDtype::Native,
            &mut |_, _| {},
        )
        .unwrap();
        let cpu_src = homer_model::load::open(&dir.join(format!("tiny-{ty}.gguf"))).unwrap();
        let flex = homer_model::backend::device(BackendKind::Cpu).unwrap().0;
        let cpu = Llama::load(cpu_src.as_ref(), &flex, None, &mut |_, _| {}).unwrap();
        for l in &model.layers {
            let device_parts = match &l.w_qkv {
                homer_model::Weight::Device(_) => ty != "q4_k_m",
                homer_model::Weight::Cat(p) => {
                    ty == "q4_k_m"
                        && p.iter()
                            .all(|p| matches!(p, homer_model::Weight::Device(_)))
                }
                _ => false,
            };
            assert!(device_parts, "tiny-{ty}: {:?}", l.w_qkv);
            assert!(
                matches!(l.w_down, homer_model::Weight::Device(_)),
                "tiny-{ty}"
            );
        }
        let path = dir.join(format!("reference-{ty}.json"));
        let r: Reference = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (ci, c) in r.cases.iter().enumerate() {
            let mut cache = KvCache::new(model.n_layers());
            let logits = model
                .forward(&c.ids, c.positions.as_deref(), &mut cache, Logits::All)
                .unwrap();
            let v = logits.dims()[1];
            let got = read_f32(logits).unwrap();
            let mut worst = 0f32;
            for (i, row) in c.logits.iter().enumerate() {
                for (j, &want) in row.iter().enumerate() {
                    worst = worst.max((got[i * v + j] - want).abs());
                }
            }
            assert!(
                worst <= 1e-4,
                "tiny-{ty} native on wgpu, case {ci}: {worst}"
            );
            // and one decode step (the matrix-vector kernel) against the CPU's f32 weights
            let step = model.decode_step(c.ids[0], &mut cache).unwrap();
            let mut cpu_cache = KvCache::new(cpu.n_layers());
            cpu.forward(&c.ids, c.positions.as_deref(), &mut cpu_cache, Logits::None)
                .unwrap();
            let want = cpu.decode_step(c.ids[0], &mut cpu_cache).unwrap();
            let e = step
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                e <= 1e-4,
                "tiny-{ty} decode step, native wgpu vs f32 CPU: {e}"
            );
        }
    }
}
