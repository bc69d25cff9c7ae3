//! GGUF block weights kept as blocks on the CPU (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) and the products
//! on them.
//!
//! Storage: each weight row's blocks repacked losslessly into two arrays, so the resident size is
//! the file's own (Q6_K: +2 bytes of padding per 210):
//! - the quants, by blocks of 32 weights: 16 bytes for the 4-bit types (byte i holds element i in
//!   its low nibble and i + 16 in its high one, GGUF's Q4_0 order; Q4_K's nibbles are moved into
//!   that order), 32 for Q8_0 (signed bytes), 24 for Q6_K (the low four bits in the 4-bit order,
//!   then 8 bytes of high bit pairs: byte 2t holds elements 4t..4t + 3 at bits 0, 2, 4, 6 and
//!   byte 2t + 1 elements 16 + 4t..16 + 4t + 3);
//! - the scale words (u16), per super-block: Q4_0 / Q8_0 d, Q4_1 d and m (super-block = block);
//!   Q4_K (256 weights) d, dmin and its 12 bytes of packed 6-bit scales and minimums; Q6_K
//!   (256 weights) its 16 signed 8-bit scales, d, and a zero word.
//!
//! Every type is then blocks of 32 weights w = q·d + c, with one (d, c) for the block's first
//! 16 elements and one for its last 16 (they differ only for Q6_K, whose scales cover 16): Q4_K
//! d = d·s_j, c = −dmin·m_j; Q6_K q = the unsigned 6-bit value, d = d·s, c = −32·d. The products
//! q·d are exact in f32 for every type, so q·d + c by one FMA is the host dequantiser's value.
//!
//! Matrix-vector products (decode: m ≤ [`crate::cpu::GEMV_MAX_ROWS`] activation rows) read each
//! block once and dequantise it in registers — q·d + m by one FMA (Q4_1; −8·d for Q4_0's offset),
//! equal to the host dequantiser's values — straight into f32 FMAs with the activations (AVX-512,
//! AVX2 or portable, picked at run time like [`crate::cpu`]); threads split the output rows.
//! The activations stay f32, so the only difference from f32 weights is the summation order.
//! Larger products (prefill) dequantise a slab of rows to f32 and run the `gemm` crate.

use half::f16;
use rayon::prelude::*;

use crate::load::quant::{GgmlType, dequantize};

/// Weights per block (the kernels' unit; K-quants' super-blocks hold 8).
pub const QK: usize = 32;

/// A weight matrix [rows, cols] of GGUF blocks, rows in the file's (`[out, in]`) orientation.
#[derive(Clone)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Packed quants, `qbytes()` per block, row-major over (row, block).
    qs: Vec<u8>,
    /// Scale words, `scales()` per super-block (see the module comment).
    dm: Vec<u16>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({} [{}, {}], {} bytes)",
            self.ty.name(),
            self.rows,
            self.cols,
            self.bytes()
        )
    }
}

impl QMatrix {
    /// Whether the CPU kernels take blocks of `ty`.
    pub fn supports(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K
        )
    }

    /// Quant bytes per block of 32.
    fn qbytes(ty: GgmlType) -> usize {
        match ty {
            GgmlType::Q8_0 => 32,
            GgmlType::Q6K => 24,
            _ => 16,
        }
    }

    /// Scale words (u16) per super-block.
    fn scales(ty: GgmlType) -> usize {
        match ty {
            GgmlType::Q4_1 => 2,
            GgmlType::Q4K => 8,
            GgmlType::Q6K => 10,
            _ => 1,
        }
    }

    /// Blocks of 32 per super-block.
    fn sub(ty: GgmlType) -> usize {
        ty.block().0 / QK
    }

    /// Repack `blocks` (GGUF layout, `rows` rows of `cols / 32` blocks each).
    pub fn from_gguf(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        blocks: &[u8],
    ) -> Result<Self, String> {
        if !Self::supports(ty) {
            return Err(format!("{} blocks have no CPU kernel", ty.name()));
        }
        let (bw, bb) = ty.block();
        if cols % bw != 0 {
            return Err(format!(
                "{cols} columns are not whole {} blocks of {bw}",
                ty.name()
            ));
        }
        let nb = rows * cols / bw;
        if blocks.len() != nb * bb {
            return Err(format!(
                "{} bytes of {} blocks for [{rows}, {cols}], expected {}",
                blocks.len(),
                ty.name(),
                nb * bb
            ));
        }
        let (qb, ns) = (Self::qbytes(ty), Self::scales(ty));
        let mut qs = Vec::with_capacity(nb * Self::sub(ty) * qb);
        let mut dm = Vec::with_capacity(nb * ns);
        let words = |dm: &mut Vec<u16>, b: &[u8]| {
            dm.extend(b.chunks_exact(2).map(|p| u16::from_le_bytes([p[0], p[1]])))
        };
        for b in blocks.chunks_exact(bb) {
            match ty {
                GgmlType::Q4K => {
                    // d, dmin, scales: the first 16 bytes as they are
                    words(&mut dm, &b[..16]);
                    // 64-weight group g: byte l holds element l (low) and 32 + l (high)
                    for g in 0..4 {
                        let q = &b[16 + 32 * g..16 + 32 * g + 32];
                        for shift in [0, 4] {
                            qs.extend((0..16).map(|i| {
                                ((q[i] >> shift) & 15) | (((q[i + 16] >> shift) & 15) << 4)
                            }));
                        }
                    }
                }
                GgmlType::Q6K => {
                    words(&mut dm, &b[192..210]);
                    dm.push(0);
                    let q = q6k_values(b);
                    for blk in q.chunks_exact(QK) {
                        qs.extend((0..16).map(|i| (blk[i] & 15) | ((blk[i + 16] & 15) << 4)));
                        for t in 0..4 {
                            for half in [0, 16] {
                                qs.push((0..4).fold(0u8, |a, e| {
                                    a | ((blk[half + 4 * t + e] >> 4) << (2 * e))
                                }));
                            }
                        }
                    }
                }
                _ => {
                    words(&mut dm, &b[..2 * ns]);
                    qs.extend_from_slice(&b[2 * ns..]);
                }
            }
        }
        Ok(Self {
            ty,
            rows,
            cols,
            qs,
            dm,
        })
    }

    /// The rows of several matrices of one type and width, stacked (fused projections).
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self, String> {
        let mut it = parts.into_iter();
        let mut out = it.next().ok_or("nothing to stack")?;
        for p in it {
            if p.ty != out.ty || p.cols != out.cols {
                return Err(format!(
                    "cannot stack {} [.., {}] under {} [.., {}]",
                    p.ty.name(),
                    p.cols,
                    out.ty.name(),
                    out.cols
                ));
            }
            out.rows += p.rows;
            out.qs.extend_from_slice(&p.qs);
            out.dm.extend_from_slice(&p.dm);
        }
        Ok(out)
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Resident bytes (the file's own size for these blocks).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * self.dm.len()
    }

    /// Rows `r0..r1` as (quant bytes, f16 scale bits): the repacked layout the device kernels
    /// take (`shaders/qgemv.wgsl`).
    pub fn rows_raw(&self, r0: usize, r1: usize) -> (&[u8], &[u16]) {
        assert!(r0 <= r1 && r1 <= self.rows);
        let nb = self.blocks_per_row();
        let ns = self.cols / self.ty.block().0 * Self::scales(self.ty);
        let qb = Self::qbytes(self.ty);
        (
            &self.qs[r0 * nb * qb..r1 * nb * qb],
            &self.dm[r0 * ns..r1 * ns],
        )
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / QK
    }

    /// (d, c) of the first and of the last 16 elements of block `g` (row-major over all
    /// blocks): w = q·d + c.
    #[inline(always)]
    fn block_scales(&self, g: usize) -> [f32; 4] {
        let h = |i: usize| f16::from_bits(self.dm[i]).to_f32();
        match self.ty {
            GgmlType::Q4_0 => {
                let d = h(g);
                [d, -8.0 * d, d, -8.0 * d]
            }
            GgmlType::Q4_1 => [h(2 * g), h(2 * g + 1), h(2 * g), h(2 * g + 1)],
            GgmlType::Q4K | GgmlType::Q6K => {
                let n = Self::scales(self.ty);
                let words = &self.dm[g / 8 * n..(g / 8 + 1) * n];
                let (d, dmin) = k_super_halves(self.ty, words);
                let h = |b: u16| f16::from_bits(b).to_f32();
                k_block_scales(self.ty, words, g % 8, h(d), h(dmin))
            }
            _ => {
                let d = h(g);
                [d, 0.0, d, 0.0]
            }
        }
    }

    /// The 32 quants q of block `g`, element order, as f32.
    #[inline(always)]
    fn block_quants(&self, g: usize, q: &mut [f32; QK]) {
        let qb = Self::qbytes(self.ty);
        let b = &self.qs[g * qb..(g + 1) * qb];
        match self.ty {
            GgmlType::Q8_0 => {
                for j in 0..QK {
                    q[j] = b[j] as i8 as f32;
                }
            }
            _ => {
                for j in 0..16 {
                    q[j] = (b[j] & 15) as f32;
                    q[j + 16] = (b[j] >> 4) as f32;
                }
                if self.ty == GgmlType::Q6K {
                    for j in 0..16 {
                        let (t, e) = (j / 4, 2 * (j % 4));
                        q[j] += (((b[16 + 2 * t] >> e) & 3) << 4) as f32;
                        q[j + 16] += (((b[17 + 2 * t] >> e) & 3) << 4) as f32;
                    }
                }
            }
        }
    }

    /// Block `g` dequantised: q·d + c by one FMA (the host dequantiser's values).
    #[inline(always)]
    fn block_weights(&self, g: usize, out: &mut [f32]) {
        let mut q = [0f32; QK];
        self.block_quants(g, &mut q);
        let [d0, c0, d1, c1] = self.block_scales(g);
        for j in 0..16 {
            out[j] = q[j].mul_add(d0, c0);
            out[j + 16] = q[j + 16].mul_add(d1, c1);
        }
    }

    /// Dequantise rows `r0..r1` into `out` [(r1 − r0) · cols].
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        assert!(r0 <= r1 && r1 <= self.rows && out.len() == (r1 - r0) * self.cols);
        let (nb, qb, ns) = (
            self.blocks_per_row(),
            Self::qbytes(self.ty),
            Self::scales(self.ty),
        );
        let (_, bb) = self.ty.block();
        let work = |(i, o): (usize, &mut [f32])| {
            let r = r0 + i;
            #[cfg(target_arch = "x86_64")]
            if crate::cpu::simd_level() == crate::cpu::SimdLevel::Avx512 {
                // SAFETY: the level was detected on this CPU; r < rows, o is one row.
                unsafe { x86::dequant_row_avx512(self, r, o) };
                return;
            }
            if Self::sub(self.ty) > 1 {
                for (b, ob) in o.chunks_exact_mut(QK).enumerate() {
                    self.block_weights(r * nb + b, ob);
                }
                return;
            }
            let mut block = [0u8; 34];
            for b in 0..nb {
                let g = r * nb + b;
                for s in 0..ns {
                    block[2 * s..2 * s + 2].copy_from_slice(&self.dm[g * ns + s].to_le_bytes());
                }
                block[2 * ns..bb].copy_from_slice(&self.qs[g * qb..(g + 1) * qb]);
                dequantize(self.ty, &block[..bb], &mut o[b * QK..(b + 1) * QK]);
            }
        };
        if (r1 - r0) * self.cols < 1 << 16 {
            out.chunks_mut(self.cols).enumerate().for_each(work);
        } else {
            out.par_chunks_mut(self.cols).enumerate().for_each(work);
        }
    }
}

/// The instruction set the block kernels use here.
pub fn level_name() -> &'static str {
    match crate::cpu::simd_level() {
        crate::cpu::SimdLevel::Avx512 => "avx512",
        crate::cpu::SimdLevel::Avx2 => "avx2",
        crate::cpu::SimdLevel::Portable => "portable",
    }
}

/// Output rows per work item of the matrix-vector product.
const CHUNK: usize = 32;

/// y [m, out] = x [m, in] · Wᵀ on blocks: the quantised dot products for m ≤ `gemv_rows`,
/// dequantised slabs + `gemm` above.
pub fn linear(x: &[f32], m: usize, w: &QMatrix, y: &mut [f32]) {
    let (k, out) = (w.cols, w.rows);
    assert_eq!(x.len(), m * k, "activations [{m}, {k}]");
    assert_eq!(y.len(), m * out);
    if m == 0 || out == 0 {
        return;
    }
    if m > crate::cpu::GEMV_MAX_ROWS {
        const SLAB: usize = 1024;
        let mut scratch = vec![0f32; SLAB.min(out) * k];
        let mut o0 = 0;
        while o0 < out {
            let o1 = (o0 + SLAB).min(out);
            let buf = &mut scratch[..(o1 - o0) * k];
            w.dequantize_rows(o0, o1, buf);
            crate::cpu::gemm_f32(x, m, k, buf, o0, o1 - o0, out, y);
            o0 = o1;
        }
        return;
    }
    // Σ x over each block of each row (the offset/minimum term of the 4-bit types).
    let xsum: Vec<f32> = x.chunks_exact(QK).map(|b| b.iter().sum()).collect();
    // y transposed ([out, m], contiguous per output row), then scattered.
    let mut yt = vec![0f32; out * m];
    let work = |(ci, chunk): (usize, &mut [f32])| {
        let o0 = ci * CHUNK;
        for (i, yo) in chunk.chunks_mut(m).enumerate() {
            dot_row(w, o0 + i, x, &xsum, m, yo);
        }
    };
    if out * k < 1 << 16 {
        yt.chunks_mut(CHUNK * m).enumerate().for_each(work);
    } else {
        yt.par_chunks_mut(CHUNK * m).enumerate().for_each(work);
    }
    for o in 0..out {
        for r in 0..m {
            y[r * out + o] = yt[o * m + r];
        }
    }
}

/// out[r] = W[row] · x[r] for the m activation rows of `x` [m, cols].
fn dot_row(w: &QMatrix, row: usize, x: &[f32], xsum: &[f32], m: usize, out: &mut [f32]) {
    let nb = w.blocks_per_row();
    let mut r = 0;
    while r < m {
        let take = (m - r).min(4);
        let xs = &x[r * w.cols..(r + take) * w.cols];
        let ss = &xsum[r * nb..(r + take) * nb];
        let o = &mut out[r..r + take];
        match take {
            1 => dot_rows::<1>(w, row, xs, ss, o),
            2 => dot_rows::<2>(w, row, xs, ss, o),
            3 => dot_rows::<3>(w, row, xs, ss, o),
            _ => dot_rows::<4>(w, row, xs, ss, o),
        }
        r += take;
    }
}

fn dot_rows<const R: usize>(w: &QMatrix, row: usize, x: &[f32], xsum: &[f32], out: &mut [f32]) {
    assert!(row < w.rows && x.len() == R * w.cols && out.len() == R);
    assert_eq!(xsum.len(), R * w.blocks_per_row());
    use crate::cpu::{SimdLevel, simd_level};
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was detected on this CPU; shapes asserted above.
        SimdLevel::Avx512 => unsafe { x86::dot_avx512::<R>(w, row, x, xsum, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        SimdLevel::Avx2 if QMatrix::sub(w.ty) == 1 => unsafe { x86::dot_avx2::<R>(w, row, x, out) },
        _ => dot_portable::<R>(w, row, x, out),
    }
}

/// Every level's semantics, scalar: w = q·d + c in f32 by one fused multiply-add.
fn dot_portable<const R: usize>(w: &QMatrix, row: usize, x: &[f32], out: &mut [f32]) {
    let (nb, k) = (w.blocks_per_row(), w.cols);
    let mut acc = [0f32; R];
    let mut wf = [0f32; QK];
    for b in 0..nb {
        w.block_weights(row * nb + b, &mut wf);
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = &x[r * k + b * QK..r * k + (b + 1) * QK];
            *a += wf.iter().zip(xb).map(|(p, q)| p * q).sum::<f32>();
        }
    }
    out.copy_from_slice(&acc);
}

/// The f16 scale words of a K-quant super-block: (d, dmin) for Q4_K, (d, 0) for Q6_K.
#[inline(always)]
fn k_super_halves(ty: GgmlType, words: &[u16]) -> (u16, u16) {
    if ty == GgmlType::Q4K {
        (words[0], words[1])
    } else {
        (words[8], 0)
    }
}

/// (d, c) of the first and last 16 elements of block `j` (0..8) of a K-quant super-block from
/// its scale words ([`QMatrix::scales`] of them) and its f16 scales (d, dmin) as f32
/// ([`k_super_halves`]).
#[inline(always)]
fn k_block_scales(ty: GgmlType, words: &[u16], j: usize, d: f32, dmin: f32) -> [f32; 4] {
    if ty == GgmlType::Q4K {
        let (sc, mn) = q4k_scale_min(words, j);
        let (d, c) = (d * sc as f32, -(dmin * mn as f32));
        [d, c, d, c]
    } else {
        let sc = |i: usize| (words[i / 2].to_le_bytes()[i % 2] as i8) as f32;
        let (d0, d1) = (d * sc(2 * j), d * sc(2 * j + 1));
        [d0, -32.0 * d0, d1, -32.0 * d1]
    }
}

/// Q4_K's 6-bit scale and minimum of sub-block `j` (0..8) from its super-block's scale words
/// (d, dmin, then the 12 packed bytes).
#[inline(always)]
fn q4k_scale_min(w: &[u16], j: usize) -> (u8, u8) {
    let byte = |i: usize| w[2 + i / 2].to_le_bytes()[i % 2];
    if j < 4 {
        (byte(j) & 63, byte(j + 4) & 63)
    } else {
        (
            (byte(j + 4) & 0x0F) | ((byte(j - 4) >> 6) << 4),
            (byte(j + 4) >> 4) | ((byte(j) >> 6) << 4),
        )
    }
}

/// A Q6_K super-block's 256 unsigned 6-bit quants in element order (GGUF's layout: low
/// nibbles in `ql`, high bit pairs in `qh`, as the host dequantiser reads them).
fn q6k_values(b: &[u8]) -> [u8; 256] {
    let mut q = [0u8; 256];
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let y = &mut q[128 * half..128 * half + 128];
        for l in 0..32 {
            y[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GgmlType, QK, QMatrix};

    #[inline(always)]
    unsafe fn h2f(bits: u16) -> f32 {
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    /// Scale and offset of block `g` (w = q·d + c).
    #[inline(always)]
    unsafe fn dc(w: &QMatrix, g: usize) -> (f32, f32) {
        unsafe {
            let ns = QMatrix::scales(w.ty);
            let d = h2f(*w.dm.get_unchecked(g * ns));
            match w.ty {
                GgmlType::Q4_0 => (d, -8.0 * d),
                GgmlType::Q4_1 => (d, h2f(*w.dm.get_unchecked(g * ns + 1))),
                _ => (d, 0.0),
            }
        }
    }

    /// Row length (columns) from which [`dot512_long`] runs.
    pub const LONG_ROW: usize = 2048;

    /// # Safety
    /// AVX-512F, FMA and F16C; `x` holds R rows of `w.cols`, `xsum` their R × blocks sums,
    /// `out` R values, `row < w.rows`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot_avx512<const R: usize>(
        w: &QMatrix,
        row: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [f32],
    ) {
        unsafe {
            match w.ty {
                GgmlType::Q4K => return dot512_k::<R, 3>(w, row, x, out),
                GgmlType::Q6K => return dot512_k::<R, 4>(w, row, x, out),
                _ => {}
            }
            // Long rows amortise converting 16 blocks' scales at once (Llama-2-7B's 4096- and
            // 11008-wide rows: decode 3.2 → 3.7 tok/s); short ones pay for that setup
            // (SmolLM2's 576: 111 → 93 tok/s), so they keep the per-block form.
            if w.cols >= LONG_ROW {
                match w.ty {
                    GgmlType::Q4_0 => dot512_long::<R, 0>(w, row, x, xsum, out),
                    GgmlType::Q4_1 => dot512_long::<R, 1>(w, row, x, xsum, out),
                    _ => dot512_long::<R, 2>(w, row, x, xsum, out),
                }
            } else {
                match w.ty {
                    GgmlType::Q4_0 => dot512_short::<R, 0>(w, row, x, out),
                    GgmlType::Q4_1 => dot512_short::<R, 1>(w, row, x, out),
                    _ => dot512_short::<R, 2>(w, row, x, out),
                }
            }
        }
    }

    /// The block's 32 weights dequantised as two vectors of 16 (element order). T: 0 = Q4_0,
    /// 1 = Q4_1, 2 = Q8_0.
    #[inline(always)]
    unsafe fn block512<const T: u8>(qs: *const u8, dm: *const u16, b: usize) -> (__m512, __m512) {
        unsafe {
            let (d, c) = match T {
                0 => {
                    let d = h2f(*dm.add(b));
                    (d, -8.0 * d)
                }
                1 => (h2f(*dm.add(2 * b)), h2f(*dm.add(2 * b + 1))),
                _ => (h2f(*dm.add(b)), 0.0),
            };
            let (dv, cv) = (_mm512_set1_ps(d), _mm512_set1_ps(c));
            let (q0, q1) = if T == 2 {
                let p = qs.add(b * 32);
                (
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i)),
                )
            } else {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(b * 16) as *const __m128i));
                (
                    _mm512_and_si512(v, _mm512_set1_epi32(15)),
                    _mm512_srli_epi32(v, 4),
                )
            };
            (
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(q0), dv, cv),
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(q1), dv, cv),
            )
        }
    }

    /// The quants of block `b` as two f32 vectors of 16 (element order).
    #[inline(always)]
    unsafe fn quants512<const T: u8>(qs: *const u8, b: usize) -> (__m512, __m512) {
        unsafe {
            let (q0, q1) = if T == 2 {
                let p = qs.add(b * 32);
                (
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i)),
                )
            } else {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(b * 16) as *const __m128i));
                (
                    _mm512_and_si512(v, _mm512_set1_epi32(15)),
                    _mm512_srli_epi32(v, 4),
                )
            };
            (_mm512_cvtepi32_ps(q0), _mm512_cvtepi32_ps(q1))
        }
    }

    /// Scales d and offsets c (w = q·d + c) of up to 16 blocks from block `g0` on, as lanes.
    #[inline(always)]
    unsafe fn scales16<const T: u8>(dm: *const u16, g0: usize, n: usize) -> (__m512, __m512) {
        unsafe {
            let ns = if T == 1 { 2 } else { 1 };
            let mut buf = [0u16; 32];
            let src = if n == 16 {
                dm.add(g0 * ns)
            } else {
                std::ptr::copy_nonoverlapping(dm.add(g0 * ns), buf.as_mut_ptr(), n * ns);
                buf.as_ptr()
            };
            if T == 1 {
                // interleaved (d, m) pairs
                let a = _mm512_cvtph_ps(_mm256_loadu_si256(src as *const __m256i));
                let b = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(16) as *const __m256i));
                let even =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odd =
                    _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
                (
                    _mm512_permutex2var_ps(a, even, b),
                    _mm512_permutex2var_ps(a, odd, b),
                )
            } else {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(src as *const __m256i));
                let c = if T == 0 {
                    _mm512_mul_ps(d, _mm512_set1_ps(-8.0))
                } else {
                    _mm512_setzero_ps()
                };
                (d, c)
            }
        }
    }

    /// Σ_j (q_j·d + c)·x_j = d·Σ q_j·x_j + c·Σ x_j per block: the quants meet the activations
    /// as integers converted to f32, the block scale multiplies their 16-lane partial sums once,
    /// and the scales of 16 blocks are converted together (one permute picks a block's).
    #[inline(always)]
    unsafe fn dot512_long<const R: usize, const T: u8>(
        w: &QMatrix,
        row: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [f32],
    ) {
        unsafe {
            let nb = w.cols / QK;
            let k = w.cols;
            let (qb, ns) = if T == 2 {
                (32, 1)
            } else {
                (16, 1 + (T == 1) as usize)
            };
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            let mut corr = [_mm512_setzero_ps(); R];
            let qs = w.qs.as_ptr().add(row * nb * qb);
            let dm = w.dm.as_ptr().add(row * nb * ns);
            let xp = x.as_ptr();
            let mut g0 = 0;
            while g0 < nb {
                let n = (nb - g0).min(16);
                _mm_prefetch::<_MM_HINT_T0>(qs.wrapping_add((g0 + 32) * qb) as *const i8);
                let (dv, cv) = scales16::<T>(dm, g0, n);
                if T != 2 {
                    for (r, c) in corr.iter_mut().enumerate() {
                        let src = &xsum[r * nb + g0..r * nb + g0 + n];
                        let sv = if n == 16 {
                            _mm512_loadu_ps(src.as_ptr())
                        } else {
                            let mut sb = [0f32; 16];
                            sb[..n].copy_from_slice(src);
                            _mm512_loadu_ps(sb.as_ptr())
                        };
                        *c = _mm512_fmadd_ps(cv, sv, *c);
                    }
                }
                // two blocks a trip into two accumulator chains (static indices keep them in
                // registers)
                let mut j = 0;
                while j < n {
                    let two = j + 1 < n;
                    let (q0, q1) = quants512::<T>(qs, g0 + j);
                    let s0 = _mm512_permutexvar_ps(_mm512_set1_epi32(j as i32), dv);
                    let (q2, q3, s1) = if two {
                        let (q2, q3) = quants512::<T>(qs, g0 + j + 1);
                        (
                            q2,
                            q3,
                            _mm512_permutexvar_ps(_mm512_set1_epi32(j as i32 + 1), dv),
                        )
                    } else {
                        (
                            _mm512_setzero_ps(),
                            _mm512_setzero_ps(),
                            _mm512_setzero_ps(),
                        )
                    };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xb = xp.add(r * k + (g0 + j) * QK);
                        let t = _mm512_mul_ps(q0, _mm512_loadu_ps(xb));
                        let t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb.add(16)), t);
                        a[0] = _mm512_fmadd_ps(t, s0, a[0]);
                        if two {
                            let u = _mm512_mul_ps(q2, _mm512_loadu_ps(xb.add(32)));
                            let u = _mm512_fmadd_ps(q3, _mm512_loadu_ps(xb.add(48)), u);
                            a[1] = _mm512_fmadd_ps(u, s1, a[1]);
                        }
                    }
                    j += 2;
                }
                g0 += n;
            }
            for r in 0..R {
                let s = _mm512_add_ps(acc[r][0], acc[r][1]);
                out[r] = _mm512_reduce_add_ps(s) + _mm512_reduce_add_ps(corr[r]);
            }
        }
    }

    /// The per-block form for short rows: each block dequantised in registers (q·d + c by one
    /// FMA) and multiplied into the activations; four accumulator chains.
    #[inline(always)]
    unsafe fn dot512_short<const R: usize, const T: u8>(
        w: &QMatrix,
        row: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        unsafe {
            let nb = w.cols / QK;
            let k = w.cols;
            let (qb, ns) = if T == 2 {
                (32, 1)
            } else {
                (16, 1 + (T == 1) as usize)
            };
            // four independent accumulator chains per row: two blocks a trip, two halves each
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            let qs = w.qs.as_ptr().add(row * nb * qb);
            let dm = w.dm.as_ptr().add(row * nb * ns);
            let xp = x.as_ptr();
            let mut b = 0;
            while b + 2 <= nb {
                // the weight stream runs ahead of the hardware prefetcher on long rows
                _mm_prefetch::<_MM_HINT_T0>(qs.wrapping_add((b + 16) * qb) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(dm.wrapping_add((b + 32) * ns) as *const i8);
                let (w0, w1) = block512::<T>(qs, dm, b);
                let (w2, w3) = block512::<T>(qs, dm, b + 1);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = xp.add(r * k + b * QK);
                    a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), a[0]);
                    a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.add(16)), a[1]);
                    a[2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xb.add(32)), a[2]);
                    a[3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xb.add(48)), a[3]);
                }
                b += 2;
            }
            if b < nb {
                let (w0, w1) = block512::<T>(qs, dm, b);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = xp.add(r * k + b * QK);
                    a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), a[0]);
                    a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.add(16)), a[1]);
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
                *o = _mm512_reduce_add_ps(s);
            }
        }
    }

    /// Block `b` of a K-quant row (`qs` at the row's quants) dequantised as two vectors of 16,
    /// element order, with the block's scales `s` ([`QMatrix::block_scales`]). T: 3 = Q4_K,
    /// 4 = Q6_K.
    #[inline(always)]
    unsafe fn kblock512<const T: u8>(qs: *const u8, b: usize, s: [f32; 4]) -> (__m512, __m512) {
        unsafe {
            let low = _mm512_set1_epi32(15);
            let (q0, q1) = if T == 3 {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(b * 16) as *const __m128i));
                (_mm512_and_si512(v, low), _mm512_srli_epi32(v, 4))
            } else {
                let p = qs.add(b * 24);
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                // high bit pairs: byte 2t (elements 4t..) and 2t + 1 (16 + 4t..), each byte
                // spread to its four elements and shifted by 0, 2, 4, 6
                let h = _mm_loadl_epi64(p.add(16) as *const __m128i);
                let pick_lo = _mm_setr_epi8(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
                let pick_hi = _mm_setr_epi8(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
                let sh = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
                let three = _mm512_set1_epi32(3);
                let high = |pick| {
                    let e = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(h, pick));
                    _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(e, sh), three), 4)
                };
                (
                    _mm512_or_si512(_mm512_and_si512(v, low), high(pick_lo)),
                    _mm512_or_si512(_mm512_srli_epi32(v, 4), high(pick_hi)),
                )
            };
            (
                _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(q0),
                    _mm512_set1_ps(s[0]),
                    _mm512_set1_ps(s[1]),
                ),
                _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(q1),
                    _mm512_set1_ps(s[2]),
                    _mm512_set1_ps(s[3]),
                ),
            )
        }
    }

    /// The (d, c) pairs of a K-quant super-block's 8 blocks ([`QMatrix::block_scales`]'s values,
    /// the f16 scales converted by F16C instead of `half`'s run-time dispatch).
    #[inline(always)]
    unsafe fn kscales(w: &QMatrix, s: usize) -> [[f32; 4]; 8] {
        let n = QMatrix::scales(w.ty);
        let words = &w.dm[s * n..(s + 1) * n];
        let (d, dmin) = super::k_super_halves(w.ty, words);
        // SAFETY: F16C is enabled in every caller (the AVX-512 kernels).
        let (d, dmin) = unsafe { (h2f(d), h2f(dmin)) };
        let mut out = [[0f32; 4]; 8];
        for (j, o) in out.iter_mut().enumerate() {
            *o = super::k_block_scales(w.ty, words, j, d, dmin);
        }
        out
    }

    /// K-quant rows: each block's scales decoded from its super-block's words (scalar), its
    /// quants in registers, q·d + c by one FMA into the activations.
    #[inline(always)]
    unsafe fn dot512_k<const R: usize, const T: u8>(
        w: &QMatrix,
        row: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        unsafe {
            let nb = w.cols / QK;
            let k = w.cols;
            let qb = QMatrix::qbytes(w.ty);
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            let qs = w.qs.as_ptr().add(row * nb * qb);
            let xp = x.as_ptr();
            let mut sc = [[0f32; 4]; 8];
            for b in 0..nb {
                _mm_prefetch::<_MM_HINT_T0>(qs.wrapping_add((b + 8) * qb) as *const i8);
                if b % 8 == 0 {
                    sc = kscales(w, (row * nb + b) / 8);
                }
                let (w0, w1) = kblock512::<T>(qs, b, sc[b % 8]);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = xp.add(r * k + b * QK);
                    a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), a[0]);
                    a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.add(16)), a[1]);
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
        }
    }

    /// Row `row` of `w` dequantised into `out` [cols] (the host dequantiser's values; a zero may
    /// come out +0 where the host's product gives −0).
    ///
    /// # Safety
    /// AVX-512F, FMA and F16C; `row < w.rows`, `out.len() == w.cols`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dequant_row_avx512(w: &QMatrix, row: usize, out: &mut [f32]) {
        unsafe {
            match w.ty {
                GgmlType::Q4_0 => dequant512::<0>(w, row, out),
                GgmlType::Q4_1 => dequant512::<1>(w, row, out),
                GgmlType::Q4K => dequant512_k::<3>(w, row, out),
                GgmlType::Q6K => dequant512_k::<4>(w, row, out),
                _ => dequant512::<2>(w, row, out),
            }
        }
    }

    #[inline(always)]
    unsafe fn dequant512<const T: u8>(w: &QMatrix, row: usize, out: &mut [f32]) {
        unsafe {
            let nb = w.cols / QK;
            let (qb, ns) = if T == 2 {
                (32, 1)
            } else {
                (16, 1 + (T == 1) as usize)
            };
            let qs = w.qs.as_ptr().add(row * nb * qb);
            let dm = w.dm.as_ptr().add(row * nb * ns);
            let o = out.as_mut_ptr();
            for b in 0..nb {
                let (w0, w1) = block512::<T>(qs, dm, b);
                _mm512_storeu_ps(o.add(b * QK), w0);
                _mm512_storeu_ps(o.add(b * QK + 16), w1);
            }
        }
    }

    #[inline(always)]
    unsafe fn dequant512_k<const T: u8>(w: &QMatrix, row: usize, out: &mut [f32]) {
        unsafe {
            let nb = w.cols / QK;
            let qs = w.qs.as_ptr().add(row * nb * QMatrix::qbytes(w.ty));
            let o = out.as_mut_ptr();
            let mut sc = [[0f32; 4]; 8];
            for b in 0..nb {
                if b % 8 == 0 {
                    sc = kscales(w, (row * nb + b) / 8);
                }
                let (w0, w1) = kblock512::<T>(qs, b, sc[b % 8]);
                _mm512_storeu_ps(o.add(b * QK), w0);
                _mm512_storeu_ps(o.add(b * QK + 16), w1);
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; shapes as [`dot_avx512`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2<const R: usize>(w: &QMatrix, row: usize, x: &[f32], out: &mut [f32]) {
        unsafe {
            let nb = w.cols / QK;
            let k = w.cols;
            let qb = QMatrix::qbytes(w.ty);
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let low = _mm256_set1_epi32(15);
            let qs = w.qs.as_ptr().add(row * nb * qb);
            let xp = x.as_ptr();
            for b in 0..nb {
                let (d, c) = dc(w, row * nb + b);
                let (dv, cv) = (_mm256_set1_ps(d), _mm256_set1_ps(c));
                // four vectors of 8 weights, in element order
                let q: [__m256i; 4] = if w.ty == GgmlType::Q8_0 {
                    let p = qs.add(b * 32);
                    let ld = |o: usize| {
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(o) as *const __m128i))
                    };
                    [ld(0), ld(8), ld(16), ld(24)]
                } else {
                    let p = qs.add(b * 16);
                    let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
                    let h = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i));
                    [
                        _mm256_and_si256(a, low),
                        _mm256_and_si256(h, low),
                        _mm256_srli_epi32(a, 4),
                        _mm256_srli_epi32(h, 4),
                    ]
                };
                for (i, qi) in q.iter().enumerate() {
                    let wv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*qi), dv, cv);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(xp.add(r * k + b * QK + 8 * i));
                        a[i & 1] = _mm256_fmadd_ps(wv, xv, a[i & 1]);
                    }
                }
            }
            for r in 0..R {
                out[r] = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
            }
        }
    }
}

/// GGUF blocks of `ty` for [rows, cols] from a seeded generator, for the kernel tests of both
/// backends: random bytes with edge values mixed in (an all-zero block, the largest and smallest
/// normal f16 scales, subnormal and negative-zero scales, all-max quants, Q8_0's −128).
pub fn random_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (bw, bb) = ty.block();
    let nb = rows * cols / bw;
    // where the block's f16 scales sit
    let halves: &[usize] = match ty {
        GgmlType::Q4_1 | GgmlType::Q4K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => &[0],
    };
    let mut out = Vec::with_capacity(nb * bb);
    for i in 0..nb {
        let mut b = vec![0u8; bb];
        for x in b.iter_mut() {
            *x = next() as u8;
        }
        let scale = |v: u64| -> u16 {
            match v % 9 {
                0 => 0x0000, // zero
                1 => 0x8000, // negative zero
                2 => 0x0001, // smallest subnormal
                3 => 0x7BFF, // largest finite (65504)
                4 => 0x0400, // smallest normal
                _ => f16::from_f32((v % 2000) as f32 / 1000.0 - 1.0).to_bits(),
            }
        };
        let quant = |j: usize| !halves.iter().any(|&h| j == h || j == h + 1);
        if i % 7 == 3 {
            for (j, x) in b.iter_mut().enumerate() {
                if quant(j) {
                    *x = 0;
                }
            }
        }
        if i % 11 == 5 {
            for (j, x) in b.iter_mut().enumerate() {
                if quant(j) {
                    *x = if ty == GgmlType::Q8_0 { 0x80 } else { 0xFF };
                }
            }
        }
        for &h in halves {
            let v = scale(next());
            // keep the huge scale rare enough that sums stay finite
            let v = if v == 0x7BFF && i % 5 != 0 { 0x3C00 } else { v };
            b[h..h + 2].copy_from_slice(&v.to_le_bytes());
        }
        out.extend(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acts(m: usize, k: usize, seed: u32) -> Vec<f32> {
        (0..m * k)
            .map(|i| {
                let v = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                    / (1u32 << 24) as f32;
                if i % 97 == 13 { 0.0 } else { (v - 0.5) * 4.0 }
            })
            .collect()
    }

    /// f64 reference on the dequantised weights, with Σ|terms| of each output for the
    /// rounding tolerance.
    fn reference(w: &QMatrix, x: &[f32], m: usize) -> Vec<(f64, f64)> {
        let (k, out) = (w.cols, w.rows);
        let mut wf = vec![0f32; out * k];
        w.dequantize_rows(0, out, &mut wf);
        let mut y = vec![(0f64, 0f64); m * out];
        for r in 0..m {
            for o in 0..out {
                let terms = (0..k).map(|j| wf[o * k + j] as f64 * x[r * k + j] as f64);
                y[r * out + o] = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            }
        }
        y
    }

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];

    #[test]
    fn repack_is_lossless() {
        for ty in TYPES {
            let (rows, cols) = (5, if ty.block().0 == 256 { 768 } else { 96 });
            let raw = random_blocks(ty, rows, cols, 3);
            let w = QMatrix::from_gguf(ty, rows, cols, &raw).unwrap();
            // the file's size (Q6_K: one padding word per 210-byte super-block)
            let pad = if ty == GgmlType::Q6K {
                2 * raw.len() / 210
            } else {
                0
            };
            assert_eq!(w.bytes(), raw.len() + pad, "{}", ty.name());
            let mut a = vec![0f32; rows * cols];
            let mut b = vec![0f32; rows * cols];
            dequantize(ty, &raw, &mut a);
            w.dequantize_rows(0, rows, &mut b);
            // equal values (an FMA's zero may be +0 where the host's product is −0), and the
            // repacked blocks themselves are the file's bytes
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    x == y && !y.is_nan(),
                    "{} element {i}: {x} vs {y}",
                    ty.name()
                );
            }
            let (_, bb) = ty.block();
            let ns = QMatrix::scales(ty);
            // the portable decoder too
            let mut p = vec![0f32; rows * cols];
            for (g, o) in p.chunks_exact_mut(QK).enumerate() {
                w.block_weights(g, o);
            }
            assert!(a.iter().zip(&p).all(|(x, y)| x == y), "{}", ty.name());
            for (g, blk) in raw.chunks_exact(bb).enumerate() {
                if ty.block().0 != QK {
                    break; // K-quants are reordered; their values are checked above
                }
                let qb = QMatrix::qbytes(ty);
                assert_eq!(&w.qs[g * qb..(g + 1) * qb], &blk[2 * ns..]);
                for k in 0..ns {
                    assert_eq!(w.dm[g * ns + k].to_le_bytes(), [blk[2 * k], blk[2 * k + 1]]);
                }
            }
            // stacking keeps rows in order
            let s = QMatrix::stack(vec![w.clone(), w.clone()]).unwrap();
            let mut c = vec![0f32; 2 * rows * cols];
            s.dequantize_rows(0, 2 * rows, &mut c);
            assert_eq!(&c[rows * cols..], &b[..]);
        }
        assert!(QMatrix::from_gguf(GgmlType::Q4K, 1, 128, &[0; 72]).is_err());
        assert!(QMatrix::from_gguf(GgmlType::F16, 1, 32, &[0; 64]).is_err());
        assert!(QMatrix::from_gguf(GgmlType::Q4_0, 2, 32, &[0; 18]).is_err());
    }

    #[test]
    fn block_products_match_the_f64_reference() {
        let mut checked = 0;
        for ty in TYPES {
            // awkward shapes: output rows that are not multiples of the chunk, 1..4 rows and more
            // (2,080 columns: the long-row kernel, 65 blocks = four groups of 16 and a tail;
            // K-quants: 1, 3 and 9 super-blocks of 256)
            let shapes: &[(usize, usize)] = if ty.block().0 == 256 {
                &[(1, 256), (33, 768), (70, 2304), (129, 256), (9, 768)]
            } else {
                &[(1, 32), (33, 96), (70, 576), (129, 160), (9, 2080)]
            };
            for &(out, k) in shapes {
                let w =
                    QMatrix::from_gguf(ty, out, k, &random_blocks(ty, out, k, out as u64)).unwrap();
                for m in [1usize, 2, 3, 4] {
                    let x = acts(m, k, (m * 31 + out) as u32);
                    let want = reference(&w, &x, m);
                    let mut y = vec![f32::NAN; m * out];
                    linear(&x, m, &w, &mut y);
                    // the portable level too, one row at a time
                    let mut yp = vec![f32::NAN; m * out];
                    for o in 0..out {
                        for r in 0..m {
                            let mut v = [0f32];
                            dot_portable::<1>(&w, o, &x[r * k..(r + 1) * k], &mut v);
                            yp[r * out + o] = v[0];
                        }
                    }
                    for (i, &(wv, abs)) in want.iter().enumerate() {
                        // f32 rounding of the products and their sums
                        let tol = 1e-6 * abs + 1e-30;
                        for (name, got) in [("dispatched", y[i]), ("portable", yp[i])] {
                            assert!(
                                got.is_finite() && (got as f64 - wv).abs() <= tol,
                                "{} [{out}, {k}] m {m} ({name}, {}): element {i}: {got} vs {wv}",
                                ty.name(),
                                level_name()
                            );
                        }
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 100);
    }

    #[test]
    fn prefill_products_match_the_dequantised_weights() {
        for ty in TYPES {
            // more rows than one slab
            let (out, k, m) = (1100, if ty.block().0 == 256 { 256 } else { 64 }, 9);
            let w = QMatrix::from_gguf(ty, out, k, &random_blocks(ty, out, k, 5)).unwrap();
            let x = acts(m, k, 4);
            let mut wf = vec![0f32; out * k];
            w.dequantize_rows(0, out, &mut wf);
            let mut y = vec![f32::NAN; m * out];
            linear(&x, m, &w, &mut y);
            for r in 0..m {
                for o in 0..out {
                    let terms = (0..k).map(|j| wf[o * k + j] as f64 * x[r * k + j] as f64);
                    let (want, abs) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                    let got = y[r * out + o] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * abs + 1e-30,
                        "{} row {r} out {o}: {got} vs {want}",
                        ty.name()
                    );
                }
            }
        }
    }
}
