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
// Inputs (group 0, storage, tightly packed row-major)
//   0  xa   [A_OUTER, NL, A_INNER]  {{ elem }}   left child, tensor A
//   1  ya   [A_OUTER, NR, A_INNER]  {{ elem }}   right child, tensor A
//   2  xb   [B_OUTER, NL, B_INNER]  {{ elem }}   left child, tensor B
//   3  yb   [B_OUTER, NR, B_INNER]  {{ elem }}   right child, tensor B
//   4  a_out [A_OUTER, M, A_INNER]  {{ elem }}   every element written exactly once
//   5  b_out [B_OUTER, M, B_INNER]  {{ elem }}   every element written exactly once
//   6  info [8]  u32                NL, NR, P, S, A_OUTER, A_INNER, B_OUTER, B_INNER
//
// Dispatch: a 2-D grid of workgroups of {{ workgroup_size }} invocations (template), flattened to
// one index, grid-stride over all output elements of A then B, so any size works. The host sizes
// the grid so that no invocation loops more than 1024 times (lavapipe was seen to stop a loop
// after 65,535 trips) and x stays ≤ 65,535.
// Bounds: the host guarantees NL ≥ P + S and NR ≥ P + S.
// Every binding is declared read_write, inputs too: burn's allocator places tensors in shared
// pages, so an input and an output may be two ranges of one wgpu buffer, and wgpu forbids a
// buffer being read-only and read-write in the same dispatch. The kernel never writes an input.
{{ enable }}
@group(0) @binding(0) var<storage, read_write> xa: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> ya: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> xb: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> yb: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> a_out: array<{{ elem }}>;
@group(0) @binding(5) var<storage, read_write> b_out: array<{{ elem }}>;
@group(0) @binding(6) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;

// Where output row r of a merge comes from: (source, row) with source 0 = left, 1 = right,
// 2 = average of left row and right row2.
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
    // 2-D grid of workgroups (x ≤ 65535), flattened; grid-stride over the elements.
    let first = (wid.y * nwg.x + wid.x) * WG + lid;
    let stride = nwg.x * nwg.y * WG;
    let nl = info[0];
    let nr = info[1];
    let p = info[2];
    let s = info[3];
    let a_outer = info[4];
    let a_inner = info[5];
    let b_outer = info[6];
    let b_inner = info[7];
    let m = nl + nr - p - s;
    let total_a = a_outer * m * a_inner;
    let total = total_a + b_outer * m * b_inner;

    for (var e = first; e < total; e = e + stride) {
        if (e < total_a) {
            let c = e % a_inner;
            let rr = e / a_inner;
            let o = rr / m;
            let src = source(rr % m, nl, nr, p, s);
            let xi = (o * nl + src.row) * a_inner + c;
            if (src.kind == 0u) {
                a_out[e] = xa[xi];
            } else if (src.kind == 1u) {
                a_out[e] = ya[(o * nr + src.row) * a_inner + c];
            } else {
                a_out[e] = (xa[xi] + ya[(o * nr + src.row2) * a_inner + c]) * {{ elem }}(0.5);
            }
        } else {
            let f = e - total_a;
            let c = f % b_inner;
            let rr = f / b_inner;
            let o = rr / m;
            let src = source(rr % m, nl, nr, p, s);
            let xi = (o * nl + src.row) * b_inner + c;
            if (src.kind == 0u) {
                b_out[f] = xb[xi];
            } else if (src.kind == 1u) {
                b_out[f] = yb[(o * nr + src.row) * b_inner + c];
            } else {
                b_out[f] = (xb[xi] + yb[(o * nr + src.row2) * b_inner + c]) * {{ elem }}(0.5);
            }
        }
    }
}
