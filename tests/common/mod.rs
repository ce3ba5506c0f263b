//! Shared helpers of the GPU test binaries: one GPU context per binary, and the skip policy
//! (loud skip without an adapter; failure instead when `ENFF_REQUIRE_GPU=1`).

#![allow(dead_code)]

pub mod golden;

use std::sync::{Mutex, MutexGuard, OnceLock};

use enff::backend::gpu::{Gpu, GpuOptions};

static LOCK: Mutex<()> = Mutex::new(());

/// Serializes the tests of one binary that must not overlap (GPU work, heap accounting).
pub fn gpu_lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared GPU backend, or `None` (after a loud message) when no adapter exists and
/// `ENFF_REQUIRE_GPU` is not 1. The guard serializes GPU tests: a `Gpu` is one in-order stream
/// whose deferred errors go to whichever caller syncs first.
pub fn gpu() -> Option<(MutexGuard<'static, ()>, &'static Gpu)> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    let guard = gpu_lock();
    GPU.get_or_init(|| {
        open(GpuOptions {
            allow_software: true,
            max_chunk_bytes: None,
            ..Default::default()
        })
    })
    .as_ref()
    .map(|g| (guard, g))
}

/// True when the GPU tests can run: an adapter opened (a missing one panics here instead under
/// `ENFF_REQUIRE_GPU=1`).
pub fn gpu_available() -> bool {
    gpu().is_some()
}

/// The `main` of a test binary whose tests are plain functions: `cpu` always run, `gpu` run
/// when an adapter opens and otherwise reported as ignored in the test summary (with the
/// reason printed once), so a machine without a GPU shows `N ignored` instead of passes.
pub fn run_tests(
    cpu: &[(&'static str, fn())],
    gpu: &[(&'static str, fn())],
    ignored: &[(&'static str, fn())],
) -> std::process::ExitCode {
    use libtest_mimic::{Arguments, Trial};
    let args = Arguments::from_args();
    let listing = args.list;
    let skip = !listing && !gpu.is_empty() && !gpu_available();
    if skip {
        eprintln!("GPU tests of this binary are IGNORED: no GPU adapter (see above)");
    }
    let trial = |(name, f): &(&'static str, fn()), ignored: bool| {
        let f = *f;
        Trial::test(*name, move || {
            f();
            Ok(())
        })
        .with_ignored_flag(ignored)
    };
    let trials = cpu
        .iter()
        .map(|t| trial(t, false))
        .chain(gpu.iter().map(|t| trial(t, skip)))
        .chain(ignored.iter().map(|t| trial(t, true)))
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// A test written once for every backend: `backend_test!(name<B>(b) { … })` with a body
/// generic over `B: Backend` defines `name::cpu` (on the CPU reference) and `name::gpu` (on
/// the shared GPU; without an adapter it is reported as ignored), to be listed in
/// `test_main!(cpu: [name::cpu], gpu: [name::gpu])`.
#[macro_export]
macro_rules! backend_test {
    ($(#[$meta:meta])* $name:ident<$B:ident>($b:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body<$B: enff::backend::Backend + 'static>($b: &$B) $body

            pub fn cpu() {
                body(&enff::backend::cpu::Cpu::new())
            }

            pub fn gpu() {
                if let Some((_lock, g)) = common::gpu() {
                    body(g)
                }
            }
        }
    };
}

/// `fn main` for [`run_tests`]: `test_main!(cpu: [a, b], gpu: [c, d]);`
#[macro_export]
macro_rules! test_main {
    (cpu: [$($c:path),* $(,)?], gpu: [$($g:path),* $(,)?] $(,)?) => {
        $crate::test_main!(cpu: [$($c),*], gpu: [$($g),*], ignored: []);
    };
    (cpu: [$($c:path),* $(,)?], gpu: [$($g:path),* $(,)?], ignored: [$($i:path),* $(,)?] $(,)?) => {
        fn main() -> std::process::ExitCode {
            common::run_tests(
                &[$((stringify!($c), $c as fn())),*],
                &[$((stringify!($g), $g as fn())),*],
                &[$((stringify!($i), $i as fn())),*],
            )
        }
    };
}

/// A second GPU backend whose buffers are split into member blocks of at most `bytes`.
pub fn gpu_split(bytes: u64) -> Option<Gpu> {
    open(GpuOptions {
        allow_software: true,
        max_chunk_bytes: Some(bytes),
        ..Default::default()
    })
}

fn open(options: GpuOptions) -> Option<Gpu> {
    match Gpu::new(options) {
        Ok(g) => {
            eprintln!("GPU tests run on: {}", g.adapter().line());
            Some(g)
        }
        Err(e) => {
            if std::env::var("ENFF_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("ENFF_REQUIRE_GPU=1 but no GPU adapter could be opened: {e}");
            }
            eprintln!(
                "\n!!!!!!!! SKIPPING GPU TEST: no GPU adapter ({e}).\n\
                 !!!!!!!! Install a Vulkan driver (e.g. mesa-vulkan-drivers) or set \
                 ENFF_REQUIRE_GPU=1 to make this a failure.\n"
            );
            None
        }
    }
}

/// `rows × cols` standard normal values times `scale`, from the Philox stream
/// `(seed, User, 0)`: the random inputs of the parity tests (the same on every run).
pub fn host_random(rows: usize, cols: usize, seed: u64, scale: f32) -> Vec<f32> {
    let key = enff::rng::NoiseKey::new(seed, enff::rng::Stream::User, 0);
    let mut v = vec![0.0f32; rows * cols];
    for (i, row) in v.chunks_mut(cols.max(1)).enumerate() {
        enff::rng::fill_normal_row(&key, i as u32, row);
        row.iter_mut().for_each(|x| *x *= scale);
    }
    v
}

/// Maximum of |a − b| / (atol + rtol·|b|) over two arrays (≤ 1 means within tolerance).
pub fn worst(a: &[f32], b: &[f32], atol: f64, rtol: f64) -> (f64, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut w = (0.0f64, 0usize);
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        let (x, y) = (*x as f64, *y as f64);
        let e = if x.is_nan() || y.is_nan() {
            f64::INFINITY
        } else {
            (x - y).abs() / (atol + rtol * y.abs())
        };
        if e > w.0 {
            w = (e, k);
        }
    }
    w
}

/// Asserts `a ≈ b` element-wise within `atol + rtol·|b|`.
pub fn assert_close(a: &[f32], b: &[f32], atol: f64, rtol: f64, what: &str) {
    let (e, k) = worst(a, b, atol, rtol);
    assert!(
        e <= 1.0,
        "{what}: element {k}: gpu {} vs cpu {} (atol {atol}, rtol {rtol}, ratio {e:.3})",
        a[k],
        b[k]
    );
}
