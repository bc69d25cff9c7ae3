// attention.wgsl — causal grouped-query attention of new rows over a KV buffer, flash style:
// online softmax over key tiles, no score matrix, K/V read once per workgroup for all the query
// heads that share them.
//
// Contract
//   out[i, h·D + d] = Σ_j softmax_j(scale · q[h, i] · k[h / G, j]) · v[h / G, j, d]
//   over keys j = 0 ..= past + i (causal, queries aligned to the end of the filled rows: query row
//   i is sequence row past + i), G = H / KV (Hugging Face's repeat_kv by index arithmetic, K and V
//   are never copied per query head). Accumulation in f32 whatever {{ q_elem }}/{{ elem }} are.
//
// Inputs (group 0, all storage buffers, tightly packed, row-major)
//   0  q     [H, N, D]    {{ q_elem }}  post-RoPE queries of the N new rows
//   1  k     [KV, CAP, D] {{ elem }}  the layer's key buffer; rows 0 .. past + N are filled
//   2  v     [KV, CAP, D] {{ elem }}  the value buffer, same layout
// {{ q_elem }} and {{ elem }} are f32 or f16 (shader-f16) each: an f16 KV cache (`--kv-dtype f16`)
// is read by an f32 query, every value widened to f32 as it is loaded.
//   3  out   [N, H·D]     f32         output, every element written exactly once
//   4  info  [6]          u32         N, H, KV, past, CAP, bitcast<u32>(scale)
// D = {{ head_dim }} is a compile-time constant (a multiple of 4: rows move as vec4s), as are the
// key tile BC = {{ key_tile }} and the query rows per workgroup QR = {{ query_rows }}.
//
// Dispatch: grid (ceil(N / QR), KV). A workgroup of {{ workgroup_size }} ≥ G·QR invocations
// takes QR consecutive query rows of every query head of one KV group: invocation l owns head
// kv·G + l / QR and row tile·QR + l % QR (idle when l ≥ G·QR or the row is ≥ N). Per key tile the
// workgroup loads BC rows of K and V into workgroup memory (zeros past the filled rows, so an
// unfilled buffer tail is never read into a sum), then every owner scores its row against them,
// rescales its running output once per tile, and accumulates. The tile count is the same for the
// whole workgroup (the last row's visible keys, read through workgroupUniformLoad), so barriers
// stay in uniform control flow; masked keys get probability exactly 0. Key 0 is visible to every
// row, so each row's running max is finite after the first tile.
// Every binding is declared read_write, inputs too: burn may place an input and an output in one
// wgpu buffer, which may not be read-only and read-write in one dispatch. Inputs are never
// written. The host checks N, H, KV, past + N ≤ CAP and the binding sizes before the launch.
{{ enable }}
@group(0) @binding(0) var<storage, read_write> q: array<vec4<{{ q_elem }}>>;
@group(0) @binding(1) var<storage, read_write> k: array<vec4<{{ elem }}>>;
@group(0) @binding(2) var<storage, read_write> v: array<vec4<{{ elem }}>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const D4: u32 = {{ head_dim }}u / 4u;
const BC: u32 = {{ key_tile }}u;
const QR: u32 = {{ query_rows }}u;

var<workgroup> kt: array<vec4<f32>, {{ key_tile }} * ({{ head_dim }} / 4)>;
var<workgroup> vt: array<vec4<f32>, {{ key_tile }} * ({{ head_dim }} / 4)>;
var<workgroup> shared_keys: u32;

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
    let kv = wid.y;
    let row0 = wid.x * QR;
    // Keys the workgroup's last row sees (filled rows end at past + n).
    if (lid == 0u) {
        shared_keys = past + min(n, row0 + QR);
    }
    let keys = workgroupUniformLoad(&shared_keys);
    let filled = past + n;

    let row = row0 + lid % QR;
    let head = kv * group + lid / QR;
    let owner = lid < group * QR && row < n && head < heads;
    let visible = past + row + 1u; // keys 0 .. visible − 1

    var qr: array<vec4<f32>, {{ head_dim }} / 4>;
    var acc: array<vec4<f32>, {{ head_dim }} / 4>;
    let qbase = (min(head, heads - 1u) * n + min(row, n - 1u)) * D4;
    for (var d = 0u; d < D4; d = d + 1u) {
        qr[d] = vec4<f32>(q[qbase + d]) * scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = -3.0e38;
    var l = 0.0;
    var s: array<f32, {{ key_tile }}>;
    let kvbase = kv * cap * D4;

    for (var t0 = 0u; t0 < keys; t0 = t0 + BC) {
        // Cooperative load of keys t0 .. t0 + BC (zeros past the filled rows).
        for (var e = lid; e < BC * D4; e = e + WG) {
            let j = t0 + e / D4;
            let src = kvbase + min(j, cap - 1u) * D4 + e % D4;
            if (j < filled) {
                kt[e] = vec4<f32>(k[src]);
                vt[e] = vec4<f32>(v[src]);
            } else {
                kt[e] = vec4<f32>(0.0);
                vt[e] = vec4<f32>(0.0);
            }
        }
        workgroupBarrier();
        if (owner) {
            var tmax = -3.0e38;
            for (var jj = 0u; jj < BC; jj = jj + 1u) {
                var dot4 = vec4<f32>(0.0);
                for (var d = 0u; d < D4; d = d + 1u) {
                    dot4 = dot4 + qr[d] * kt[jj * D4 + d];
                }
                let sc = dot4.x + dot4.y + dot4.z + dot4.w;
                let ok = t0 + jj < visible;
                s[jj] = select(-3.0e38, sc, ok);
                if (ok) {
                    tmax = max(tmax, sc);
                }
            }
            if (t0 < visible) {
                let mnew = max(m, tmax);
                let corr = exp(m - mnew);
                m = mnew;
                var psum = 0.0;
                for (var d = 0u; d < D4; d = d + 1u) {
                    acc[d] = acc[d] * corr;
                }
                for (var jj = 0u; jj < BC; jj = jj + 1u) {
                    let p = select(0.0, exp(s[jj] - mnew), t0 + jj < visible);
                    psum = psum + p;
                    for (var d = 0u; d < D4; d = d + 1u) {
                        acc[d] = acc[d] + p * vt[jj * D4 + d];
                    }
                }
                l = l * corr + psum;
            }
        }
        workgroupBarrier();
    }
    if (owner) {
        let inv = 1.0 / l;
        let obase = (row * heads + head) * D4;
        for (var d = 0u; d < D4; d = d + 1u) {
            out[obase + d] = acc[d] * inv;
        }
    }
}
