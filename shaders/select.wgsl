// select.wgsl — HOMER's keep-mask on the device (spec §4.2–4.3): drop the K rows with the
// smallest significance, by rank counting.
//
// Contract
//   rank[j] = #{ i : (s[i], i) < (s[j], j) }  in the total order of homer::prune (f32 total_cmp
//             with every NaN taken as -inf, the least significant; then index: among equal
//             scores the lower index ranks lower and is dropped first)
//   keep[j] = 1.0 if rank[j] ≥ K else 0.0
//   Bit-identical to `homer::prune::keep_after_dropping` (the CPU oracle); +inf affixes are never
//   dropped while K ≤ the number of finite scores.
//
// Inputs (group 0, storage; all read_write because burn may place an input and an output in one
// wgpu buffer, which may not be read-only and read-write in one dispatch)
//   0  scores [N]  f32   significance of every row
//   1  keep   [N]  f32   output, every element written exactly once
//   2  info   [2]  u32   N, K
//
// Algorithm and cost: every invocation owns one row j and counts the rows below it, reading the
// scores through a workgroup tile of {{ workgroup_size }} keys: O(N²) comparisons, N reads of
// each score per workgroup. At N = 8192 that is 67 M comparisons — trivial on a GPU, slow on a
// CPU adapter; `homer bench kernels` measures it against the host sort.
// Dispatch: a 2-D grid of workgroups of {{ workgroup_size }} (template), flattened; a workgroup
// handles row blocks base, base + stride, … so any N works. Barriers stay in uniform control
// flow: N is read through workgroupUniformLoad and every invocation of a workgroup runs the same
// trips, lanes past N only load a clamped key and skip the write.
@group(0) @binding(0) var<storage, read_write> scores: array<f32>;
@group(0) @binding(1) var<storage, read_write> keep: array<f32>;
@group(0) @binding(2) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;

var<workgroup> tile: array<u32, {{ workgroup_size }}>;
var<workgroup> shared_n: u32;
var<workgroup> shared_k: u32;

// Map an f32 to a u32 whose unsigned order is f32::total_cmp's order, a NaN of either sign
// mapping to -inf's key (bit tests: a compiler may assume no NaN in float comparisons).
fn order_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return 0x007fffffu;
    }
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    if (lid == 0u) {
        shared_n = info[0];
        shared_k = info[1];
    }
    let n = workgroupUniformLoad(&shared_n);
    let k = workgroupUniformLoad(&shared_k);
    let group = wid.y * nwg.x + wid.x;
    let stride = nwg.x * nwg.y * WG;
    for (var base = group * WG; base < n; base = base + stride) {
        let j = base + lid;
        let kj = order_key(scores[min(j, n - 1u)]);
        var rank = 0u;
        for (var t = 0u; t < n; t = t + WG) {
            tile[lid] = order_key(scores[min(t + lid, n - 1u)]);
            workgroupBarrier();
            let len = min(WG, n - t);
            for (var u = 0u; u < len; u = u + 1u) {
                let ki = tile[u];
                let i = t + u;
                if (ki < kj || (ki == kj && i < j)) {
                    rank = rank + 1u;
                }
            }
            workgroupBarrier();
        }
        if (j < n) {
            keep[j] = select(0.0, 1.0, rank >= k);
        }
    }
}
