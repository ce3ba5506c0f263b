// Fused EnFF update: Monte-Carlo velocity, local guidance and the Euler/Heun step
// (ENFF_SPEC §2.2, §3.1, §4.1). CPU twin: src/backend/cpu/flow.rs::flow_update.
//
// One invocation per state component k loops over the members i of this state chunk:
//   v_i   = cx·x_ik + Σ_j W_ij U_jk,  U_jk = ua·target_jk + ub·source_jk
//           (U_j = μ̇_j − (ṡ/s) μ_j, so v_i = (ṡ/s)(x_i − Σ W μ) + Σ W μ̇)
//   x̂     = x_ik + horizon·v_i;  g = scale · h'(x̂) · (y − h(x̂)) on observed components
//   state ← state + h_new·(v + g) + h_old·v_prev;  v_out ← v + g
// With member-block splitting the sum over j runs over several target chunks: chunks before
// the last accumulate into `acc` (first = 1 starts from cx·x), the last one finalizes.

// Rust mirror: src/backend/gpu/params.rs::UpdateParams
struct UpdateParams {
    n_rows: u32,
    n_t: u32,
    d: u32,
    n_total: u32,
    row0_state: u32,
    row0_t: u32,
    has_source: u32,
    has_eval: u32,
    has_prev: u32,
    has_vel_out: u32,
    first: u32,
    last: u32,
    guided: u32,
    obs_every: u32,
    obs_offset: u32,
    obs_m: u32,
    pointwise: u32,
    cx: f32,
    ua: f32,
    ub: f32,
    h_new: f32,
    h_old: f32,
    scale: f32,
    horizon: f32,
}

@group(0) @binding(0) var<uniform> p: UpdateParams;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> tgt: array<f32>;
@group(0) @binding(3) var<storage, read> src: array<f32>;
@group(0) @binding(4) var<storage, read> evalb: array<f32>;
@group(0) @binding(5) var<storage, read_write> state: array<f32>;
@group(0) @binding(6) var<storage, read> vprev: array<f32>;
@group(0) @binding(7) var<storage, read_write> velout: array<f32>;
@group(0) @binding(8) var<storage, read> y: array<f32>;
@group(0) @binding(9) var<storage, read_write> acc: array<f32>;

const MAXJ: u32 = 32u;

fn h_of(x: f32) -> f32 {
    if (p.pointwise == 1u) {
        return atan(x);
    }
    if (p.pointwise == 2u) {
        return tanh(x);
    }
    return x;
}

fn h_prime(x: f32) -> f32 {
    if (p.pointwise == 1u) {
        return 1.0 / (1.0 + x * x);
    }
    if (p.pointwise == 2u) {
        let t = tanh(x);
        return 1.0 - t * t;
    }
    return 1.0;
}

fn u_at(j: u32, k: u32) -> f32 {
    var u = p.ua * tgt[j * p.d + k];
    if (p.has_source != 0u) {
        u = u + p.ub * src[j * p.d + k];
    }
    return u;
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = gid.x + gid.y * nwg.x * 256u;
    if (k >= p.d) {
        return;
    }
    var u: array<f32, 32>;
    let cached = p.n_t <= MAXJ;
    if (cached) {
        for (var j = 0u; j < p.n_t; j = j + 1u) {
            u[j] = u_at(j, k);
        }
    }
    var observed = false;
    var obs_idx = 0u;
    if (p.guided != 0u && k >= p.obs_offset) {
        let rel = k - p.obs_offset;
        if (rel % p.obs_every == 0u && rel / p.obs_every < p.obs_m) {
            observed = true;
            obs_idx = rel / p.obs_every;
        }
    }
    for (var i = 0u; i < p.n_rows; i = i + 1u) {
        let e = i * p.d + k;
        var xe: f32;
        if (p.has_eval != 0u) {
            xe = evalb[e];
        } else {
            xe = state[e];
        }
        var v: f32;
        if (p.first != 0u) {
            v = p.cx * xe;
        } else {
            v = acc[e];
        }
        let wrow = (p.row0_state + i) * p.n_total + p.row0_t;
        if (cached) {
            for (var j = 0u; j < p.n_t; j = j + 1u) {
                v = fma(w[wrow + j], u[j], v);
            }
        } else {
            for (var j = 0u; j < p.n_t; j = j + 1u) {
                v = fma(w[wrow + j], u_at(j, k), v);
            }
        }
        if (p.last == 0u) {
            acc[e] = v;
            continue;
        }
        if (observed) {
            let xh = xe + p.horizon * v;
            v = v + p.scale * h_prime(xh) * (y[obs_idx] - h_of(xh));
        }
        var nv = state[e] + p.h_new * v;
        if (p.has_prev != 0u) {
            nv = nv + p.h_old * vprev[e];
        }
        state[e] = nv;
        if (p.has_vel_out != 0u) {
            velout[e] = v;
        }
    }
}
