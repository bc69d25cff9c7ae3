// dequant.wgsl — GGUF blocks to f32 rows (prefill: the weight is dequantised into a scratch
// tensor that burn's matmul then reads).
//
// Contract
//   w[o, j] = q · d + c of block (o, j / 32), exactly `homer_model::load::quant::dequantize`'s
//   values (q·d is exact in f32, one rounding for the + c), for o < OUT, j < K.
//   Types, the quant words and the scale words as in qgemv.wgsl.
//
// Inputs (group 0, storage, read_write for the reason given in qgemv.wgsl)
//   0  qs    u32          quant words, QW = 4 (Q4) or 8 (Q8_0) per block
//   1  dm    u32          f16 scale words
//   2  w     [OUT, K]     f32 output (as vec4s), every element written exactly once
//   3  info  [2]          u32   OUT, K
//
// Dispatch: a 2-D grid of workgroups of {{ workgroup_size }} (x ≤ 65,535), flattened;
// grid-stride over the OUT · K / 32 · QW quant words (the host keeps every invocation under 1,024
// trips). Word i of block g writes 2 vec4s (Q4: its low and high nibbles) or 1 (Q8_0).
@group(0) @binding(0) var<storage, read_write> qs: array<u32>;
@group(0) @binding(1) var<storage, read_write> dm: array<u32>;
@group(0) @binding(2) var<storage, read_write> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const TYPE: u32 = {{ qtype }}u;
const QW: u32 = select(4u, 8u, {{ qtype }}u == 2u);

{{ block_decode }}

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let total = info[0] * (info[1] / 32u) * QW;
    let first = (wid.y * nwg.x + wid.x) * WG + lid;
    let stride = nwg.x * nwg.y * WG;
    for (var i = first; i < total; i = i + stride) {
        let g = i / QW; // block index, row-major over (o, b)
        let wi = i % QW;
        let sc = scale_offset(g);
        let v = qs[i];
        // vec4 index of the block's first element: g · 8 (rows are whole blocks)
        if (TYPE == 2u) {
            w[g * 8u + wi] = signed_bytes(v) * sc.x;
        } else {
            w[g * 8u + wi] = nibbles(v, 0u) * sc.x + vec4<f32>(sc.y);
            w[g * 8u + 4u + wi] = nibbles(v, 4u) * sc.x + vec4<f32>(sc.y);
        }
    }
}
