//! Normal noise (`shaders/noise.wgsl`; CPU twin `src/rng.rs` and `Cpu::fill_normal`).

use super::*;

pub(super) fn fill_normal(
    gpu: &Gpu,
    out: &mut GpuBuffer,
    key: NoiseKey,
    mean: Option<&GpuBuffer>,
    scale: f32,
) -> Result<()> {
    let _call = gpu.exclusive();
    let (rows, cols) = (out.rows, out.cols);
    crate::backend::check_noise_mean(out, mean)?;
    if cols == 0 {
        return Ok(());
    }
    let kw = key.key_words();
    let ctr = key.counter(0, 0);
    for (c, chunk) in out.chunks.iter().enumerate() {
        let (r0, r1) = out.chunk_rows(c);
        let (has_mean, mbuf) = match mean {
            None => (0, &gpu.dummy_ro),
            Some(m) if m.rows == 1 && rows != 1 => (1, m.single("noise mean row")?),
            Some(m) => (2, &m.chunks[c]),
        };
        let p = NoiseParams {
            key0: kw[0],
            key1: kw[1],
            ctr2: ctr[2],
            ctr3: ctr[3],
            rows: (r1 - r0) as u32,
            cols: u32_of(cols, "columns")?,
            row0: r0 as u32,
            has_mean,
            scale,
            mean_row0: 0,
            _pad: [0; 2],
        };
        let g = groups_1d(((r1 - r0) * cols.div_ceil(4)) as u64)?;
        gpu.dispatch(&gpu.kernels.noise, &p, &[chunk, mbuf], (g.0, g.1, 1))?;
    }
    Ok(())
}
