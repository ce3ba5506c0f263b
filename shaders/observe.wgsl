// Pointwise observation maps, shared by every kernel that observes the state: the source of
// this file is prepended to those shaders when their modules are built
// (src/backend/gpu/observe.rs::with_observe). CPU twin: src/observe.rs::Pointwise.
// Codes (src/backend/gpu/observe.rs::pointwise_code): 0 identity, 1 arctan, 2 tanh.
// Parity test: tests/kernels.rs::inflation_statistics_observation_and_likelihood_match.

// h(x)
fn obs_value(code: u32, x: f32) -> f32 {
    if (code == 1u) {
        return atan(x);
    }
    if (code == 2u) {
        return tanh(x);
    }
    return x;
}

// h'(x)
fn obs_derivative(code: u32, x: f32) -> f32 {
    if (code == 1u) {
        return 1.0 / (1.0 + x * x);
    }
    if (code == 2u) {
        let t = tanh(x);
        return 1.0 - t * t;
    }
    return 1.0;
}
