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
// Parity test: tests/kernels.rs::flow_update_matches_the_cpu_twin_for_every_variant.

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
    clamp: f32,      // > 0: clamp v to [−clamp, clamp] before the step (EnSF's score clamp)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
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
            v = v + p.scale * obs_derivative(p.pointwise, xh) * (y[obs_idx] - obs_value(p.pointwise, xh));
        }
        if (p.clamp > 0.0) {
            v = clamp(v, -p.clamp, p.clamp);
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

// Large-n variant: the Σ_j W_ij U_jk product as a tiled matrix product (64 members x 64
// components per workgroup, 4 x 4 per invocation, j in steps of 16 through shared memory),
// followed by the same guidance and integrator epilogue as `main`.
const TI: u32 = 64u;
const TJ: u32 = 16u;
var<workgroup> ws: array<f32, 1024>; // TI x TJ, row-major
var<workgroup> us: array<f32, 1024>; // TJ x TI (components), row-major

fn finish(i: u32, k: u32, vin: f32) {
    let e = i * p.d + k;
    var xe: f32;
    if (p.has_eval != 0u) {
        xe = evalb[e];
    } else {
        xe = state[e];
    }
    var v = vin;
    if (p.first != 0u) {
        v = v + p.cx * xe;
    } else {
        v = v + acc[e];
    }
    if (p.last == 0u) {
        acc[e] = v;
        return;
    }
    if (p.guided != 0u && k >= p.obs_offset) {
        let rel = k - p.obs_offset;
        if (rel % p.obs_every == 0u && rel / p.obs_every < p.obs_m) {
            let xh = xe + p.horizon * v;
            v = v + p.scale * obs_derivative(p.pointwise, xh) * (y[rel / p.obs_every] - obs_value(p.pointwise, xh));
        }
    }
    if (p.clamp > 0.0) {
        v = clamp(v, -p.clamp, p.clamp);
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

@compute @workgroup_size(16, 16, 1)
fn tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let k0 = wg.x * TI;
    let i0 = wg.y * TI;
    let flat = lid.y * 16u + lid.x;
    var sum: array<f32, 16>;
    for (var q = 0u; q < 16u; q = q + 1u) {
        sum[q] = 0.0;
    }
    for (var j0 = 0u; j0 < p.n_t; j0 = j0 + TJ) {
        for (var e = 0u; e < 4u; e = e + 1u) {
            let idx = flat + e * 256u;
            // W tile: row ii (member), column jj
            let ii = idx / TJ;
            let jj = idx % TJ;
            var wv = 0.0;
            if (i0 + ii < p.n_rows && j0 + jj < p.n_t) {
                wv = w[(p.row0_state + i0 + ii) * p.n_total + p.row0_t + j0 + jj];
            }
            ws[ii * TJ + jj] = wv;
            // U tile: row jj2 (mean), column kk (component)
            let jj2 = idx / TI;
            let kk = idx % TI;
            var uv = 0.0;
            if (j0 + jj2 < p.n_t && k0 + kk < p.d) {
                uv = u_at(j0 + jj2, k0 + kk);
            }
            us[jj2 * TI + kk] = uv;
        }
        workgroupBarrier();
        for (var jj = 0u; jj < TJ; jj = jj + 1u) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var q = 0u; q < 4u; q = q + 1u) {
                a[q] = ws[(lid.y + 16u * q) * TJ + jj];
                b[q] = us[jj * TI + lid.x + 16u * q];
            }
            for (var r = 0u; r < 4u; r = r + 1u) {
                for (var q = 0u; q < 4u; q = q + 1u) {
                    sum[r * 4u + q] = fma(a[r], b[q], sum[r * 4u + q]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r = r + 1u) {
        let i = i0 + lid.y + 16u * r;
        for (var q = 0u; q < 4u; q = q + 1u) {
            let k = k0 + lid.x + 16u * q;
            if (i < p.n_rows && k < p.d) {
                finish(i, k, sum[r * 4u + q]);
            }
        }
    }
}
