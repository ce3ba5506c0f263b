// Ensemble-wide element-wise kernels and reductions: column sums and variances, inflation,
// ensemble statistics against the truth, finiteness checks, observation operators and
// per-member log-likelihoods.
// CPU twins: src/backend/cpu/ensemble.rs::{inflate, ensemble_stats, check_finite, observe,
// log_likelihoods, observed_moments}.
// Parity test: tests/kernels.rs::inflation_statistics_observation_and_likelihood_match.

// Rust mirror: src/backend/gpu/params.rs::EnsembleParams
struct EnsembleParams {
    rows: u32,       // rows of this chunk
    cols: u32,       // d (or m for observations)
    first: u32,      // 1: overwrite accumulators, 0: add
    flag_slot: u32,
    row0: u32,       // global member index of the first row of this chunk
    m: u32,          // observation dimension
    every: u32,
    offset: u32,
    pointwise: u32,  // 0 identity, 1 arctan, 2 tanh
    count: u32,      // number of partial sums (stats_final)
    _pad0: u32,
    _pad1: u32,
    inv_n: f32,      // 1 / n
    inv_n1: f32,     // 1 / max(n − 1, 1)
    gamma: f32,      // inflation factor
    neg_inv_2s2: f32, // −1 / (2 σ_y²)
}

@group(0) @binding(0) var<uniform> p: EnsembleParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> flags: array<atomic<u32>>;
@group(0) @binding(5) var<storage, read_write> e: array<f32>;
@group(0) @binding(6) var<storage, read> f: array<f32>;

const WG: u32 = 256u;
var<workgroup> r0: array<f32, 256>;
var<workgroup> r1: array<f32, 256>;

fn linear(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// b[k] (+)= Σ_i a[i, k]
@compute @workgroup_size(256, 1, 1)
fn colsum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = linear(gid, nwg);
    if (k >= p.cols) {
        return;
    }
    var s = 0.0;
    for (var i = 0u; i < p.rows; i = i + 1u) {
        s = s + a[i * p.cols + k];
    }
    if (p.first != 0u) {
        b[k] = s;
    } else {
        b[k] = b[k] + s;
    }
}

// c[k] (+)= Σ_i (a[i, k] − b[k]/n)²
@compute @workgroup_size(256, 1, 1)
fn colsq(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = linear(gid, nwg);
    if (k >= p.cols) {
        return;
    }
    let mean = b[k] * p.inv_n;
    var s = 0.0;
    for (var i = 0u; i < p.rows; i = i + 1u) {
        let dv = a[i * p.cols + k] - mean;
        s = fma(dv, dv, s);
    }
    if (p.first != 0u) {
        c[k] = s;
    } else {
        c[k] = c[k] + s;
    }
}

// c[i, k] = m_k + γ (c[i, k] − m_k), m_k = b[k]/n
@compute @workgroup_size(256, 1, 1)
fn inflate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear(gid, nwg);
    if (idx >= p.rows * p.cols) {
        return;
    }
    let mean = b[idx % p.cols] * p.inv_n;
    c[idx] = mean + p.gamma * (c[idx] - mean);
}

// Per workgroup: e[2 wg] = Σ (b[k]/n − a[k])², e[2 wg + 1] = Σ c[k]/(n − 1)
@compute @workgroup_size(256, 1, 1)
fn stats_partial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = linear(gid, nwg);
    var se = 0.0;
    var var_ = 0.0;
    if (k < p.cols) {
        let dm = b[k] * p.inv_n - a[k];
        se = dm * dm;
        var_ = c[k] * p.inv_n1;
    }
    r0[lid.x] = se;
    r1[lid.x] = var_;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid.x < s) {
            r0[lid.x] = r0[lid.x] + r0[lid.x + s];
            r1[lid.x] = r1[lid.x] + r1[lid.x + s];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        let w = wg.x + wg.y * nwg.x;
        e[2u * w] = r0[0];
        e[2u * w + 1u] = r1[0];
    }
}

// One workgroup: b[0] = Σ_w e[2w], b[1] = Σ_w e[2w + 1] over p.count partials.
@compute @workgroup_size(256, 1, 1)
fn stats_final(@builtin(local_invocation_id) lid: vec3<u32>) {
    var s0 = 0.0;
    var s1 = 0.0;
    for (var w = lid.x; w < p.count; w = w + WG) {
        s0 = s0 + e[2u * w];
        s1 = s1 + e[2u * w + 1u];
    }
    r0[lid.x] = s0;
    r1[lid.x] = s1;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid.x < s) {
            r0[lid.x] = r0[lid.x] + r0[lid.x + s];
            r1[lid.x] = r1[lid.x] + r1[lid.x + s];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        b[0] = r0[0];
        b[1] = r1[0];
    }
}

// Raises flag slot p.flag_slot with the first flat (global) index of a NaN/Inf in a.
@compute @workgroup_size(256, 1, 1)
fn finite(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear(gid, nwg);
    if (idx >= p.rows * p.cols) {
        return;
    }
    if ((bitcast<u32>(a[idx]) & 0x7f800000u) == 0x7f800000u) {
        atomicOr(&flags[2u * p.flag_slot], 1u);
        atomicMin(&flags[2u * p.flag_slot + 1u], p.row0 * p.cols + idx);
    }
}

// b[i, q] = h(a[i, offset + q·every])
@compute @workgroup_size(256, 1, 1)
fn observe(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear(gid, nwg);
    if (idx >= p.rows * p.m) {
        return;
    }
    let i = idx / p.m;
    let q = idx % p.m;
    b[idx] = obs_value(p.pointwise, a[i * p.cols + p.offset + q * p.every]);
}

// One workgroup per member: b[row0 + i] = −Σ_q (f[q] − h(a[i, offset + q·every]))² / (2σ²)
@compute @workgroup_size(256, 1, 1)
fn loglik(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = wg.x + wg.y * nwg.x;
    if (i >= p.rows) {
        return;
    }
    var s = 0.0;
    for (var q = lid.x; q < p.m; q = q + WG) {
        let r = f[q] - obs_value(p.pointwise, a[i * p.cols + p.offset + q * p.every]);
        s = fma(r, r, s);
    }
    r0[lid.x] = s;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st / 2u) {
        if (lid.x < st) {
            r0[lid.x] = r0[lid.x] + r0[lid.x + st];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        b[p.row0 + i] = r0[0] * p.neg_inv_2s2;
    }
}

// Observed moments (2 × m in b): b[q] (+)= Σ_i h(a[i, comp q]) over the rows of this chunk.
@compute @workgroup_size(256, 1, 1)
fn obs_sum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = linear(gid, nwg);
    if (q >= p.m) {
        return;
    }
    let col = p.offset + q * p.every;
    var s = 0.0;
    for (var i = 0u; i < p.rows; i = i + 1u) {
        s = s + obs_value(p.pointwise, a[i * p.cols + col]);
    }
    if (p.first != 0u) {
        b[q] = s;
    } else {
        b[q] = b[q] + s;
    }
}

// b[m + q] (+)= Σ_i (h(a[i, comp q]) − b[q]/n)² (b[q] holds the full sum).
@compute @workgroup_size(256, 1, 1)
fn obs_sq(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = linear(gid, nwg);
    if (q >= p.m) {
        return;
    }
    let col = p.offset + q * p.every;
    let mean = b[q] * p.inv_n;
    var s = 0.0;
    for (var i = 0u; i < p.rows; i = i + 1u) {
        let dv = obs_value(p.pointwise, a[i * p.cols + col]) - mean;
        s = fma(dv, dv, s);
    }
    if (p.first != 0u) {
        b[p.m + q] = s;
    } else {
        b[p.m + q] = b[p.m + q] + s;
    }
}

// b[q] = sum/n (mean), b[m + q] = sum of squares/(n − 1) (unbiased variance).
@compute @workgroup_size(256, 1, 1)
fn obs_final(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = linear(gid, nwg);
    if (q >= p.m) {
        return;
    }
    b[q] = b[q] * p.inv_n;
    b[p.m + q] = b[p.m + q] * p.inv_n1;
}
