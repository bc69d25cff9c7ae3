// attention_split.wgsl — pass 1 of split-key ("flash-decoding") attention for a few new rows
// (decode): the keys are cut into spans of L = {{ key_span }} rows, one workgroup per (span, KV
// group), so a long cache is read by many workgroups at once instead of by the few invocations
// that own the rows (attention.wgsl gives one workgroup per KV group and one invocation per
// query row and head: 3 busy invocations for the default model's decode). Pass 2,
// attention_combine.wgsl, merges the spans' partial softmaxes.
//
// Contract (for every span s, query head h, new row i; G = H / KV, "pair" p = (h mod G)·N + i):
//   visible(i) = keys 0 ..= past + i (causal; queries aligned to the end of the filled rows)
//   sc_j       = scale · q[h, i] · k[h / G, j]   for j in span s ∩ visible(i)
//   ml[s, h, i] = (m, l): m = max_j sc_j, l = Σ_j exp(sc_j − m); (−3e38, 0) for an empty span
//   acc[s, h, i, :] = Σ_j exp(sc_j − m) · v[h / G, j, :]                (0 for an empty span)
//   Accumulation in f32 whatever {{ q_elem }}/{{ elem }} are.
//
// Inputs (group 0, storage buffers, tightly packed, row-major)
//   0  q     [H, N, D]     {{ q_elem }}  post-RoPE queries of the N new rows
//   1  k     [KV, CAP, D]  {{ elem }}  the layer's key buffer; rows 0 .. past + N are filled
//   2  v     [KV, CAP, D]  {{ elem }}  the value buffer, same layout
//   3  acc   [S, H, N, D]  f32         partial outputs, every element written exactly once
//   4  ml    [S, H, N, 2]  f32         partial max and sum, every element written exactly once
//   5  info  [6]           u32         N, H, KV, past, CAP, bitcast<u32>(scale)
// D = {{ head_dim }} (a multiple of 4), L and PAIRS = G·N = {{ pairs }} are compile-time
// constants; the host checks H = KV·G, past + N ≤ CAP, S = ceil((past + N) / L) and that the
// workgroup memory (PAIRS·(D + L) floats) fits.
//
// Dispatch: grid (S, KV), {{ workgroup_size }} invocations. Scores: invocation l takes keys
// l, l + WG, … of the span, each key row read once for all PAIRS queries (held in workgroup
// memory). Then one invocation per pair finds its max, all invocations turn scores into
// probabilities, one per pair sums them, and the (pair, 4 dims) outputs are spread over the
// invocations, each reading the V rows of its pair's nonzero probabilities. Masked keys and
// rows past the filled ones are never read into a sum (an unfilled tail may hold anything).
// Loops have uniform trip counts around the barriers. Every binding is read_write (burn may
// place an input and an output in one wgpu buffer); inputs are never written.
{{ enable }}
@group(0) @binding(0) var<storage, read_write> q: array<vec4<{{ q_elem }}>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<{{ elem }}>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<{{ elem }}>>;
@group(0) @binding(3) var<storage, read_write> acc: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> ml: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const D4: u32 = {{ head_dim }}u / 4u;
const L: u32 = {{ key_span }}u;
const PAIRS: u32 = {{ pairs }}u;
const MASKED: f32 = -3.0e38;

var<workgroup> qs: array<vec4<f32>, {{ pairs }} * ({{ head_dim }} / 4)>;
var<workgroup> p: array<f32, {{ pairs }} * {{ key_span }}>;
var<workgroup> pmax: array<f32, {{ pairs }}>;

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = info[0];
    let heads = info[1];
    let kvh = info[2];
    let past = info[3];
    let cap = info[4];
    let scale = bitcast<f32>(info[5]);
    let group = heads / kvh;
    let s = wid.x;
    let kv = wid.y;
    let k0 = s * L;
    let filled = past + n;
    let kvbase = kv * cap * D4;

    // The group's queries, pre-scaled: pair pp = g·N + i is head kv·G + g, row i.
    for (var e = lid; e < PAIRS * D4; e = e + WG) {
        let pp = e / D4;
        let head = kv * group + pp / n;
        let row = pp % n;
        qs[e] = vec4<f32>(q[(head * n + row) * D4 + e % D4]) * scale;
    }
    workgroupBarrier();

    // Scores of the span's keys, every key row read once for all pairs.
    for (var jl = lid; jl < L; jl = jl + WG) {
        let j = k0 + jl;
        var dots: array<f32, {{ pairs }}>;
        if (j < filled) {
            for (var pp = 0u; pp < PAIRS; pp = pp + 1u) {
                dots[pp] = 0.0;
            }
            for (var d = 0u; d < D4; d = d + 1u) {
                let kr = vec4<f32>(k[kvbase + j * D4 + d]);
                for (var pp = 0u; pp < PAIRS; pp = pp + 1u) {
                    dots[pp] = dots[pp] + dot(qs[pp * D4 + d], kr);
                }
            }
        }
        for (var pp = 0u; pp < PAIRS; pp = pp + 1u) {
            let visible = past + pp % n + 1u;
            p[pp * L + jl] = select(MASKED, dots[pp], j < visible);
        }
    }
    workgroupBarrier();

    if (lid < PAIRS) {
        var m = MASKED;
        for (var jl = 0u; jl < L; jl = jl + 1u) {
            m = max(m, p[lid * L + jl]);
        }
        pmax[lid] = m;
    }
    workgroupBarrier();

    // Scores → probabilities (exactly 0 where masked, also in an empty span).
    for (var e = lid; e < PAIRS * L; e = e + WG) {
        let sc = p[e];
        p[e] = select(0.0, exp(sc - pmax[e / L]), sc > -1.0e38);
    }
    workgroupBarrier();

    let span = min(L, filled - min(k0, filled));
    for (var e = lid; e < PAIRS * D4; e = e + WG) {
        let pp = e / D4;
        let d = e % D4;
        var a = vec4<f32>(0.0);
        for (var jl = 0u; jl < span; jl = jl + 1u) {
            let pr = p[pp * L + jl];
            if (pr > 0.0) {
                a = a + pr * vec4<f32>(v[kvbase + (k0 + jl) * D4 + d]);
            }
        }
        let head = kv * group + pp / n;
        let idx = (s * heads + head) * n + pp % n;
        acc[idx * D4 + d] = a;
        if (d == 0u) {
            var l = 0.0;
            for (var jl = 0u; jl < L; jl = jl + 1u) {
                l = l + p[pp * L + jl];
            }
            ml[2u * idx] = pmax[pp];
            ml[2u * idx + 1u] = l;
        }
    }
}
