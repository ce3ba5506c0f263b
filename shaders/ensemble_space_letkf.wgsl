// Batched LETKF (ENFF_SPEC §6.5): one workgroup per grid cell does the local ensemble-space
// analysis of every component of that cell, in place.
// CPU twin: src/backend/cpu/ensemble_space.rs::letkf_analysis (same enumeration order, same
// f32 cyclic Jacobi eigen-solver).
//
// Layout: `fields` components on each cell of an nx x ny periodic grid (a ring: ny = 1);
// component f * nx*ny + cell. Observation q sits at component offset + q * every.
// For the cell: C = Σ_q ρ_q ã_q ã_qᵀ/σ² + (n-1) I, b = Σ_q ρ_q ã_q (y_q - ȳ_q)/σ² over the
// local observations (Gaspari-Cohn ρ_q > 1e-6 at grid distance ≤ reach). Each component's
// anomalies a get x̄_a = x̄ + bᵀC⁻¹a and x_a,i = x̄_a + (√(n-1) C^{-1/2} a)_i, by one of two
// paths (uniform per workgroup): where a Gershgorin/trace bound λ̄ of C - (n-1) I allows a
// Chebyshev degree ≤ 2n + 8 (the spread not far above the observation noise), both matrix
// functions applied to a by the Chebyshev recurrence (one matrix-vector product per degree);
// otherwise C = V Λ Vᵀ by cyclic Jacobi, w = C⁻¹ b, T = √(n-1) C^{-1/2}.
// The twin computes the degree per block of 16 cells (the highest); both are accurate to f32.
// Parity test: tests/ensemble_space.rs::batched_letkf_matches_the_cpu_twin.

// Rust mirror: src/backend/gpu/ensemble_space.rs::LetkfParams
struct LetkfParams {
    n: u32,
    d: u32,
    m: u32,
    nx: u32,
    ny: u32,
    fields: u32,
    every: u32,
    offset: u32,
    groups_x: u32,
    reach_cells: u32,
    _pad0: u32,
    _pad1: u32,
    radius: f32,
    reach: f32,
    inv_s2: f32,
    n1: f32,
}

@group(0) @binding(0) var<uniform> p: LetkfParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> hx: array<f32>;
@group(0) @binding(3) var<storage, read> y: array<f32>;

const WG: u32 = 64u;
const RHO_MIN: f32 = 1e-6;
const MAX_SWEEPS: u32 = 10u;
const TOL: f32 = 1e-12;
const EIG_FLOOR: f32 = 1e-9;

// n x n matrices (n ≤ 32): C, then T; and the eigenvectors V.
var<workgroup> cm: array<f32, 1024>;
var<workgroup> vm: array<f32, 1024>;
var<workgroup> col: array<f32, 32>;
var<workgroup> bv: array<f32, 32>;
var<workgroup> lam: array<f32, 32>;
var<workgroup> sq: array<f32, 32>;
var<workgroup> tmp: array<f32, 32>;
var<workgroup> wv: array<f32, 32>;
var<workgroup> rot: vec2<f32>;
var<workgroup> done: u32;
// Chebyshev path: coefficients (degree ≤ 2·32 + 8), the shared vector v_k, degree and bound.
const MAX_TERMS: u32 = 73u;
const CHEB_TOL: f32 = 1e-6;
const PI: f32 = 3.14159265358979;
var<workgroup> c1s: array<f32, MAX_TERMS>;
var<workgroup> c2s: array<f32, MAX_TERMS>;
var<workgroup> vc: array<f32, 32>;
var<workgroup> deg: u32;
var<workgroup> lamb: f32;

// Chebyshev degree for C - (n-1) I with spectrum in [0, lam]; twin:
// src/backend/cpu/ensemble_space.rs::letkf_chebyshev_degree (0xffffffff: not finite).
fn cheb_degree(lam: f32, n1: f32) -> u32 {
    if (!(abs(lam) <= 3.0e38)) {
        return 0xffffffffu;
    }
    let beta = max(lam, 0.0) / n1;
    if (beta < 1e-6) {
        return 3u;
    }
    let x0 = 1.0 + 2.0 / beta;
    let rho = x0 + sqrt(x0 * x0 - 1.0);
    let lead = 2.0 / sqrt(1.0 + beta) * rho / (rho - 1.0);
    let m = ceil(log(lead / CHEB_TOL) / log(rho));
    if (!(m < 1e6)) {
        return 0xffffffffu;
    }
    return u32(max(m, 1.0)) + 2u;
}

// cos(k θ_j) at the nodes θ_j = π(j + ½)/N, the argument reduced exactly; twin: letkf_node_cos.
fn node_cos(k: u32, j: u32, nodes: u32) -> f32 {
    let r = ((2u * j + 1u) * k) % (4u * nodes);
    return cos(PI * f32(r) / f32(2u * nodes));
}

fn gaspari_cohn(dist: f32, radius: f32) -> f32 {
    let z = abs(dist) / (1.82 * radius);
    var v = 0.0;
    if (z < 1.0) {
        v = 1.0 - 5.0 / 3.0 * z * z + 5.0 / 8.0 * z * z * z + 0.5 * pow(z, 4.0) - 0.25 * pow(z, 5.0);
    } else if (z < 2.0) {
        v = pow(z, 5.0) / 12.0 - 0.5 * pow(z, 4.0) + 5.0 / 8.0 * z * z * z + 5.0 / 3.0 * z * z - 5.0 * z + 4.0 - 2.0 / (3.0 * z);
    }
    return clamp(v, 0.0, 1.0);
}

// (c, s) of the Jacobi rotation that zeroes a_pq.
fn rotation(app: f32, aqq: f32, apq: f32) -> vec2<f32> {
    if (abs(apq) < 1e-30) {
        return vec2<f32>(1.0, 0.0);
    }
    let theta = (aqq - app) / (2.0 * apq);
    var t: f32;
    if (abs(theta) > 1e18) {
        t = 0.5 / theta;
    } else {
        let sgn = select(1.0, -1.0, theta < 0.0);
        t = sgn / (abs(theta) + sqrt(theta * theta + 1.0));
    }
    let c = 1.0 / sqrt(t * t + 1.0);
    return vec2<f32>(c, t * c);
}

// Loads component k of every member into col (thread t < n loads member t) and returns the
// member mean; called by every thread of the workgroup (it holds a barrier). Twin:
// ensemble_space.rs::field_anomalies.
fn load_component(k: u32, t: u32, n: u32) -> f32 {
    if (t < n) {
        col[t] = x[t * p.d + k];
    }
    workgroupBarrier();
    var s = 0.0;
    for (var i = 0u; i < n; i = i + 1u) {
        s = s + col[i];
    }
    return s / f32(n);
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let cells = p.nx * p.ny;
    let cell = wg.x + wg.y * p.groups_x;
    if (cell >= cells) {
        return;
    }
    let t = lid.x;
    let n = p.n;
    let nn = n * n;
    for (var e = t; e < nn; e = e + WG) {
        cm[e] = 0.0;
    }
    if (t < n) {
        bv[t] = 0.0;
    }

    // Accumulate C and b over the local observations (uniform enumeration).
    let r = i32(p.reach_cells);
    let nx = i32(p.nx);
    let ny = i32(p.ny);
    let lo_x = min(r, (nx - 1) / 2);
    let hi_x = min(r, nx / 2);
    let lo_y = min(r, (ny - 1) / 2);
    let hi_y = min(r, ny / 2);
    let r0 = i32(cell / p.ny);
    let c0 = i32(cell % p.ny);
    for (var dr = -lo_x; dr <= hi_x; dr = dr + 1) {
        for (var dc = -lo_y; dc <= hi_y; dc = dc + 1) {
            let dist = sqrt(f32(dr * dr + dc * dc));
            if (dist > p.reach) {
                continue;
            }
            let rho = gaspari_cohn(dist, p.radius);
            if (rho <= RHO_MIN) {
                continue;
            }
            let c = u32(((r0 + dr + nx) % nx) * ny + (c0 + dc + ny) % ny);
            for (var f = 0u; f < p.fields; f = f + 1u) {
                let comp = f * cells + c;
                if (comp < p.offset) {
                    continue;
                }
                let rel = comp - p.offset;
                if (rel % p.every != 0u || rel / p.every >= p.m) {
                    continue;
                }
                let q = rel / p.every;
                workgroupBarrier();
                if (t < n) {
                    col[t] = hx[t * p.m + q];
                }
                workgroupBarrier();
                var s = 0.0;
                for (var i = 0u; i < n; i = i + 1u) {
                    s = s + col[i];
                }
                let yb = s / f32(n);
                let wq = rho * p.inv_s2;
                for (var e = t; e < nn; e = e + WG) {
                    let i = e / n;
                    let j = e % n;
                    cm[e] = cm[e] + wq * (col[i] - yb) * (col[j] - yb);
                }
                if (t < n) {
                    bv[t] = bv[t] + wq * (col[t] - yb) * (y[q] - yb);
                }
            }
        }
    }
    workgroupBarrier();
    for (var e = t; e < nn; e = e + WG) {
        let i = e / n;
        let j = e % n;
        if (i == j) {
            cm[e] = cm[e] + p.n1;
            vm[e] = 1.0;
        } else {
            vm[e] = 0.0;
        }
    }
    workgroupBarrier();

    // Chebyshev path: the degree from λ̄ = min(trace, largest absolute row sum) of C - (n-1) I.
    if (t == 0u) {
        var trace = 0.0;
        var gersh = 0.0;
        for (var i = 0u; i < n; i = i + 1u) {
            var row = 0.0;
            for (var j = 0u; j < n; j = j + 1u) {
                row = row + abs(cm[i * n + j] - select(0.0, p.n1, i == j));
            }
            trace = trace + (cm[i * n + i] - p.n1);
            gersh = max(gersh, row);
        }
        let lam = min(trace, gersh);
        lamb = lam;
        var m = cheb_degree(lam, p.n1);
        if (m > 2u * n + 8u) {
            m = 0u;
        }
        deg = m;
    }
    let m = workgroupUniformLoad(&deg);
    if (m > 0u) {
        let lam = lamb;
        let beta = max(lam, 0.0) / p.n1;
        let nodes = m + 1u;
        for (var k = t; k < nodes; k = k + WG) {
            var s1 = 0.0;
            var s2 = 0.0;
            for (var j = 0u; j < nodes; j = j + 1u) {
                let xn = node_cos(1u, j, nodes);
                let g1 = 1.0 / (1.0 + 0.5 * beta * (xn + 1.0));
                let ck = node_cos(k, j, nodes);
                s1 = s1 + g1 * ck;
                s2 = s2 + sqrt(g1) * ck;
            }
            c1s[k] = 2.0 / f32(nodes) * s1;
            c2s[k] = 2.0 / f32(nodes) * s2;
        }
        let scale = select(0.0, 2.0 / lam, lam > 0.0);
        workgroupBarrier();
        for (var f = 0u; f < p.fields; f = f + 1u) {
            let k = f * cells + cell;
            let mean = load_component(k, t, n);
            var a = 0.0;
            if (t < n) {
                a = col[t] - mean;
                vc[t] = a;
            }
            workgroupBarrier();
            // v_0 = a (private prev), v_1 = M a with M = scale (C - (n-1) I) - I.
            var prev = a;
            var cur = 0.0;
            var r1 = 0.0;
            var r2 = 0.0;
            if (t < n) {
                var acc = 0.0;
                for (var j = 0u; j < n; j = j + 1u) {
                    acc = acc + cm[t * n + j] * vc[j];
                }
                cur = scale * (acc - p.n1 * a) - a;
                r1 = 0.5 * c1s[0] * a + c1s[1] * cur;
                r2 = 0.5 * c2s[0] * a + c2s[1] * cur;
            }
            workgroupBarrier();
            if (t < n) {
                vc[t] = cur;
            }
            workgroupBarrier();
            for (var kk = 2u; kk < nodes; kk = kk + 1u) {
                var nxt = 0.0;
                if (t < n) {
                    var acc = 0.0;
                    for (var j = 0u; j < n; j = j + 1u) {
                        acc = acc + cm[t * n + j] * vc[j];
                    }
                    let mv = scale * (acc - p.n1 * cur) - cur;
                    nxt = 2.0 * mv - prev;
                    r1 = r1 + c1s[kk] * nxt;
                    r2 = r2 + c2s[kk] * nxt;
                }
                workgroupBarrier();
                if (t < n) {
                    vc[t] = nxt;
                    prev = cur;
                    cur = nxt;
                }
                workgroupBarrier();
            }
            // x̄_a = x̄ + b·r1/(n-1) (r1 = (n-1) C⁻¹a), x_a,t = x̄_a + r2 (r2 = √(n-1) C^{-1/2} a).
            if (t < n) {
                tmp[t] = bv[t] * r1;
            }
            workgroupBarrier();
            var wa = 0.0;
            for (var i = 0u; i < n; i = i + 1u) {
                wa = wa + tmp[i];
            }
            if (t < n) {
                x[t * p.d + k] = (mean + wa / p.n1) + r2;
            }
            workgroupBarrier();
        }
        return;
    }

    // Cyclic Jacobi: a <- Jᵀ a J as a row pass then a column pass; V <- V J.
    for (var sweep = 0u; sweep < MAX_SWEEPS; sweep = sweep + 1u) {
        if (t == 0u) {
            var off = 0.0;
            var dg = 0.0;
            for (var i = 0u; i < n; i = i + 1u) {
                dg = dg + cm[i * n + i] * cm[i * n + i];
                for (var j = i + 1u; j < n; j = j + 1u) {
                    off = off + cm[i * n + j] * cm[i * n + j];
                }
            }
            done = select(0u, 1u, off <= TOL * dg);
        }
        if (workgroupUniformLoad(&done) == 1u) {
            break;
        }
        for (var pp = 0u; pp + 1u < n; pp = pp + 1u) {
            for (var qq = pp + 1u; qq < n; qq = qq + 1u) {
                if (t == 0u) {
                    rot = rotation(cm[pp * n + pp], cm[qq * n + qq], cm[pp * n + qq]);
                }
                workgroupBarrier();
                let cs = rot;
                if (t < n) {
                    let apt = cm[pp * n + t];
                    let aqt = cm[qq * n + t];
                    cm[pp * n + t] = cs.x * apt - cs.y * aqt;
                    cm[qq * n + t] = cs.y * apt + cs.x * aqt;
                }
                workgroupBarrier();
                if (t < n) {
                    let atp = cm[t * n + pp];
                    let atq = cm[t * n + qq];
                    cm[t * n + pp] = cs.x * atp - cs.y * atq;
                    cm[t * n + qq] = cs.y * atp + cs.x * atq;
                    let vtp = vm[t * n + pp];
                    let vtq = vm[t * n + qq];
                    vm[t * n + pp] = cs.x * vtp - cs.y * vtq;
                    vm[t * n + qq] = cs.y * vtp + cs.x * vtq;
                }
                workgroupBarrier();
            }
        }
    }

    // w = V Λ⁻¹ Vᵀ b, T = V diag(√(n1/λ)) Vᵀ (into cm).
    if (t < n) {
        lam[t] = max(cm[t * n + t], EIG_FLOOR);
        sq[t] = sqrt(p.n1 / lam[t]);
    }
    workgroupBarrier();
    if (t < n) {
        var s = 0.0;
        for (var i = 0u; i < n; i = i + 1u) {
            s = s + vm[i * n + t] * bv[i];
        }
        tmp[t] = s / lam[t];
    }
    workgroupBarrier();
    if (t < n) {
        var s = 0.0;
        for (var l = 0u; l < n; l = l + 1u) {
            s = s + vm[t * n + l] * tmp[l];
        }
        wv[t] = s;
    }
    for (var e = t; e < nn; e = e + WG) {
        let i = e / n;
        let j = e % n;
        var s = 0.0;
        for (var l = 0u; l < n; l = l + 1u) {
            s = s + vm[i * n + l] * vm[j * n + l] * sq[l];
        }
        cm[e] = s;
    }
    workgroupBarrier();

    // Apply to every component of the cell.
    for (var f = 0u; f < p.fields; f = f + 1u) {
        let k = f * cells + cell;
        let mean = load_component(k, t, n);
        if (t < n) {
            var wa = 0.0;
            var ta = 0.0;
            for (var j = 0u; j < n; j = j + 1u) {
                let aj = col[j] - mean;
                wa = wa + wv[j] * aj;
                ta = ta + cm[t * n + j] * aj;
            }
            x[t * p.d + k] = (mean + wa) + ta;
        }
        workgroupBarrier();
    }
}
