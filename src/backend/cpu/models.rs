//! CPU twin of the model kernels (`shaders/models.wgsl`, `spectral_ks.wgsl`,
//! `stencil_ns.wgsl`; GPU host code: `backend/gpu/models.rs`, `spectral.rs`, `stencil.rs`):
//! members advanced by the models' own CPU definitions (`crate::model`), in parallel over rows.

use rayon::prelude::*;

use super::*;

pub(super) fn advance(
    cpu: &Cpu,
    model: &Model,
    states: &mut CpuBuffer,
    steps: usize,
) -> Result<()> {
    let d = model.dim();
    if states.cols != d {
        return Err(Error::shape(
            "model state",
            format!("{d} components per member ({})", model.name()),
            format!("{} components", states.cols),
        ));
    }
    if steps == 0 || states.rows == 0 {
        return Ok(());
    }
    if matches!(model.system, System::Rotation2d(_)) {
        for row in states.data_mut().chunks_mut(2) {
            rk::advance_state(model, row, steps, &mut []);
        }
        return Ok(());
    }
    let rows = states.rows;
    let parts = cpu.parts_for(rows * d * steps * 16).min(rows);
    let row_split = Split::new(rows, parts, 1);
    let advance_rows = |chunk: &mut [f32], slot: &mut Slot| match &model.system {
        System::KuramotoSivashinsky(ks) => {
            let scratch = grow(&mut slot.c32, ks.scratch_len());
            for row in chunk.chunks_mut(d) {
                ks.advance(row, steps, scratch);
            }
        }
        System::NavierStokes2d(ns) => {
            let scratch = grow(&mut slot.f32a, ns.scratch_len());
            for row in chunk.chunks_mut(d) {
                ns.advance(row, steps, scratch);
            }
        }
        _ => {
            let scratch = grow(&mut slot.f32a, rk::SCRATCH_VECTORS * d);
            for row in chunk.chunks_mut(d) {
                rk::advance_state(model, row, steps, scratch);
            }
        }
    };
    cpu.with_slots(|slots| {
        if row_split.count() == 1 {
            // One part: on the calling thread, without waking the pool.
            advance_rows(states.data_mut(), &mut slots[0]);
        } else {
            states
                .data_mut()
                .par_chunks_mut(row_split.get(0).1 * d)
                .zip(slots.par_iter_mut())
                .for_each(|(chunk, slot)| advance_rows(chunk, slot));
        }
    })
}
