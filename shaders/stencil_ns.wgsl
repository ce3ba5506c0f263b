// 2-D incompressible Navier–Stokes, Chorin projection (ENFF_SPEC §8.5), for every member and
// grid cell at once. CPU twin: src/model/ns.rs (predictor_point, divergence_row, jacobi_row,
// correction_row), same operations in the same order.
//
// Member r's state is (p, u, v) at x[r·3n² ..], channel-major, cell (i, j) at i·n + j (i the
// x index, j the y index), periodic. Its scratch (u*, v*, b, p_tmp) is at s[r·4n² ..].
// Parity test: tests/ks_ns.rs::gpu_ns_forecast_matches_the_cpu_model_and_projects.

// Rust mirror: src/backend/gpu/stencil.rs::NsParams
struct NsParams {
    n: u32,
    rows: u32,
    mode: u32, // jacobi: 0 p → p_tmp, 1 p_tmp → p; correct: 0 p in x, 1 p in p_tmp (copied to x)
    _pad: u32,
    dt: f32,
    nu: f32,
    inv_2h: f32,
    inv_h2: f32,
    inv_dt: f32,
    g: f32, // dt / 2h
    cx: f32,
    cy: f32,
    cb: f32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> p: NsParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> s: array<f32>;
@group(0) @binding(3) var<storage, read> forcing: array<f32>;

struct Cell {
    r: u32,
    i: u32,
    j: u32,
    c: u32,  // i·n + j
    ip: u32, // (i+1)·n + j
    im: u32, // (i−1)·n + j
    jp: u32, // i·n + j+1
    jm: u32, // i·n + j−1
    ok: bool,
}

fn cell(gid: vec3<u32>, nwg: vec3<u32>) -> Cell {
    let t = gid.x + gid.y * nwg.x * 256u;
    let n = p.n;
    let nn = n * n;
    var q: Cell;
    q.ok = t < p.rows * nn;
    let tt = min(t, p.rows * nn - 1u);
    q.r = tt / nn;
    q.c = tt % nn;
    q.i = q.c / n;
    q.j = q.c % n;
    q.ip = ((q.i + 1u) % n) * n + q.j;
    q.im = ((q.i + n - 1u) % n) * n + q.j;
    q.jp = q.i * n + (q.j + 1u) % n;
    q.jm = q.i * n + (q.j + n - 1u) % n;
    return q;
}

@compute @workgroup_size(256, 1, 1)
fn predict(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = cell(gid, nwg);
    if (!q.ok) {
        return;
    }
    let nn = p.n * p.n;
    let u = q.r * 3u * nn + nn;
    let v = u + nn;
    let uc = x[u + q.c];
    let ul = x[u + q.jm];
    let ur = x[u + q.jp];
    let up = x[u + q.ip];
    let um = x[u + q.im];
    let vc = x[v + q.c];
    let vl = x[v + q.jm];
    let vr = x[v + q.jp];
    let vp = x[v + q.ip];
    let vm = x[v + q.im];
    let ux = (up - um) * p.inv_2h;
    let uy = (ur - ul) * p.inv_2h;
    let vx = (vp - vm) * p.inv_2h;
    let vy = (vr - vl) * p.inv_2h;
    let au = uc * ux + vc * uy;
    let av = uc * vx + vc * vy;
    let lu = (up + um - 2.0 * uc) * p.inv_h2 + (ur + ul - 2.0 * uc) * p.inv_h2;
    let lv = (vp + vm - 2.0 * vc) * p.inv_h2 + (vr + vl - 2.0 * vc) * p.inv_h2;
    let sb = q.r * 4u * nn;
    s[sb + q.c] = uc + p.dt * (p.nu * lu - au + forcing[q.j]);
    s[sb + nn + q.c] = vc + p.dt * (p.nu * lv - av);
}

@compute @workgroup_size(256, 1, 1)
fn divergence(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = cell(gid, nwg);
    if (!q.ok) {
        return;
    }
    let nn = p.n * p.n;
    let us = q.r * 4u * nn;
    let vs = us + nn;
    s[vs + nn + q.c] = ((s[us + q.ip] - s[us + q.im]) * p.inv_2h + (s[vs + q.jp] - s[vs + q.jm]) * p.inv_2h) * p.inv_dt;
}

@compute @workgroup_size(256, 1, 1)
fn jacobi(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = cell(gid, nwg);
    if (!q.ok) {
        return;
    }
    let nn = p.n * p.n;
    let xp = q.r * 3u * nn;
    let b = q.r * 4u * nn + 2u * nn;
    let pt = b + nn;
    if (p.mode == 0u) {
        s[pt + q.c] = p.cx * (x[xp + q.ip] + x[xp + q.im]) + p.cy * (x[xp + q.jp] + x[xp + q.jm]) - p.cb * s[b + q.c];
    } else {
        x[xp + q.c] = p.cx * (s[pt + q.ip] + s[pt + q.im]) + p.cy * (s[pt + q.jp] + s[pt + q.jm]) - p.cb * s[b + q.c];
    }
}

@compute @workgroup_size(256, 1, 1)
fn correct(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = cell(gid, nwg);
    if (!q.ok) {
        return;
    }
    let nn = p.n * p.n;
    let xp = q.r * 3u * nn;
    let us = q.r * 4u * nn;
    let vs = us + nn;
    var dpx: f32;
    var dpy: f32;
    if (p.mode == 0u) {
        dpx = x[xp + q.ip] - x[xp + q.im];
        dpy = x[xp + q.jp] - x[xp + q.jm];
    } else {
        let pt = us + 3u * nn;
        dpx = s[pt + q.ip] - s[pt + q.im];
        dpy = s[pt + q.jp] - s[pt + q.jm];
        x[xp + q.c] = s[pt + q.c];
    }
    x[xp + nn + q.c] = s[us + q.c] - p.g * dpx;
    x[xp + 2u * nn + q.c] = s[vs + q.c] - p.g * dpy;
}
