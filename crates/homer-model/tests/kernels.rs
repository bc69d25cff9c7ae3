//! The CPU kernels (burn-flex + `homer_model::cpu`) against their oracle, the same model run
//! with burn tensor ops (on flex and on wgpu), on random weights of awkward shapes: prefill in
//! several blocks (attention over a partly filled, growing KV buffer), HOMER-style layer calls
//! with no past, decode steps, and f16 weights.

use burn::tensor::Tensor;
use homer_model::{
    BackendKind, Device, KvCache, KvDtype, Llama, LlamaConfig, Logits, WeightDtype, read_f32,
};

fn device(kind: BackendKind) -> Device {
    homer_model::backend::device(kind).unwrap().0
}

fn config(heads: usize, kv: usize, hd: usize, d: usize, ff: usize, tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 301,
        hidden_size: d,
        intermediate_size: ff,
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

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 13) % 301).collect()
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of every row of a prompt run in pieces (past > 0 from the second piece on, the KV
/// buffer growing past its first capacity), then 3 decode steps.
fn run(model: &Llama, pieces: &[usize]) -> (Vec<f32>, Vec<Vec<f32>>) {
    let all = ids(pieces.iter().sum());
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
    let mut steps = vec![];
    for t in [5u32, 17, 250] {
        steps.push(model.decode_step(t, &mut cache).unwrap());
    }
    (logits, steps)
}

#[test]
fn kernels_match_tensor_ops_on_awkward_shapes() {
    let flex = device(BackendKind::Cpu);
    let gpu = device(BackendKind::Wgpu);
    // (heads, kv heads, head dim, d_model, ffn, tied, prompt pieces)
    for &(h, kv, hd, d, ff, tied, pieces) in &[
        (4, 2, 8, 32, 48, false, &[7usize, 1, 30][..]),
        (6, 2, 24, 60, 100, true, &[70, 45][..]),
        (3, 3, 16, 48, 40, false, &[1, 129][..]),
        (8, 1, 32, 72, 96, true, &[600][..]),
        // head dim 64 (the AVX-512 microkernels) and a cache past 1,024 rows: decode splits
        // the keys across threads
        (6, 2, 64, 96, 64, false, &[1000, 90][..]),
    ] {
        let cfg = config(h, kv, hd, d, ff, tied);
        let fast = Llama::random_on_path(cfg.clone(), 7, &flex, WeightDtype::F32, true);
        let slow = Llama::random_on_path(cfg.clone(), 7, &flex, WeightDtype::F32, false);
        let oracle = Llama::random_on_path(cfg.clone(), 7, &gpu, WeightDtype::F32, false);
        let (fl, fs) = run(&fast, pieces);
        let (sl, ss) = run(&slow, pieces);
        let (ol, os) = run(&oracle, pieces);
        let what = format!("h {h} kv {kv} hd {hd} d {d} ff {ff} pieces {pieces:?}");
        let e = max_err(&fl, &sl);
        assert!(
            e < 2e-4,
            "prefill logits, kernels vs flex tensor ops ({what}): {e}"
        );
        assert!(max_err(&sl, &ol) < 2e-4, "flex vs wgpu tensor ops ({what})");
        for (i, (a, b)) in fs.iter().zip(&ss).enumerate() {
            let e = max_err(a, b);
            assert!(e < 2e-4, "decode step {i} ({what}): {e}");
            assert!(
                max_err(b, &os[i]) < 2e-4,
                "decode step {i}, flex vs wgpu ({what})"
            );
        }
        assert!(fl.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn homer_layer_calls_match_tensor_ops() {
    // The calls HOMER makes: a node's rows with no past; the K/V, q_last and hidden rows.
    let flex = device(BackendKind::Cpu);
    let cfg = config(6, 2, 24, 60, 100, false);
    let fast = Llama::random_on_path(cfg.clone(), 3, &flex, WeightDtype::F32, true);
    let slow = Llama::random_on_path(cfg, 3, &flex, WeightDtype::F32, false);
    let t = ids(77);
    let positions: Vec<usize> = (0..77).map(|i| (i * 5) % 41).collect();
    let (cos, sin) = fast.rope_tables(&positions);
    let x = fast.embed(&t).unwrap();
    // `queries` of the last rows (HOMER's query window) are the queries attend computes: its
    // last row is q_last on both paths.
    let (wc, ws) = fast.rope_tables(&positions[70..]);
    let qw =
        [&fast, &slow].map(|m| m.layers[1].queries(x.clone().slice([70..77, 0..60]), &wc, &ws));
    assert_eq!(qw[0].dims(), [6, 7, 24]);
    let a = fast.layers[1].attend(x.clone(), &cos, &sin, None);
    let b = slow.layers[1].attend(x.clone(), &cos, &sin, None);
    // Keys re-rotated from these positions to others equal the keys computed at the others
    // (HOMER's re-indexed positions); f16 keys are rotated in f32 and stored back as f16.
    let to: Vec<usize> = (0..77).map(|i| (i * 3 + 7) % 60).collect();
    let (ct, st) = fast.rope_tables(&to);
    for m in [&fast, &slow] {
        let want = m.layers[1].attend(x.clone(), &ct, &st, None).kv.k;
        let got = m.rerotate_keys(a.kv.k.clone(), &positions, &to);
        let e = max_err(&read_f32(got).unwrap(), &read_f32(want.clone()).unwrap());
        assert!(e < 1e-4, "re-rotated keys: {e}");
        let h = m.rerotate_keys(
            a.kv.k.clone().cast(burn::tensor::DType::F16),
            &positions,
            &to,
        );
        assert_eq!(h.dtype(), burn::tensor::DType::F16);
        let e = max_err(&read_f32(h).unwrap(), &read_f32(want).unwrap());
        assert!(e < 1e-2, "re-rotated f16 keys: {e}");
    }
    for q in qw {
        let last = q.slice([0..6, 6..7, 0..24]).reshape([6, 24]);
        let e = max_err(
            &read_f32(last).unwrap(),
            &read_f32(a.q_last.clone()).unwrap(),
        );
        assert!(e < 1e-4, "queries' last row vs q_last: {e}");
    }
    let pairs: [(&str, Tensor<2>, Tensor<2>); 2] = [
        ("hidden", a.hidden.clone(), b.hidden.clone()),
        ("q_last", a.q_last.clone(), b.q_last.clone()),
    ];
    for (what, p, q) in pairs {
        let e = max_err(&read_f32(p).unwrap(), &read_f32(q).unwrap());
        assert!(e < 1e-4, "{what}: {e}");
    }
    assert_eq!(a.kv.k.dims(), [2, 77, 24]);
    let e = max_err(&read_f32(a.kv.k).unwrap(), &read_f32(b.kv.k).unwrap());
    assert!(e < 1e-5, "keys: {e}");
    let e = max_err(&read_f32(a.kv.v).unwrap(), &read_f32(b.kv.v).unwrap());
    assert!(e < 1e-5, "values: {e}");
    let f = fast.layers[1].feed_forward(a.hidden);
    let g = slow.layers[1].feed_forward(b.hidden);
    let e = max_err(&read_f32(f).unwrap(), &read_f32(g).unwrap());
    assert!(e < 1e-4, "feed forward: {e}");
}

#[test]
fn f16_weights_stay_close_to_f32() {
    let flex = device(BackendKind::Cpu);
    let cfg = config(6, 2, 24, 60, 100, true);
    let f32m = Llama::random_on_path(cfg.clone(), 11, &flex, WeightDtype::F32, true);
    let f16m = Llama::random_on_path(cfg, 11, &flex, WeightDtype::F16, true);
    let (a, sa) = run(&f32m, &[40, 9]);
    let (b, sb) = run(&f16m, &[40, 9]);
    let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
    let e = max_err(&a, &b);
    // f16 rounds each weight by at most 2^-11 relative; the logits move by about that.
    assert!(e < 5e-3 * scale, "f16 vs f32 logits: {e} (scale {scale})");
    assert!(e > 0.0, "the f16 model must actually hold f16 weights");
    assert!(max_err(&sa[2], &sb[2]) < 5e-3 * scale);
    // bf16 keeps 8 bits of mantissa (f16 keeps 11): about 8× the error, still close.
    let cfg = config(6, 2, 24, 60, 100, true);
    let bf16m = Llama::random_on_path(cfg, 11, &flex, WeightDtype::BF16, true);
    let (c, _) = run(&bf16m, &[40, 9]);
    let e = max_err(&a, &c);
    assert!(
        e < 4e-2 * scale && e > 0.0,
        "bf16 vs f32 logits: {e} (scale {scale})"
    );
}

#[test]
fn f16_kv_cache_stays_close_to_f32() {
    let flex = device(BackendKind::Cpu);
    // head dims 64 (AVX-512 microkernels) and 24 (portable), caches past 1,024 rows (split
    // decode) and short ones
    for (hd, pieces) in [(64usize, &[1000usize, 90][..]), (24, &[40, 9][..])] {
        let cfg = config(6, 2, hd, 96, 64, false);
        let f32m = Llama::random_on_path(cfg.clone(), 13, &flex, WeightDtype::F32, true);
        let mut f16m = Llama::random_on_path(cfg, 13, &flex, WeightDtype::F32, true);
        f16m.set_kv_dtype(KvDtype::F16).unwrap();
        let (a, sa) = run(&f32m, pieces);
        let (b, sb) = run(&f16m, pieces);
        let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
        let e = max_err(&a, &b);
        // keys and values rounded to f16 once (2^-11 relative): the logits move by about that
        assert!(
            e < 5e-3 * scale,
            "hd {hd}: f16 vs f32 KV logits: {e} (scale {scale})"
        );
        assert!(e > 0.0, "hd {hd}: the cache must actually hold f16");
        for (x, y) in sa.iter().zip(&sb) {
            assert!(max_err(x, y) < 5e-3 * scale, "hd {hd}: decode steps");
        }
        let mut cache = KvCache::new(f16m.n_layers());
        f16m.forward(&ids(5), None, &mut cache, Logits::None)
            .unwrap();
        let kv = cache.layer(0).unwrap();
        assert_eq!(kv.k.dtype(), burn::tensor::DType::F16);
        assert_eq!(kv.v.dtype(), burn::tensor::DType::F16);
    }
    // burn's tensor ops (no CPU kernels) take an f16 cache too
    let cfg = config(6, 2, 24, 96, 64, false);
    let f32m = Llama::random_on_path(cfg.clone(), 13, &flex, WeightDtype::F32, false);
    let mut f16m = Llama::random_on_path(cfg, 13, &flex, WeightDtype::F32, false);
    f16m.set_kv_dtype(KvDtype::F16).unwrap();
    let ((a, _), (b, _)) = (run(&f32m, &[40, 9]), run(&f16m, &[40, 9]));
    let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
    let e = max_err(&a, &b);
    assert!(
        e < 5e-3 * scale && e > 0.0,
        "tensor ops, f16 vs f32 KV: {e}"
    );
}

#[test]
fn kv_buffer_grows_in_place_and_keeps_rows() {
    let flex = device(BackendKind::Cpu);
    let cfg = config(4, 2, 8, 32, 48, false);
    let m = Llama::random(cfg, 5, &flex);
    let mut cache = KvCache::with_capacity(m.n_layers(), 10);
    m.forward(&ids(10), None, &mut cache, Logits::None).unwrap();
    let b = cache.layers[0].as_ref().unwrap();
    assert_eq!((b.len(), b.capacity()), (10, 10));
    let before = read_f32(cache.layer(2).unwrap().k).unwrap();
    m.decode_step(3, &mut cache).unwrap();
    let b = cache.layers[0].as_ref().unwrap();
    assert_eq!((b.len(), b.capacity()), (11, 20), "a full buffer doubles");
    let after = read_f32(cache.layer(2).unwrap().k).unwrap();
    // The 10 old rows of each KV head are unchanged.
    for c in 0..2 {
        assert_eq!(
            &after[c * 11 * 8..c * 11 * 8 + 80],
            &before[c * 10 * 8..c * 10 * 8 + 80]
        );
    }
    cache.reserve_total(40, &m.device);
    assert_eq!(cache.layers[1].as_ref().unwrap().capacity(), 40);
    assert_eq!(cache.len(), 11);
}

/// Issue 17, item 3: logits that come out NaN name the first layer whose output is not finite;
/// on both backends.
#[test]
fn non_finite_logits_name_the_layer() {
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let dev = device(kind);
        let mut model = Llama::random(config(4, 2, 8, 32, 48, false), 5, &dev);
        let prompt = ids(20);
        let (l, _) = model.prefill(&prompt, Logits::Last).unwrap();
        assert!(read_f32(l).unwrap().iter().all(|v| v.is_finite()));
        model.layers[1].ffn_norm = Tensor::<1>::full([32], f32::NAN, &dev);
        let (l, _) = model.prefill(&prompt, Logits::Last).unwrap();
        assert!(read_f32(l).unwrap().iter().any(|v| v.is_nan()), "{kind}");
        let e = model.non_finite_error(&prompt).to_string();
        assert!(
            e.contains("non-finite at layer 1 of 3") && e.contains("--dtype"),
            "{kind}: {e}"
        );
    }
}

/// Issue 17, item 5 on the CPU: a forward whose K/V cache would outgrow the memory available is
/// refused before allocating (an allocation failure would abort the process), and the model
/// goes on.
#[test]
fn a_cache_beyond_the_memory_available_is_refused_on_the_cpu() {
    let dev = device(BackendKind::Cpu);
    let model = Llama::random(config(4, 2, 8, 32, 48, false), 5, &dev);
    let prompt = ids(20);
    let mut cache = KvCache::new(model.n_layers());
    // 2^40 positions x 2 heads x 8 dims x 4 bytes x (K, V) x 3 layers: 384 TiB.
    cache.initial_capacity = 1 << 40;
    let e = model
        .forward(&prompt, None, &mut cache, Logits::Last)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("the K/V cache for 1099511627776 positions (3 layers)")
            && e.contains("needs 422212465067188 bytes of memory")
            && e.contains("--kv-dtype f16"),
        "{e}"
    );
    let (l, _) = model.prefill(&prompt, Logits::Last).unwrap();
    assert!(read_f32(l).unwrap().iter().all(|v| v.is_finite()));
}

/// `backend::device_memory`: None on the CPU backend (its tensors live in the heap); on wgpu it
/// counts a 24 MiB tensor (three of cubecl's 8 MiB pages) while the tensor lives, and the pools
/// hold at least what is live.
#[test]
fn device_memory_counts_a_tensor_on_the_gpu() {
    use homer_model::backend::device_memory;
    assert_eq!(device_memory(&device(BackendKind::Cpu)), None);
    let gpu = device(BackendKind::Wgpu);
    let n = 6 << 20;
    let t = Tensor::<1>::from_data(burn::tensor::TensorData::new(vec![1f32; n], [n]), &gpu);
    gpu.sync().unwrap();
    let m = device_memory(&gpu).expect("a wgpu device reports its pools");
    assert!(m.in_use >= 4 * n as u64, "{m:?}");
    assert!(m.reserved >= m.in_use, "{m:?}");
    // The tensor is what it was given (the bytes are really on the device).
    let back = read_f32(t.slice([n - 3..n])).unwrap();
    assert_eq!(back, vec![1.0; 3]);
}
