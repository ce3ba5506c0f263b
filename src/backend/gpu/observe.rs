//! Host side of `shaders/observe.wgsl`, the pointwise observation maps shared by every kernel
//! that observes the state (WGSL has no includes, so the file is prepended to those shaders).
//! CPU twin: `crate::observe::Pointwise`.

use crate::observe::Pointwise;

/// The WGSL source of `shaders/<file>` with the shared observation maps of
/// `shaders/observe.wgsl` prepended (WGSL has no includes).
macro_rules! with_observe {
    ($file:literal) => {
        concat!(
            include_str!("../../../shaders/observe.wgsl"),
            "\n",
            include_str!(concat!("../../../shaders/", $file))
        )
    };
}

/// The code of a pointwise map in the kernels' parameter blocks.
pub(super) fn pointwise_code(p: Pointwise) -> u32 {
    match p {
        Pointwise::Identity => 0,
        Pointwise::Arctan => 1,
        Pointwise::Tanh => 2,
    }
}
