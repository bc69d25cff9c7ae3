// attention_combine.wgsl — pass 2 of split-key attention: merge the spans' partial softmaxes
// written by attention_split.wgsl into the attention output.
//
// Contract (every new row i, query head h, dims d; S spans):
//   M = max_s m_s,  out[i, h·D + d] = Σ_s exp(m_s − M) · acc[s, h, i, d] / Σ_s exp(m_s − M) · l_s
//   An empty span has (m, l) = (−3e38, 0) and acc 0, so it adds nothing; span 0 always holds key
//   0, visible to every row, so M is finite and the denominator ≥ 1.
//
// Inputs (group 0, storage buffers, tightly packed, row-major)
//   0  acc   [S, H, N, D]  f32   partial outputs
//   1  ml    [S, H, N, 2]  f32   partial max and sum
//   2  out   [N, H·D]      f32   output, every element written exactly once
//   3  info  [3]           u32   N, H, S
// D = {{ head_dim }} (a multiple of 4) is a compile-time constant.
//
// Dispatch: a 2-D grid of workgroups of {{ workgroup_size }} invocations, flattened; grid-stride
// over the N·H·D/4 output vec4s (the host keeps the trips per invocation bounded). Every binding
// is read_write (burn may place an input and an output in one wgpu buffer); inputs are never
// written.
@group(0) @binding(0) var<storage, read_write> acc: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> ml: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ workgroup_size }}u;
const D4: u32 = {{ head_dim }}u / 4u;

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let first = (wid.y * nwg.x + wid.x) * WG + lid;
    let stride = nwg.x * nwg.y * WG;
    let n = info[0];
    let heads = info[1];
    let spans = info[2];
    let total = n * heads * D4;
    for (var e = first; e < total; e = e + stride) {
        let d = e % D4;
        let row = e / D4 / heads;
        let head = e / D4 % heads;
        let idx0 = head * n + row; // (s · H + head) · N + row at s = 0
        var m = -3.0e38;
        for (var s = 0u; s < spans; s = s + 1u) {
            m = max(m, ml[2u * (s * heads * n + idx0)]);
        }
        var num = vec4<f32>(0.0);
        var den = 0.0;
        for (var s = 0u; s < spans; s = s + 1u) {
            let idx = s * heads * n + idx0;
            let l = ml[2u * idx + 1u];
            if (l > 0.0) {
                let w = exp(ml[2u * idx] - m);
                num = num + w * acc[idx * D4 + d];
                den = den + w * l;
            }
        }
        out[e] = num / den;
    }
}
