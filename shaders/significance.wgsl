// significance.wgsl — HOMER's significance score of every row of one node (spec §4.2).
//
// Contract
//   sig[j] = max over query heads h of (q[h] · k[h / G, j]) · scale − bias[last_pos − pos[j]]
//   sig[j] = +inf where row j is an affix (prunable[j] == 0); G = H / KV (GQA by index arithmetic,
//   K is never copied or repeated). The max is taken over the raw dot products and scaled once,
//   which equals scaling each dot first because scale > 0.
//
// Inputs (group 0, all storage buffers, tightly packed, row-major)
//   0  q      [H, D]      {{ q_elem }}  post-RoPE query of the node's last row at the pruning layer
//   1  keys   [KV, N, D]  {{ elem }}  the layer's post-RoPE keys, the model's cache layout
//   2  rows   [2N]        u32         positions pos[0..N] then prunable flags (0 = affix) [N..2N]
//   3  bias   [B]         f32         the layer's calibration row indexed by distance; B ≥ 1
//                                     (a one-element dummy with bias_len = 0 when uncalibrated)
//   4  out    [N]         f32         output, every element written exactly once
//   5  info   [7]         u32         N, H, KV, D, last_pos, bias_len, bitcast<u32>(scale)
//
// Dispatch: a 2-D grid of workgroups of {{ workgroup_size }} invocations (template), flattened to
// one index; each invocation handles rows first, first + stride, … (grid-stride), so N need not be
// a multiple of anything. The host sizes the grid so that no invocation loops more than 1024
// times (lavapipe was seen to stop a loop after 65,535 trips) and x stays ≤ 65,535.
// Bounds: the host guarantees pos[j] ≤ last_pos and last_pos − pos[j] < bias_len for prunable rows
// (it refuses the call otherwise); the distance is still clamped so a bad input cannot read past
// the bias buffer. Accumulation is always f32, whatever {{ q_elem }} and {{ elem }} are (f32, or
// f16 with shader-f16, each: an f16 KV cache is scored by the model's f32 query).
// Every binding is declared read_write, inputs too: burn's allocator places tensors in shared
// pages, so an input and an output may be two ranges of one wgpu buffer, and wgpu forbids a
// buffer being read-only and read-write in the same dispatch. The kernel never writes an input.
{{ enable }}
@group(0) @binding(0) var<storage, read_write> q: array<{{ q_elem }}>;
@group(0) @binding(1) var<storage, read_write> keys: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> rows: array<u32>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    // 2-D grid of workgroups (x ≤ 65535), flattened; grid-stride over the elements.
    let first = (wid.y * nwg.x + wid.x) * WG + lid;
    let stride = nwg.x * nwg.y * WG;
    let n = info[0];
    let heads = info[1];
    let kv = info[2];
    let d = info[3];
    let last_pos = info[4];
    let bias_len = info[5];
    let scale = bitcast<f32>(info[6]);
    let group = heads / kv;

    for (var j = first; j < n; j = j + stride) {
        if (rows[n + j] == 0u) {
            out[j] = bitcast<f32>(0x7f800000u); // +inf: affixes are never dropped
            continue;
        }
        var best = bitcast<f32>(0xff800000u); // -inf
        for (var h = 0u; h < heads; h = h + 1u) {
            let kb = ((h / group) * n + j) * d;
            let qb = h * d;
            var acc = 0.0;
            for (var t = 0u; t < d; t = t + 1u) {
                acc = acc + f32(q[qb + t]) * f32(keys[kb + t]);
            }
            best = max(best, acc);
        }
        var s = best * scale;
        if (bias_len > 0u) {
            let dist = min(last_pos - min(rows[j], last_pos), bias_len - 1u);
            s = s - bias[dist];
        }
        out[j] = s;
    }
}
