//! The Runge–Kutta forecast of the ODE models (`shaders/models.wgsl`; CPU twin
//! `src/model/rk.rs::step`); the grid models dispatch to `spectral.rs` and `stencil.rs`.

use super::*;

pub(super) fn advance(
    gpu: &Gpu,
    model: &Model,
    states: &mut GpuBuffer,
    steps: usize,
) -> Result<()> {
    let _call = gpu.exclusive();
    let d = model.dim();
    shape_err("model state", states, states.rows, d)?;
    if steps == 0 || states.rows == 0 {
        return Ok(());
    }
    let (system, p0, p1, p2) = match &model.system {
        System::Lorenz63(l) => (0u32, l.sigma, l.rho, l.beta),
        System::Lorenz96(l) => (1u32, l.forcing, 0.0, 0.0),
        System::Rotation2d(_) => {
            // A 2 x 2 rotation: cheaper on the host than a dispatch, and exact in f64.
            let mut host = gpu.read(states)?;
            for row in host.chunks_mut(2) {
                crate::model::rk::advance_state(model, row, steps, &mut []);
            }
            return gpu.write(states, &host);
        }
        System::Custom(_) => {
            return Err(Error::Unsupported {
                backend: "gpu".into(),
                what: format!("the user-defined model `{}`", model.name()),
                fix: "use a built-in model or --backend cpu".into(),
            })
        }
        System::KuramotoSivashinsky(ks) => return gpu.advance_ks(ks, states, steps),
        System::NavierStokes2d(ns) => return gpu.advance_ns(ns, states, steps),
    };
    // Stage coefficients (argument = x + dt Σ a·k) and final weights: the scheme's tableau.
    let crate::model::rk::Tableau {
        a: stages,
        b: weights,
    } = crate::model::rk::tableau(model.scheme);
    let rows_per_chunk = states.rows_per_chunk;
    let kbufs: Vec<wgpu::Buffer> = {
        let mut s = gpu
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
        let need = (rows_per_chunk.min(states.rows) * d * 4) as u64;
        if s.rk.len() < 4 || s.rk[0].size() < need {
            s.rk.clear();
            for _ in 0..4 {
                s.rk.push(gpu.new_buffer(
                    "enff rk stages",
                    need.next_power_of_two().min(gpu.hw_max_binding).max(need),
                )?);
            }
        }
        s.rk.clone()
    };
    for (c, chunk) in states.chunks.iter().enumerate() {
        let (r0, r1) = states.chunk_rows(c);
        let rows = (r1 - r0) as u32;
        let g = groups_1d(((r1 - r0) * d) as u64)?;
        for _ in 0..steps {
            for (s, coef) in stages.iter().enumerate() {
                let p = ModelParams {
                    rows,
                    d: d as u32,
                    system,
                    _pad: 0,
                    dt: model.dt,
                    p0,
                    p1,
                    p2,
                    c1: coef[0],
                    c2: coef[1],
                    c3: coef[2],
                    c4: 0.0,
                };
                let ins: [&wgpu::Buffer; 3] = [
                    if s > 0 { &kbufs[0] } else { &gpu.dummy_ro },
                    if s > 1 { &kbufs[1] } else { &gpu.dummy_ro },
                    if s > 2 { &kbufs[2] } else { &gpu.dummy_ro },
                ];
                gpu.dispatch(
                    &gpu.kernels.model_stage,
                    &p,
                    &[chunk, ins[0], ins[1], ins[2], &kbufs[s]],
                    (g.0, g.1, 1),
                )?;
            }
            let p = ModelParams {
                rows,
                d: d as u32,
                system,
                _pad: 0,
                dt: model.dt,
                p0,
                p1,
                p2,
                c1: weights[0],
                c2: weights[1],
                c3: weights[2],
                c4: weights[3],
            };
            gpu.dispatch(
                &gpu.kernels.model_combine,
                &p,
                &[chunk, &kbufs[0], &kbufs[1], &kbufs[2], &kbufs[3]],
                (g.0, g.1, 1),
            )?;
        }
    }
    Ok(())
}
