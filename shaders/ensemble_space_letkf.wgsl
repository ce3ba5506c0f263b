// Batched LETKF (ENFF_SPEC §6.5): one workgroup per grid cell does the local ensemble-space
// analysis of every component of that cell, in place.
// CPU twin: src/backend/cpu/ensemble_space.rs::letkf_analysis (same enumeration order, same
// f32 cyclic Jacobi eigen-solver).
//
// Layout: `fields` components on each cell of an nx x ny periodic grid (a ring: ny = 1);
// component f * nx*ny + cell. Observation q sits at component offset + q * every.
// For the cell: C = Σ_q ρ_q ã_q ã_qᵀ/σ² + (n-1) I, b = Σ_q ρ_q ã_q (y_q - ȳ_q)/σ² over the
// local observations (Gaspari-Cohn ρ_q > 1e-6 at grid distance ≤ reach), C = V Λ Vᵀ by cyclic
// Jacobi, w = C⁻¹ b, T = √(n-1) C^{-1/2}; each component: x̄_a = x̄ + w·a, x_a,i = x̄_a + (T a)_i.
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
        if (t < n) {
            col[t] = x[t * p.d + k];
        }
        workgroupBarrier();
        var s = 0.0;
        for (var i = 0u; i < n; i = i + 1u) {
            s = s + col[i];
        }
        let mean = s / f32(n);
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
