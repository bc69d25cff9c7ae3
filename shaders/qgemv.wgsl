// qgemv.wgsl — y = x · Wᵀ for a few activation rows (decode) on GGUF blocks, dequantised in
// registers.
//
// Contract
//   y[r, o] = Σ_j x[r, j] · w(o, j)   for r < M ≤ 4, o < OUT, j < K (K a multiple of 32; of 256
//   for the K-quants)
//   w(o, j) = q · d + c of block (o, j / 32), as `homer_model::load::quant::dequantize`:
//     TYPE 0 Q4_0  q = nibble (0..15),  c = −8·d
//     TYPE 1 Q4_1  q = nibble,          c = m (the block's minimum)
//     TYPE 2 Q8_0  q = signed byte,     c = 0
//     TYPE 3 Q4_K  q = nibble,          d = d·s_j, c = −dmin·m_j (6-bit scale and minimum)
//     TYPE 4 Q6_K  q = 6-bit (0..63),   d = d·s (per 16 elements), c = −32·d
//   Accumulation in f32; the sum order differs from a host loop, nothing else.
//
// Inputs (group 0, storage buffers; all read_write because burn may place an input and an output
// in one wgpu buffer, which may not be read-only and read-write in one dispatch)
//   0  x     [M, K]        f32 (read as vec4s)
//   1  qs    [OUT · K / 32 · QW] u32   the quant words of each block (layout in block_decode.wgsl)
//   2  dm    u32           the scale words (block_decode.wgsl)
//   3  y     [M, OUT]      f32 output, every element written exactly once
//   4  info  [3]           u32   M, OUT, K
// A weight above the adapter's binding limit is launched in row chunks, each into its own y.
//
// Dispatch: ceil(OUT / RPW) workgroups of {{ workgroup_size }} invocations, 2-D (x ≤ 65,535) and
// flattened; RPW = {{ rows_per_group }} output rows per workgroup, LANES = WG / RPW invocations per
// row. Lane l of a row takes the row's units l, l + LANES, … (8 weights of a 4- or 6-bit block,
// 4 of a Q8_0 block), for every activation row, then the LANES partial sums are reduced through
// workgroup memory. The barriers sit outside every data-dependent loop (uniform control flow);
// invocations of rows past OUT load nothing and write nothing.
@group(0) @binding(0) var<storage, read_write> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> qs: array<u32>;
@group(0) @binding(2) var<storage, read_write> dm: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const RPW: u32 = {{ rows_per_group }}u;
const LANES: u32 = {{ workgroup_size }}u / {{ rows_per_group }}u;
const TYPE: u32 = {{ qtype }}u;

var<workgroup> partial: array<vec4<f32>, {{ workgroup_size }}>;

{{ block_decode }}

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let m = info[0];
    let out_rows = info[1];
    let k = info[2];
    let group = wid.y * nwg.x + wid.x;
    let o = group * RPW + lid / LANES;
    let lane = lid % LANES;
    let nb = k / 32u;
    let k4 = k / 4u;
    var acc = vec4<f32>(0.0);
    if (o < out_rows) {
        let units = nb * UNITS;
        for (var i = lane; i < units; i = i + LANES) {
            let b = i / UNITS;
            let u = i % UNITS;
            let g = o * nb + b;
            let wv = unit_weights(g, u, block_scales(g));
            // unit u covers elements 4u .. 4u + 3 (x vec4 b·8 + u) and, for the 4- and 6-bit
            // types, 16 + 4u .. 16 + 4u + 3 (vec4 b·8 + 4 + u)
            for (var r = 0u; r < 4u; r = r + 1u) {
                if (r < m) {
                    let xb = r * k4 + b * 8u + u;
                    var s = dot(wv[0], x[xb]);
                    if (TYPE != 2u) {
                        s = s + dot(wv[1], x[xb + 4u]);
                    }
                    acc[r] = acc[r] + s;
                }
            }
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s = s >> 1u) {
        if (lane < s) {
            partial[lid] = partial[lid] + partial[lid + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && o < out_rows) {
        let total = partial[lid];
        for (var r = 0u; r < 4u; r = r + 1u) {
            if (r < m) {
                y[r * out_rows + o] = total[r];
            }
        }
    }
}
