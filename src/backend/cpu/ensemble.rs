//! CPU twins of `shaders/ensemble.wgsl` (GPU host code: `backend/gpu/ensemble.rs`): inflation
//! about the mean, the finiteness scan, observing the members, the observed moments, the
//! particle log-likelihoods and the metrics (RMSE of the mean, spread), with f64 accumulation.

use rayon::prelude::*;

use super::*;

pub(super) fn inflate(cpu: &Cpu, ensemble: &mut CpuBuffer, gamma: f32) -> Result<()> {
    crate::backend::check_inflation(gamma)?;
    if gamma == 1.0 || ensemble.rows < 2 {
        return Ok(());
    }
    let (n, d) = (ensemble.rows, ensemble.cols);
    let inv_n = 1.0 / n as f64;
    let data_ptr = super::flow::SyncPtr(ensemble.data_mut().as_mut_ptr());
    let parts = cpu.parts_for(n * d);
    Split::new(d, parts, 64).for_each(|(k0, k1)| {
        for k in k0..k1 {
            // SAFETY: parts own disjoint column ranges of the matrix.
            let mut s = 0.0f64;
            for i in 0..n {
                s += unsafe { *data_ptr.get().add(i * d + k) } as f64;
            }
            let mean = s * inv_n;
            for i in 0..n {
                unsafe {
                    let p = data_ptr.get().add(i * d + k);
                    *p = (mean + gamma as f64 * (*p as f64 - mean)) as f32;
                }
            }
        }
    });
    Ok(())
}

pub(super) fn check_finite(cpu: &Cpu, buf: &CpuBuffer, name: &str) -> Result<()> {
    // A vectorized scan (in parallel for large buffers) first; the slow search that names
    // the first bad entry runs only when there is one.
    let data = &buf.data;
    let finite = if cpu.parts_for(data.len()) > 1 {
        data.par_chunks(PARALLEL_THRESHOLD).all(simd::all_finite)
    } else {
        simd::all_finite(data)
    };
    if finite {
        return Ok(());
    }
    crate::error::check_finite(
        name,
        data,
        buf.cols,
        "check the inputs; a non-finite ensemble usually means the filter diverged",
    )
}

pub(super) fn observe(
    cpu: &Cpu,
    operator: &dyn ObservationOperator,
    x: &CpuBuffer,
    out: &mut CpuBuffer,
) -> Result<()> {
    let m = operator.obs_dim(x.cols)?;
    Cpu::same_shape("observation output", out, x.rows, m)?;
    if m == 0 {
        return Ok(());
    }
    if cpu.parts_for(x.rows * m * OBSERVE_COST) > 1 {
        out.data_mut()
            .par_chunks_mut(m)
            .zip(x.data.par_chunks(x.cols.max(1)))
            .for_each(|(y, xi)| operator.apply(xi, y));
    } else {
        out.data_mut()
            .chunks_mut(m)
            .zip(x.data.chunks(x.cols.max(1)))
            .for_each(|(y, xi)| operator.apply(xi, y));
    }
    Ok(())
}

pub(super) fn observed_moments(
    cpu: &Cpu,
    operator: &dyn ObservationOperator,
    x: &CpuBuffer,
    out: &mut CpuBuffer,
) -> Result<()> {
    let (n, d) = (x.rows, x.cols);
    let m = operator.obs_dim(d)?;
    Cpu::same_shape("observed moments", out, 2, m)?;
    if m == 0 {
        return Ok(());
    }
    if n == 0 {
        out.data_mut().fill(0.0);
        return Ok(());
    }
    // Observe member by member, then reduce each observation in f64 (two passes).
    let parallel = cpu.parts_for(n * m * OBSERVE_COST) > 1;
    let mut hx = vec![0.0f32; n * m];
    if parallel {
        hx.par_chunks_mut(m)
            .zip(x.data.par_chunks(d.max(1)))
            .for_each(|(y, xi)| operator.apply(xi, y));
    } else {
        hx.chunks_mut(m)
            .zip(x.data.chunks(d.max(1)))
            .for_each(|(y, xi)| operator.apply(xi, y));
    }
    let moments = |(q, (mu, v)): (usize, (&mut f32, &mut f32))| {
        let s: f64 = (0..n).map(|k| hx[k * m + q] as f64).sum();
        let mq = s / n as f64;
        let ss: f64 = (0..n).map(|k| (hx[k * m + q] as f64 - mq).powi(2)).sum();
        *mu = mq as f32;
        *v = (ss / (n.max(2) - 1) as f64) as f32;
    };
    let (mean, var) = out.data_mut().split_at_mut(m);
    if parallel {
        mean.par_iter_mut()
            .zip(var.par_iter_mut())
            .enumerate()
            .for_each(moments);
    } else {
        mean.iter_mut()
            .zip(var.iter_mut())
            .enumerate()
            .for_each(moments);
    }
    Ok(())
}

pub(super) fn log_likelihoods(
    cpu: &Cpu,
    operator: &dyn ObservationOperator,
    x: &CpuBuffer,
    y: &CpuBuffer,
    obs_noise_std: f32,
    out: &mut CpuBuffer,
) -> Result<()> {
    let (n, d) = (x.rows, x.cols);
    let m = operator.obs_dim(d)?;
    Cpu::same_shape("observation", y, 1, m)?;
    Cpu::same_shape("log-likelihood output", out, 1, n)?;
    crate::error::check_positive(
        "observe.noise_std",
        obs_noise_std as f64,
        "the observation noise std must be positive",
    )?;
    let inv = 1.0 / (2.0 * obs_noise_std as f64 * obs_noise_std as f64);
    cpu.with_slots(|slots| {
        let slot = &mut slots[0];
        let h = grow(&mut slot.f32a, m);
        for i in 0..n {
            operator.apply(x.row(i), h);
            let e: f64 = h
                .iter()
                .zip(&y.data)
                .map(|(&hk, &yk)| ((yk - hk) as f64).powi(2))
                .sum();
            out.data_mut()[i] = (-e * inv) as f32;
        }
    })
}

pub(super) fn ensemble_stats(
    cpu: &Cpu,
    ensemble: &CpuBuffer,
    truth: &CpuBuffer,
) -> Result<EnsembleStats> {
    let (n, d) = (ensemble.rows, ensemble.cols);
    Cpu::same_shape("truth", truth, 1, d)?;
    if n == 0 || d == 0 {
        return Err(Error::invalid(
            "ensemble",
            format!("{n} x {d}"),
            "metrics need at least one member and one component",
        ));
    }
    let parts = cpu.parts_for(n * d);
    let data = &ensemble.data;
    let (se, var) = Split::new(d, parts, 64).map_reduce(
        |(k0, k1)| {
            let mut se = 0.0f64;
            let mut var = 0.0f64;
            // Column moments a chunk at a time (vectorized over columns), then the sums
            // over columns in column order.
            let (mut mean, mut ss) = ([0.0f64; STATS_CHUNK], [0.0f64; STATS_CHUNK]);
            let mut kb = k0;
            while kb < k1 {
                let w = STATS_CHUNK.min(k1 - kb);
                simd::column_moments(data, n, d, kb, &mut mean[..w], &mut ss[..w]);
                for c in 0..w {
                    se += (mean[c] - truth.data[kb + c] as f64).powi(2);
                    var += ss[c] / (n.max(2) - 1) as f64;
                }
                kb += w;
            }
            (se, var)
        },
        || (0.0, 0.0),
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    Ok(EnsembleStats {
        rmse: (se / d as f64).sqrt(),
        spread: if n < 2 { 0.0 } else { (var / d as f64).sqrt() },
    })
}
