// Row-wise max-subtracted softmax of the n x n log-weights, in place (ENFF_SPEC §2.2).
// CPU twin: src/backend/cpu/flow.rs::softmax_rows.
// A non-finite log-weight raises the error flag (slot p.flag_slot) with the first flat index;
// the host reads the flag once per analysis. Unlike the reference code we never fall back to
// uniform weights silently.
// Parity test: tests/kernels.rs::softmax_rows_match_and_flag_non_finite_logits.

// Rust mirror: src/backend/gpu/params.rs::SoftmaxParams
struct SoftmaxParams {
    n: u32,
    flag_slot: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: SoftmaxParams;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> flags: array<atomic<u32>>;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;
var<workgroup> redu: array<u32, 64>;
var<workgroup> bad: u32;

fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= p.n) {
        return;
    }
    let t = lid.x;
    let base = row * p.n;
    var m = -3.4028235e38;
    var my_bad = 0xffffffffu;
    for (var j = t; j < p.n; j = j + WG) {
        let v = w[base + j];
        if (!is_finite(v)) {
            my_bad = min(my_bad, j);
        }
        m = max(m, v);
    }
    red[t] = m;
    redu[t] = my_bad;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (t < s) {
            red[t] = max(red[t], red[t + s]);
            redu[t] = min(redu[t], redu[t + s]);
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        bad = redu[0];
    }
    // Read the max before the barrier in workgroupUniformLoad: after it, red[] is reused.
    let mx = red[0];
    let first_bad = workgroupUniformLoad(&bad);
    if (first_bad != 0xffffffffu) {
        if (t == 0u) {
            atomicOr(&flags[2u * p.flag_slot], 1u);
            atomicMin(&flags[2u * p.flag_slot + 1u], base + first_bad);
        }
        return;
    }
    var sum = 0.0;
    for (var j = t; j < p.n; j = j + WG) {
        sum = sum + exp(w[base + j] - mx);
    }
    red[t] = sum;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (t < s) {
            red[t] = red[t] + red[t + s];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / red[0];
    for (var j = t; j < p.n; j = j + WG) {
        w[base + j] = exp(w[base + j] - mx) * inv;
    }
}
