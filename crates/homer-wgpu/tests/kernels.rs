//! The WGSL kernels against the burn-tensor oracle (`homer::TensorOps`) on the wgpu adapter
//! (lavapipe on machines without a GPU): fresh random inputs, sizes that are not multiples of the
//! workgroup size, GQA shapes 9/3, 8/8, 4/1, head dims 64 and 128, NaN-poisoned outputs, a
//! lowered binding limit, and whole HOMER prefills with either set of ops.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::tensor::{Tensor, TensorData};
use homer::{
    BiasTable, ChunkTensors, HomerConfig, HomerInput, HomerOps, HomerOutput, KeyShift,
    NextPosition, Scoring, SignificanceInput, TensorOps,
};
use homer_model::{
    BackendKind, Device, DeviceInfo, KvDtype, LayerKv, Llama, LlamaConfig, read_f32,
};
use homer_wgpu::{LaunchCfg, WgslOps};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn wgpu() -> (Device, DeviceInfo) {
    homer_model::backend::device(BackendKind::Wgpu).unwrap_or_else(|e| {
        panic!("these tests need a wgpu adapter (install mesa-vulkan-drivers on a machine without a GPU): {e}")
    })
}

/// WGSL ops with NaN-poisoned outputs, a small workgroup and a small grid cap, so that every
/// launch runs several grid-stride rounds and an unwritten element shows up as NaN.
fn poisoned_ops(info: &DeviceInfo, workgroup_size: u32, max_workgroups: u32) -> WgslOps {
    WgslOps::for_device(info).unwrap().with_launch(LaunchCfg {
        workgroup_size,
        max_workgroups,
        poison: true,
    })
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn tensor<const D: usize>(rng: &mut StdRng, shape: [usize; D], dev: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(random(rng, n), shape), dev)
}

fn host<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    read_f32(t.clone()).unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            !g.is_nan(),
            "{what}: element {j} was never written (NaN poison)"
        );
        if w.is_infinite() {
            assert_eq!(g, w, "{what}: element {j}");
            continue;
        }
        let tol = rel * w.abs().max(1.0);
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {j}: {g} vs oracle {w}"
        );
    }
}

#[test]
fn significance_matches_oracle() {
    let (dev, info) = wgpu();
    let ops = poisoned_ops(&info, 64, 5);
    let mut rng = StdRng::seed_from_u64(7);
    let mut checked = 0;
    for &(h, kv) in &[(9, 3), (8, 8), (4, 1)] {
        for &hd in &[64, 128] {
            for &n in &[1usize, 7, 255, 4097] {
                let q = tensor(&mut rng, [h, hd], &dev);
                let keys = tensor(&mut rng, [kv, n, hd], &dev);
                // Positions as HOMER makes them: non-monotone after merges, repeated.
                let positions: Vec<usize> = (0..n).map(|_| rng.random_range(0..n + 3)).collect();
                let last = n + 3;
                let prunable: Vec<bool> = (0..n).map(|j| j % 5 != 2).collect();
                let bias = random(&mut rng, last + 1);
                for with_bias in [false, true] {
                    let input = SignificanceInput {
                        q_last: &q,
                        keys: &keys,
                        positions: &positions,
                        prunable: &prunable,
                        bias: with_bias.then_some(&bias[..]),
                        last_position: last,
                    };
                    let want = TensorOps.significance(&input).unwrap();
                    let got = ops.significance(&input).unwrap();
                    assert!(want.iter().any(|w| w.is_finite() && *w != 0.0));
                    assert_close(
                        &format!("significance h{h}/kv{kv} d{hd} n{n} bias {with_bias}"),
                        &got,
                        &want,
                        1e-5,
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 48);
}

fn random_chunk(
    rng: &mut StdRng,
    n: usize,
    d: usize,
    layers: usize,
    kv: usize,
    hd: usize,
    dev: &Device,
) -> ChunkTensors {
    ChunkTensors {
        hidden: tensor(rng, [n, d], dev),
        cache: (0..layers)
            .map(|_| LayerKv {
                k: tensor(rng, [kv, n, hd], dev),
                v: tensor(rng, [kv, n, hd], dev),
            })
            .collect(),
    }
}

fn host_chunk(c: &ChunkTensors) -> Vec<Vec<f32>> {
    let mut v = vec![host(&c.hidden)];
    for kv in &c.cache {
        v.push(host(&kv.k));
        v.push(host(&kv.v));
    }
    v
}

fn assert_same_chunk(what: &str, got: &ChunkTensors, want: &ChunkTensors) {
    assert_eq!(
        got.hidden.dims(),
        want.hidden.dims(),
        "{what}: hidden shape"
    );
    assert_eq!(got.cache.len(), want.cache.len());
    for (g, w) in got.cache.iter().zip(&want.cache) {
        assert_eq!(g.k.dims(), w.k.dims(), "{what}: key shape");
        assert_eq!(g.v.dims(), w.v.dims(), "{what}: value shape");
    }
    for (i, (g, w)) in host_chunk(got).iter().zip(host_chunk(want)).enumerate() {
        // Copies and (a + b)·0.5: bit-identical to the oracle.
        let unwritten: Vec<usize> = (0..g.len()).filter(|&j| g[j].is_nan()).collect();
        assert!(
            unwritten.is_empty(),
            "{what}: tensor {i} has {} of {} elements unwritten, first {:?}",
            unwritten.len(),
            g.len(),
            &unwritten[..unwritten.len().min(4)]
        );
        assert_eq!(g, &w, "{what}: tensor {i}");
    }
}

#[test]
fn gather_matches_oracle() {
    let (dev, info) = wgpu();
    let ops = poisoned_ops(&info, 64, 7);
    let mut rng = StdRng::seed_from_u64(11);
    for &(kv, hd) in &[(3, 64), (8, 128), (1, 64)] {
        for &n in &[1usize, 7, 255, 4097] {
            // Layer counts 2 and 3: an odd and an even number of tensors after the hidden rows.
            for layers in [2, 3] {
                // Hidden width 40 takes the vec4 path, 30 the scalar one.
                let width = if layers == 2 { 40 } else { 30 };
                let chunk = random_chunk(&mut rng, n, width, layers, kv, hd, &dev);
                let mut keep: Vec<usize> = (0..n).filter(|_| rng.random_bool(0.6)).collect();
                if keep.is_empty() {
                    keep.push(n - 1);
                }
                let want = TensorOps.gather(chunk.clone(), &keep).unwrap();
                let got = ops.gather(chunk, &keep).unwrap();
                assert_same_chunk(
                    &format!("gather kv{kv} d{hd} n{n} layers {layers}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

/// Shift tables as `Llama::key_shift` lays them out ([rows, hd], halves repeated) for random
/// angles: the kernel's contract holds for any rotation.
fn random_shift(rng: &mut StdRng, rows: usize, hd: usize, dev: &Device) -> KeyShift {
    let angles: Vec<f32> = (0..rows * hd / 2)
        .map(|_| rng.random_range(-40.0f32..40.0))
        .collect();
    KeyShift::from_angles(&angles, hd, dev)
}

/// Turned keys to f32 rounding (the kernel may fuse the multiply-add), every other tensor
/// bit for bit, nothing left unwritten.
fn assert_rotated_chunk(what: &str, got: &ChunkTensors, want: &ChunkTensors, rel: f32) {
    assert_eq!(
        got.hidden.dims(),
        want.hidden.dims(),
        "{what}: hidden shape"
    );
    assert_eq!(host(&got.hidden), host(&want.hidden), "{what}: hidden rows");
    assert_eq!(got.cache.len(), want.cache.len(), "{what}: layers");
    for (l, (g, w)) in got.cache.iter().zip(&want.cache).enumerate() {
        assert_eq!(g.k.dims(), w.k.dims(), "{what}: layer {l} key shape");
        assert_eq!(g.k.dtype(), w.k.dtype(), "{what}: layer {l} key type");
        assert_close(
            &format!("{what}: layer {l} keys"),
            &host(&g.k),
            &host(&w.k),
            rel,
        );
        assert_eq!(host(&g.v), host(&w.v), "{what}: layer {l} values");
    }
}

#[test]
fn gather_rotate_matches_oracle() {
    let (dev, info) = wgpu();
    let ops = poisoned_ops(&info, 32, 5);
    let mut rng = StdRng::seed_from_u64(23);
    let mut checked = 0;
    // Head dims 64 and 128 take the vec4 path, 6 and 12 (halves not whole vec4s) the scalar one.
    for &(kv, hd) in &[(3, 64), (1, 6), (8, 128), (2, 12)] {
        for &n in &[1usize, 7, 255, 1031] {
            for layers in [1, 2] {
                let chunk = random_chunk(&mut rng, n, 30, layers, kv, hd, &dev);
                let mut keep: Vec<usize> = (0..n).filter(|_| rng.random_bool(0.6)).collect();
                if keep.is_empty() {
                    keep.push(n - 1);
                }
                let all: Vec<usize> = (0..n).collect();
                for keep in [keep, all] {
                    let shift = random_shift(&mut rng, keep.len(), hd, &dev);
                    let want = TensorOps
                        .gather_rotate(chunk.clone(), &keep, &shift)
                        .unwrap();
                    // The oracle turned something: its keys differ from a plain gather's.
                    let plain = TensorOps.gather(chunk.clone(), &keep).unwrap();
                    assert_ne!(host(&want.cache[0].k), host(&plain.cache[0].k));
                    let got = ops.gather_rotate(chunk.clone(), &keep, &shift).unwrap();
                    assert_rotated_chunk(
                        &format!(
                            "gather_rotate kv{kv} d{hd} n{n} layers {layers} keep {}",
                            keep.len()
                        ),
                        &got,
                        &want,
                        1e-5,
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 64);
    // Tables that do not fit the kept rows are refused, not read past.
    let chunk = random_chunk(&mut rng, 9, 30, 1, 2, 64, &dev);
    let shift = random_shift(&mut rng, 4, 64, &dev);
    let e = ops.gather_rotate(chunk, &[0, 2, 4], &shift).unwrap_err();
    assert!(e.to_string().contains("key shift tables"), "{e}");
}

#[test]
fn merge_matches_oracle() {
    let (dev, info) = wgpu();
    let ops = poisoned_ops(&info, 32, 3);
    let mut rng = StdRng::seed_from_u64(13);
    for &(kv, hd) in &[(3, 64), (8, 128), (1, 64)] {
        for &(nl, nr, p, s) in &[
            (7, 7, 2, 3),
            (255, 200, 10, 5),
            (4097, 4000, 1, 1),
            (5, 9, 0, 5),
            (8, 4, 4, 0),
        ] {
            for layers in [1, 2] {
                let width = if layers == 1 { 24 } else { 26 };
                let l = random_chunk(&mut rng, nl, width, layers, kv, hd, &dev);
                let r = random_chunk(&mut rng, nr, width, layers, kv, hd, &dev);
                let want = TensorOps.merge(l.clone(), r.clone(), p, s).unwrap();
                let got = ops.merge(l, r, p, s).unwrap();
                assert_eq!(got.rows(), nl + nr - p - s);
                assert_same_chunk(
                    &format!("merge kv{kv} d{hd} {nl}+{nr} p{p} s{s}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
fn binding_limit_is_refused_with_a_clear_error() {
    let (dev, info) = wgpu();
    let mut rng = StdRng::seed_from_u64(17);
    // 3 × 300 × 64 f32 keys = 230,400 bytes; a pretend limit of 200,000 bytes.
    let ops = WgslOps::for_device(&info)
        .unwrap()
        .with_max_binding(200_000);
    let q = tensor(&mut rng, [9, 64], &dev);
    let keys = tensor(&mut rng, [3, 300, 64], &dev);
    let positions: Vec<usize> = (0..300).collect();
    let prunable = vec![true; 300];
    let input = SignificanceInput {
        q_last: &q,
        keys: &keys,
        positions: &positions,
        prunable: &prunable,
        bias: None,
        last_position: 299,
    };
    let e = ops.significance(&input).unwrap_err().to_string();
    assert!(
        e.contains("max_storage_buffer_binding_size") && e.contains("230400"),
        "{e}"
    );

    let chunk = random_chunk(&mut rng, 300, 16, 1, 3, 64, &dev);
    let e = ops.gather(chunk.clone(), &[0, 5]).unwrap_err().to_string();
    assert!(
        e.contains("layer 0 keys") && e.contains("max_storage_buffer_binding_size"),
        "{e}"
    );
    // Two children that fit, but whose merge would not.
    let small = random_chunk(&mut rng, 200, 16, 1, 3, 64, &dev);
    let e = ops
        .merge(small.clone(), small, 2, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("merged node") && e.contains("200000"), "{e}");
    // Children that differ in more than their rows are refused, not read out of bounds.
    let (a, b) = (
        random_chunk(&mut rng, 20, 16, 1, 3, 64, &dev),
        random_chunk(&mut rng, 20, 12, 1, 3, 64, &dev),
    );
    let e = ops.merge(a, b, 2, 2).unwrap_err().to_string();
    assert!(e.contains("differ in more than their row counts"), "{e}");
    // Under the limit everything runs.
    let ops = ops.with_max_binding(u64::MAX);
    assert!(ops.gather(chunk, &[0, 5]).is_ok());
    // A CPU device is refused up front.
    let cpu = homer_model::backend::device(BackendKind::Cpu).unwrap().1;
    let e = WgslOps::for_device(&cpu).unwrap_err().to_string();
    assert!(e.contains("wgpu device"), "{e}");
}

fn tiny_config(n_layers: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: n_layers,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_ids: vec![],
        rope_scaling: Default::default(),
    }
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 7919) >> 7) % 97)
        .collect()
}

fn prefill(
    model: &Llama,
    ops: &dyn HomerOps,
    cfg: &HomerConfig,
    p: &[u32],
    c: &[u32],
    s: &[u32],
) -> HomerOutput {
    prefill_stored(model, ops, cfg, p, c, s, None)
}

fn prefill_stored(
    model: &Llama,
    ops: &dyn HomerOps,
    cfg: &HomerConfig,
    p: &[u32],
    c: &[u32],
    s: &[u32],
    store: Option<&mut dyn homer::LeafStore>,
) -> HomerOutput {
    homer::homer_prefill_with_store(
        model,
        HomerInput {
            prefix: p,
            context: c,
            suffix: s,
            units: None,
            prior: None,
            separator: None,
        },
        cfg,
        ops,
        store,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A leaf store in a map (issue 16's document cache, without its budget).
#[derive(Default)]
struct MapStore(std::collections::HashMap<(std::ops::Range<usize>, usize), homer::LeafState>);

impl homer::LeafStore for MapStore {
    fn get(&mut self, c: &std::ops::Range<usize>, layers: usize) -> Option<homer::LeafState> {
        self.0.get(&(c.clone(), layers)).cloned()
    }
    fn put(&mut self, c: &std::ops::Range<usize>, layers: usize, s: &homer::LeafState) {
        self.0.insert((c.clone(), layers), s.clone());
    }
}

#[test]
fn homer_prefill_with_wgsl_ops_equals_oracle_ops() {
    let (dev, info) = wgpu();
    let mut model = Llama::random(tiny_config(7), 5, &dev);
    // f32 KV cache, then f16 (`--kv-dtype f16`: the kernels pair each layer's K with its V and
    // move the f32 hidden rows alone; significance reads f16 keys under an f32 query)
    let kv_dtypes: &[KvDtype] = if info.shader_f16 {
        &[KvDtype::F32, KvDtype::F16]
    } else {
        &[KvDtype::F32]
    };
    for &kv_dtype in kv_dtypes {
        model.set_kv_dtype(kv_dtype).unwrap();
        homer_prefill_both_ways(&model, &info, kv_dtype);
    }
}

fn homer_prefill_both_ways(model: &Llama, info: &DeviceInfo, kv_dtype: KvDtype) {
    let mut bias = BiasTable::zeros(7, 64);
    for (i, b) in bias.data.iter_mut().enumerate() {
        *b = ((i % 64) as f32 * 0.29).cos() * 0.4;
    }
    let mut cfg = HomerConfig {
        chunk_len: 24,
        target_len: None,
        warmup_layers: 2,
        max_initial_chunk_len: None,
        bias: Some(Arc::new(bias)),
        scoring: Scoring::Attention,
        selection: Default::default(),
        next_position: NextPosition::AfterLast,
    };
    // The paper's per-token selection; whole spans (nodes may keep fewer rows than planned, so
    // the kernels see parents built from under-filled children); the mean query of the suffix
    // rows with re-indexed positions (re-rotated keys in every merge and in the root's gather);
    // the final cache alone renumbered (keys turned in the root's gather, gather_rotate.wgsl).
    use homer::{Agg, Positions, Query, Selection, Unit};
    for selection in [
        Selection::default(),
        Selection {
            unit: Unit::Span {
                len: 3,
                agg: Agg::Max,
            },
            ..Default::default()
        },
        Selection {
            query: Query::Suffix,
            positions: Positions::Reindex,
            ..Default::default()
        },
        Selection {
            positions: Positions::Root,
            ..Default::default()
        },
    ] {
        cfg.selection = selection;
        prefill_both_ways_with(model, info, kv_dtype, &cfg);
    }
}

fn prefill_both_ways_with(model: &Llama, info: &DeviceInfo, kv_dtype: KvDtype, cfg: &HomerConfig) {
    let unit = cfg.selection;
    let (p, c, s) = (ids(3, 1), ids(100, 2), ids(4, 3));
    let want = prefill(model, &TensorOps, cfg, &p, &c, &s);
    let got = prefill(model, &poisoned_ops(info, 32, 4), cfg, &p, &c, &s);
    // The kernels on a document cache's leaves (issue 16): filled by another question, then
    // reused by this one; the same result as without a store.
    let mut store = MapStore::default();
    let ops = poisoned_ops(info, 32, 4);
    let other = ids(4, 9);
    let _ = prefill_stored(model, &ops, cfg, &p, &c, &other, Some(&mut store));
    let stored = prefill_stored(model, &ops, cfg, &p, &c, &s, Some(&mut store));
    assert_eq!(stored.stats.leaves_reused, 8, "{kv_dtype} {unit}");
    assert_eq!(
        stored.trace.kept, want.trace.kept,
        "{kv_dtype} {unit}: with a store"
    );
    let d = stored
        .logits
        .iter()
        .zip(&want.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        d < 1e-4,
        "{kv_dtype} {unit}: logits with a store differ by {d}"
    );
    assert_eq!(want.plan.n_chunks, 8);
    assert!(
        want.trace
            .nodes
            .iter()
            .filter(|n| !n.dropped.is_empty())
            .count()
            >= 8
    );
    assert_eq!(
        got.trace.kept, want.trace.kept,
        "{kv_dtype} {unit}: kept context tokens"
    );
    assert_eq!(got.positions, want.positions);
    let d = got
        .logits
        .iter()
        .zip(&want.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "{kv_dtype} {unit}: logits differ by {d}");
    for (l, (g, w)) in got.cache.layers.iter().zip(&want.cache.layers).enumerate() {
        let (g, w) = (g.as_ref().unwrap().filled(), w.as_ref().unwrap().filled());
        assert_eq!(
            g.k.dtype(),
            kv_dtype.dtype(),
            "layer {l}: the root's cache element type"
        );
        assert_eq!(g.v.dtype(), kv_dtype.dtype());
        let (gk, wk) = (host(&g.k), host(&w.k));
        let dk = gk
            .iter()
            .zip(&wk)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(dk < 1e-4, "{kv_dtype}: layer {l} keys differ by {dk}");
    }
}

/// f16 storage where the adapter has `shader-f16` (lavapipe does): the kernels read f16, accumulate
/// in f32, and agree with the f32 oracle on the same (f16-rounded) values. Without the feature,
/// f16 input is refused with a message naming it.
#[test]
fn f16_storage_where_the_adapter_has_shader_f16() {
    use burn::tensor::DType;
    let (dev, info) = wgpu();
    let mut rng = StdRng::seed_from_u64(19);
    let (h, kv, hd, n) = (9, 3, 64, 255);
    let q16 = tensor(&mut rng, [h, hd], &dev).cast(DType::F16);
    let k16 = tensor(&mut rng, [kv, n, hd], &dev).cast(DType::F16);
    let positions: Vec<usize> = (0..n).collect();
    let prunable: Vec<bool> = (0..n).map(|j| j >= 3).collect();
    let input16 = SignificanceInput {
        q_last: &q16,
        keys: &k16,
        positions: &positions,
        prunable: &prunable,
        bias: None,
        last_position: n - 1,
    };
    let ops = poisoned_ops(&info, 64, 2);
    if !info.shader_f16 {
        let e = ops.significance(&input16).unwrap_err().to_string();
        assert!(e.contains("shader-f16"), "{e}");
        return;
    }
    let (q32, k32) = (q16.clone().cast(DType::F32), k16.clone().cast(DType::F32));
    let want = TensorOps
        .significance(&SignificanceInput {
            q_last: &q32,
            keys: &k32,
            ..input16
        })
        .unwrap();
    let got = ops.significance(&input16).unwrap();
    assert_close("f16 significance", &got, &want, 1e-5);
    // an f16 KV cache under an f32 model: f32 query, f16 keys
    let q32 = tensor(&mut rng, [h, hd], &dev);
    let mixed = SignificanceInput {
        q_last: &q32,
        ..input16
    };
    let want = TensorOps
        .significance(&SignificanceInput {
            keys: &k32,
            ..mixed
        })
        .unwrap();
    assert_close(
        "f32 query, f16 keys",
        &ops.significance(&mixed).unwrap(),
        &want,
        1e-5,
    );

    let chunk = ChunkTensors {
        hidden: tensor(&mut rng, [n, 16], &dev).cast(DType::F16),
        cache: vec![LayerKv {
            k: k16.clone(),
            v: tensor(&mut rng, [kv, n, hd], &dev).cast(DType::F16),
        }],
    };
    let keep: Vec<usize> = (0..n).filter(|j| j % 3 != 1).collect();
    let want = TensorOps.gather(chunk.clone(), &keep).unwrap();
    let got = ops.gather(chunk.clone(), &keep).unwrap();
    assert_eq!(got.cache[0].k.dtype(), DType::F16);
    assert_same_chunk("f16 gather", &got, &want);
    // f16 keys turned in f32 and rounded once; the oracle rounds the same f32 result, so the two
    // may differ by one f16 step where a fused multiply-add moves the f32 value across a rounding
    // boundary.
    let all: Vec<usize> = (0..n).collect();
    for keep in [keep, all] {
        let shift = random_shift(&mut rng, keep.len(), hd, &dev);
        let want = TensorOps
            .gather_rotate(chunk.clone(), &keep, &shift)
            .unwrap();
        let got = ops.gather_rotate(chunk.clone(), &keep, &shift).unwrap();
        assert_eq!(got.cache[0].k.dtype(), DType::F16);
        assert_rotated_chunk(
            &format!("f16 gather_rotate keep {}", keep.len()),
            &got,
            &want,
            2e-3,
        );
    }
    // The scalar f16 path (head dim 12: its halves are not whole vec4s).
    let chunk = ChunkTensors {
        hidden: tensor(&mut rng, [n, 16], &dev).cast(DType::F16),
        cache: vec![LayerKv {
            k: tensor(&mut rng, [kv, n, 12], &dev).cast(DType::F16),
            v: tensor(&mut rng, [kv, n, 12], &dev).cast(DType::F16),
        }],
    };
    let keep: Vec<usize> = (0..n).filter(|j| j % 4 != 3).collect();
    let shift = random_shift(&mut rng, keep.len(), 12, &dev);
    let want = TensorOps
        .gather_rotate(chunk.clone(), &keep, &shift)
        .unwrap();
    let got = ops.gather_rotate(chunk, &keep, &shift).unwrap();
    assert_eq!(got.cache[0].k.dtype(), DType::F16);
    assert_rotated_chunk("f16 gather_rotate, head dim 12", &got, &want, 2e-3);
}

/// Device-side selection (`select.wgsl`) equals the host oracle `homer::prune`, ties, ±inf and
/// NaN included.
#[test]
fn select_matches_host_oracle() {
    let (dev, info) = wgpu();
    let ops = poisoned_ops(&info, 64, 2);
    let mut rng = StdRng::seed_from_u64(23);
    for &n in &[1usize, 7, 255, 4097] {
        // Few distinct values, so ties are common.
        let mut s: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-4i32..4) as f32 * 0.5)
            .collect();
        s[0] = f32::INFINITY;
        if n > 3 {
            s[n - 1] = f32::INFINITY;
            s[1] = f32::NEG_INFINITY;
            s[2] = f32::NAN;
            s[3] = -0.0;
        }
        if n > 6 {
            // A negative NaN and a second NaN: both rank with -inf (least significant).
            s[4] = -f32::NAN;
            s[5] = f32::NEG_INFINITY;
        }
        let scores = Tensor::<1>::from_data(TensorData::new(s.clone(), [n]), &dev);
        for drop in [0, 1, n / 3, n.saturating_sub(2), n] {
            let want = homer::prune::keep_after_dropping(&s, drop);
            let got = ops.select_keep_on_device(&scores, drop).unwrap();
            assert_eq!(got, want, "n {n} drop {drop}");
        }
    }
}
