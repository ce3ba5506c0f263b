// Local Kalman gains of covariance-guidance stages (src/filter/covariance.rs), on the device.
// CPU twin: src/backend/cpu/gain.rs::local_gains.
//
// `moments`: one thread per state component c: the forecast mean x̄_c, the endpoint mean
//   x̄̂₁_c (the linearization point) and, on observed components, h̄_q = mean_k h(x̂₁[k, c])
//   and (with_var) the linearized innovation variance h'(x̄̂₁_c)²·var_k(x_f[k, c]) + σ².
// `gains`: one workgroup per component i, in observation space (the Woodbury form). With the
//   window entries e < w (observation q_e at component c_e, taper ρ_e, 0 = padding) and
//   s_e = √ρ_e·h'(x̄̂₁[c_e])/σ:
//     M_s = I + τ_s·S,  S_ef = s_e s_f·P(c_e, c_f),  r_e = s_e·P(c_e, i),
//     gain[s, i, e] = (√ρ_e/σ)·(M_s⁻¹ r)_e   for every stage s < stages (table s = rows s·d ..),
//   P the forecast covariance (sums over members in tiles of TK, in workgroup memory). S and r
//   are built once; each stage factors its M_s by a workgroup Cholesky (S kept packed in
//   `tile` meanwhile). Padding entries get s_e = 0: an identity row, gain 0.
// `gains_ens`: the same gains in ensemble space, for windows wider than the ensemble (n ≤ NMAX,
//   any w), the twin's choice as well. With a_e the anomalies of component c_e:
//     G = Σ_e s_e²·a_e a_eᵀ/(n − 1)  (n × n, summed over tiles of TE window entries),
//     v_s = (I + τ_s·G)⁻¹ a_i/√(n − 1),   gain[s, i, e] = (√ρ_e/σ)·s_e·a_eᵀv_s/√(n − 1),
//   G built once, one factorization per stage.
//   Padding entries get s_e = 0: no term in G, gain 0.
// The host picks the space (src/backend/gpu/gain.rs); a problem neither kernel takes (n and w
// both above 48, or an ensemble split into member blocks) runs the twin on the host.
// Parity test: tests/covariance_guidance.rs::local_gains_agree_with_the_cpu_twin_and_the_f64_reference.

// Rust mirror: src/backend/gpu/gain.rs::LocalGainParams
struct LocalGainParams {
    n: u32,
    d: u32,
    w: u32,
    m: u32,
    every: u32,
    offset: u32,
    pointwise: u32,   // 0 identity, 1 arctan, 2 tanh
    groups_x: u32,    // workgroups along x of the `gains` dispatch
    inv_sigma: f32,
    stages: u32,      // stages of this dispatch (at most 32)
    inv_n: f32,       // 1 / n
    inv_n1: f32,      // 1 / (n − 1)
    with_var: u32,    // 1: hbar is 2 × m, row 1 receives h'(x̄̂₁)²·var(x_f) + σ²
    table0: u32,      // gain table of this dispatch's first stage
    _pad1: u32,
    _pad2: u32,
    taus: array<vec4<f32>, 8>,    // τ_s of stage s at taus[s / 4][s % 4] (at most 32 stages)
}

@group(0) @binding(0) var<uniform> p: LocalGainParams;
@group(0) @binding(1) var<storage, read> fc: array<f32>;
@group(0) @binding(2) var<storage, read> xh: array<f32>;
@group(0) @binding(3) var<storage, read_write> moments: array<f32>;   // [x̄ (d), x̄̂₁ (d)]
@group(0) @binding(4) var<storage, read_write> hbar: array<f32>;
@group(0) @binding(5) var<storage, read> index: array<f32>;
@group(0) @binding(6) var<storage, read> taper: array<f32>;
@group(0) @binding(7) var<storage, read_write> gain: array<f32>;

const WG: u32 = 256u;
const GT: u32 = 64u;      // threads of a `gains` workgroup
const WMAX: u32 = 48u;    // widest window (src/backend/gpu/gain.rs::GPU_MAX_WINDOW)
const LD: u32 = 49u;      // row stride: WMAX + 1 (row w of `mat` holds r)
const TK: u32 = 16u;      // members per tile
const NMAX: u32 = 48u;    // largest ensemble of `gains_ens` (src/backend/gpu/gain.rs::GPU_MAX_ENS_MEMBERS)
const TE: u32 = 16u;      // window entries per tile of `gains_ens`

// Shared by both gain kernels (`gains_ens` in brackets).
var<workgroup> mat: array<f32, 2401>;   // LD × LD: lower triangle of M, then r in row w (n)
var<workgroup> tile: array<f32, 1176>;  // TK × LD anomalies: window columns, then column i
                                        // (TE × LD scaled anomalies s_e·a_e of a tile);
                                        // then the stage-independent matrix, packed
                                        // lower triangle (WMAX·(WMAX + 1)/2)
var<workgroup> scl: array<f32, 48>;     // s_e (of the tile's entries)
var<workgroup> col: array<u32, 49>;     // c_e, then i (of the tile's entries)
var<workgroup> zv: array<f32, 48>;      // M⁻¹ r

@compute @workgroup_size(256, 1, 1)
fn moments_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * WG;
    if (c >= p.d) {
        return;
    }
    var sf = 0.0;
    var sh = 0.0;
    var sy = 0.0;
    for (var k = 0u; k < p.n; k = k + 1u) {
        let v = xh[k * p.d + c];
        sf = sf + fc[k * p.d + c];
        sh = sh + v;
        sy = sy + obs_value(p.pointwise, v);
    }
    moments[c] = sf * p.inv_n;
    moments[p.d + c] = sh * p.inv_n;
    if (c >= p.offset) {
        let rel = c - p.offset;
        if (rel % p.every == 0u && rel / p.every < p.m) {
            let q = rel / p.every;
            hbar[q] = sy * p.inv_n;
            if (p.with_var == 1u) {
                let mf = sf * p.inv_n;
                var sv = 0.0;
                for (var k = 0u; k < p.n; k = k + 1u) {
                    let dv = fc[k * p.d + c] - mf;
                    sv = fma(dv, dv, sv);
                }
                let dh = obs_derivative(p.pointwise, sh * p.inv_n);
                hbar[p.m + q] = dh * dh * sv * p.inv_n1 + 1.0 / (p.inv_sigma * p.inv_sigma);
            }
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn gains_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = wg.x + wg.y * p.groups_x;
    if (i >= p.d) {
        return;
    }
    let t = lid.x;
    let w = p.w;
    let ww = w + 1u;
    let base = i * w;
    for (var e = t; e < w; e = e + GT) {
        let rho = taper[base + e];
        let q = min(u32(index[base + e]), p.m - 1u);
        let c = p.offset + q * p.every;
        col[e] = c;
        var s = 0.0;
        if (rho > 0.0) {
            s = sqrt(rho) * obs_derivative(p.pointwise, moments[p.d + c]) * p.inv_sigma;
        }
        scl[e] = s;
    }
    if (t == 0u) {
        col[w] = i;
    }
    for (var e = t; e < LD * LD; e = e + GT) {
        mat[e] = 0.0;
    }
    workgroupBarrier();

    // Covariance sums over member tiles: mat[e, f] += Σ_k a_k,e a_k,f for f ≤ e, f < w
    // (row e = w: against component i).
    for (var k0 = 0u; k0 < p.n; k0 = k0 + TK) {
        let kt = min(TK, p.n - k0);
        for (var idx = t; idx < kt * ww; idx = idx + GT) {
            let kk = idx / ww;
            let e = idx - kk * ww;
            let c = col[e];
            tile[kk * LD + e] = fc[(k0 + kk) * p.d + c] - moments[c];
        }
        workgroupBarrier();
        for (var idx = t; idx < ww * w; idx = idx + GT) {
            let e = idx / w;
            let f = idx - e * w;
            if (f <= e) {
                var acc = 0.0;
                for (var kk = 0u; kk < kt; kk = kk + 1u) {
                    acc = fma(tile[kk * LD + e], tile[kk * LD + f], acc);
                }
                mat[e * LD + f] = mat[e * LD + f] + acc;
            }
        }
        workgroupBarrier();
    }

    // S (packed into `tile`) and r (row w of `mat`, untouched by the factorization).
    for (var idx = t; idx < ww * w; idx = idx + GT) {
        let e = idx / w;
        let f = idx - e * w;
        if (f <= e) {
            let cv = mat[e * LD + f] * p.inv_n1;
            if (e < w) {
                tile[e * (e + 1u) / 2u + f] = scl[e] * scl[f] * cv;
            } else {
                mat[e * LD + f] = scl[f] * cv;
            }
        }
    }
    workgroupBarrier();

    for (var s = 0u; s < p.stages; s = s + 1u) {
        factor_stage(w, s, t);
        let out = (p.table0 + s) * p.d * w + base;
        for (var e = t; e < w; e = e + GT) {
            let rho = taper[base + e];
            var g = 0.0;
            if (rho > 0.0) {
                g = sqrt(rho) * p.inv_sigma * zv[e];
            }
            gain[out + e] = g;
        }
    }
}

// Stage s of a dispatch: M_s = I + τ_s·(the stage-independent matrix packed in `tile`) into
// the k × k lower triangle of `mat`, then `factor_and_solve` with the right-hand side kept in
// row k. Called by the whole workgroup.
fn factor_stage(k: u32, s: u32, t: u32) {
    let tau = p.taus[s / 4u][s % 4u];
    for (var idx = t; idx < k * k; idx = idx + GT) {
        let r = idx / k;
        let c = idx - r * k;
        if (c <= r) {
            mat[r * LD + c] = tau * tile[r * (r + 1u) / 2u + c] + select(0.0, 1.0, r == c);
        }
    }
    workgroupBarrier();
    factor_and_solve(k, t);
}

// M = L Lᵀ in place (the k × k lower triangle of `mat`, the diagonal floored like the twin's),
// then zv = L⁻ᵀ L⁻¹ r with r in row k of `mat`. Called by the whole workgroup; zv is ready
// for every thread on return.
fn factor_and_solve(k: u32, t: u32) {
    for (var j = 0u; j < k; j = j + 1u) {
        if (t == 0u) {
            mat[j * LD + j] = sqrt(max(mat[j * LD + j], 1e-12));
        }
        workgroupBarrier();
        let djj = mat[j * LD + j];
        for (var r = j + 1u + t; r < k; r = r + GT) {
            mat[r * LD + j] = mat[r * LD + j] / djj;
        }
        workgroupBarrier();
        let rem = k - j - 1u;
        for (var idx = t; idx < rem * rem; idx = idx + GT) {
            let r = j + 1u + idx / rem;
            let c = j + 1u + idx % rem;
            if (c <= r) {
                mat[r * LD + c] = mat[r * LD + c] - mat[r * LD + j] * mat[c * LD + j];
            }
        }
        workgroupBarrier();
    }
    // The triangular solves on one thread (k ≤ 48).
    if (t == 0u) {
        for (var r = 0u; r < k; r = r + 1u) {
            var s = mat[k * LD + r];
            for (var c = 0u; c < r; c = c + 1u) {
                s = s - mat[r * LD + c] * zv[c];
            }
            zv[r] = s / mat[r * LD + r];
        }
        for (var rr = 0u; rr < k; rr = rr + 1u) {
            let r = k - 1u - rr;
            var s = zv[r];
            for (var c = r + 1u; c < k; c = c + 1u) {
                s = s - mat[c * LD + r] * zv[c];
            }
            zv[r] = s / mat[r * LD + r];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(64, 1, 1)
fn gains_ens_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = wg.x + wg.y * p.groups_x;
    if (i >= p.d) {
        return;
    }
    let t = lid.x;
    let n = p.n;
    let w = p.w;
    let base = i * w;
    let isq = sqrt(p.inv_n1);
    for (var e = t; e < LD * LD; e = e + GT) {
        mat[e] = 0.0;
    }
    // G over tiles of TE window entries: s_e and c_e, the scaled anomalies s_e·a_e (entries
    // innermost, so neighbouring threads read neighbouring components), then the tile's terms.
    for (var e0 = 0u; e0 < w; e0 = e0 + TE) {
        let te = min(TE, w - e0);
        if (t < te) {
            let e = e0 + t;
            let rho = taper[base + e];
            let q = min(u32(index[base + e]), p.m - 1u);
            let c = p.offset + q * p.every;
            col[t] = c;
            var s = 0.0;
            if (rho > 0.0) {
                s = sqrt(rho) * obs_derivative(p.pointwise, moments[p.d + c]) * p.inv_sigma;
            }
            scl[t] = s;
        }
        workgroupBarrier();
        for (var idx = t; idx < te * n; idx = idx + GT) {
            let k = idx / te;
            let ee = idx - k * te;
            let c = col[ee];
            tile[ee * LD + k] = scl[ee] * (fc[k * p.d + c] - moments[c]);
        }
        workgroupBarrier();
        for (var idx = t; idx < n * n; idx = idx + GT) {
            let r = idx / n;
            let c = idx - r * n;
            if (c <= r) {
                var acc = 0.0;
                for (var ee = 0u; ee < te; ee = ee + 1u) {
                    acc = fma(tile[ee * LD + r], tile[ee * LD + c], acc);
                }
                mat[r * LD + c] = mat[r * LD + c] + acc;
            }
        }
        workgroupBarrier();
    }

    // G/(n − 1) packed into `tile` (free once the sums are done) and the right-hand side
    // a_i/√(n − 1) in row n of `mat` (untouched by the factorization).
    for (var idx = t; idx < n * n; idx = idx + GT) {
        let r = idx / n;
        let c = idx - r * n;
        if (c <= r) {
            tile[r * (r + 1u) / 2u + c] = mat[r * LD + c] * p.inv_n1;
        }
    }
    for (var k = t; k < n; k = k + GT) {
        mat[n * LD + k] = (fc[k * p.d + i] - moments[i]) * isq;
    }
    workgroupBarrier();

    for (var st = 0u; st < p.stages; st = st + 1u) {
        factor_stage(n, st, t);

        // gain[s, i, e] = (√ρ_e/σ)·s_e·a_eᵀv_s/√(n − 1), one thread per entry.
        let out = (p.table0 + st) * p.d * w + base;
        for (var e = t; e < w; e = e + GT) {
            let rho = taper[base + e];
            var g = 0.0;
            if (rho > 0.0) {
                let q = min(u32(index[base + e]), p.m - 1u);
                let c = p.offset + q * p.every;
                let s = sqrt(rho) * obs_derivative(p.pointwise, moments[p.d + c]) * p.inv_sigma;
                let mc = moments[c];
                var acc = 0.0;
                for (var k = 0u; k < n; k = k + 1u) {
                    acc = fma(fc[k * p.d + c] - mc, zv[k], acc);
                }
                g = sqrt(rho) * p.inv_sigma * s * acc * isq;
            }
            gain[out + e] = g;
        }
    }
}
