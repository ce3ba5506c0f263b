// Ensemble-space products of the observed anomalies for the ETKF and the EnKF (ENFF_SPEC
// §6.3-6.4), so that only an (n + 1 + e) x n result crosses to the host instead of h(X).
// CPU twin: src/backend/cpu/ensemble_space.rs::observed_products (f64 accumulation; here f32
// partial sums over a stride of the observations, reduced in a tree).
//
// With ã_i = hx_i - ȳ (hx is n x m, row-major):
//   out[r, j] = ã_r · ã_j              for r < n        (Gram matrix)
//   out[n, j] = ã_j · (y - ȳ)                           (projected innovation)
//   out[n + 1 + r, j] = ã_j · η_r      for r < e        (projected perturbations, eta e x m)
// Parity test: tests/ensemble_space.rs::observed_products_match_the_cpu_twin.

// Rust mirror: src/backend/gpu/ensemble_space.rs::ProductParams
struct ProductParams {
    n: u32,
    m: u32,
    e: u32,
    groups_x: u32,
}

@group(0) @binding(0) var<uniform> p: ProductParams;
@group(0) @binding(1) var<storage, read> hx: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> eta: array<f32>;
@group(0) @binding(4) var<storage, read_write> ybar: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

// ȳ_q = mean over members of hx[., q]; one thread per observation.
@compute @workgroup_size(256, 1, 1)
fn obs_mean(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = gid.x + gid.y * nwg.x * 256u;
    if (q >= p.m) {
        return;
    }
    var s = 0.0;
    for (var i = 0u; i < p.n; i = i + 1u) {
        s = s + hx[i * p.m + q];
    }
    ybar[q] = s / f32(p.n);
}

// One workgroup per output entry (r, j).
@compute @workgroup_size(64, 1, 1)
fn products(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let entry = wg.x + wg.y * p.groups_x;
    if (entry >= (p.n + 1u + p.e) * p.n) {
        return;
    }
    let r = entry / p.n;
    let j = entry % p.n;
    let t = lid.x;
    var s = 0.0;
    for (var q = t; q < p.m; q = q + WG) {
        let yb = ybar[q];
        let aj = hx[j * p.m + q] - yb;
        var v: f32;
        if (r < p.n) {
            v = hx[r * p.m + q] - yb;
        } else if (r == p.n) {
            v = y[q] - yb;
        } else {
            v = eta[(r - p.n - 1u) * p.m + q];
        }
        s = s + aj * v;
    }
    red[t] = s;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h / 2u) {
        if (t < h) {
            red[t] = red[t] + red[t + h];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        out[entry] = red[0];
    }
}
