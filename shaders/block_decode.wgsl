// block_decode.wgsl — not a kernel: the GGUF block decoding that qgemv.wgsl and dequant.wgsl
// share, pasted into both at `{{ block_decode }}` by homer-wgpu. It expects the including kernel
// to declare `qs: array<u32>` (quant words), `dm: array<u32>` (scale words) and
// `const TYPE: u32` (0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q4_K, 4 Q6_K).
//
// Every type is blocks of 32 weights w = q·d + c, one (d, c) for the block's first 16 elements
// and one for its last 16 (they differ only for Q6_K). A block's quant words, QW of them:
//   Q4_0, Q4_1, Q4_K  4 words: byte i holds element i (low nibble) and i + 16 (high nibble)
//   Q8_0              8 words: byte i holds element i, signed
//   Q6_K              6 words: the low four bits as the 4-bit types, then 2 words of high bit
//                     pairs: 16-bit field t (word 4 + t / 2, half t % 2) holds elements
//                     4t..4t + 3 at bits 0, 2, 4, 6 and 16 + 4t..16 + 4t + 3 at bits 8..14
// A unit is 8 weights of a 4-bit or 6-bit block (elements 4u..4u + 3 and 16 + 4u..16 + 4u + 3,
// u < 4) or 4 of a Q8_0 block (elements 4u..4u + 3, u < 8): UNITS per block.
// Scale words per super-block (as `homer_model::qcpu::QMatrix` packs them):
//   Q4_0, Q8_0  one f16 per block, two blocks a word (block b: word b / 2, half b % 2)
//   Q4_1        one word per block: d (low half), m (high half)
//   Q4_K        4 words per 256 weights: d | dmin, then 12 bytes of packed 6-bit scale and
//               minimum pairs (GGUF's order); block j: d = d·s_j, c = −dmin·m_j
//   Q6_K        5 words per 256 weights: 16 signed 8-bit scales (one per 16 elements), then d
//               (low half); c = −32·d
//
//   nibbles(w, 0) / nibbles(w, 4)  the low / high nibbles of the four bytes of w, as f32
//   signed_bytes(w)                 the four bytes of w as signed 8-bit values, as f32
//   high_pairs(f, 0) / (f, 8)       Q6_K's high bit pairs of a unit's low / high four elements,
//                                   times 16
//   block_scales(g)                 (d, c) of block g's first and last 16 elements

const QW: u32 = select(select(4u, 6u, TYPE == 4u), 8u, TYPE == 2u);
const UNITS: u32 = select(4u, 8u, TYPE == 2u);

fn nibbles(w: u32, shift: u32) -> vec4<f32> {
    return vec4<f32>(
        f32((w >> shift) & 15u),
        f32((w >> (shift + 8u)) & 15u),
        f32((w >> (shift + 16u)) & 15u),
        f32((w >> (shift + 24u)) & 15u),
    );
}

fn signed_bytes(w: u32) -> vec4<f32> {
    let v = bitcast<i32>(w);
    return vec4<f32>(
        f32((v << 24u) >> 24u),
        f32((v << 16u) >> 24u),
        f32((v << 8u) >> 24u),
        f32(v >> 24u),
    );
}

fn high_pairs(f: u32, shift: u32) -> vec4<f32> {
    return vec4<f32>(
        f32((f >> shift) & 3u),
        f32((f >> (shift + 2u)) & 3u),
        f32((f >> (shift + 4u)) & 3u),
        f32((f >> (shift + 6u)) & 3u),
    ) * 16.0;
}

// Byte `i` of the scale words from word `base` on.
fn scale_byte(base: u32, i: u32) -> u32 {
    return (dm[base + i / 4u] >> (8u * (i % 4u))) & 255u;
}

fn block_scales(g: u32) -> vec4<f32> {
    if (TYPE == 1u) {
        let s = unpack2x16float(dm[g]);
        return vec4<f32>(s, s);
    }
    if (TYPE == 3u) {
        let base = (g / 8u) * 4u;
        let j = g % 8u;
        let dd = unpack2x16float(dm[base]);
        var sc: u32;
        var mn: u32;
        if (j < 4u) {
            sc = scale_byte(base + 1u, j) & 63u;
            mn = scale_byte(base + 1u, j + 4u) & 63u;
        } else {
            sc = (scale_byte(base + 1u, j + 4u) & 15u) | ((scale_byte(base + 1u, j - 4u) >> 6u) << 4u);
            mn = (scale_byte(base + 1u, j + 4u) >> 4u) | ((scale_byte(base + 1u, j) >> 6u) << 4u);
        }
        let d = dd.x * f32(sc);
        let c = -(dd.y * f32(mn));
        return vec4<f32>(d, c, d, c);
    }
    if (TYPE == 4u) {
        let base = (g / 8u) * 5u;
        let j = g % 8u;
        let d = unpack2x16float(dm[base + 4u]).x;
        let pair = dm[base + j / 2u] >> (16u * (j % 2u));
        let d0 = d * f32(bitcast<i32>(pair << 24u) >> 24u);
        let d1 = d * f32(bitcast<i32>(pair << 16u) >> 24u);
        return vec4<f32>(d0, -32.0 * d0, d1, -32.0 * d1);
    }
    let h = unpack2x16float(dm[g / 2u]);
    let d = select(h.x, h.y, (g & 1u) == 1u);
    let c = select(0.0, -8.0 * d, TYPE == 0u);
    return vec4<f32>(d, c, d, c);
}

// Unit u of block g (g's quant words start at word g·QW): its weights as two vec4s (the second
// is unused for Q8_0).
fn unit_weights(g: u32, u: u32, sc: vec4<f32>) -> array<vec4<f32>, 2> {
    let word = qs[g * QW + u];
    if (TYPE == 2u) {
        return array<vec4<f32>, 2>(signed_bytes(word) * sc.x, vec4<f32>(0.0));
    }
    var lo = nibbles(word, 0u);
    var hi = nibbles(word, 4u);
    if (TYPE == 4u) {
        let f = qs[g * QW + 4u + u / 2u] >> (16u * (u % 2u));
        lo = lo + high_pairs(f, 0u);
        hi = hi + high_pairs(f, 8u);
    }
    return array<vec4<f32>, 2>(lo * sc.x + vec4<f32>(sc.y), hi * sc.z + vec4<f32>(sc.w));
}
