//! CPU twin of `shaders/noise.wgsl` (GPU host code: `backend/gpu/noise.rs`): standard normal
//! draws from the Philox streams of `crate::rng`, shifted and scaled, a row chunk at a time.

use rayon::prelude::*;

use super::*;

pub(super) fn fill_normal(
    cpu: &Cpu,
    out: &mut CpuBuffer,
    key: NoiseKey,
    mean: Option<&CpuBuffer>,
    scale: f32,
) -> Result<()> {
    let (rows, cols) = (out.rows, out.cols);
    crate::backend::check_noise_mean(out, mean)?;
    if cols == 0 {
        return Ok(());
    }
    // Chunks of a row are drawn and shifted while they sit in L1.
    let fill_row = |(i, row): (usize, &mut [f32])| {
        let mrow = mean.map(|m| if m.rows == 1 { m.row(0) } else { m.row(i) });
        for (c, chunk) in row.chunks_mut(NOISE_CHUNK).enumerate() {
            let k0 = c * NOISE_CHUNK;
            rng::fill_normal_at(&key, i as u32, k0, chunk);
            match mrow {
                Some(mrow) => {
                    let mu = &mrow[k0..k0 + chunk.len()];
                    for (v, &m) in chunk.iter_mut().zip(mu) {
                        *v = m + scale * *v;
                    }
                }
                None if scale != 1.0 => chunk.iter_mut().for_each(|v| *v *= scale),
                None => {}
            }
        }
    };
    if cpu.parts_for(rows * cols * 16) > 1 {
        out.data_mut()
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(fill_row);
    } else {
        out.data_mut()
            .chunks_mut(cols)
            .enumerate()
            .for_each(fill_row);
    }
    Ok(())
}
