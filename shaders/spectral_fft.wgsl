// One pass of the batched Stockham FFT (radix 2 or 4) over every member at once.
// CPU twin: src/backend/cpu/spectral.rs::fft_pass (the algorithm is described there).
//
// Complex data are interleaved f32 pairs, member after member (`batch` sequences of length m).
// One thread per butterfly: thread t handles member t / (m/R) and butterfly j = t mod (m/R).
// Parity test: tests/ks_ns.rs::gpu_fft_matches_its_twin_and_rustfft.

// Rust mirror: src/backend/gpu/spectral.rs::FftParams
struct FftParams {
    m: u32,
    batch: u32,
    ns: u32,
    radix: u32,
    inverse: u32,
    square: u32, // 1: square re and im of each input as it is loaded (the KS nonlinearity)
    tw_stride: u32, // m / (ns · radix)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: FftParams;
@group(0) @binding(1) var<storage, read> src: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> tw: array<vec2<f32>>;

fn cmul(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

fn load(base: u32, e: u32, r: u32, k: u32) -> vec2<f32> {
    var z = src[base + e];
    if (p.square != 0u) {
        z = vec2<f32>(z.x * z.x, z.y * z.y);
    }
    if (r > 0u) {
        var w = tw[r * k * p.tw_stride];
        if (p.inverse != 0u) {
            w.y = -w.y;
        }
        z = cmul(z, w);
    }
    return z;
}

@compute @workgroup_size(256, 1, 1)
fn pass_main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 256u;
    let quarter = p.m / p.radix;
    if (t >= p.batch * quarter) {
        return;
    }
    let b = t / quarter;
    let j = t % quarter;
    let base = b * p.m;
    let k = j % p.ns;
    let out = base + (j / p.ns) * p.ns * p.radix + k;
    if (p.radix == 2u) {
        let v0 = load(base, j, 0u, k);
        let v1 = load(base, j + quarter, 1u, k);
        dst[out] = v0 + v1;
        dst[out + p.ns] = v0 - v1;
    } else {
        let v0 = load(base, j, 0u, k);
        let v1 = load(base, j + quarter, 1u, k);
        let v2 = load(base, j + 2u * quarter, 2u, k);
        let v3 = load(base, j + 3u * quarter, 3u, k);
        let a0 = v0 + v2;
        let a1 = v0 - v2;
        let a2 = v1 + v3;
        let d = v1 - v3;
        // Forward: (v1 − v3)·(−i); inverse: ·(+i).
        var a3 = vec2<f32>(d.y, -d.x);
        if (p.inverse != 0u) {
            a3 = vec2<f32>(-d.y, d.x);
        }
        dst[out] = a0 + a2;
        dst[out + p.ns] = a1 + a3;
        dst[out + 2u * p.ns] = a0 - a2;
        dst[out + 3u * p.ns] = a1 - a3;
    }
}
