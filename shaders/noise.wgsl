// Philox4x32-10 + Box–Muller normal noise: out = mean + scale · z(key, member, component).
// CPU twin: src/rng.rs (philox4x32_10, box_muller, fill_normal_row) and
// src/backend/cpu/noise.rs::fill_normal. Same counter layout, so both draw the same numbers
// (Box–Muller is evaluated in f32 here and in f64 on the CPU: they agree to ~1e-6).
// Parity test: tests/kernels.rs::fill_normal_matches_the_cpu_philox_stream.

// Rust mirror: src/backend/gpu/params.rs::NoiseParams
struct NoiseParams {
    key0: u32,
    key1: u32,
    ctr2: u32,       // stream << 20 | step
    ctr3: u32,       // cycle
    rows: u32,       // rows of this chunk
    cols: u32,
    row0: u32,       // global member index of the first row
    has_mean: u32,   // 0: none, 1: one mean row broadcast, 2: one mean row per member
    scale: f32,
    mean_row0: u32,  // first row of `mean` matching this chunk (has_mean = 2)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: NoiseParams;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> mean: array<f32>;

fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a_lo = a & 0xffffu;
    let a_hi = a >> 16u;
    let b_lo = b & 0xffffu;
    let b_hi = b >> 16u;
    let lo_lo = a_lo * b_lo;
    let hi_lo = a_hi * b_lo;
    let lo_hi = a_lo * b_hi;
    let hi_hi = a_hi * b_hi;
    let cross = (lo_lo >> 16u) + (hi_lo & 0xffffu) + lo_hi;
    let hi = hi_hi + (hi_lo >> 16u) + (cross >> 16u);
    return vec2<u32>(hi, a * b);
}

fn philox(ctr: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = ctr;
    var k = key;
    for (var round = 0u; round < 10u; round = round + 1u) {
        if (round > 0u) {
            k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let p0 = mulhilo(0xD2511F53u, c.x);
        let p1 = mulhilo(0xCD9E8D57u, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
    }
    return c;
}

fn box_muller(a: u32, b: u32) -> vec2<f32> {
    let u1 = f32((a >> 8u) + 1u) * (1.0 / 16777216.0);
    let u2 = f32(b >> 8u) * (1.0 / 16777216.0);
    let r = sqrt(-2.0 * log(u1));
    let theta = 6.2831853071795864 * u2 - 3.1415926535897932;
    return vec2<f32>(r * cos(theta), r * sin(theta));
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blocks_per_row = (p.cols + 3u) / 4u;
    let t = gid.x + gid.y * nwg.x * 256u;
    if (t >= blocks_per_row * p.rows) {
        return;
    }
    let i = t / blocks_per_row;
    let blk = t % blocks_per_row;
    let w = philox(vec4<u32>(blk, p.row0 + i, p.ctr2, p.ctr3), vec2<u32>(p.key0, p.key1));
    let z01 = box_muller(w.x, w.y);
    let z23 = box_muller(w.z, w.w);
    var z = array<f32, 4>(z01.x, z01.y, z23.x, z23.y);
    for (var e = 0u; e < 4u; e = e + 1u) {
        let k = blk * 4u + e;
        if (k < p.cols) {
            var m = 0.0;
            if (p.has_mean == 1u) {
                m = mean[k];
            } else if (p.has_mean == 2u) {
                m = mean[(p.mean_row0 + i) * p.cols + k];
            }
            out[i * p.cols + k] = m + p.scale * z[e];
        }
    }
}
