// dequant.wgsl — GGUF blocks to f32 rows (prefill: the weight is dequantised into a scratch
// tensor that burn's matmul then reads).
//
// Contract
//   w[o, j] = q · d + c of block (o, j / 32), exactly `homer_model::load::quant::dequantize`'s
//   values (q·d is exact in f32 for every type, one rounding for the + c), for o < OUT, j < K.
//   Types, the quant words and the scale words as in qgemv.wgsl and block_decode.wgsl.
//
// Inputs (group 0, storage, read_write for the reason given in qgemv.wgsl)
//   0  qs    u32          quant words, QW per block
//   1  dm    u32          scale words
//   2  w     [OUT, K]     f32 output (as vec4s), every element written exactly once
//   3  info  [2]          u32   OUT, K
//
// Dispatch: a 2-D grid of workgroups of {{ workgroup_size }} (x ≤ 65,535), flattened;
// grid-stride over the OUT · K / 32 · UNITS units (the host keeps every invocation under 1,024
// trips). Unit u of block g writes 2 vec4s (4- and 6-bit types) or 1 (Q8_0).
@group(0) @binding(0) var<storage, read_write> qs: array<u32>;
@group(0) @binding(1) var<storage, read_write> dm: array<u32>;
@group(0) @binding(2) var<storage, read_write> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const TYPE: u32 = {{ qtype }}u;

{{ block_decode }}

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let total = info[0] * (info[1] / 32u) * UNITS;
    let first = (wid.y * nwg.x + wid.x) * WG + lid;
    let stride = nwg.x * nwg.y * WG;
    for (var i = first; i < total; i = i + stride) {
        let g = i / UNITS; // block index, row-major over (o, b)
        let u = i % UNITS;
        let wv = unit_weights(g, u, block_scales(g));
        // vec4 index of the block's first element: g · 8 (rows are whole blocks)
        w[g * 8u + u] = wv[0];
        if (TYPE != 2u) {
            w[g * 8u + 4u + u] = wv[1];
        }
    }
}
