//! Ensemble-wide element-wise kernels and reductions (`shaders/ensemble.wgsl` with the maps of
//! `shaders/observe.wgsl`; CPU twins in `backend/cpu/mod.rs`): inflation, finiteness checks,
//! observation operators, likelihoods, observed moments and the ensemble statistics.

use super::*;

pub(super) fn inflate(gpu: &Gpu, ensemble: &mut GpuBuffer, gamma: f32) -> Result<()> {
    let _call = gpu.exclusive();
    crate::backend::check_inflation(gamma)?;
    if gamma == 1.0 || ensemble.rows < 2 {
        return Ok(());
    }
    gpu.column_moments(ensemble, false)?;
    let colsum = {
        let s = gpu
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
        s.colsum.clone().expect("column sums allocated")
    };
    for (c, chunk) in ensemble.chunks.iter().enumerate() {
        let (r0, r1) = ensemble.chunk_rows(c);
        let p = EnsembleParams {
            rows: (r1 - r0) as u32,
            cols: ensemble.cols as u32,
            inv_n: 1.0 / ensemble.rows as f32,
            gamma,
            ..Default::default()
        };
        let g = groups_1d(((r1 - r0) * ensemble.cols) as u64)?;
        gpu.dispatch(&gpu.kernels.inflate, &p, &[&colsum, chunk], (g.0, g.1, 1))?;
    }
    Ok(())
}

pub(super) fn check_finite(gpu: &Gpu, buf: &GpuBuffer, name: &str) -> Result<()> {
    let _call = gpu.exclusive();
    let slot = gpu.flag_slot(name, buf.cols)?;
    for (c, chunk) in buf.chunks.iter().enumerate() {
        let (r0, r1) = buf.chunk_rows(c);
        let p = EnsembleParams {
            rows: (r1 - r0) as u32,
            cols: buf.cols as u32,
            flag_slot: slot,
            row0: r0 as u32,
            ..Default::default()
        };
        let g = groups_1d(((r1 - r0) * buf.cols) as u64)?;
        gpu.dispatch(&gpu.kernels.finite, &p, &[chunk, &gpu.flags], (g.0, g.1, 1))?;
    }
    Ok(())
}

pub(super) fn observe(
    gpu: &Gpu,
    operator: &dyn ObservationOperator,
    x: &GpuBuffer,
    out: &mut GpuBuffer,
) -> Result<()> {
    let _call = gpu.exclusive();
    let op = gpu.builtin_obs(operator)?;
    let m = operator.obs_dim(x.cols)?;
    shape_err("observation output", out, x.rows, m)?;
    if out.chunks.len() != 1 && out.rows_per_chunk != x.rows_per_chunk {
        return Err(Error::Unsupported {
            backend: "gpu".into(),
            what: "observing an ensemble whose state and observation blocks differ".into(),
            fix: "observe fewer members at a time".into(),
        });
    }
    let single_out = out.chunks.len() == 1;
    for (c, chunk) in x.chunks.iter().enumerate() {
        let (r0, r1) = x.chunk_rows(c);
        if single_out && r0 > 0 {
            return Err(Error::Unsupported {
                backend: "gpu".into(),
                what: "observing a split ensemble into one observation block".into(),
                fix: "observe fewer members at a time".into(),
            });
        }
        let p = EnsembleParams {
            rows: (r1 - r0) as u32,
            cols: x.cols as u32,
            m: m as u32,
            every: op.every as u32,
            offset: op.offset as u32,
            pointwise: pointwise_code(op.pointwise),
            ..Default::default()
        };
        let g = groups_1d(((r1 - r0) * m) as u64)?;
        let dst = if single_out {
            &out.chunks[0]
        } else {
            &out.chunks[c]
        };
        gpu.dispatch(&gpu.kernels.observe, &p, &[chunk, dst], (g.0, g.1, 1))?;
    }
    Ok(())
}

pub(super) fn observed_moments(
    gpu: &Gpu,
    operator: &dyn ObservationOperator,
    x: &GpuBuffer,
    out: &mut GpuBuffer,
) -> Result<()> {
    let _call = gpu.exclusive();
    let op = gpu.builtin_obs(operator)?;
    let (n, d) = (x.rows, x.cols);
    let m = operator.obs_dim(d)?;
    shape_err("observed moments", out, 2, m)?;
    if m == 0 {
        return Ok(());
    }
    let dst = out.single("observed moments")?;
    let g = groups_1d(m as u64)?;
    let params = |c: usize| -> Result<EnsembleParams> {
        let (r0, r1) = x.chunk_rows(c);
        Ok(EnsembleParams {
            rows: (r1 - r0) as u32,
            cols: u32_of(d, "state dimension")?,
            first: (c == 0) as u32,
            m: u32_of(m, "observation dimension")?,
            every: u32_of(op.every, "observe.every")?,
            offset: u32_of(op.offset, "observe.offset")?,
            pointwise: pointwise_code(op.pointwise),
            inv_n: 1.0 / n.max(1) as f32,
            inv_n1: 1.0 / n.max(2).saturating_sub(1) as f32,
            ..Default::default()
        })
    };
    for kernel in [&gpu.kernels.obs_sum, &gpu.kernels.obs_sq] {
        for (c, chunk) in x.chunks.iter().enumerate() {
            gpu.dispatch(kernel, &params(c)?, &[chunk, dst], (g.0, g.1, 1))?;
        }
    }
    gpu.dispatch(&gpu.kernels.obs_final, &params(0)?, &[dst], (g.0, g.1, 1))
}

pub(super) fn log_likelihoods(
    gpu: &Gpu,
    operator: &dyn ObservationOperator,
    x: &GpuBuffer,
    y: &GpuBuffer,
    obs_noise_std: f32,
    out: &mut GpuBuffer,
) -> Result<()> {
    let _call = gpu.exclusive();
    let op = gpu.builtin_obs(operator)?;
    let (n, d) = (x.rows, x.cols);
    let m = operator.obs_dim(d)?;
    shape_err("observation", y, 1, m)?;
    shape_err("log-likelihood output", out, 1, n)?;
    crate::error::check_positive(
        "observe.noise_std",
        obs_noise_std as f64,
        "the observation noise std must be positive",
    )?;
    let ybuf = y.single("observation")?;
    let obuf = out.single("log-likelihoods")?;
    for (c, chunk) in x.chunks.iter().enumerate() {
        let (r0, r1) = x.chunk_rows(c);
        let p = EnsembleParams {
            rows: (r1 - r0) as u32,
            cols: d as u32,
            row0: r0 as u32,
            m: m as u32,
            every: op.every as u32,
            offset: op.offset as u32,
            pointwise: pointwise_code(op.pointwise),
            neg_inv_2s2: -1.0 / (2.0 * obs_noise_std * obs_noise_std),
            ..Default::default()
        };
        let rows = (r1 - r0) as u32;
        let (gx, gy) = (rows.min(65_535), rows.div_ceil(65_535).max(1));
        gpu.dispatch(&gpu.kernels.loglik, &p, &[chunk, obuf, ybuf], (gx, gy, 1))?;
    }
    Ok(())
}

pub(super) fn ensemble_stats(
    gpu: &Gpu,
    ensemble: &GpuBuffer,
    truth: &GpuBuffer,
) -> Result<EnsembleStats> {
    let _call = gpu.exclusive();
    let (n, d) = (ensemble.rows, ensemble.cols);
    shape_err("truth", truth, 1, d)?;
    if n == 0 || d == 0 {
        return Err(Error::invalid(
            "ensemble",
            format!("{n} x {d}"),
            "metrics need at least one member and one component",
        ));
    }
    gpu.column_moments(ensemble, true)?;
    let g = groups_1d(d as u64)?;
    let count = g.0 as usize * g.1 as usize;
    let (colsum, colsq, part) = {
        let mut s = gpu
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
        let part = gpu
            .scratch_buf(&mut s.stats_part, 2 * count, "metric partial sums")?
            .clone();
        (
            s.colsum.clone().expect("allocated"),
            s.colsq.clone().expect("allocated"),
            part,
        )
    };
    let p = EnsembleParams {
        rows: n as u32,
        cols: d as u32,
        inv_n: 1.0 / n as f32,
        inv_n1: 1.0 / (n.max(2) - 1) as f32,
        count: count as u32,
        ..Default::default()
    };
    gpu.dispatch(
        &gpu.kernels.stats_partial,
        &p,
        &[truth.single("truth")?, &colsum, &colsq, &part],
        (g.0, g.1, 1),
    )?;
    gpu.dispatch(
        &gpu.kernels.stats_final,
        &p,
        &[&gpu.result2, &part],
        (1, 1, 1),
    )?;
    let bytes = gpu.read_small(&gpu.result2, 8)?;
    let v: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
    Ok(EnsembleStats {
        rmse: (v[0] as f64 / d as f64).sqrt(),
        spread: if n < 2 {
            0.0
        } else {
            (v[1] as f64 / d as f64).sqrt()
        },
    })
}

impl Gpu {
    /// Column sums of `x` into the scratch colsum buffer (and optionally squared deviations).
    pub(super) fn column_moments(&self, x: &GpuBuffer, with_var: bool) -> Result<()> {
        let (n, d) = (x.rows, x.cols);
        let mut s = self
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
        let colsum = self.scratch_buf(&mut s.colsum, d, "column sums")?.clone();
        let colsq = if with_var {
            Some(
                self.scratch_buf(&mut s.colsq, d, "column variances")?
                    .clone(),
            )
        } else {
            None
        };
        drop(s);
        let g = groups_1d(d as u64)?;
        // The parameters of member block `c` (both passes read the blocks the same way).
        let params = |c: usize| {
            let (r0, r1) = x.chunk_rows(c);
            EnsembleParams {
                rows: (r1 - r0) as u32,
                cols: d as u32,
                first: (c == 0) as u32,
                inv_n: 1.0 / n as f32,
                ..Default::default()
            }
        };
        for (c, buf) in x.chunks.iter().enumerate() {
            self.dispatch(
                &self.kernels.colsum,
                &params(c),
                &[buf, &colsum],
                (g.0, g.1, 1),
            )?;
        }
        // The squared deviations need the complete means: a second pass over the blocks.
        if let Some(colsq) = colsq {
            for (c, buf) in x.chunks.iter().enumerate() {
                self.dispatch(
                    &self.kernels.colsq,
                    &params(c),
                    &[buf, &colsum, &colsq],
                    (g.0, g.1, 1),
                )?;
            }
        }
        Ok(())
    }
}
