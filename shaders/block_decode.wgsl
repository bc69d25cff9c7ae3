// block_decode.wgsl — not a kernel: the GGUF block decoding that qgemv.wgsl and dequant.wgsl
// share, pasted into both at `{{ block_decode }}` by homer-wgpu. It expects the including kernel
// to declare `dm: array<u32>` (the f16 scale words) and `const TYPE: u32` (0 Q4_0, 1 Q4_1, 2 Q8_0).
//
//   nibbles(w, 0) / nibbles(w, 4)  the low / high nibbles of the four bytes of w, as f32
//   signed_bytes(w)                 the four bytes of w as signed 8-bit values, as f32
//   scale_offset(g)                 (d, c) of block g, so that a weight is q·d + c

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

// (d, c) of block g: w = q·d + c.
fn scale_offset(g: u32) -> vec2<f32> {
    if (TYPE == 1u) {
        return unpack2x16float(dm[g]);
    }
    let h = unpack2x16float(dm[g / 2u]);
    let d = select(h.x, h.y, (g & 1u) == 1u);
    return vec2<f32>(d, select(0.0, -8.0 * d, TYPE == 0u));
}
