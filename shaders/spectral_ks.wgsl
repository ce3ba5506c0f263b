// Kuramoto–Sivashinsky forecast in Fourier space (ETDRK4, ENFF_SPEC §8.4) for every member at
// once; the complex FFTs are shaders/spectral_fft.wgsl.
// CPU twins: src/backend/cpu/spectral.rs::{unpack_forward, pack_inverse, etdrk4_stage}.
//
// `spec` holds seven spectra per member, slot after slot (v, n1, n2a, n2b, n3, a, bc), each
// `batch · bins` complex values (bins = m + 1 for real length d = 2m). `packed` is a packed
// half-length spectrum per member (m complex values). `coef` holds e, e2, q, f1, f2, f3, g
// (bins values each); `rtw` the real-FFT twiddles e^{−2πik/d}, k ≤ m.
// Parity test: tests/ks_ns.rs::gpu_ks_forecast_matches_the_cpu_model.

// Rust mirror: src/backend/gpu/spectral.rs::KsParams
struct KsParams {
    m: u32,
    batch: u32,
    mode: u32, // unpack: 0 plain, 1 nonlinear (i·g·X); stage: 0..3 (see etdrk4_stage)
    slot: u32, // spectrum slot read (pack) or written (unpack)
    scale: f32, // 1 / d
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: KsParams;
@group(0) @binding(1) var<storage, read_write> spec: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> packed: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> coef: array<f32>;
@group(0) @binding(4) var<storage, read> rtw: array<vec2<f32>>;

fn cmul(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

fn thread_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256, 1, 1)
fn unpack_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = thread_index(gid, nwg);
    let bins = p.m + 1u;
    if (t >= p.batch * bins) {
        return;
    }
    let b = t / bins;
    let k = t % bins;
    let zk = packed[b * p.m + k % p.m];
    let zc = packed[b * p.m + (p.m - k) % p.m];
    let zmk = vec2<f32>(zc.x, -zc.y);
    let e = (zk + zmk) * 0.5;
    let dd = (zk - zmk) * 0.5;
    let o = vec2<f32>(dd.y, -dd.x);
    var x = e + cmul(rtw[k], o);
    if (p.mode == 1u) {
        let g = coef[6u * bins + k];
        x = vec2<f32>(-x.y * g, x.x * g);
    }
    spec[p.slot * p.batch * bins + t] = x;
}

@compute @workgroup_size(256, 1, 1)
fn pack_inverse(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = thread_index(gid, nwg);
    if (t >= p.batch * p.m) {
        return;
    }
    let bins = p.m + 1u;
    let b = t / p.m;
    let k = t % p.m;
    let base = p.slot * p.batch * bins + b * bins;
    var z: vec2<f32>;
    if (k == 0u) {
        let a0 = spec[base].x;
        let am = spec[base + p.m].x;
        z = vec2<f32>((a0 + am) * p.scale, (a0 - am) * p.scale);
    } else {
        let xk = spec[base + k];
        let xm = spec[base + p.m - k];
        let xmk = vec2<f32>(xm.x, -xm.y);
        let e = xk + xmk;
        let w = rtw[k];
        let o = cmul(xk - xmk, vec2<f32>(w.x, -w.y));
        z = vec2<f32>((e.x - o.y) * p.scale, (e.y + o.x) * p.scale);
    }
    packed[t] = z;
}

@compute @workgroup_size(256, 1, 1)
fn stage(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = thread_index(gid, nwg);
    let bins = p.m + 1u;
    let slot = p.batch * bins;
    if (t >= slot) {
        return;
    }
    let k = t % bins;
    let v = spec[t];
    if (p.mode == 0u) {
        spec[5u * slot + t] = v * coef[bins + k] + spec[slot + t] * coef[2u * bins + k];
    } else if (p.mode == 1u) {
        spec[6u * slot + t] = v * coef[bins + k] + spec[2u * slot + t] * coef[2u * bins + k];
    } else if (p.mode == 2u) {
        let w = spec[3u * slot + t] * 2.0 - spec[slot + t];
        spec[6u * slot + t] = spec[5u * slot + t] * coef[bins + k] + w * coef[2u * bins + k];
    } else {
        let s1 = v * coef[k] + spec[slot + t] * coef[3u * bins + k];
        let s2 = s1 + (spec[2u * slot + t] + spec[3u * slot + t]) * (2.0 * coef[4u * bins + k]);
        spec[t] = s2 + spec[4u * slot + t] * coef[5u * bins + k];
    }
}
