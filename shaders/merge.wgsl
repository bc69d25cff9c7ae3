// merge.wgsl — merge two sibling nodes, two row-aligned tensors per dispatch (spec §5).
//
// Contract, for each pair (left x, right y) with NL and NR rows on the middle axis and
// prefix length P, suffix length S (both children carry the same affixes):
//   out rows = [ (x[0..P] + y[0..P]) · 0.5,          averaged prefix
//                x[P..NL−S],                          left context
//                y[P..NR−S],                          right context
//                (x[NL−S..NL] + y[NR−S..NR]) · 0.5 ]  averaged suffix
//   M = NL + NR − P − S output rows; positions are never renumbered (the host keeps them).
//   The average is (x + y) · 0.5, the same arithmetic as the tensor-op oracle, so results are
//   bit-identical to it.
//
// Layout: as gather.wgsl — tensor A is [A_OUTER, rows, A_INNER], tensor B [B_OUTER, rows, B_INNER]
// (hidden rows as [1, rows, d_model], a layer's K or V as [KV, rows, head_dim]); one dispatch merges
// two tensors, an odd one out is paired with B_OUTER = 0 and small dummy buffers.
//
// Template parameters: {{ elem }} is the scalar (f32, or f16 with shader-f16) or a vec4 of it
// (host's choice when both inner widths are multiples of 4; widths are then in vec4s);
// A_INNER = {{ a_inner }} and B_INNER = {{ b_inner }} are compile-time constants, so splitting an
// element index into row and column needs no runtime division.
//
// Inputs (group 0, storage, tightly packed row-major)
//   0  xa    [A_OUTER, NL, A_INNER]  {{ elem }}   left child, tensor A
//   1  ya    [A_OUTER, NR, A_INNER]  {{ elem }}   right child, tensor A
//   2  xb    [B_OUTER, NL, B_INNER]  {{ elem }}   left child, tensor B
//   3  yb    [B_OUTER, NR, B_INNER]  {{ elem }}   right child, tensor B
//   4  a_out [A_OUTER, M, A_INNER]   {{ elem }}   every element written exactly once
//   5  b_out [B_OUTER, M, B_INNER]   {{ elem }}   every element written exactly once
//   6  info  [6]  u32                NL, NR, P, S, A_OUTER, B_OUTER
// Every binding is declared read_write, inputs too: burn's allocator places tensors in shared
// pages, so an input and an output may be two ranges of one wgpu buffer, and wgpu forbids a
// buffer being read-only and read-write in the same dispatch. The kernel never writes an input.
//
// Dispatch: workgroups of {{ workgroup_size }} invocations (template); grid y = one slab per outer
// index (A's, then B's), grid x grid-strides over the slab's M·INNER output elements. The host
// sizes x so that no invocation loops more than 1024 times and keeps x, y ≤ 65,535.
// Bounds: the host guarantees NL ≥ P + S and NR ≥ P + S.
{{ enable }}
@group(0) @binding(0) var<storage, read_write> xa: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> ya: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> xb: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> yb: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> a_out: array<{{ elem }}>;
@group(0) @binding(5) var<storage, read_write> b_out: array<{{ elem }}>;
@group(0) @binding(6) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const A_INNER: u32 = {{ a_inner }}u;
const B_INNER: u32 = {{ b_inner }}u;

// Where output row r comes from: kind 0 = left row `row`, 1 = right row `row`,
// 2 = average of left row `row` and right row `row2`.
struct Src {
    kind: u32,
    row: u32,
    row2: u32,
}

fn source(r: u32, nl: u32, nr: u32, p: u32, s: u32) -> Src {
    let m = nl + nr - p - s;
    if (r < p) {
        return Src(2u, r, r);
    }
    if (r < nl - s) {
        return Src(0u, r, 0u);
    }
    if (r < m - s) {
        return Src(1u, r - (nl - s) + p, 0u);
    }
    let t = r - (m - s);
    return Src(2u, nl - s + t, nr - s + t);
}

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let nl = info[0];
    let nr = info[1];
    let p = info[2];
    let s = info[3];
    let a_outer = info[4];
    let b_outer = info[5];
    let m = nl + nr - p - s;
    let slab = wid.y;
    let first = wid.x * WG + lid;
    let stride = nwg.x * WG;
    if (slab < a_outer) {
        let o = slab;
        for (var e = first; e < m * A_INNER; e = e + stride) {
            let src = source(e / A_INNER, nl, nr, p, s);
            let c = e % A_INNER;
            let xi = (o * nl + src.row) * A_INNER + c;
            var v: {{ elem }};
            if (src.kind == 0u) {
                v = xa[xi];
            } else if (src.kind == 1u) {
                v = ya[(o * nr + src.row) * A_INNER + c];
            } else {
                v = (xa[xi] + ya[(o * nr + src.row2) * A_INNER + c]) * {{ elem }}(0.5);
            }
            a_out[o * m * A_INNER + e] = v;
        }
    } else if (slab < a_outer + b_outer) {
        let o = slab - a_outer;
        for (var e = first; e < m * B_INNER; e = e + stride) {
            let src = source(e / B_INNER, nl, nr, p, s);
            let c = e % B_INNER;
            let xi = (o * nl + src.row) * B_INNER + c;
            var v: {{ elem }};
            if (src.kind == 0u) {
                v = xb[xi];
            } else if (src.kind == 1u) {
                v = yb[(o * nr + src.row) * B_INNER + c];
            } else {
                v = (xb[xi] + yb[(o * nr + src.row2) * B_INNER + c]) * {{ elem }}(0.5);
            }
            b_out[o * m * B_INNER + e] = v;
        }
    }
}
