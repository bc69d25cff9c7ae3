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
// Template parameters: {{ elem }} is the element — the scalar (f32, or f16 with shader-f16) or a
// vec4 of it; the host picks vec4 when both inner widths are multiples of 4 (head dims, d_model)
// and states widths in elements. A_INNER = {{ a_inner }} and B_INNER = {{ b_inner }} are
// compile-time constants, so the row/column split of an element index is a multiply-shift, not
// a division (integer division dominated this kernel on a CPU adapter).
//
// Inputs (group 0, storage, tightly packed row-major)
//   0  a_in   [A_OUTER, N, A_INNER]  {{ elem }}
//   1  b_in   [B_OUTER, N, B_INNER]  {{ elem }}
//   2  a_out  [A_OUTER, M, A_INNER]  {{ elem }}  every element written exactly once
//   3  b_out  [B_OUTER, M, B_INNER]  {{ elem }}  every element written exactly once
//   4  index  [M]                    u32        rows to keep, in output order
//   5  info   [4]                    u32        N, M, A_OUTER, B_OUTER
// Every binding is declared read_write, inputs too: burn's allocator places tensors in shared
// pages, so an input and an output may be two ranges of one wgpu buffer, and wgpu forbids a
// buffer being read-only and read-write in the same dispatch. The kernel never writes an input.
//
// Dispatch: workgroups of {{ workgroup_size }} invocations (template); grid y = one slab per outer
// index (A's A_OUTER slabs, then B's B_OUTER), grid x grid-strides over the slab's M·INNER
// elements. The host sizes x so that no invocation loops more than 1024 times (lavapipe was seen
// to stop a loop after 65,535 trips) and keeps x, y ≤ 65,535.
// Bounds: the host refuses an index ≥ N before launching; the kernel clamps it as well so that no
// read leaves its buffer.
{{ enable }}
@group(0) @binding(0) var<storage, read_write> a_in: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> b_in: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> a_out: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> b_out: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> index: array<u32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const A_INNER: u32 = {{ a_inner }}u;
const B_INNER: u32 = {{ b_inner }}u;

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let n = info[0];
    let m = info[1];
    let a_outer = info[2];
    let b_outer = info[3];
    let slab = wid.y;
    let first = wid.x * WG + lid;
    let stride = nwg.x * WG;
    if (slab < a_outer) {
        let base_out = slab * m * A_INNER;
        for (var e = first; e < m * A_INNER; e = e + stride) {
            let r = e / A_INNER;
            let c = e % A_INNER;
            let src = min(index[r], n - 1u);
            a_out[base_out + e] = a_in[(slab * n + src) * A_INNER + c];
        }
    } else if (slab < a_outer + b_outer) {
        let o = slab - a_outer;
        let base_out = o * m * B_INNER;
        for (var e = first; e < m * B_INNER; e = e + stride) {
            let r = e / B_INNER;
            let c = e % B_INNER;
            let src = min(index[r], n - 1u);
            b_out[base_out + e] = b_in[(o * n + src) * B_INNER + c];
        }
    }
}
