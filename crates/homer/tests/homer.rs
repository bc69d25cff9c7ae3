//! HOMER through the real depth-first driver on small Llama models: the spec's test vectors
//! (§14 T1–T3 with the index stand-in score, T6 with the real significance), propagation and
//! affix averaging checked against plain forwards of the leaves, one chunk = plain prefill on
//! both backends, and the live-row bound of the depth-first order.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::tensor::{Tensor, TensorData};
use homer::{
    BiasTable, ChunkTensors, HomerConfig, HomerInput, HomerOps, HomerOutput, NextPosition, Scoring,
    SignificanceInput, TensorOps, homer_prefill,
};
use homer_model::{BackendKind, Device, KvCache, LayerKv, Llama, LlamaConfig, Logits, read_f32};

fn device(kind: BackendKind) -> Device {
    homer_model::backend::device(kind)
        .unwrap_or_else(|e| panic!("{kind} backend unavailable: {e}"))
        .0
}

fn tiny_config(n_layers: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: n_layers,
        num_attention_heads: 4,
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

fn by_index(sign: f32) -> Scoring {
    Scoring::Custom(Arc::new(move |rows: &homer::RowMeta| {
        rows.context_index
            .iter()
            .map(|c| c.map_or(0.0, |i| sign * i as f32))
            .collect()
    }))
}

fn run(model: &Llama, p: &[u32], c: &[u32], s: &[u32], cfg: &HomerConfig) -> HomerOutput {
    homer_prefill(
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
        &TensorOps,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn config(chunk_len: usize, warmup: usize, scoring: Scoring) -> HomerConfig {
    HomerConfig {
        chunk_len,
        target_len: None,
        warmup_layers: warmup,
        max_initial_chunk_len: None,
        bias: None,
        scoring,
        selection: Default::default(),
        next_position: NextPosition::AfterLast,
    }
}

fn host3(t: &Tensor<3>) -> (Vec<f32>, [usize; 3]) {
    (read_f32(t.clone()).unwrap(), t.dims())
}

/// Rows `rows` of a [KV, n, hd] tensor, as [KV][row][hd] flattened.
fn take_rows(t: &Tensor<3>, rows: &[usize]) -> Vec<f32> {
    let (v, [kv, n, hd]) = host3(t);
    let mut out = vec![];
    for h in 0..kv {
        for &r in rows {
            assert!(r < n);
            out.extend_from_slice(&v[(h * n + r) * hd..(h * n + r + 1) * hd]);
        }
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn t1_final_cache_rows_positions_and_propagation() {
    let dev = device(BackendKind::Cpu);
    let model = Llama::random(tiny_config(8), 11, &dev);
    let (p, c, s) = (ids(2, 1), ids(128, 2), ids(2, 3));
    let out = run(&model, &p, &c, &s, &config(20, 2, by_index(1.0)));
    let want: Vec<usize> = (56..64).chain(120..128).collect();
    assert_eq!(out.trace.kept, want);
    let mut pos = vec![0, 1];
    pos.extend(10..18);
    pos.extend(10..18);
    pos.extend([18, 19]);
    assert_eq!(out.positions, pos);
    assert_eq!(out.last_position_id, 19);
    assert_eq!(out.cache.next_position, 20);
    assert_eq!(out.trace.n_chunks, 8);
    assert_eq!(out.trace.nodes.len(), 15);
    // Every layer holds the same 20 rows.
    for l in &out.cache.layers {
        assert_eq!(l.as_ref().unwrap().len(), 20);
    }
    // Leaves prune 8 at layer 4; height-1 nodes at layer 5; node(0..3) keeps C56..63.
    let leaf0 = &out.trace.nodes[0];
    assert_eq!(
        (leaf0.prune_layer, leaf0.rows_in, leaf0.rows_out),
        (Some(4), 20, 12)
    );
    assert_eq!(leaf0.kept, (8..16).collect::<Vec<_>>());
    assert_eq!(leaf0.dropped, (0..8).collect::<Vec<_>>());
    let q = out.trace.nodes.iter().find(|n| n.leaves == (0..4)).unwrap();
    assert_eq!(
        (q.prune_layer, q.kept.clone()),
        (Some(6), (56..64).collect())
    );
    assert_eq!(out.trace.nodes[14].prune_layer, None);

    // Propagation and affix averaging: at the leaves' layers 0..5 the final cache must hold
    // exactly what a plain forward of each leaf computed for its surviving rows, and for the
    // affix rows the mean over all 8 leaves (nested pairwise means = uniform mean).
    let plan = &out.plan;
    let mut leaf_caches = vec![];
    for i in 0..8 {
        let leaf_ids: Vec<u32> = p
            .iter()
            .chain(&c[plan.chunks[i].clone()])
            .chain(&s)
            .copied()
            .collect();
        let mut cache = KvCache::new(8);
        model
            .forward(
                &leaf_ids,
                Some(&plan.leaf_positions(i)),
                &mut cache,
                Logits::Last,
            )
            .unwrap();
        leaf_caches.push(cache);
    }
    for l in 0..5 {
        let fin = out.cache.layer(l).unwrap();
        for (which, fk, lk) in [("K", &fin.k, 0), ("V", &fin.v, 1)] {
            let get = |i: usize| {
                let kv = leaf_caches[i].layer(l).unwrap();
                if lk == 0 { kv.k.clone() } else { kv.v.clone() }
            };
            // Leaf 3 rows 10..18 are C56..63; leaf 7 rows 10..18 are C120..127.
            let ctx = [
                take_rows(&get(3), &(10..18).collect::<Vec<_>>()),
                take_rows(&get(7), &(10..18).collect::<Vec<_>>()),
            ];
            let got_l = take_rows(fk, &(2..10).collect::<Vec<_>>());
            let got_r = take_rows(fk, &(10..18).collect::<Vec<_>>());
            assert!(max_diff(&got_l, &ctx[0]) < 1e-5, "layer {l} {which} left");
            assert!(max_diff(&got_r, &ctx[1]) < 1e-5, "layer {l} {which} right");
            for (rows_fin, rows_leaf) in [(vec![0, 1], vec![0, 1]), (vec![18, 19], vec![18, 19])] {
                let mut mean = vec![0f32; take_rows(&get(0), &rows_leaf).len()];
                for i in 0..8 {
                    for (m, x) in mean.iter_mut().zip(take_rows(&get(i), &rows_leaf)) {
                        *m += x / 8.0;
                    }
                }
                let got = take_rows(fk, &rows_fin);
                assert!(
                    max_diff(&got, &mean) < 1e-5,
                    "layer {l} {which} affix rows {rows_fin:?}"
                );
            }
        }
    }
    // The suffix rows really differ between leaves (so the mean above is a real check).
    let a = take_rows(&leaf_caches[0].layer(2).unwrap().k, &[19]);
    let b = take_rows(&leaf_caches[5].layer(2).unwrap().k, &[19]);
    assert!(max_diff(&a, &b) > 1e-3);

    // Keep the earliest instead: C0..7 and C64..71 at positions 2..9.
    let out = run(&model, &p, &c, &s, &config(20, 2, by_index(-1.0)));
    assert_eq!(out.trace.kept, (0..8).chain(64..72).collect::<Vec<_>>());
    assert_eq!(
        &out.positions[2..18],
        &[(2..10).collect::<Vec<_>>(), (2..10).collect()].concat()[..]
    );
}

#[test]
fn t2_and_t3_final_rows() {
    let dev = device(BackendKind::Cpu);
    let model = Llama::random(tiny_config(8), 5, &dev);
    let (p, s) = (ids(2, 4), ids(2, 5));
    // T2: L = 100.
    let out = run(&model, &p, &ids(100, 6), &s, &config(20, 2, by_index(1.0)));
    assert_eq!(out.trace.kept, (44..52).chain(92..100).collect::<Vec<_>>());
    let mut pos = vec![0, 1];
    pos.extend(7..15);
    pos.extend(3..11);
    pos.extend([15, 16]);
    assert_eq!(out.positions, pos);
    assert_eq!(out.last_position_id, 16);
    // T3: L = 98 (short right chunk).
    let out = run(&model, &p, &ids(98, 7), &s, &config(20, 2, by_index(1.0)));
    let want: Vec<usize> = (44..52).chain([90]).chain(91..98).collect();
    assert_eq!(out.trace.kept, want);
    let mut pos = vec![0, 1];
    pos.extend(7..15);
    pos.push(14);
    pos.extend(2..9);
    pos.extend([15, 16]);
    assert_eq!(out.positions, pos);
    let leaf7 = out.trace.nodes.iter().find(|n| n.leaves == (7..8)).unwrap();
    assert_eq!(
        (leaf7.rows_in, leaf7.rows_out, leaf7.prune_layer),
        (11, 11, None)
    );
    // Reference generate convention: the first decoded token reuses last_position_id.
    let mut cfg = config(20, 2, by_index(1.0));
    cfg.next_position = NextPosition::ReferenceGenerate;
    let out = run(&model, &p, &ids(98, 7), &s, &cfg);
    assert_eq!(out.cache.next_position, 16);
}

#[test]
fn t6_significance_arithmetic() {
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let dev = device(kind);
        // head_dim 1 makes the scaled logit q·k itself; both query heads read their own KV head.
        let q = Tensor::<2>::from_data(TensorData::new(vec![1f32, 1.0], [2, 1]), &dev);
        let h0 = [9f32, 1.0, 2.0, 0.5, 3.0, 7.0];
        let h1 = [8f32, 1.5, 0.0, 2.5, 1.0, 6.0];
        let k = Tensor::<3>::from_data(
            TensorData::new(h0.iter().chain(&h1).copied().collect::<Vec<_>>(), [2, 6, 1]),
            &dev,
        );
        let positions: Vec<usize> = (0..6).collect();
        let prunable = [false, true, true, true, true, false];
        let bias = [0.5f32, 1.0, 0.0, 0.0, 0.0, 0.0];
        let sig = TensorOps
            .significance(&SignificanceInput {
                q_last: &q,
                keys: &k,
                positions: &positions,
                prunable: &prunable,
                bias: Some(&bias),
                last_position: 5,
            })
            .unwrap();
        let inf = f32::INFINITY;
        assert_eq!(sig, vec![inf, 1.5, 2.0, 2.5, 2.0, inf], "{kind}");
        assert_eq!(homer::prune::keep_after_dropping(&sig, 2), vec![0, 3, 4, 5]);
        let raw = TensorOps
            .significance(&SignificanceInput {
                q_last: &q,
                keys: &k,
                positions: &positions,
                prunable: &[true; 6],
                bias: None,
                last_position: 5,
            })
            .unwrap();
        assert_eq!(raw, vec![9.0, 1.5, 2.0, 2.5, 3.0, 7.0]);
    }
}

/// Significance with GQA (9 query heads on 3 KV heads) against a hand loop.
#[test]
fn significance_gqa_matches_hand_loop() {
    let dev = device(BackendKind::Cpu);
    let (h, kvh, n, hd) = (9, 3, 13, 8);
    let mut state = 7u32;
    let mut rnd = move || {
        state = state.wrapping_mul(1664525).wrapping_add(1013904223);
        (state >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
    };
    let qv: Vec<f32> = (0..h * hd).map(|_| rnd()).collect();
    let kv: Vec<f32> = (0..kvh * n * hd).map(|_| rnd()).collect();
    let bias: Vec<f32> = (0..20).map(|_| rnd()).collect();
    let positions: Vec<usize> = (0..n).map(|j| (j * 7) % 11).collect();
    let last = 12;
    let prunable: Vec<bool> = (0..n).map(|j| j % 5 != 0).collect();
    let q = Tensor::<2>::from_data(TensorData::new(qv.clone(), [h, hd]), &dev);
    let k = Tensor::<3>::from_data(TensorData::new(kv.clone(), [kvh, n, hd]), &dev);
    let got = TensorOps
        .significance(&SignificanceInput {
            q_last: &q,
            keys: &k,
            positions: &positions,
            prunable: &prunable,
            bias: Some(&bias),
            last_position: last,
        })
        .unwrap();
    for j in 0..n {
        if !prunable[j] {
            assert_eq!(got[j], f32::INFINITY);
            continue;
        }
        let mut best = f32::NEG_INFINITY;
        for hh in 0..h {
            let g = hh / (h / kvh);
            let dot: f32 = (0..hd)
                .map(|i| qv[hh * hd + i] * kv[(g * n + j) * hd + i])
                .sum();
            best = best.max(dot / (hd as f32).sqrt());
        }
        let want = best - bias[last - positions[j]];
        assert!(
            (got[j] - want).abs() < 1e-5,
            "row {j}: {} vs {want}",
            got[j]
        );
    }
}

#[test]
fn merge_and_gather_ops() {
    let dev = device(BackendKind::Cpu);
    let mk2 = |n: usize, base: f32| {
        let v: Vec<f32> = (0..n * 3).map(|i| base + i as f32).collect();
        Tensor::<2>::from_data(TensorData::new(v, [n, 3]), &dev)
    };
    let mk3 = |n: usize, base: f32| {
        let v: Vec<f32> = (0..2 * n * 2).map(|i| base + i as f32).collect();
        Tensor::<3>::from_data(TensorData::new(v, [2, n, 2]), &dev)
    };
    let left = ChunkTensors {
        hidden: mk2(5, 0.0),
        cache: vec![LayerKv {
            k: mk3(5, 0.0),
            v: mk3(5, 100.0),
        }],
    };
    let right = ChunkTensors {
        hidden: mk2(4, 1000.0),
        cache: vec![LayerKv {
            k: mk3(4, 1000.0),
            v: mk3(4, 2000.0),
        }],
    };
    // P = 1, S = 2: left = [p | c c | s s], right = [p | c | s s].
    let m = TensorOps.merge(left.clone(), right.clone(), 1, 2).unwrap();
    assert_eq!(m.rows(), 6);
    let h = read_f32(m.hidden.clone()).unwrap();
    let l = read_f32(left.hidden.clone()).unwrap();
    let r = read_f32(right.hidden.clone()).unwrap();
    let row = |v: &[f32], i: usize| v[i * 3..i * 3 + 3].to_vec();
    let avg = |a: Vec<f32>, b: Vec<f32>| {
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x + y) / 2.0)
            .collect::<Vec<_>>()
    };
    assert_eq!(row(&h, 0), avg(row(&l, 0), row(&r, 0)));
    assert_eq!(row(&h, 1), row(&l, 1));
    assert_eq!(row(&h, 2), row(&l, 2));
    assert_eq!(row(&h, 3), row(&r, 1));
    assert_eq!(row(&h, 4), avg(row(&l, 3), row(&r, 2)));
    assert_eq!(row(&h, 5), avg(row(&l, 4), row(&r, 3)));
    let k = take_rows(&m.cache[0].k, &[0, 3, 5]);
    let lk = take_rows(&left.cache[0].k, &[0, 4]);
    let rk = take_rows(&right.cache[0].k, &[0, 1, 3]);
    // [kv][row][hd]: head 0 rows (0, 3, 5), then head 1.
    for head in 0..2 {
        let o = head * 6;
        assert_eq!(
            &k[o..o + 2],
            &avg(
                lk[head * 4..head * 4 + 2].to_vec(),
                rk[head * 6..head * 6 + 2].to_vec()
            )[..]
        );
        assert_eq!(&k[o + 2..o + 4], &rk[head * 6 + 2..head * 6 + 4]);
        assert_eq!(
            &k[o + 4..o + 6],
            &avg(
                lk[head * 4 + 2..head * 4 + 4].to_vec(),
                rk[head * 6 + 4..head * 6 + 6].to_vec()
            )[..]
        );
    }
    // Gather keeps the listed rows everywhere.
    let g = TensorOps.gather(left.clone(), &[0, 2, 4]).unwrap();
    assert_eq!(
        read_f32(g.hidden).unwrap(),
        [row(&l, 0), row(&l, 2), row(&l, 4)].concat()
    );
    assert_eq!(
        take_rows(&g.cache[0].v, &[0, 1, 2]),
        take_rows(&left.cache[0].v, &[0, 2, 4])
    );
    assert!(TensorOps.gather(left, &[7]).is_err());
}

/// One chunk ⇒ plain prefill: same logits and cache, on both backends, with the real tiny
/// fixture model (GQA).
#[test]
fn one_chunk_equals_plain_prefill() {
    let path = Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../../tests/fixtures/tiny-llama");
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let (dev, info) = homer_model::backend::device(kind).unwrap();
        let src = homer_model::load::open(&path).unwrap();
        let model = Llama::load(
            src.as_ref(),
            &dev,
            info.max_storage_buffer_binding_size,
            &mut |_, _| {},
        )
        .unwrap();
        let (p, c, s) = (ids(5, 8), ids(37, 9), ids(4, 10));
        let out = run(&model, &p, &c, &s, &config(64, 1, Scoring::Attention));
        assert_eq!(out.plan.n_chunks, 1);
        let all: Vec<u32> = [p.clone(), c.clone(), s.clone()].concat();
        let (logits, cache) = model.prefill(&all, Logits::Last).unwrap();
        let plain = read_f32(logits).unwrap();
        let d = max_diff(&out.logits, &plain);
        assert!(d < 1e-4, "{kind}: logits differ by {d}");
        assert_eq!(out.positions, (0..46).collect::<Vec<_>>());
        assert_eq!((out.last_position_id, out.cache.next_position), (45, 46));
        for (l, (a, b)) in out.cache.layers.iter().zip(&cache.layers).enumerate() {
            let (a, b) = (a.as_ref().unwrap().filled(), b.as_ref().unwrap().filled());
            let dk = max_diff(
                &read_f32(a.k.clone()).unwrap(),
                &read_f32(b.k.clone()).unwrap(),
            );
            let dv = max_diff(
                &read_f32(a.v.clone()).unwrap(),
                &read_f32(b.v.clone()).unwrap(),
            );
            assert!(dk < 1e-4 && dv < 1e-4, "{kind} layer {l}: K {dk} V {dv}");
        }
        assert_eq!(out.trace.kept, (0..37).collect::<Vec<_>>());
        // With one chunk nothing merges: every selection knob (a fresh suffix re-reads the
        // same rows) is the plain prefill too.
        let mut fresh = config(64, 1, Scoring::Attention);
        fresh.selection = "span4,query=suffix,positions=reindex,reread=suffix"
            .parse()
            .unwrap();
        let f = run(&model, &p, &c, &s, &fresh);
        let d = max_diff(&f.logits, &plain);
        assert!(d < 1e-4, "{kind}: fresh suffix logits differ by {d}");
        assert_eq!(f.positions, (0..46).collect::<Vec<_>>());
        assert_eq!((f.cache.len(), f.cache.next_position), (46, 46));
        let mut fc = f.cache;
        let mut pc = cache.clone();
        let a = model.decode_step(3, &mut fc).unwrap();
        let b = model.decode_step(3, &mut pc).unwrap();
        assert!(
            max_diff(&a, &b) < 1e-4,
            "{kind}: decoding after a fresh suffix"
        );
        // Decoding continues identically.
        let mut hc = out.cache;
        let mut pc = cache;
        let a = model.decode_step(3, &mut hc).unwrap();
        let b = model.decode_step(3, &mut pc).unwrap();
        assert!(max_diff(&a, &b) < 1e-4);
    }
}

/// The wgpu backend takes the same pruning decisions as the CPU one on a multi-chunk prefill
/// with the real significance and a non-zero bias.
#[test]
fn multi_chunk_cpu_and_wgpu_agree() {
    let mut outs = vec![];
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let dev = device(kind);
        let model = Llama::random(tiny_config(6), 21, &dev);
        let mut bias = BiasTable::zeros(6, 64);
        for (i, b) in bias.data.iter_mut().enumerate() {
            *b = ((i % 64) as f32 * 0.37).sin() * 0.5;
        }
        let mut cfg = config(24, 2, Scoring::Attention);
        cfg.bias = Some(Arc::new(bias));
        let out = run(&model, &ids(3, 11), &ids(90, 12), &ids(3, 13), &cfg);
        assert_eq!(out.plan.n_chunks, 8);
        assert_eq!(out.trace.scoring, "calibrated");
        outs.push(out);
    }
    assert_eq!(outs[0].trace.kept, outs[1].trace.kept);
    assert_eq!(outs[0].positions, outs[1].positions);
    let d = max_diff(&outs[0].logits, &outs[1].logits);
    assert!(d < 1e-3, "logits differ by {d}");
    // Not a degenerate run: every node the plan cuts dropped rows (12 of 15 here: the root and,
    // by the short-right-chunk rule, the last two leaves keep everything).
    let pruning = outs[0]
        .plan
        .nodes
        .iter()
        .filter(|n| n.drop_count() > 0)
        .count();
    assert_eq!(pruning, 12);
    assert_eq!(
        outs[0]
            .trace
            .nodes
            .iter()
            .filter(|n| !n.dropped.is_empty())
            .count(),
        pruning
    );
}

/// Whole-unit selections (spans, sentences) through the real tree on both backends: every node
/// keeps or drops each unit whole (of the rows it holds), never keeps more than planned, the
/// cache and positions follow the kept rows, and both backends keep the same tokens. Pooled
/// selection keeps exactly the planned rows.
#[test]
fn unit_selections_keep_units_whole() {
    use homer::{Agg, Selection, Unit};
    let (p, c, s) = (ids(3, 31), ids(90, 32), ids(3, 33));
    // Sentence units of uneven lengths 1..=7 tokens.
    let mut sentence = vec![];
    let mut u = 0u32;
    while sentence.len() < c.len() {
        let len = 1 + (u as usize * 5) % 7;
        sentence.extend(std::iter::repeat_n(u, len));
        u += 1;
    }
    sentence.truncate(c.len());
    for (unit, units) in [
        (
            Unit::Span {
                len: 4,
                agg: Agg::Max,
            },
            None,
        ),
        (
            Unit::Span {
                len: 5,
                agg: Agg::Mean,
            },
            None,
        ),
        (Unit::Sentence { agg: Agg::Max }, Some(&sentence[..])),
    ] {
        let unit_of = |i: usize| match unit {
            Unit::Span { len, .. } => (i / len) as u32,
            _ => sentence[i],
        };
        let mut kept_by_backend = vec![];
        for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
            let dev = device(kind);
            let model = Llama::random(tiny_config(6), 21, &dev);
            let mut cfg = config(24, 2, Scoring::Attention);
            cfg.selection = Selection {
                unit,
                ..Default::default()
            };
            let out = homer_prefill(
                &model,
                HomerInput {
                    prefix: &p,
                    context: &c,
                    suffix: &s,
                    units,
                    prior: None,
                    separator: None,
                },
                &cfg,
                &TensorOps,
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap_or_else(|e| panic!("{unit}: {e}"));
            let mut underfilled = 0;
            for (node, plan) in out.trace.nodes.iter().zip(&out.plan.nodes) {
                assert!(node.rows_out <= plan.len_out, "{unit}: node {}", node.id);
                if node.dropped.is_empty() {
                    continue;
                }
                underfilled += usize::from(node.rows_out < plan.len_out);
                for &k in &node.kept {
                    assert!(
                        !node.dropped.iter().any(|&d| unit_of(d) == unit_of(k)),
                        "{unit}: node {} kept token {k} and dropped part of its unit",
                        node.id
                    );
                }
            }
            // Whole units do not fill every node exactly here: the relaxed row count is used.
            assert!(
                underfilled > 0,
                "{unit}: no node kept fewer rows than planned"
            );
            let root = out.trace.nodes.last().unwrap();
            assert_eq!(out.trace.final_len, root.rows_out);
            assert_eq!(out.positions.len(), out.trace.final_len);
            assert_eq!(out.trace.kept.len(), out.trace.final_len - 6);
            assert_eq!(out.cache.len(), out.trace.final_len);
            assert!(out.logits.iter().all(|x| x.is_finite()));
            kept_by_backend.push(out.trace.kept);
        }
        assert_eq!(kept_by_backend[0], kept_by_backend[1], "{unit}");
    }
    // Pooling keeps exactly the planned rows, and a sentence selection without units is an error.
    let dev = device(BackendKind::Cpu);
    let model = Llama::random(tiny_config(6), 21, &dev);
    let mut cfg = config(24, 2, Scoring::Attention);
    cfg.selection = Selection {
        unit: Unit::Pool {
            width: 5,
            agg: Agg::Max,
        },
        ..Default::default()
    };
    let pooled = run(&model, &p, &c, &s, &cfg);
    let paper = run(&model, &p, &c, &s, &config(24, 2, Scoring::Attention));
    assert_eq!(pooled.trace.final_len, paper.trace.final_len);
    assert_ne!(pooled.trace.kept, paper.trace.kept);
    for (n, plan) in pooled.trace.nodes.iter().zip(&pooled.plan.nodes) {
        assert_eq!(n.rows_out, plan.len_out);
    }
    // The suffix's mean query ranks differently from the last row's, the same on both
    // backends (the window's queries come from `DecoderLayer::queries`).
    let mut kept = vec![];
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let m = Llama::random(tiny_config(6), 21, &device(kind));
        let mut qc = config(24, 2, Scoring::Attention);
        qc.selection.query = homer::Query::Suffix;
        let out = run(&m, &p, &c, &s, &qc);
        assert_eq!(out.trace.final_len, paper.trace.final_len);
        kept.push(out.trace.kept);
    }
    assert_eq!(kept[0], kept[1]);
    assert_ne!(kept[0], paper.trace.kept);
    cfg.selection = Selection {
        unit: Unit::Sentence { agg: Agg::Max },
        ..Default::default()
    };
    let err = homer_prefill(
        &model,
        HomerInput {
            prefix: &p,
            context: &c,
            suffix: &s,
            units: None,
            prior: None,
            separator: None,
        },
        &cfg,
        &TensorOps,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .err()
    .expect("sentence selection without units must fail");
    assert!(err.to_string().contains("sentence units"), "{err}");
}

/// Re-indexed positions: the final cache is numbered 0..n on both backends (same kept tokens and
/// logits); with `root`, merging is the paper's (same kept tokens and first logits) and only the
/// final keys are re-rotated: they equal the paper's keys re-rotated from its positions.
#[test]
fn reindexed_positions() {
    use homer::{Positions, Selection};
    let (p, c, s) = (ids(3, 41), ids(90, 42), ids(3, 43));
    let mut outs = vec![];
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let model = Llama::random(tiny_config(6), 21, &device(kind));
        let mut cfg = config(24, 2, Scoring::Attention);
        cfg.selection = Selection {
            positions: Positions::Reindex,
            ..Default::default()
        };
        let out = run(&model, &p, &c, &s, &cfg);
        let n = out.trace.final_len;
        assert_eq!(out.positions, (0..n).collect::<Vec<_>>());
        assert_eq!(out.last_position_id, n - 1);
        assert_eq!(out.cache.next_position, n);
        assert!(out.logits.iter().all(|x| x.is_finite()));
        outs.push(out);
    }
    assert_eq!(outs[0].trace.kept, outs[1].trace.kept);
    let d = max_diff(&outs[0].logits, &outs[1].logits);
    assert!(d < 1e-3, "reindex: logits differ by {d}");

    // A fresh suffix over many chunks: the same kept tokens as the merged suffix, other first
    // logits, the same on both backends, a cache of the same rows.
    let mut fresh = vec![];
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let model = Llama::random(tiny_config(6), 21, &device(kind));
        let mut cfg = config(24, 2, Scoring::Attention);
        cfg.selection.reread = homer::Reread::Suffix;
        let f = run(&model, &p, &c, &s, &cfg);
        let m = run(&model, &p, &c, &s, &config(24, 2, Scoring::Attention));
        assert_eq!(f.trace.kept, m.trace.kept);
        assert_eq!(f.cache.len(), m.cache.len());
        assert_eq!(f.cache.next_position, m.cache.next_position);
        assert!(
            max_diff(&f.logits, &m.logits) > 1e-3,
            "{kind}: the suffix was not re-read"
        );
        fresh.push(f.logits);
    }
    let d = max_diff(&fresh[0], &fresh[1]);
    assert!(d < 1e-3, "fresh suffix: backends differ by {d}");

    let model = Llama::random(tiny_config(6), 21, &device(BackendKind::Cpu));
    let paper = run(&model, &p, &c, &s, &config(24, 2, Scoring::Attention));
    assert_ne!(
        outs[0].trace.kept, paper.trace.kept,
        "re-indexing changes the scores"
    );
    let mut cfg = config(24, 2, Scoring::Attention);
    cfg.selection.positions = Positions::Root;
    let root = run(&model, &p, &c, &s, &cfg);
    assert_eq!(root.trace.kept, paper.trace.kept);
    assert_eq!(max_diff(&root.logits, &paper.logits), 0.0);
    let n = root.trace.final_len;
    assert_eq!(root.positions, (0..n).collect::<Vec<_>>());
    assert_ne!(paper.positions, root.positions);
    let to: Vec<usize> = (0..n).collect();
    for (l, (a, b)) in root
        .cache
        .layers
        .iter()
        .zip(&paper.cache.layers)
        .enumerate()
    {
        let (a, b) = (a.as_ref().unwrap().filled(), b.as_ref().unwrap().filled());
        let want = model.rerotate_keys(b.k, &paper.positions, &to);
        let e = max_diff(&host3(&a.k).0, &host3(&want).0);
        assert!(
            e < 1e-6,
            "layer {l}: root keys vs re-rotated paper keys: {e}"
        );
        assert_eq!(max_diff(&host3(&a.v).0, &host3(&b.v).0), 0.0);
    }

    // Re-reading everything kept: exactly a plain prefill of prefix + kept tokens + suffix.
    let mut cfg = config(24, 2, Scoring::Attention);
    cfg.selection.reread = homer::Reread::All;
    let all = run(&model, &p, &c, &s, &cfg);
    assert_eq!(all.trace.kept, paper.trace.kept);
    let ids: Vec<u32> = p
        .iter()
        .chain(all.trace.kept.iter().map(|&i| &c[i]))
        .chain(&s)
        .copied()
        .collect();
    let (l, plain) = model.prefill(&ids, Logits::Last).unwrap();
    assert_eq!(max_diff(&all.logits, &read_f32(l).unwrap()), 0.0);
    assert_eq!(all.positions, (0..ids.len()).collect::<Vec<_>>());
    assert_eq!(all.cache.len(), ids.len());
    assert_eq!(all.cache.next_position, plain.next_position);
}

/// Depth-first order: the live state grows with the tree height, not the chunk count.
#[test]
fn live_rows_grow_with_height_not_chunks() {
    let dev = device(BackendKind::Cpu);
    let model = Llama::random(tiny_config(8), 3, &dev);
    let mut peaks = vec![];
    for chunks in [2usize, 4, 16, 64] {
        // C = 20, P = S = 2: 16 context tokens per chunk.
        let out = run(
            &model,
            &ids(2, 1),
            &ids(16 * chunks, 2),
            &ids(2, 3),
            &config(20, 1, Scoring::Random { seed: 1 }),
        );
        assert_eq!(out.plan.n_chunks, chunks);
        let h = out.plan.height;
        assert!(
            out.stats.peak_live_chunks <= h + 1,
            "{chunks} chunks: {:?}",
            out.stats
        );
        peaks.push((chunks, h, out.stats.peak_live_rows));
    }
    // Each extra level adds at most one held sibling (≤ 12 rows × 9 caches); 32× more chunks
    // (2 → 64) adds 5 levels.
    let (_, h0, p0) = peaks[0];
    for &(chunks, h, p) in &peaks[1..] {
        assert!(
            p <= p0 + (h - h0) * 12 * 9,
            "{chunks} chunks: peak {p} rows vs {p0} at 2 chunks ({peaks:?})"
        );
    }
    let total_leaf_rows = 64 * 20;
    assert!(peaks[3].2 < total_leaf_rows, "{peaks:?}");
}

#[test]
fn errors_are_reported_not_panicked() {
    let dev = device(BackendKind::Cpu);
    let model = Llama::random(tiny_config(4), 3, &dev);
    let cancel = AtomicBool::new(false);
    let go = |p: &[u32], c: &[u32], s: &[u32], cfg: &HomerConfig, cancel: &AtomicBool| {
        homer_prefill(
            &model,
            HomerInput {
                prefix: p,
                context: c,
                suffix: s,
                units: None,
                prior: None,
                separator: None,
            },
            cfg,
            &TensorOps,
            cancel,
            &mut |_| {},
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let cfg = config(20, 1, Scoring::Attention);
    assert!(go(&[1], &[2; 50], &[], &cfg, &cancel).contains("suffix is empty"));
    assert!(go(&[1], &[200; 50], &[3], &cfg, &cancel).contains("outside the vocabulary"));
    let mut big = config(100, 0, Scoring::Attention);
    big.chunk_len = 100;
    assert!(go(&[1], &[2; 500], &[3], &big, &cancel).contains("beyond the model's window"));
    let mut wrong = config(20, 1, Scoring::Attention);
    wrong.bias = Some(Arc::new(BiasTable::zeros(5, 64)));
    assert!(go(&[1], &[2; 50], &[3], &wrong, &cancel).contains("5 layers"));
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(go(&[1], &[2; 50], &[3], &cfg, &cancel), "cancelled");
}

#[test]
fn calibration_table_is_the_mean_statistic() {
    let dev = device(BackendKind::Cpu);
    let model = Llama::random(tiny_config(3), 9, &dev);
    let cancel = AtomicBool::new(false);
    let (a, b) = (ids(24, 1), ids(24, 2));
    let ta = homer::calibrate::calibrate(
        &model,
        std::slice::from_ref(&a),
        &TensorOps,
        &cancel,
        &mut |_, _| {},
    )
    .unwrap();
    let tb = homer::calibrate::calibrate(
        &model,
        std::slice::from_ref(&b),
        &TensorOps,
        &cancel,
        &mut |_, _| {},
    )
    .unwrap();
    let tab =
        homer::calibrate::calibrate(&model, &[a.clone(), b], &TensorOps, &cancel, &mut |_, _| {})
            .unwrap();
    assert_eq!((tab.n_layers, tab.distances), (3, 24));
    for i in 0..tab.data.len() {
        assert!((tab.data[i] - (ta.data[i] + tb.data[i]) / 2.0).abs() < 1e-5);
    }
    // bias[l][0] is the last token against itself: max over heads of q·k/√d at the last row.
    let positions: Vec<usize> = (0..24).collect();
    let (cos, sin) = model.rope_tables(&positions);
    let x = model.embed(&a).unwrap();
    let att = model.layers[0].attend(x, &cos, &sin, None);
    let sig = TensorOps
        .significance(&SignificanceInput {
            q_last: &att.q_last,
            keys: &att.kv.k,
            positions: &positions,
            prunable: &[true; 24],
            bias: None,
            last_position: 23,
        })
        .unwrap();
    assert!((ta.row(0)[0] - sig[23]).abs() < 1e-6);
    assert!((ta.row(0)[23] - sig[0]).abs() < 1e-6);
    assert!(
        homer::calibrate::calibrate(
            &model,
            &[ids(5, 1), ids(6, 1)],
            &TensorOps,
            &cancel,
            &mut |_, _| {}
        )
        .is_err()
    );
}

/// A [`homer::LeafStore`] in a map, counting what passed through it.
#[derive(Default)]
struct MapStore {
    leaves: std::collections::HashMap<(std::ops::Range<usize>, usize), homer::LeafState>,
    gets: usize,
    puts: usize,
}

impl homer::LeafStore for MapStore {
    fn get(&mut self, context: &std::ops::Range<usize>, layers: usize) -> Option<homer::LeafState> {
        self.gets += 1;
        self.leaves.get(&(context.clone(), layers)).cloned()
    }
    fn put(&mut self, context: &std::ops::Range<usize>, layers: usize, state: &homer::LeafState) {
        self.puts += 1;
        self.leaves.insert((context.clone(), layers), state.clone());
    }
}

/// Issue 16: a prefill through a leaf store, first filling it and then reusing it for a second
/// question of another length, gives what a prefill without a store gives for each question —
/// the same kept tokens and positions, logits and final keys within rounding — on both backends,
/// under the paper's selection and under re-indexed positions with a suffix query and spans.
#[test]
fn a_leaf_store_reuses_the_document_and_changes_no_result() {
    let (p, c) = (ids(3, 31), ids(90, 32));
    let questions = [ids(3, 33), ids(5, 34)];
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let dev = device(kind);
        let model = Llama::random(tiny_config(6), 23, &dev);
        let mut bias = BiasTable::zeros(6, 64);
        for (i, b) in bias.data.iter_mut().enumerate() {
            *b = ((i % 64) as f32 * 0.29).cos() * 0.5;
        }
        for selection in ["paper", "span4,query=suffix,positions=reindex"] {
            let mut cfg = config(24, 2, Scoring::Attention);
            cfg.bias = Some(Arc::new(bias.clone()));
            if selection != "paper" {
                cfg.selection = selection.parse().unwrap();
            }
            let mut store = MapStore::default();
            for (qi, s) in questions.iter().enumerate() {
                let plain = run(&model, &p, &c, s, &cfg);
                let stored = homer::homer_prefill_with_store(
                    &model,
                    HomerInput {
                        prefix: &p,
                        context: &c,
                        suffix: s,
                        units: None,
                        prior: None,
                        separator: None,
                    },
                    &cfg,
                    &TensorOps,
                    Some(&mut store),
                    &AtomicBool::new(false),
                    &mut |_| {},
                )
                .unwrap();
                let what = format!("{kind} {selection} question {qi}");
                let n = plain.plan.n_chunks;
                assert_eq!(n, 8, "{what}");
                assert_eq!(stored.plan.chunks, plain.plan.chunks, "{what}");
                // The first question computes and keeps every leaf, the second reuses them all.
                let st = &stored.stats;
                if qi == 0 {
                    assert_eq!((st.leaves_stored, st.leaves_reused), (n, 0), "{what}");
                } else {
                    assert_eq!((st.leaves_stored, st.leaves_reused), (0, n), "{what}");
                    assert!(st.row_layers_reused > 0, "{what}");
                }
                assert_eq!(store.leaves.len(), n, "{what}");
                assert_eq!(stored.trace.kept, plain.trace.kept, "{what}");
                assert_eq!(stored.positions, plain.positions, "{what}");
                let d = max_diff(&stored.logits, &plain.logits);
                assert!(d < 1e-4, "{what}: logits differ by {d}");
                for l in [0, 5] {
                    let k =
                        |o: &HomerOutput| host3(&o.cache.layers[l].as_ref().unwrap().filled().k).0;
                    let d = max_diff(&k(&stored), &k(&plain));
                    assert!(d < 1e-4, "{what}: layer {l} keys differ by {d}");
                }
                // Not a degenerate run: the leaves prune.
                assert!(
                    plain
                        .trace
                        .nodes
                        .iter()
                        .any(|t| t.leaves.len() == 1 && !t.dropped.is_empty()),
                    "{what}"
                );
            }
            assert_eq!(store.puts, 8);
        }
    }
}

/// Issue 17, item 3: a forward pass that turns NaN stops with an error naming where, instead of
/// ranking NaN scores and answering garbage; on both backends.
#[test]
fn a_non_finite_forward_pass_is_an_error_naming_the_node() {
    for kind in [BackendKind::Cpu, BackendKind::Wgpu] {
        let dev = device(kind);
        let mut model = Llama::random(tiny_config(6), 21, &dev);
        model.layers[1].ffn_norm = Tensor::<1>::full([32], f32::NAN, &dev);
        let err = homer_prefill(
            &model,
            HomerInput {
                prefix: &ids(3, 11),
                context: &ids(90, 12),
                suffix: &ids(3, 13),
                units: None,
                prior: None,
                separator: None,
            },
            &config(24, 2, Scoring::Attention),
            &TensorOps,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .err()
        .unwrap_or_else(|| panic!("{kind}: a NaN model answered"));
        match err {
            homer::HomerError::NonFinite(m) => {
                assert!(m.contains("node 0 (layers 0..") && m.contains("NaN"), "{m}")
            }
            e => panic!("{kind}: {e}"),
        }
    }
}
