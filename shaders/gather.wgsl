// gather.wgsl — keep the listed rows of two row-aligned tensors in one dispatch (spec §4.3, §6.1).
//
// Contract
//   a_out[o, r, c] = a_in[o, index[r], c]   for o < A_OUTER, r < M, c < A_INNER
//   b_out[o, r, c] = b_in[o, index[r], c]   for o < B_OUTER, r < M, c < B_INNER
//   Both inputs have N rows on their middle axis; `index` lists M row numbers (each < N).
//
// Layout and why: a node's state is its hidden rows [1, N, d_model] (as [outer 1, rows, inner]) and,
// for every cached layer, K and V [KV, N, head_dim] — the model's own per-layer cache layout, so a
// gather never reshapes or copies the cache into another form. One node cache as a single
// [layers, 2, KV, N, head_dim] tensor would let one dispatch cover every layer, but at N = 8192 on
// the default model it is 377 MB, above the 128 MiB `max_storage_buffer_binding_size` of lavapipe
// and many GPUs, so it would have to be split anyway. Instead each dispatch moves two tensors
// (hidden + a K, or a K and a V): 31 dispatches for the default model's 30 layers, each binding a
// single layer's K or V (6.3 MB at N = 8192). The caller pairs tensors; an odd one out gets a
// zero-sized partner (B_OUTER = 0) bound to a small dummy buffer.
//
// Inputs (group 0, storage, tightly packed row-major)
//   0  a_in   [A_OUTER, N, A_INNER]  {{ elem }}
//   1  b_in   [B_OUTER, N, B_INNER]  {{ elem }}
//   2  a_out  [A_OUTER, M, A_INNER]  {{ elem }}  every element written exactly once
//   3  b_out  [B_OUTER, M, B_INNER]  {{ elem }}  every element written exactly once
//   4  index  [M]                    u32        rows to keep, in output order
//   5  info   [6]                    u32        N, M, A_OUTER, A_INNER, B_OUTER, B_INNER
//
// Dispatch: a 2-D grid of workgroups of {{ workgroup_size }} invocations (template), flattened to
// one index, grid-stride over all output elements of A then B, so any size works. The host sizes
// the grid so that no invocation loops more than 1024 times (lavapipe was seen to stop a loop
// after 65,535 trips) and x stays ≤ 65,535.
// Bounds: the host refuses an index ≥ N before launching; the kernel clamps it as well so that no
// read leaves its buffer.
// Every binding is declared read_write, inputs too: burn's allocator places tensors in shared
// pages, so an input and an output may be two ranges of one wgpu buffer, and wgpu forbids a
// buffer being read-only and read-write in the same dispatch. The kernel never writes an input.
{{ enable }}
@group(0) @binding(0) var<storage, read_write> a_in: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> b_in: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> a_out: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> b_out: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> index: array<u32>;
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
    let m = info[1];
    let a_outer = info[2];
    let a_inner = info[3];
    let b_outer = info[4];
    let b_inner = info[5];
    let total_a = a_outer * m * a_inner;
    let total = total_a + b_outer * m * b_inner;

    for (var e = first; e < total; e = e + stride) {
        if (e < total_a) {
            let c = e % a_inner;
            let rr = e / a_inner;
            let r = rr % m;
            let o = rr / m;
            let src = min(index[r], n - 1u);
            a_out[e] = a_in[(o * n + src) * a_inner + c];
        } else {
            let f = e - total_a;
            let c = f % b_inner;
            let rr = f / b_inner;
            let r = rr % m;
            let o = rr / m;
            let src = min(index[r], n - 1u);
            b_out[f] = b_in[(o * n + src) * b_inner + c];
        }
    }
}
