//! Golden vectors of ENFF_SPEC §10, as test bodies generic over the backend: each test binary
//! runs the same body on the CPU and, where it has one, on the GPU.

// Golden vectors are quoted with the digits the specification gives.
#![allow(clippy::excessive_precision)]

use enff::backend::Backend;
use enff::filter::{Etkf, Filter, Observation};
use enff::observe::Observe;

/// G4's forecast ensemble (4 members × 3 components) and observation (σ_y = 0.5, identity).
pub const G4_FORECAST: [f32; 12] = [
    1.0, 0.5, -0.2, 0.2, -0.3, 0.4, -0.6, 0.1, 0.3, 0.4, 0.9, -0.5,
];
/// G4's observation.
pub const G4_Y: [f32; 3] = [0.3, 0.1, -0.1];

/// G4's ETKF analysis (no inflation).
pub const G4_ETKF_ANALYSIS: [f32; 12] = [
    0.72193907,
    0.32930704,
    -0.03907919,
    0.31937932,
    -0.12936941,
    0.25784397,
    -0.21662729,
    0.20435969,
    0.16961546,
    0.2934384,
    0.61603801,
    -0.2797916,
];

/// The ETKF analysis of G4 on `backend`, read back to the host.
pub fn etkf_g4<B: Backend + 'static>(backend: &B) -> Vec<f32> {
    let mut ens = backend.upload(4, 3, &G4_FORECAST).unwrap();
    let y = backend.upload(1, 3, &G4_Y).unwrap();
    let h = Observe::identity();
    let obs = Observation {
        y: &y,
        operator: &h,
        noise_std: 0.5,
    };
    Etkf::<B>::new(1.0)
        .unwrap()
        .analyse(backend, &mut ens, None, &obs, 1)
        .unwrap();
    backend.read(&ens).unwrap()
}
