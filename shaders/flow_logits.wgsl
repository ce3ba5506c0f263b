// Pairwise log-weight distances of the EnFF Monte-Carlo velocity (ENFF_SPEC §2.2).
// CPU twin: src/backend/cpu/flow.rs::flow_logits.
//
// Pass 1 (`distances`): every workgroup owns a TILE x TILE block of (member i, mean j) pairs and
// one slab of state components; it writes Σ_k (x_ik − μ_jk)² over its slab, summed from the
// differences (never ‖x‖² + ‖μ‖² − 2x·μ), into partial[slab][i][j].
// Pass 2 (`reduce`): ℓ_ij = −Σ_slab partial / (2 s²) + bias_j.
// μ_jk = a·target_jk + b·source_jk is formed on the fly while the tile is loaded.
// Parity test: tests/kernels.rs::flow_logits_match_the_cpu_twin.

// Rust mirror: src/backend/gpu/params.rs::LogitParams
struct LogitParams {
    n_x: u32,        // rows of this x chunk
    n_t: u32,        // rows of this target/source chunk
    d: u32,          // state dimension
    slab_len: u32,   // components per slab (multiple of TK)
    n_total: u32,    // n: leading dimension of partial and logits
    row0_x: u32,     // global member index of the first x row
    row0_t: u32,     // global member index of the first target row
    n_slabs: u32,    // number of slabs
    a: f32,          // weight of the target in μ
    b: f32,          // weight of the source in μ
    has_source: u32, // 0: source binding is a placeholder
    has_bias: u32,   // 0: bias binding is a placeholder
    neg_inv_2s2: f32, // −1 / (2 s²)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const TILE: u32 = 32u;
const TK: u32 = 32u;
const STRIDE: u32 = 33u; // TILE + 1: conflict-free shared-memory stores

@group(0) @binding(0) var<uniform> p: LogitParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> tgt: array<f32>;
@group(0) @binding(3) var<storage, read> src: array<f32>;
@group(0) @binding(4) var<storage, read_write> partial: array<f32>;

var<workgroup> xs: array<f32, 1056>; // TK * STRIDE, k-major: xs[c * STRIDE + r]
var<workgroup> ms: array<f32, 1056>;

@compute @workgroup_size(16, 16, 1)
fn distances(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ti0 = wg.x * TILE;
    let tj0 = wg.y * TILE;
    let slab = wg.z;
    let k_begin = slab * p.slab_len;
    let k_end = min(p.d, k_begin + p.slab_len);
    let flat = lid.y * 16u + lid.x;
    var a00 = 0.0;
    var a01 = 0.0;
    var a10 = 0.0;
    var a11 = 0.0;
    let r0 = lid.y * 2u;
    let c0 = lid.x * 2u;
    for (var k0 = k_begin; k0 < k_end; k0 = k0 + TK) {
        for (var e = 0u; e < 4u; e = e + 1u) {
            let idx = flat + e * 256u;
            let r = idx / TK;
            let c = idx % TK;
            let k = k0 + c;
            var xv = 0.0;
            var mv = 0.0;
            let gi = ti0 + r;
            if (gi < p.n_x && k < k_end) {
                xv = x[gi * p.d + k];
            }
            let gj = tj0 + r;
            if (gj < p.n_t && k < k_end) {
                mv = p.a * tgt[gj * p.d + k];
                if (p.has_source != 0u) {
                    mv = mv + p.b * src[gj * p.d + k];
                }
            }
            xs[c * STRIDE + r] = xv;
            ms[c * STRIDE + r] = mv;
        }
        workgroupBarrier();
        for (var c = 0u; c < TK; c = c + 1u) {
            let x0 = xs[c * STRIDE + r0];
            let x1 = xs[c * STRIDE + r0 + 1u];
            let m0 = ms[c * STRIDE + c0];
            let m1 = ms[c * STRIDE + c0 + 1u];
            let d00 = x0 - m0;
            let d01 = x0 - m1;
            let d10 = x1 - m0;
            let d11 = x1 - m1;
            a00 = fma(d00, d00, a00);
            a01 = fma(d01, d01, a01);
            a10 = fma(d10, d10, a10);
            a11 = fma(d11, d11, a11);
        }
        workgroupBarrier();
    }
    let i0 = ti0 + r0;
    let j0 = tj0 + c0;
    let base = slab * p.n_total * p.n_total;
    if (i0 < p.n_x && j0 < p.n_t) {
        partial[base + (p.row0_x + i0) * p.n_total + p.row0_t + j0] = a00;
    }
    if (i0 < p.n_x && j0 + 1u < p.n_t) {
        partial[base + (p.row0_x + i0) * p.n_total + p.row0_t + j0 + 1u] = a01;
    }
    if (i0 + 1u < p.n_x && j0 < p.n_t) {
        partial[base + (p.row0_x + i0 + 1u) * p.n_total + p.row0_t + j0] = a10;
    }
    if (i0 + 1u < p.n_x && j0 + 1u < p.n_t) {
        partial[base + (p.row0_x + i0 + 1u) * p.n_total + p.row0_t + j0 + 1u] = a11;
    }
}

// Pass 2 bindings (separate entry point, same layout slots reused differently).
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> logits: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    let nn = p.n_total * p.n_total;
    if (idx >= nn) {
        return;
    }
    // Neumaier-compensated sum over slabs: the common part of the distances is large and only
    // differences between j matter, so keep the f32 rounding of this sum small.
    var s = 0.0;
    var comp = 0.0;
    for (var slab = 0u; slab < p.n_slabs; slab = slab + 1u) {
        let v = partial[slab * nn + idx];
        let t = s + v;
        if (abs(s) >= abs(v)) {
            comp = comp + ((s - t) + v);
        } else {
            comp = comp + ((v - t) + s);
        }
        s = t;
    }
    var l = (s + comp) * p.neg_inv_2s2;
    if (p.has_bias != 0u) {
        l = l + bias[idx % p.n_total];
    }
    logits[idx] = l;
}

// Large-n variant of pass 1: 64 x 64 pairs per workgroup, 4 x 4 per invocation, for ensembles
// where the computation, not memory traffic, bounds the time. Same output as `distances`.
const BIG: u32 = 64u;
const BK: u32 = 16u;
const BSTRIDE: u32 = 65u; // BIG + 1
var<workgroup> bxs: array<f32, 1040>; // BK * BSTRIDE, k-major
var<workgroup> bms: array<f32, 1040>;

@compute @workgroup_size(16, 16, 1)
fn distances_big(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ti0 = wg.x * BIG;
    let tj0 = wg.y * BIG;
    let slab = wg.z;
    let k_begin = slab * p.slab_len;
    let k_end = min(p.d, k_begin + p.slab_len);
    let flat = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    for (var q = 0u; q < 16u; q = q + 1u) {
        acc[q] = 0.0;
    }
    for (var k0 = k_begin; k0 < k_end; k0 = k0 + BK) {
        for (var e = 0u; e < 4u; e = e + 1u) {
            let idx = flat + e * 256u;
            let r = idx / BK;
            let c = idx % BK;
            let k = k0 + c;
            var xv = 0.0;
            var mv = 0.0;
            let gi = ti0 + r;
            if (gi < p.n_x && k < k_end) {
                xv = x[gi * p.d + k];
            }
            let gj = tj0 + r;
            if (gj < p.n_t && k < k_end) {
                mv = p.a * tgt[gj * p.d + k];
                if (p.has_source != 0u) {
                    mv = mv + p.b * src[gj * p.d + k];
                }
            }
            bxs[c * BSTRIDE + r] = xv;
            bms[c * BSTRIDE + r] = mv;
        }
        workgroupBarrier();
        for (var c = 0u; c < BK; c = c + 1u) {
            var xr: array<f32, 4>;
            var mc: array<f32, 4>;
            for (var q = 0u; q < 4u; q = q + 1u) {
                xr[q] = bxs[c * BSTRIDE + lid.y + 16u * q];
                mc[q] = bms[c * BSTRIDE + lid.x + 16u * q];
            }
            for (var r = 0u; r < 4u; r = r + 1u) {
                for (var q = 0u; q < 4u; q = q + 1u) {
                    let dv = xr[r] - mc[q];
                    acc[r * 4u + q] = fma(dv, dv, acc[r * 4u + q]);
                }
            }
        }
        workgroupBarrier();
    }
    let base = slab * p.n_total * p.n_total;
    for (var r = 0u; r < 4u; r = r + 1u) {
        let i = ti0 + lid.y + 16u * r;
        for (var q = 0u; q < 4u; q = q + 1u) {
            let j = tj0 + lid.x + 16u * q;
            if (i < p.n_x && j < p.n_t) {
                partial[base + (p.row0_x + i) * p.n_total + p.row0_t + j] = acc[r * 4u + q];
            }
        }
    }
}
