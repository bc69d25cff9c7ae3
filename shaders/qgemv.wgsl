// qgemv.wgsl — y = x · Wᵀ for a few activation rows (decode) on GGUF blocks, dequantised in
// registers.
//
// Contract
//   y[r, o] = Σ_j x[r, j] · w(o, j)   for r < M ≤ 4, o < OUT, j < K (K a multiple of 32)
//   w(o, j) = q · d + c of the block (o, j / 32), as `homer_model::load::quant::dequantize`:
//     TYPE 0 Q4_0  q = nibble (0..15), c = −8·d
//     TYPE 1 Q4_1  q = nibble,         c = m (the block's minimum)
//     TYPE 2 Q8_0  q = signed byte,    c = 0
//   Accumulation in f32; the sum order differs from a host loop, nothing else.
//
// Inputs (group 0, storage buffers; all read_write because burn may place an input and an output
// in one wgpu buffer, which may not be read-only and read-write in one dispatch)
//   0  x     [M, K]        f32 (read as vec4s)
//   1  qs    [OUT · K / 32 · QW] u32   the quants of each block, QW = 4 words (Q4) or 8 (Q8_0), in
//             GGUF's byte order: Q4 byte i of a block holds element i (low nibble) and i + 16
//             (high nibble); Q8_0 byte i holds element i
//   2  dm    u32           f16 scales: Q4_1 one word per block (d low half, m high half);
//             Q4_0 / Q8_0 one half per block (block b in word b / 2, half b % 2)
//   3  y     [M, OUT]      f32 output, every element written exactly once
//   4  info  [3]           u32   M, OUT, K
// A weight above the adapter's binding limit is launched in row chunks, each into its own y.
//
// Dispatch: ceil(OUT / RPW) workgroups of {{ workgroup_size }} invocations, 2-D (x ≤ 65,535) and
// flattened; RPW = {{ rows_per_group }} output rows per workgroup, LANES = WG / RPW invocations per
// row. Lane l of a row takes the row's quant words l, l + LANES, … (8 weights per Q4 word, 4 per
// Q8_0 word), for every activation row, then the LANES partial sums are reduced through
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
const QW: u32 = select(4u, 8u, {{ qtype }}u == 2u);

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
        let words = nb * QW;
        let base = o * words;
        for (var i = lane; i < words; i = i + LANES) {
            let b = i / QW;
            let wi = i % QW;
            let sc = scale_offset(o * nb + b);
            let word = qs[base + i];
            // Q4: word wi holds elements 4wi .. 4wi + 3 (low nibbles) and 16 + 4wi .. (high);
            // Q8_0: elements 4wi .. 4wi + 3. In vec4s of x: b·8 + wi, and b·8 + 4 + wi.
            var lo: vec4<f32>;
            var hi = vec4<f32>(0.0);
            if (TYPE == 2u) {
                lo = signed_bytes(word) * sc.x;
            } else {
                lo = nibbles(word, 0u) * sc.x + vec4<f32>(sc.y);
                hi = nibbles(word, 4u) * sc.x + vec4<f32>(sc.y);
            }
            for (var r = 0u; r < 4u; r = r + 1u) {
                if (r < m) {
                    let xb = r * k4 + b * 8u + wi;
                    var s = dot(lo, x[xb]);
                    if (TYPE != 2u) {
                        s = s + dot(hi, x[xb + 4u]);
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
