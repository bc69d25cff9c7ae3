// gather_rotate.wgsl — keep the listed rows of one layer's keys and values and turn every kept
// key to a new position on the way (HOMER's renumbered positions: `positions=reindex|root`,
// issue 15; the oracle is homer::TensorOps::gather_rotate).
//
// Contract (H = HEAD / 2, the rotate-half pairs of RoPE as the model applies it)
//   a_out[o, r, c] = x[c]·cos[r, c] + rot(x)[c]·sin[r, c],   x = a_in[o, index[r], ·]
//       rot(x)[c] = −x[c + H] for c < H,   x[c − H] for c ≥ H
//   b_out[o, r, c] = b_in[o, index[r], c]
//   for o < A_OUTER (keys) resp. B_OUTER (values, 0 = none), r < M, c < HEAD. cos and sin are the
//   shift tables [M, HEAD] of homer_model::Llama::key_shift (halves repeated), always f32. The
//   turn is computed in f32 whatever the element (f16 keys are widened, turned and rounded once,
//   as homer_model::rope::rotate); it equals the oracle to f32 rounding (a compiler may fuse the
//   multiply-add). Values are copied bit for bit.
//
// Layout: keys and values [OUTER, N, HEAD] (a layer's own cache layout, KV heads outer), tightly
// packed row-major. {{ elem }} is the stored element — the scalar (f32, or f16 with shader-f16) or
// a vec4 of it; {{ felem }} is the same shape in f32. The host picks vec4 when HEAD is a multiple
// of 8, so that both halves hold whole vec4s (an element c < H pairs with c + H). A_INNER and
// B_INNER ({{ a_inner }}, {{ b_inner }}) are HEAD in elements, compile-time constants.
//
// Inputs (group 0, storage; all read_write: burn may place an input and an output in one wgpu
// buffer, which may not be bound read-only and read-write in one dispatch; no input is written)
//   0  a_in   [A_OUTER, N, HEAD]  {{ elem }}   keys
//   1  b_in   [B_OUTER, N, HEAD]  {{ elem }}   values
//   2  a_out  [A_OUTER, M, HEAD]  {{ elem }}   every element written exactly once
//   3  b_out  [B_OUTER, M, HEAD]  {{ elem }}   every element written exactly once
//   4  index  [M]                 u32        rows to keep, in output order
//   5  cos    [M, HEAD]           f32
//   6  sin    [M, HEAD]           f32
//   7  info   [4]                 u32        N, M, A_OUTER, B_OUTER
//
// Dispatch (as gather.wgsl): workgroups of {{ workgroup_size }}; grid y = one slab per outer index
// (the keys' A_OUTER slabs, then the values' B_OUTER), grid x grid-strides over a slab's M·INNER
// elements; the host bounds the trips per invocation (≤ 1024) and x, y ≤ 65,535.
// Bounds: the host refuses an index ≥ N before launching; the kernel clamps it as well.
{{ enable }}
@group(0) @binding(0) var<storage, read_write> a_in: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> b_in: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> a_out: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> b_out: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> index: array<u32>;
@group(0) @binding(5) var<storage, read_write> cos_t: array<{{ felem }}>;
@group(0) @binding(6) var<storage, read_write> sin_t: array<{{ felem }}>;
@group(0) @binding(7) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const A_INNER: u32 = {{ a_inner }}u;
const B_INNER: u32 = {{ b_inner }}u;
const HALF: u32 = A_INNER / 2u;

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
            let row = (slab * n + min(index[r], n - 1u)) * A_INNER;
            let x = {{ felem }}(a_in[row + c]);
            var turned: {{ felem }};
            if (c < HALF) {
                turned = -{{ felem }}(a_in[row + c + HALF]);
            } else {
                turned = {{ felem }}(a_in[row + c - HALF]);
            }
            a_out[base_out + e] = {{ elem }}(x * cos_t[e] + turned * sin_t[e]);
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
