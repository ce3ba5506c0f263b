// Covariance guidance with a banded Kalman gain (one flow step):
//   state[k,i] += h_vel·velocity[k,i] + h_gain·Σ_c gain[table·d + i, c]·(y[q] − h(endpoint[k, comp(q)])),
//   q = index[i,c], comp(q) = offset + q·every.
// With has_mean, the innovation is split: (y − hbar) − alpha·(h(endpoint) − hbar).
// With has_clip, it is clamped to ±clip_scale·√ivar[m + q] (row 1 of the stage's observation
// statistics: the linearized innovation variance).
// One thread per (member, component) of a member block; zero gain entries are padding.
// CPU twin: src/backend/cpu/gain.rs::gain_step.
// Parity test: tests/covariance_guidance.rs::banded_gain_step_agrees_with_the_cpu.

// Rust mirror: src/backend/gpu/gain.rs::GainParams
struct GainParams {
    rows: u32,       // members in this block
    d: u32,          // state dimension
    w: u32,          // gain entries per component (window)
    m: u32,          // observation dimension
    every: u32,
    offset: u32,
    pointwise: u32,  // 0 identity, 1 arctan, 2 tanh
    table: u32,      // gain table applied (rows table·d ..)
    h_vel: f32,
    h_gain: f32,
    has_mean: u32,   // 1: split the innovation about hbar
    alpha: f32,      // anomaly weight of the split
    has_clip: u32,   // 1: clamp the innovation
    clip_scale: f32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: GainParams;
@group(0) @binding(1) var<storage, read_write> state: array<f32>;
@group(0) @binding(2) var<storage, read> velocity: array<f32>;
@group(0) @binding(3) var<storage, read> endpoint: array<f32>;
@group(0) @binding(4) var<storage, read> gain: array<f32>;
@group(0) @binding(5) var<storage, read> index: array<f32>;
@group(0) @binding(6) var<storage, read> y: array<f32>;
@group(0) @binding(7) var<storage, read> hbar: array<f32>;
@group(0) @binding(8) var<storage, read> ivar: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= p.rows * p.d) {
        return;
    }
    let k = e / p.d;
    let i = e - k * p.d;
    var acc = 0.0;
    if (p.h_gain != 0.0) {
        let base = i * p.w;
        let gbase = (p.table * p.d + i) * p.w;
        for (var c = 0u; c < p.w; c = c + 1u) {
            let g = gain[gbase + c];
            if (g != 0.0) {
                let q = min(u32(index[base + c]), p.m - 1u);
                let hx = obs_value(p.pointwise, endpoint[k * p.d + p.offset + q * p.every]);
                var r = y[q] - hx;
                if (p.has_mean == 1u) {
                    r = (y[q] - hbar[q]) - p.alpha * (hx - hbar[q]);
                }
                if (p.has_clip == 1u) {
                    let bound = p.clip_scale * sqrt(max(ivar[p.m + q], 0.0));
                    r = clamp(r, -bound, bound);
                }
                acc = acc + g * r;
            }
        }
    }
    state[e] = state[e] + p.h_vel * velocity[e] + p.h_gain * acc;
}
