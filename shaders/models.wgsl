// Runge–Kutta stages of the forecast models for every member at once (ENFF_SPEC §8.2, §8.3,
// §8.8). CPU twin: src/model/rk.rs::step with src/model/mod.rs::{Lorenz63, Lorenz96}::rhs,
// run over the members by src/backend/cpu/models.rs::advance.
//
// `stage`: kout = f(x + dt·(c1·k1 + c2·k2 + c3·k3)), the argument formed on the fly at every
// stencil point, so no temporary state is stored.
// `combine`: x ← x + dt·(c1·k1 + c2·k2 + c3·k3 + c4·k4).
// Parity test: tests/kernels.rs::model_kernels_match_the_cpu_runge_kutta.

// Rust mirror: src/backend/gpu/params.rs::ModelParams
struct ModelParams {
    rows: u32,
    d: u32,
    system: u32, // 0: Lorenz-63 (p0 = σ, p1 = ρ, p2 = β), 1: Lorenz-96 (p0 = F)
    _pad: u32,
    dt: f32,
    p0: f32,
    p1: f32,
    p2: f32,
    c1: f32,
    c2: f32,
    c3: f32,
    c4: f32,
}

@group(0) @binding(0) var<uniform> p: ModelParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> k1: array<f32>;
@group(0) @binding(3) var<storage, read> k2: array<f32>;
@group(0) @binding(4) var<storage, read> k3: array<f32>;
@group(0) @binding(5) var<storage, read_write> kout: array<f32>;

fn arg(e: u32) -> f32 {
    var s = 0.0;
    if (p.c1 != 0.0) {
        s = s + p.c1 * k1[e];
    }
    if (p.c2 != 0.0) {
        s = s + p.c2 * k2[e];
    }
    if (p.c3 != 0.0) {
        s = s + p.c3 * k3[e];
    }
    return x[e] + p.dt * s;
}

@compute @workgroup_size(256, 1, 1)
fn stage(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.d) {
        return;
    }
    let i = idx / p.d;
    let k = idx % p.d;
    let row = i * p.d;
    if (p.system == 0u) {
        let a0 = arg(row);
        let a1 = arg(row + 1u);
        let a2 = arg(row + 2u);
        if (k == 0u) {
            kout[idx] = p.p0 * (a1 - a0);
        } else if (k == 1u) {
            kout[idx] = a0 * (p.p1 - a2) - a1;
        } else {
            kout[idx] = a0 * a1 - p.p2 * a2;
        }
    } else {
        let km2 = (k + p.d - 2u) % p.d;
        let km1 = (k + p.d - 1u) % p.d;
        let kp1 = (k + 1u) % p.d;
        kout[idx] = (arg(row + kp1) - arg(row + km2)) * arg(row + km1) - arg(idx) + p.p0;
    }
}

@compute @workgroup_size(256, 1, 1)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.d) {
        return;
    }
    x[idx] = x[idx] + p.dt * (p.c1 * k1[idx] + p.c2 * k2[idx] + p.c3 * k3[idx] + p.c4 * kout[idx]);
}
