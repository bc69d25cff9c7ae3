//! The project's own CPU kernels, on plain slices: causal GQA flash attention (online softmax,
//! RoPE and the KV append fused in), a multi-threaded matrix-vector product for decode on f32 or
//! f16 weight rows, the prefill product through the `gemm` crate, RMSNorm and SwiGLU.
//!
//! Each kernel body is written once and compiled three times (AVX-512, AVX2+FMA+F16C, portable),
//! the variant picked at run time from the CPU's features. The oracle of every kernel is the
//! burn-tensor-op path of the same computation (`layer.rs`), compared in the tests of
//! `kernels.rs` on random inputs of awkward sizes; the plain-Rust references at the bottom of this
//! file check the kernels' tiling on their own.
//!
//! Threads: rayon's global pool, the one burn-flex and `gemm` use (no second pool).

use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

/// Keys per tile of the attention kernel (scores of one tile stay in registers / L1).
pub const KEY_TILE: usize = 64;
/// Query rows per work item of the attention kernel (× the GQA group's heads).
pub const QUERY_TILE: usize = 64;
/// Rows of activations up to which a linear layer is a matrix-vector product over weight rows.
pub const GEMV_MAX_ROWS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Portable,
    Avx2,
    Avx512,
}

/// The instruction set the kernels run with on this CPU (detected once).
/// `HOMER_CPU_SIMD=portable|avx2` caps it (tests and measurements of the variants).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[allow(unused_mut)]
        let mut level = SimdLevel::Portable;
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                level = SimdLevel::Avx2;
                if is_x86_feature_detected!("avx512f") {
                    level = SimdLevel::Avx512;
                }
            }
        }
        match std::env::var("HOMER_CPU_SIMD").as_deref() {
            Ok("portable") => SimdLevel::Portable,
            Ok("avx2") => level.min(SimdLevel::Avx2),
            _ => level,
        }
    })
}

/// Run `f` on a thread of the kernels' pool (rayon's global pool), the caller waiting asleep.
/// A forward pass's sequential parts then run on a pool thread that joins every parallel kernel
/// itself, so on a machine with as many cores as pool threads no thread spins for a core the
/// forward pass needs (measured: decode 10–15% faster on 2 cores).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::join(f, || ()).0
    }
}

/// Compile `$body` (an `#[inline(always)]` fn) for each SIMD level and call the best one.
macro_rules! dispatch {
    ($body:ident ( $($arg:expr),* $(,)? )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
            unsafe fn v4<F: FnOnce() -> R, R>(f: F) -> R { f() }
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn v3<F: FnOnce() -> R, R>(f: F) -> R { f() }
            match simd_level() {
                // SAFETY: the level was detected on this CPU.
                SimdLevel::Avx512 => unsafe { v4(#[inline(always)] || $body($($arg),*)) },
                SimdLevel::Avx2 => unsafe { v3(#[inline(always)] || $body($($arg),*)) },
                SimdLevel::Portable => $body($($arg),*),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body($($arg),*)
        }
    }};
}

// ---------------------------------------------------------------------------------------------
// exp

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// e^x to within a few ulp for x ≤ 88 (x below −87 gives ≈ 0): range reduction to
/// r ∈ [−ln2/2, ln2/2] and a degree-6 Taylor polynomial, branch-free so loops vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n through the exponent field. n + 1.5·2^23 holds n (|n| < 2^22) in its low mantissa
    // bits; reading them from the bits keeps the loop vectorised, where `n as i32` (a saturating
    // cast) went lane by lane through scalar converts (most of the attention kernel's time).
    let biased = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000 - 127);
    p * f32::from_bits(biased << 23)
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Shapes of one fused attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// New rows (queries).
    pub n: usize,
    /// Query heads, KV heads, head dim.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rows already in the KV buffers before this call; the new rows are appended after them.
    pub past: usize,
    /// Rows the KV buffers can hold ([kv_heads, cap, head_dim]).
    pub cap: usize,
}

impl AttnShape {
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// An element of the KV buffers: f32, or f16 (`--kv-dtype f16`: half the cache's memory and
/// bandwidth; keys and values are rounded once when written, the products stay f32).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// f16 (the AVX-512 decode kernels convert its lanes as they load them).
    const IS_F16: bool;
    fn store(dst: &mut [Self], src: &[f32]);
    /// `src` as f32: itself for f32, else converted into `scratch` (at least as long).
    fn as_f32<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32];
}

impl KvElem for f32 {
    const IS_F16: bool = false;
    #[inline(always)]
    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn as_f32<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for f16 {
    const IS_F16: bool = true;
    #[inline(always)]
    fn store(dst: &mut [f16], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn as_f32<'a>(src: &'a [f16], scratch: &'a mut [f32]) -> &'a [f32] {
        let out = &mut scratch[..src.len()];
        #[cfg(target_arch = "x86_64")]
        if simd_level() != SimdLevel::Portable {
            // SAFETY: AVX2 and F16C were detected; equal lengths.
            unsafe { x86::f16_to_f32(src, out) };
            return out;
        }
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(out);
        out
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: work items write disjoint regions (see the callers).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[inline(always)]
fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], scale: f32, out: &mut [f32]) {
    let half = x.len() / 2;
    for d in 0..half {
        out[d] = (x[d] * cos[d] - x[d + half] * sin[d]) * scale;
    }
    for d in half..x.len() {
        out[d] = (x[d] * cos[d] + x[d - half] * sin[d]) * scale;
    }
}

/// The fused attention step of one decoder layer on `qkv` [n, (H + 2·KV)·hd] (the output of the
/// fused q/k/v projection, before RoPE), with RoPE tables `cos`, `sin` [n, hd]:
/// 1. RoPE on the new keys, which are written with the new values at rows `past..past + n` of
///    `k_buf`, `v_buf` [KV, cap, hd] (in place);
/// 2. causal attention of the rotated queries (row i sees keys `0..=past + i`; query head h reads
///    KV head h / (H / KV)) with an online softmax over key tiles: no score matrix, masked
///    tiles skipped;
/// 3. writes the attention output `out` [n, H·hd] and the rotated (unscaled) query of the last
///    row `q_last` [H, hd].
pub fn attention<T: KvElem>(
    s: AttnShape,
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    k_buf: &mut [T],
    v_buf: &mut [T],
    out: &mut [f32],
    q_last: &mut [f32],
) {
    let (n, h, kvh, hd) = (s.n, s.heads, s.kv_heads, s.head_dim);
    let w = s.qkv_width();
    assert!(h % kvh == 0 && hd % 2 == 0 && s.past + n <= s.cap);
    assert_eq!(qkv.len(), n * w);
    assert_eq!(cos.len(), n * hd);
    assert_eq!(sin.len(), n * hd);
    assert_eq!(k_buf.len(), kvh * s.cap * hd);
    assert_eq!(v_buf.len(), kvh * s.cap * hd);
    assert_eq!(out.len(), n * h * hd);
    assert_eq!(q_last.len(), h * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    // 1. keys and values into the buffers; rotated, scaled queries into a scratch.
    let mut q = vec![0f32; n * h * hd];
    dispatch!(prepare(s, qkv, cos, sin, k_buf, v_buf, &mut q, scale));
    let r = n - 1;
    rope_row_all(
        s,
        &qkv[r * w..r * w + h * hd],
        &cos[r * hd..(r + 1) * hd],
        &sin[r * hd..(r + 1) * hd],
        q_last,
    );
    // 2. attention, one work item per (KV head, query tile).
    let g = h / kvh;
    let t = s.past + n;
    if n * g <= SPLIT_MAX_VECTORS && t >= 2 * SPLIT_KEYS {
        split_keys(s, g, &q, k_buf, v_buf, out);
        return;
    }
    let tiles = n.div_ceil(QUERY_TILE);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let (k_buf, v_buf, q) = (&*k_buf, &*v_buf, &q[..]);
    // Every query tile of a KV head reads the same key tiles: transpose them once here
    // ([KV][key tile][hd][KEY_TILE], f32) instead of once per query tile (a prefill of n rows
    // transposed each key tile about n / 128 times, through scatters).
    let ktiles = t.div_ceil(KEY_TILE);
    let kt_all = if tiles > 1 {
        let mut kt = vec![0f32; kvh * ktiles * hd * KEY_TILE];
        kt.par_chunks_mut(hd * KEY_TILE)
            .enumerate()
            .for_each(|(item, dst)| {
                let (c, j0) = (item / ktiles, item % ktiles * KEY_TILE);
                let tk = KEY_TILE.min(t - j0);
                let at = (c * s.cap + j0) * hd;
                let mut scratch = vec![0f32; if T::IS_F16 { tk * hd } else { 0 }];
                dispatch!(transpose_tile(
                    &k_buf[at..at + tk * hd],
                    hd,
                    &mut scratch,
                    dst
                ));
            });
        kt
    } else {
        vec![]
    };
    let kt_all = &kt_all[..];
    let work = |item: usize| {
        let (c, t) = (item / tiles, item % tiles);
        let r0 = t * QUERY_TILE;
        let r1 = (r0 + QUERY_TILE).min(n);
        let kk = &k_buf[c * s.cap * hd..(c + 1) * s.cap * hd];
        let vv = &v_buf[c * s.cap * hd..(c + 1) * s.cap * hd];
        let kt = match kt_all.is_empty() {
            true => None,
            false => Some(&kt_all[c * ktiles * hd * KEY_TILE..(c + 1) * ktiles * hd * KEY_TILE]),
        };
        let ptr = out_ptr;
        dispatch!(attend_tile(s, g, c, r0, r1, q, kk, vv, kt, ptr));
    };
    let items = kvh * tiles;
    // Decode-sized work (a few query vectors against a short cache) is not worth a handoff.
    if items == 1 || n * (s.past + n) * h < 16_384 {
        (0..items).for_each(work);
    } else {
        (0..items).into_par_iter().for_each(work);
    }
}

/// Query vectors (rows × group heads) up to which keys are split across threads instead.
const SPLIT_MAX_VECTORS: usize = 16;
/// Keys per split of a decode-sized attention.
const SPLIT_KEYS: usize = 512;

/// Decode-sized attention (a few query rows against a long cache), split over the keys so both
/// cores work on one KV head (flash-decoding): each (KV head, key range) item keeps its own
/// softmax state (max, sum, unnormalised output), merged at the end.
fn split_keys<T: KvElem>(
    s: AttnShape,
    g: usize,
    q: &[f32],
    k_buf: &[T],
    v_buf: &[T],
    out: &mut [f32],
) {
    let (n, h, kvh, hd) = (s.n, s.heads, s.kv_heads, s.head_dim);
    let t = s.past + n;
    let splits = t.div_ceil(SPLIT_KEYS).min(64);
    let per = t.div_ceil(splits);
    let nv = n * g;
    let stride = nv * (hd + 2);
    let mut part = vec![0f32; kvh * splits * stride];
    part.par_chunks_mut(stride)
        .enumerate()
        .for_each(|(item, buf)| {
            let (c, sp) = (item / splits, item % splits);
            let (ka, kb) = (sp * per, ((sp + 1) * per).min(t));
            let kk = &k_buf[c * s.cap * hd..(c + 1) * s.cap * hd];
            let vv = &v_buf[c * s.cap * hd..(c + 1) * s.cap * hd];
            dispatch!(attend_range(s, g, c, q, kk, vv, ka, kb, buf));
        });
    for c in 0..kvh {
        for i in 0..nv {
            let (r, hh) = (i / g, c * g + i % g);
            let at = |sp: usize| (c * splits + sp) * stride;
            let mx = (0..splits)
                .map(|sp| part[at(sp) + nv * hd + i])
                .fold(f32::NEG_INFINITY, f32::max);
            let dst = &mut out[(r * h + hh) * hd..(r * h + hh + 1) * hd];
            dst.fill(0.0);
            let mut l = 0.0;
            for sp in 0..splits {
                let m = part[at(sp) + nv * hd + i];
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let w = exp(m - mx);
                l += w * part[at(sp) + nv * hd + nv + i];
                let o = &part[at(sp) + i * hd..at(sp) + (i + 1) * hd];
                for d in 0..hd {
                    dst[d] += w * o[d];
                }
            }
            let inv = 1.0 / l;
            dst.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// max(init, max x), with 16 partial maxima so the loop vectorises (a float reduction in one
/// accumulator does not).
#[inline(always)]
fn max_lanes(x: &[f32], init: f32) -> f32 {
    let mut acc = [init; 16];
    let (c, t) = x.as_chunks::<16>();
    // A plain compare-and-select (one vmaxps; `f32::max`'s NaN rule took three instructions):
    // a NaN score is not picked as the maximum, and its e^(x − m) is NaN all the same.
    for ch in c {
        for i in 0..16 {
            acc[i] = if ch[i] > acc[i] { ch[i] } else { acc[i] };
        }
    }
    // The 16 lanes folded in halves (4 dependent steps, not 16: this ran once per query vector
    // and key tile, and the serial chain cost as much as a quarter of the tile's products).
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            acc[i] = if acc[i + w] > acc[i] {
                acc[i + w]
            } else {
                acc[i]
            };
        }
        w /= 2;
    }
    t.iter().fold(acc[0], |m, &a| m.max(a))
}

/// Key rows `k` [tk][hd] (tk ≤ KEY_TILE) as f32 into `dst` [hd][KEY_TILE], keys past tk zero
/// (`scratch`: room for the rows as f32 when they are f16.)
#[inline(always)]
fn transpose_tile<T: KvElem>(k: &[T], hd: usize, scratch: &mut [f32], dst: &mut [f32]) {
    let tk = k.len() / hd;
    let rows = T::as_f32(k, scratch);
    // Eight keys at a time: each dim's eight values land in one contiguous run of dst.
    let mut j0 = 0;
    while j0 < tk {
        let w = 8.min(tk - j0);
        for d in 0..hd {
            let run = &mut dst[d * KEY_TILE + j0..d * KEY_TILE + j0 + w];
            for (j, x) in run.iter_mut().enumerate() {
                *x = rows[(j0 + j) * hd + d];
            }
        }
        j0 += w;
    }
    for d in 0..hd {
        dst[d * KEY_TILE + tk..(d + 1) * KEY_TILE].fill(0.0);
    }
}

/// Σ of 16 lanes folded in halves (4 dependent steps).
#[inline(always)]
fn sum_lanes(mut acc: [f32; 16]) -> f32 {
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// x ← e^(x − m) in place; returns the sum (16 partial sums, vectorised).
#[inline(always)]
fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    let mut acc = [0f32; 16];
    let (c, t) = x.as_chunks::<16>();
    for ch in c {
        for i in 0..16 {
            acc[i] += ch[i];
        }
    }
    sum_lanes(acc) + t.iter().sum::<f32>()
}

/// Every query vector of KV head `c` against keys ka..kb (each vector only up to its causal
/// limit): writes the unnormalised output [nv][hd], then the max [nv] and the sum [nv] of the
/// softmax over that range into `buf`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_range<T: KvElem>(
    s: AttnShape,
    g: usize,
    c: usize,
    q: &[f32],
    k: &[T],
    v: &[T],
    ka: usize,
    kb: usize,
    buf: &mut [f32],
) {
    let nv = s.n * g;
    let (o, rest) = buf.split_at_mut(nv * s.head_dim);
    let (m, l) = rest.split_at_mut(nv);
    attend_keys(s, g, c, 0, s.n, q, k, v, None, ka, kb, o, m, l);
}

fn rope_row_all(s: AttnShape, qrow: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let hd = s.head_dim;
    for hh in 0..s.heads {
        rope_row(
            &qrow[hh * hd..(hh + 1) * hd],
            cos,
            sin,
            1.0,
            &mut out[hh * hd..(hh + 1) * hd],
        );
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn prepare<T: KvElem>(
    s: AttnShape,
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    k_buf: &mut [T],
    v_buf: &mut [T],
    q: &mut [f32],
    scale: f32,
) {
    let (h, kvh, hd) = (s.heads, s.kv_heads, s.head_dim);
    let w = s.qkv_width();
    let mut rotated = vec![0f32; hd];
    for r in 0..s.n {
        let row = &qkv[r * w..(r + 1) * w];
        let (c_, s_) = (&cos[r * hd..(r + 1) * hd], &sin[r * hd..(r + 1) * hd]);
        for hh in 0..h {
            rope_row(
                &row[hh * hd..(hh + 1) * hd],
                c_,
                s_,
                scale,
                &mut q[(r * h + hh) * hd..(r * h + hh + 1) * hd],
            );
        }
        let dst = s.past + r;
        for c in 0..kvh {
            let k_src = &row[(h + c) * hd..(h + c + 1) * hd];
            let v_src = &row[(h + kvh + c) * hd..(h + kvh + c + 1) * hd];
            let at = (c * s.cap + dst) * hd;
            rope_row(k_src, c_, s_, 1.0, &mut rotated);
            T::store(&mut k_buf[at..at + hd], &rotated);
            T::store(&mut v_buf[at..at + hd], v_src);
        }
    }
}

/// Query vectors processed together (reusing each loaded key/value row).
const QV: usize = 4;

/// One work item: query rows r0..r1 of the g heads of KV head `c`, against that head's keys.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_tile<T: KvElem>(
    s: AttnShape,
    g: usize,
    c: usize,
    r0: usize,
    r1: usize,
    q: &[f32],
    k: &[T],
    v: &[T],
    kt: Option<&[f32]>,
    out: SendPtr,
) {
    let (h, hd) = (s.heads, s.head_dim);
    let nv = (r1 - r0) * g;
    let mut o = vec![0f32; nv * hd];
    let mut m = vec![0f32; nv];
    let mut l = vec![0f32; nv];
    attend_keys(
        s,
        g,
        c,
        r0,
        r1,
        q,
        k,
        v,
        kt,
        0,
        usize::MAX,
        &mut o,
        &mut m,
        &mut l,
    );
    for i in 0..nv {
        let (r, hh) = (r0 + i / g, c * g + i % g);
        let inv = 1.0 / l[i];
        // SAFETY: (row r, head hh) belongs to this work item only; the buffer is n·H·hd long.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((r * h + hh) * hd), hd) };
        for d in 0..hd {
            dst[d] = o[i * hd + d] * inv;
        }
    }
}

/// The online softmax of query rows r0..r1 (the g heads of KV head `c`) over keys ka..kb, each
/// row only up to its causal limit, in key tiles: the tile's keys (converted to f32 once when
/// f16) transposed to [hd][KEY_TILE] so the scores vectorise over keys, four query vectors at a
/// time (`kt_pre`: every tile of the head already transposed, [tile][hd][KEY_TILE] from key 0;
/// needs `ka` = 0). Leaves the unnormalised output `o` [nv][hd], the running max `m` and sum
/// `l` [nv].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_keys<T: KvElem>(
    s: AttnShape,
    g: usize,
    c: usize,
    r0: usize,
    r1: usize,
    q: &[f32],
    k: &[T],
    v: &[T],
    kt_pre: Option<&[f32]>,
    ka: usize,
    kb: usize,
    o: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let (h, hd) = (s.heads, s.head_dim);
    let nv = (r1 - r0) * g;
    // Pre-transposed tiles are indexed from key 0 (a debug_assert would be compiled out: this
    // crate builds without debug assertions in every profile).
    assert!(
        kt_pre.is_none() || ka == 0,
        "pre-transposed key tiles start at key 0"
    );
    o.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    // Query vector i is row r0 + i / g, head c·g + i % g.
    let qvec = |i: usize| {
        let (r, hh) = (r0 + i / g, c * g + i % g);
        &q[(r * h + hh) * hd..(r * h + hh + 1) * hd]
    };
    let mut kt = vec![0f32; hd * KEY_TILE];
    let mut sc = [[0f32; KEY_TILE]; QV];
    let mut kscratch = vec![0f32; hd * KEY_TILE];
    let mut vscratch = vec![0f32; hd * KEY_TILE];
    // AVX-512 microkernels for the two products (head dims that are multiples of 64).
    #[cfg(target_arch = "x86_64")]
    let wide = simd_level() == SimdLevel::Avx512 && hd % 64 == 0;
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    // Up to QV query vectors (decode): scores straight from the key rows, one 16-lane sum per
    // (vector, key), instead of transposing every tile (Llama-2-7B-shaped / SmolLM2 decode at
    // 4,096 rows of cache).
    let by_rows = wide && nv <= QV;
    let kmax = (s.past + r1).min(kb); // keys seen by the tile's last row
    let mut j0 = ka;
    while j0 < kmax {
        let tk = KEY_TILE.min(kmax - j0);
        let (krows, vrows) = (&k[j0 * hd..(j0 + tk) * hd], &v[j0 * hd..(j0 + tk) * hd]);
        // The tile as f32 (in place for f32 buffers; decode's row kernels read f16 directly).
        let vtile: &[f32] = if by_rows && T::IS_F16 {
            &[]
        } else {
            T::as_f32(vrows, &mut vscratch)
        };
        // The key tile as [hd][KEY_TILE] so scores vectorise over keys (worth it for many
        // query vectors; decode's few take the key rows as they are).
        let ktt: &[f32] = match kt_pre {
            _ if by_rows => &[],
            Some(pre) => {
                let at = j0 / KEY_TILE * hd * KEY_TILE;
                &pre[at..at + hd * KEY_TILE]
            }
            None => {
                transpose_tile(krows, hd, &mut kscratch, &mut kt);
                &kt
            }
        };
        let mut i0 = 0;
        while i0 < nv {
            let qn = QV.min(nv - i0);
            // Scores of qn query vectors against the tile.
            if wide {
                #[cfg(target_arch = "x86_64")]
                {
                    let qs: [&[f32]; QV] = std::array::from_fn(|a| qvec(i0 + a.min(qn - 1)));
                    if by_rows {
                        // SAFETY: AVX-512 (and F16C) was detected; krows holds tk rows of hd
                        // (a multiple of 64) f32 or f16 values, each q has hd values.
                        unsafe { x86::scores_rows(qs, krows, hd, tk, &mut sc) };
                    } else {
                        // SAFETY: AVX-512 was detected; kt is [hd][KEY_TILE], each q has hd
                        // values.
                        unsafe { x86::scores4(qs, ktt, hd, &mut sc) };
                    }
                }
            } else {
                for row in sc.iter_mut() {
                    *row = [0.0; KEY_TILE];
                }
                for d in 0..hd {
                    let kd: &[f32; KEY_TILE] =
                        ktt[d * KEY_TILE..(d + 1) * KEY_TILE].try_into().unwrap();
                    for (a, row) in sc.iter_mut().enumerate().take(qn) {
                        let qd = qvec(i0 + a)[d];
                        for j in 0..KEY_TILE {
                            row[j] += qd * kd[j];
                        }
                    }
                }
            }
            // Online softmax per vector; probabilities overwrite the scores.
            let mut valid = [0usize; QV];
            for a in 0..qn {
                let i = i0 + a;
                let limit = s.past + r0 + i / g; // last visible key
                let vcount = (limit + 1).min(kb).saturating_sub(j0).min(tk);
                valid[a] = vcount;
                let row = &mut sc[a];
                if vcount == 0 {
                    // Every key of the tile is after this row: no weight in the P · V below.
                    *row = [0.0; KEY_TILE];
                    continue;
                }
                let mx = max_lanes(&row[..vcount], m[i]);
                let alpha = exp(m[i] - mx);
                let sum = exp_sub_sum(&mut row[..vcount], mx);
                for x in row[vcount..].iter_mut() {
                    *x = 0.0;
                }
                m[i] = mx;
                l[i] = l[i] * alpha + sum;
                if alpha != 1.0 {
                    for x in o[i * hd..(i + 1) * hd].iter_mut() {
                        *x *= alpha;
                    }
                }
            }
            // o += P · V over the tile.
            let vmax = valid[..qn].iter().copied().max().unwrap_or(0);
            let (oa, _) = o.split_at_mut((i0 + qn) * hd);
            let oa = &mut oa[i0 * hd..];
            if wide {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512 was detected; v holds rows j0..j0 + vmax of hd values, oa
                // holds qn rows of hd values, hd is a multiple of 64.
                unsafe {
                    if by_rows {
                        x86::pv4(&sc, &vrows[..vmax * hd], hd, vmax, qn, oa)
                    } else {
                        x86::pv4(&sc, &vtile[..vmax * hd], hd, vmax, qn, oa)
                    }
                };
            } else {
                for j in 0..vmax {
                    let vrow = &vtile[j * hd..(j + 1) * hd];
                    for a in 0..qn {
                        let p = sc[a][j];
                        let orow = &mut oa[a * hd..(a + 1) * hd];
                        for d in 0..hd {
                            orow[d] += p * vrow[d];
                        }
                    }
                }
            }
            i0 += qn;
        }
        j0 += tk;
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layers

/// Weight rows of a linear layer, [out, in] (GGUF / PyTorch orientation).
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Rows<'_> {
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(w) => w.len(),
            Rows::F16(w) => w.len(),
            Rows::BF16(w) => w.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// y [m, out] = x [m, in] · Wᵀ for W [out, in]. Matrix-vector products (m ≤ [`GEMV_MAX_ROWS`])
/// stream each weight row once, threads splitting the output rows; larger m goes to `gemm`
/// (f16 weights converted to f32 a slab of rows at a time).
pub fn linear(x: &[f32], m: usize, w: Rows<'_>, out_dim: usize, y: &mut [f32]) {
    let k = x.len() / m.max(1);
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), out_dim * k);
    assert_eq!(y.len(), m * out_dim);
    if m == 0 || out_dim == 0 {
        return;
    }
    if m <= GEMV_MAX_ROWS {
        gemv(x, m, k, w, out_dim, y);
    } else {
        match w {
            Rows::F32(w) => gemm_f32(x, m, k, w, 0, out_dim, out_dim, y),
            Rows::F16(w) => gemm_half(x, m, k, w, out_dim, y, convert_half),
            Rows::BF16(w) => gemm_half(x, m, k, w, out_dim, y, convert_half),
        }
    }
}

/// The prefill product on 16-bit weight rows: converted to f32 a slab of 1024 rows at a time.
fn gemm_half<T>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[T],
    out_dim: usize,
    y: &mut [f32],
    convert: fn(&[T], &mut [f32]),
) {
    const SLAB: usize = 1024;
    let mut scratch = vec![0f32; SLAB.min(out_dim) * k];
    let mut o0 = 0;
    while o0 < out_dim {
        let o1 = (o0 + SLAB).min(out_dim);
        let buf = &mut scratch[..(o1 - o0) * k];
        convert(&w[o0 * k..o1 * k], buf);
        gemm_f32(x, m, k, buf, o0, o1 - o0, out_dim, y);
        o0 = o1;
    }
}

/// y[:, o0..o0 + rows] = x · wᵀ with w [rows, k] (a slab of the weight rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    o0: usize,
    rows: usize,
    ld: usize,
    y: &mut [f32],
) {
    // SAFETY: the strides describe x [m, k] row-major, wᵀ [k, rows] (w row-major), and the
    // column block o0..o0 + rows of y [m, ld]; all inside the slices (asserted by the caller).
    unsafe {
        gemm::gemm(
            m,
            rows,
            k,
            y.as_mut_ptr().add(o0),
            1,
            ld as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// 16-bit floats (f16 or bf16) to f32, in parallel slabs; half's slice conversion uses F16C
/// (8 lanes at a time) where the CPU has it.
fn convert_half<T: Sync>(src: &[T], dst: &mut [f32])
where
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    dst.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// Output rows per work item of the matrix-vector product.
const GEMV_CHUNK: usize = 64;

fn gemv(x: &[f32], m: usize, k: usize, w: Rows<'_>, out_dim: usize, y: &mut [f32]) {
    // Work on y transposed ([out, m], contiguous per output row), then scatter.
    let mut yt = vec![0f32; out_dim * m];
    let work = |(ci, chunk): (usize, &mut [f32])| {
        let o0 = ci * GEMV_CHUNK;
        match w {
            Rows::F32(w) => dispatch!(gemv_rows_f32(x, m, k, w, o0, chunk)),
            Rows::F16(w) => gemv_rows_f16(x, m, k, w, o0, chunk),
            Rows::BF16(w) => dispatch!(gemv_rows_bf16(x, m, k, w, o0, chunk)),
        }
    };
    // Small products (a few hundred KB of weights) stay on the calling thread.
    if out_dim * k < 1 << 16 {
        yt.chunks_mut(GEMV_CHUNK * m).enumerate().for_each(work);
    } else {
        yt.par_chunks_mut(GEMV_CHUNK * m).enumerate().for_each(work);
    }
    for o in 0..out_dim {
        for r in 0..m {
            y[r * out_dim + o] = yt[o * m + r];
        }
    }
}

#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (ac, at) = a.split_at(a.len() / L * L);
    let (bc, bt) = b.split_at(ac.len());
    for (ca, cb) in ac.chunks_exact(L).zip(bc.chunks_exact(L)) {
        for i in 0..L {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in at.iter().zip(bt) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn gemv_rows_f32(x: &[f32], m: usize, k: usize, w: &[f32], o0: usize, yt: &mut [f32]) {
    let rows = yt.len() / m;
    for i in 0..rows {
        let wr = &w[(o0 + i) * k..(o0 + i + 1) * k];
        for r in 0..m {
            yt[i * m + r] = dot_f32(wr, &x[r * k..(r + 1) * k]);
        }
    }
}

/// bf16 rows: the f32 value is the bf16 bits shifted up, which vectorises as it stands.
#[inline(always)]
fn gemv_rows_bf16(x: &[f32], m: usize, k: usize, w: &[bf16], o0: usize, yt: &mut [f32]) {
    const L: usize = 32;
    let rows = yt.len() / m;
    let mut buf = [0f32; L];
    for i in 0..rows {
        let wr = &w[(o0 + i) * k..(o0 + i + 1) * k];
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [0f32; L];
            let (wc, wt) = wr.as_chunks::<L>();
            let (xc, xt) = xr.as_chunks::<L>();
            for (cw, cx) in wc.iter().zip(xc) {
                for j in 0..L {
                    buf[j] = f32::from_bits((cw[j].to_bits() as u32) << 16);
                }
                for j in 0..L {
                    acc[j] += buf[j] * cx[j];
                }
            }
            let mut sum: f32 = acc.iter().sum();
            for (a, b) in wt.iter().zip(xt) {
                sum += a.to_f32() * b;
            }
            yt[i * m + r] = sum;
        }
    }
}

fn gemv_rows_f16(x: &[f32], m: usize, k: usize, w: &[f16], o0: usize, yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        match simd_level() {
            // SAFETY: the level was detected on this CPU.
            SimdLevel::Avx512 => return unsafe { x86::gemv_rows_f16_avx512(x, m, k, w, o0, yt) },
            SimdLevel::Avx2 => return unsafe { x86::gemv_rows_f16_avx2(x, m, k, w, o0, yt) },
            SimdLevel::Portable => {}
        }
    }
    let rows = yt.len() / m;
    for i in 0..rows {
        let wr = &w[(o0 + i) * k..(o0 + i + 1) * k];
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            yt[i * m + r] = wr.iter().zip(xr).map(|(a, b)| a.to_f32() * b).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::f16;
    use std::arch::x86_64::*;

    /// f16 → f32, 8 at a time (F16C), the tail one by one.
    ///
    /// # Safety
    /// AVX2 and F16C; `src.len() == dst.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
        unsafe {
            let n = src.len() / 8 * 8;
            let (sp, dp) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
            let mut i = 0;
            while i < n {
                let h = _mm_loadu_si128(sp.add(i) as *const __m128i);
                _mm256_storeu_ps(dp.add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
            for i in n..src.len() {
                dst[i] = src[i].to_f32();
            }
        }
    }

    /// Scores of 4 query vectors against a transposed key tile kt [hd][64]: 16 accumulators of
    /// 16 lanes in registers, one broadcast per (vector, dim).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores4(q: [&[f32]; 4], kt: &[f32], hd: usize, out: &mut [[f32; 64]; 4]) {
        // SAFETY: kt has hd·64 values, each q has hd values (the caller's contract).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for d in 0..hd {
                let kp = kt.as_ptr().add(d * 64);
                let k = [
                    _mm512_loadu_ps(kp),
                    _mm512_loadu_ps(kp.add(16)),
                    _mm512_loadu_ps(kp.add(32)),
                    _mm512_loadu_ps(kp.add(48)),
                ];
                for a in 0..4 {
                    let qa = _mm512_set1_ps(*q[a].get_unchecked(d));
                    for c in 0..4 {
                        acc[a][c] = _mm512_fmadd_ps(qa, k[c], acc[a][c]);
                    }
                }
            }
            for a in 0..4 {
                for c in 0..4 {
                    _mm512_storeu_ps(out[a].as_mut_ptr().add(16 * c), acc[a][c]);
                }
            }
        }
    }

    /// 16 lanes of a KV row as f32 (f16 converted by F16C).
    #[inline(always)]
    unsafe fn load16<T: super::KvElem>(p: *const T) -> __m512 {
        unsafe {
            if T::IS_F16 {
                _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
            } else {
                _mm512_loadu_ps(p as *const f32)
            }
        }
    }

    /// Scores of 4 query vectors against `tk` ≤ 64 key rows [tk][hd] (hd a multiple of 16):
    /// per key, 16-lane products for the 4 vectors, each summed once.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn scores_rows<T: super::KvElem>(
        q: [&[f32]; 4],
        k: &[T],
        hd: usize,
        tk: usize,
        out: &mut [[f32; 64]; 4],
    ) {
        // SAFETY: k has tk·hd values, each q has hd values (the caller's contract).
        unsafe {
            for j in 0..tk {
                let kp = k.as_ptr().add(j * hd);
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut d = 0;
                while d < hd {
                    let kv = load16(kp.add(d));
                    for a in 0..4 {
                        let qv = _mm512_loadu_ps(q[a].as_ptr().add(d));
                        acc[a] = _mm512_fmadd_ps(qv, kv, acc[a]);
                    }
                    d += 16;
                }
                for a in 0..4 {
                    out[a][j] = _mm512_reduce_add_ps(acc[a]);
                }
            }
        }
    }

    /// o[a] += Σ_j p[a][j] · v[j] for `qn` ≤ 4 vectors over `tk` value rows of hd (a multiple of
    /// 64) values, 64 dims at a time with the 4 × 4 accumulators in registers.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn pv4<T: super::KvElem>(
        p: &[[f32; 64]; 4],
        v: &[T],
        hd: usize,
        tk: usize,
        qn: usize,
        o: &mut [f32],
    ) {
        // SAFETY: v has tk·hd values, o has qn·hd values (the caller's contract).
        unsafe {
            for dc in (0..hd).step_by(64) {
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                for j in 0..tk {
                    let vp = v.as_ptr().add(j * hd + dc);
                    let vr = [
                        load16(vp),
                        load16(vp.add(16)),
                        load16(vp.add(32)),
                        load16(vp.add(48)),
                    ];
                    for a in 0..4 {
                        let pj = _mm512_set1_ps(*p[a].get_unchecked(j));
                        for c in 0..4 {
                            acc[a][c] = _mm512_fmadd_ps(pj, vr[c], acc[a][c]);
                        }
                    }
                }
                for a in 0..qn {
                    for c in 0..4 {
                        let op = o.as_mut_ptr().add(a * hd + dc + 16 * c);
                        _mm512_storeu_ps(op, _mm512_add_ps(_mm512_loadu_ps(op), acc[a][c]));
                    }
                }
            }
        }
    }

    /// f16 weight rows · f32 activations, 32 weights per step (two 16-lane converts and FMAs).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn gemv_rows_f16_avx512(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f16],
        o0: usize,
        yt: &mut [f32],
    ) {
        // SAFETY: the caller checked the CPU features; every pointer stays inside x, w and yt.
        unsafe {
            let rows = yt.len() / m;
            let kc = k / 32 * 32;
            for i in 0..rows {
                let wr = w.as_ptr().add((o0 + i) * k) as *const u16;
                for r in 0..m {
                    let xr = x.as_ptr().add(r * k);
                    let mut a0 = _mm512_setzero_ps();
                    let mut a1 = _mm512_setzero_ps();
                    let mut j = 0;
                    while j < kc {
                        let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(wr.add(j) as *const __m256i));
                        let w1 =
                            _mm512_cvtph_ps(_mm256_loadu_si256(wr.add(j + 16) as *const __m256i));
                        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr.add(j)), a0);
                        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr.add(j + 16)), a1);
                        j += 32;
                    }
                    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                    while j < k {
                        s += f16::from_bits(*wr.add(j)).to_f32() * *xr.add(j);
                        j += 1;
                    }
                    yt[i * m + r] = s;
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemv_rows_f16_avx2(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f16],
        o0: usize,
        yt: &mut [f32],
    ) {
        // SAFETY: the caller checked the CPU features; every pointer stays inside x, w and yt.
        unsafe {
            let rows = yt.len() / m;
            let kc = k / 16 * 16;
            for i in 0..rows {
                let wr = w.as_ptr().add((o0 + i) * k) as *const u16;
                for r in 0..m {
                    let xr = x.as_ptr().add(r * k);
                    let mut a0 = _mm256_setzero_ps();
                    let mut a1 = _mm256_setzero_ps();
                    let mut j = 0;
                    while j < kc {
                        let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wr.add(j) as *const __m128i));
                        let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wr.add(j + 8) as *const __m128i));
                        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr.add(j)), a0);
                        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(j + 8)), a1);
                        j += 16;
                    }
                    let v = _mm256_add_ps(a0, a1);
                    let hi = _mm256_extractf128_ps(v, 1);
                    let q = _mm_add_ps(_mm256_castps256_ps128(v), hi);
                    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
                    let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
                    let mut s = _mm_cvtss_f32(q);
                    while j < k {
                        s += f16::from_bits(*wr.add(j)).to_f32() * *xr.add(j);
                        j += 1;
                    }
                    yt[i * m + r] = s;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise

/// out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w, rows of width w.len().
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len());
    let work = |(xr, or): (&[f32], &mut [f32])| dispatch!(rms_row(xr, w, eps, or));
    if x.len() < 1 << 15 {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(work);
    } else {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(work);
    }
}

#[inline(always)]
fn rms_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot_f32(x, x);
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, a), b) in out.iter_mut().zip(x).zip(w) {
        *o = a * inv * b;
    }
}

/// SwiGLU of the fused gate|up projection: gu [n, 2f] (gate columns first) → silu(gate)·up [n, f].
pub fn swiglu(gu: &[f32], f: usize, out: &mut [f32]) {
    assert_eq!(gu.len(), out.len() * 2);
    let work = |(g, o): (&[f32], &mut [f32])| dispatch!(swiglu_row(g, o));
    if out.len() < 1 << 15 {
        gu.chunks(2 * f).zip(out.chunks_mut(f)).for_each(work);
    } else {
        gu.par_chunks(2 * f)
            .zip(out.par_chunks_mut(f))
            .for_each(work);
    }
}

#[inline(always)]
fn swiglu_row(gu: &[f32], out: &mut [f32]) {
    let f = out.len();
    let (g, u) = gu.split_at(f);
    for ((o, &a), &b) in out.iter_mut().zip(g).zip(u) {
        *o = a / (1.0 + exp(-a)) * b;
    }
}

// ---------------------------------------------------------------------------------------------
// Plain references (tests)

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
            (0..n).map(|_| self.next() * a).collect()
        }
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY) < 1e-37, true);
        assert_eq!(exp(0.0), 1.0);
        // Clamped ends: 2^n stays a normal number; no overflow to inf, no wrap to garbage.
        assert!((exp(-1e6) / (-87f32).exp() - 1.0).abs() < 4e-7);
        assert!((exp(1e6) / 88f32.exp() - 1.0).abs() < 4e-7);
    }

    #[test]
    fn lane_reductions_match_sequential() {
        let mut rng = Rng(0x5eed_1234);
        for n in [0, 1, 7, 15, 16, 17, 31, 33, 64, 70, 129] {
            let x = rng.vec(n, 30.0);
            for init in [f32::NEG_INFINITY, 0.5, 100.0] {
                let want = x.iter().copied().fold(init, f32::max);
                assert_eq!(max_lanes(&x, init), want, "max of {n} from {init}");
            }
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max).max(0.0);
            let mut y = x.clone();
            let got = exp_sub_sum(&mut y, m);
            let want: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
            assert!(
                (got as f64 - want).abs() <= 1e-6 * want.max(1e-30),
                "sum of {n}: {got} vs {want}"
            );
            for (a, b) in x.iter().zip(&y) {
                assert!(
                    (b - (a - m).exp()).abs() <= 4e-7 * (a - m).exp(),
                    "e^({a} - {m})"
                );
            }
        }
    }

    /// Straightforward attention with RoPE on the host (the same math as `layer.rs`).
    fn reference(
        s: AttnShape,
        qkv: &[f32],
        cos: &[f32],
        sin: &[f32],
        k0: &[f32],
        v0: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (n, h, kvh, hd) = (s.n, s.heads, s.kv_heads, s.head_dim);
        let w = s.qkv_width();
        let half = hd / 2;
        let rope = |x: &[f32], r: usize| -> Vec<f32> {
            (0..hd)
                .map(|d| {
                    let rot = if d < half { -x[d + half] } else { x[d - half] };
                    x[d] * cos[r * hd + d] + rot * sin[r * hd + d]
                })
                .collect()
        };
        let mut kb = k0.to_vec();
        let mut vb = v0.to_vec();
        for r in 0..n {
            for c in 0..kvh {
                let kr = rope(&qkv[r * w + (h + c) * hd..r * w + (h + c + 1) * hd], r);
                let at = (c * s.cap + s.past + r) * hd;
                kb[at..at + hd].copy_from_slice(&kr);
                vb[at..at + hd].copy_from_slice(
                    &qkv[r * w + (h + kvh + c) * hd..r * w + (h + kvh + c + 1) * hd],
                );
            }
        }
        let mut out = vec![0f32; n * h * hd];
        let g = h / kvh;
        for r in 0..n {
            for hh in 0..h {
                let q = rope(&qkv[r * w + hh * hd..r * w + (hh + 1) * hd], r);
                let c = hh / g;
                let t = s.past + r + 1;
                let sc: Vec<f64> = (0..t)
                    .map(|j| {
                        let kr = &kb[(c * s.cap + j) * hd..(c * s.cap + j + 1) * hd];
                        q.iter()
                            .zip(kr)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let mut acc = 0f64;
                    for j in 0..t {
                        acc += e[j] * vb[(c * s.cap + j) * hd + d] as f64;
                    }
                    out[(r * h + hh) * hd + d] = (acc / z) as f32;
                }
            }
        }
        (out, kb, vb)
    }

    #[test]
    fn attention_matches_reference_on_awkward_shapes() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        // (n, heads, kv_heads, head_dim, past, spare capacity)
        for &(n, h, kvh, hd, past, spare) in &[
            (1, 4, 2, 8, 0, 0),
            (1, 9, 3, 64, 130, 7),
            (37, 6, 2, 24, 0, 3),
            (70, 3, 3, 16, 59, 0),
            (100, 9, 3, 64, 77, 11),
            (5, 8, 1, 32, 200, 1),
            (1, 9, 3, 64, 1500, 5),
            (2, 6, 3, 16, 2047, 0),
            (4, 4, 1, 8, 3000, 2),
            (45, 4, 2, 128, 70, 3),
            (130, 9, 3, 64, 0, 0),
        ] {
            let s = AttnShape {
                n,
                heads: h,
                kv_heads: kvh,
                head_dim: hd,
                past,
                cap: past + n + spare,
            };
            let qkv = rng.vec(n * s.qkv_width(), 2.0);
            let ang = rng.vec(n * hd / 2, 3.0);
            let mut cos = vec![0f32; n * hd];
            let mut sin = vec![0f32; n * hd];
            for r in 0..n {
                for i in 0..hd / 2 {
                    let a = ang[r * hd / 2 + i];
                    for off in [0, hd / 2] {
                        cos[r * hd + i + off] = a.cos();
                        sin[r * hd + i + off] = a.sin();
                    }
                }
            }
            let mut kb = rng.vec(kvh * s.cap * hd, 1.0);
            let mut vb = rng.vec(kvh * s.cap * hd, 1.0);
            let (want, wk, wv) = reference(s, &qkv, &cos, &sin, &kb, &vb);
            // The same with an f16 cache (its own conversions and key-tile paths): within f16's
            // rounding of the keys and values.
            let mut kh: Vec<f16> = kb.iter().map(|&x| f16::from_f32(x)).collect();
            let mut vh: Vec<f16> = vb.iter().map(|&x| f16::from_f32(x)).collect();
            let mut out = vec![f32::NAN; n * h * hd];
            let mut ql = vec![f32::NAN; h * hd];
            attention(s, &qkv, &cos, &sin, &mut kh, &mut vh, &mut out, &mut ql);
            let what = format!("n {n} h {h} kv {kvh} hd {hd} past {past}");
            close(&out, &want, 2e-2, &format!("f16 cache out ({what})"));
            attention(s, &qkv, &cos, &sin, &mut kb, &mut vb, &mut out, &mut ql);
            close(&out, &want, 2e-5, &format!("out ({what})"));
            close(&kb, &wk, 1e-6, &format!("k ({what})"));
            close(&vb, &wv, 0.0, &format!("v ({what})"));
            // q_last: the rotated query of the last row.
            let r = n - 1;
            let w = s.qkv_width();
            for hh in 0..h {
                let x = &qkv[r * w + hh * hd..r * w + (hh + 1) * hd];
                let mut want = vec![0f32; hd];
                rope_row(
                    x,
                    &cos[r * hd..(r + 1) * hd],
                    &sin[r * hd..(r + 1) * hd],
                    1.0,
                    &mut want,
                );
                close(&ql[hh * hd..(hh + 1) * hd], &want, 1e-6, "q_last");
            }
        }
    }

    #[test]
    fn linear_matches_reference_for_every_path() {
        let mut rng = Rng(77);
        for &(m, k, out) in &[
            (1, 576, 960),
            (3, 33, 70),
            (4, 100, 1),
            (5, 64, 131),
            (37, 129, 1100),
            (1, 7, 5),
        ] {
            let x = rng.vec(m * k, 1.0);
            let w = rng.vec(out * k, 0.5);
            let wh: Vec<f16> = w.iter().map(|&a| f16::from_f32(a)).collect();
            let wr: Vec<f32> = wh.iter().map(|a| a.to_f32()).collect();
            let refer = |w: &[f32]| -> Vec<f32> {
                let mut y = vec![0f32; m * out];
                for r in 0..m {
                    for o in 0..out {
                        y[r * out + o] = (0..k)
                            .map(|j| x[r * k + j] as f64 * w[o * k + j] as f64)
                            .sum::<f64>() as f32;
                    }
                }
                y
            };
            let mut y = vec![f32::NAN; m * out];
            linear(&x, m, Rows::F32(&w), out, &mut y);
            close(&y, &refer(&w), 1e-5, &format!("f32 m {m} k {k} out {out}"));
            let mut y = vec![f32::NAN; m * out];
            linear(&x, m, Rows::F16(&wh), out, &mut y);
            close(&y, &refer(&wr), 1e-5, &format!("f16 m {m} k {k} out {out}"));
            let wb: Vec<bf16> = w.iter().map(|&a| bf16::from_f32(a)).collect();
            let wbr: Vec<f32> = wb.iter().map(|a| a.to_f32()).collect();
            let mut y = vec![f32::NAN; m * out];
            linear(&x, m, Rows::BF16(&wb), out, &mut y);
            close(
                &y,
                &refer(&wbr),
                1e-5,
                &format!("bf16 m {m} k {k} out {out}"),
            );
        }
    }

    #[test]
    fn rms_norm_and_swiglu_match_reference() {
        let mut rng = Rng(5);
        for &(n, d) in &[(1, 576), (7, 33), (300, 130)] {
            let x = rng.vec(n * d, 3.0);
            let w = rng.vec(d, 1.0);
            let mut y = vec![0f32; n * d];
            rms_norm(&x, &w, 1e-5, &mut y);
            for r in 0..n {
                let row = &x[r * d..(r + 1) * d];
                let ms = row.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + 1e-5).sqrt();
                let want: Vec<f32> = row
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| (*a as f64 * inv * *b as f64) as f32)
                    .collect();
                close(&y[r * d..(r + 1) * d], &want, 2e-6, "rms_norm");
            }
            let gu = rng.vec(n * 2 * d, 6.0);
            let mut o = vec![0f32; n * d];
            swiglu(&gu, d, &mut o);
            for r in 0..n {
                for i in 0..d {
                    let (a, b) = (gu[r * 2 * d + i] as f64, gu[r * 2 * d + d + i] as f64);
                    let want = (a / (1.0 + (-a).exp()) * b) as f32;
                    assert!(
                        (o[r * d + i] - want).abs() <= 2e-6 * (1.0 + want.abs()),
                        "swiglu {r},{i}"
                    );
                }
            }
        }
    }
}
