//! The EnFF flow kernels (`shaders/flow_logits.wgsl`, `shaders/flow_softmax.wgsl`,
//! `shaders/flow_update.wgsl`; CPU twins in `backend/cpu/flow.rs`).

use super::*;

pub(super) fn flow_logits(
    gpu: &Gpu,
    x: &GpuBuffer,
    target: &GpuBuffer,
    source: Option<&GpuBuffer>,
    path: PathCoefficients,
    bias: Option<&GpuBuffer>,
    logits: &mut GpuBuffer,
) -> Result<()> {
    let _call = gpu.exclusive();
    let (n, d) = (x.rows, x.cols);
    shape_err("flow target", target, n, d)?;
    if let Some(s) = source {
        shape_err("flow source", s, n, d)?;
    }
    shape_err("flow log-weights", logits, n, n)?;
    if let Some(b) = bias {
        shape_err("log-weight bias", b, 1, n)?;
    }
    check_path(&path, source.is_some())?;
    let logits_buf = logits.single("flow log-weights")?;
    // Large ensembles are compute-bound: 64 x 64 tiles with 4 x 4 pairs per invocation.
    let big = n > 32;
    let tile = if big { 64 } else { LOGIT_TILE };
    let tiles = (n as u64).div_ceil(tile as u64).pow(2);
    let max_slabs = (d as u64).div_ceil(LOGIT_TK as u64).max(1);
    let want = LOGIT_TARGET_GROUPS.div_ceil(tiles).clamp(1, max_slabs);
    let slab_len = ((d as u64).div_ceil(want))
        .next_multiple_of(LOGIT_TK as u64)
        .max(LOGIT_TK as u64);
    let n_slabs = (d as u64).div_ceil(slab_len).max(1);
    if n_slabs > 65_535 {
        return Err(Error::TooLarge {
            detail: format!("d = {d} needs {n_slabs} slabs, more than one dispatch allows"),
        });
    }
    let partial = {
        let mut s = gpu
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
        gpu.scratch_buf(
            &mut s.partial,
            n_slabs as usize * n * n,
            "pairwise partial sums",
        )?
        .clone()
    };
    let use_source = source.is_some() && path.b != 0.0;
    for (cx, xb) in x.chunks.iter().enumerate() {
        let (xr0, xr1) = x.chunk_rows(cx);
        for (ct, tb) in target.chunks.iter().enumerate() {
            let (tr0, tr1) = target.chunk_rows(ct);
            let sb = match source {
                Some(s) if use_source => &s.chunks[ct],
                _ => &gpu.dummy_ro,
            };
            let p = LogitParams {
                n_x: (xr1 - xr0) as u32,
                n_t: (tr1 - tr0) as u32,
                d: u32_of(d, "d")?,
                slab_len: slab_len as u32,
                n_total: n as u32,
                row0_x: xr0 as u32,
                row0_t: tr0 as u32,
                n_slabs: n_slabs as u32,
                a: path.a,
                b: path.b,
                has_source: use_source as u32,
                has_bias: 0,
                neg_inv_2s2: 0.0,
                _pad: [0; 3],
            };
            let gx = ((xr1 - xr0) as u32).div_ceil(tile);
            let gy = ((tr1 - tr0) as u32).div_ceil(tile);
            let kernel = if big {
                &gpu.kernels.logits_big
            } else {
                &gpu.kernels.logits
            };
            gpu.dispatch(
                kernel,
                &p,
                &[xb, tb, sb, &partial],
                (gx, gy, n_slabs as u32),
            )?;
        }
    }
    let s = path.s as f64;
    let p = LogitParams {
        n_total: n as u32,
        n_slabs: n_slabs as u32,
        has_bias: bias.is_some() as u32,
        neg_inv_2s2: (-1.0 / (2.0 * s * s)) as f32,
        ..Default::default()
    };
    let bias_buf = match bias {
        Some(b) => b.single("log-weight bias")?,
        None => &gpu.dummy_ro,
    };
    let g = groups_1d((n * n) as u64)?;
    gpu.dispatch(
        &gpu.kernels.logits_reduce,
        &p,
        &[&partial, bias_buf, logits_buf],
        (g.0, g.1, 1),
    )
}

pub(super) fn softmax_rows(gpu: &Gpu, logits: &mut GpuBuffer) -> Result<()> {
    let _call = gpu.exclusive();
    let n = logits.cols;
    if logits.rows != n {
        return Err(Error::shape(
            "flow log-weights",
            "a square n x n matrix",
            format!("{} x {}", logits.rows, n),
        ));
    }
    let slot = gpu.flag_slot("flow log-weights", n)?;
    let buf = logits.single("flow log-weights")?;
    let p = SoftmaxParams {
        n: n as u32,
        flag_slot: slot,
        _pad: [0; 2],
    };
    let rows = n as u32;
    let (gx, gy) = (rows.clamp(1, 65_535), rows.div_ceil(65_535).max(1));
    gpu.dispatch(&gpu.kernels.softmax, &p, &[buf, &gpu.flags], (gx, gy, 1))
}

pub(super) fn flow_update(
    gpu: &Gpu,
    state: &mut GpuBuffer,
    up: &FlowUpdate<'_, Gpu>,
    mut velocity_out: Option<&mut GpuBuffer>,
) -> Result<()> {
    let _call = gpu.exclusive();
    let (n, d) = (state.rows, state.cols);
    shape_err("flow weights", up.weights, n, n)?;
    shape_err("flow target", up.target, n, d)?;
    if let Some(e) = up.eval {
        shape_err("flow evaluation point", e, n, d)?;
    }
    if let Some(s) = up.source {
        shape_err("flow source", s, n, d)?;
    }
    if let Some((v, _)) = up.previous {
        shape_err("previous velocity", v, n, d)?;
    }
    if let Some(v) = velocity_out.as_deref() {
        shape_err("velocity output", v, n, d)?;
    }
    check_path(&up.path, up.source.is_some())?;
    let guidance = match &up.guidance {
        Some(g) => {
            let op = gpu.builtin_obs(g.operator)?;
            let m = g.operator.obs_dim(d)?;
            shape_err("observation", g.y, 1, m)?;
            Some((op, m, g.scale, g.horizon, g.y.single("observation")?))
        }
        None => None,
    };
    let wbuf = up.weights.single("flow weights")?;
    let pth = up.path;
    let cx = (pth.ds as f64 / pth.s as f64) as f32;
    let ua = pth.da - cx * pth.a;
    let ub = pth.db - cx * pth.b;
    let use_source = up.source.is_some() && ub != 0.0;
    let t_chunks = up.target.chunks.len();
    let acc = if t_chunks > 1 {
        let mut s = gpu
            .scratch
            .lock()
            .map_err(|_| Error::Gpu("scratch poisoned".into()))?;
        Some(
            gpu.scratch_buf(
                &mut s.acc,
                state.rows_per_chunk.min(n) * d,
                "velocity accumulator",
            )?
            .clone(),
        )
    } else {
        None
    };
    let g = groups_1d(d as u64)?;
    for ci in 0..state.chunks.len() {
        let (sr0, sr1) = state.chunk_rows(ci);
        for cj in 0..t_chunks {
            let (tr0, tr1) = up.target.chunk_rows(cj);
            let last = cj + 1 == t_chunks;
            let (op, m, scale, horizon, ybuf) = match &guidance {
                Some((op, m, s, h, y)) => (Some(*op), *m, *s, *h, *y),
                None => (None, 0, 0.0, 0.0, &gpu.dummy_ro),
            };
            let p = UpdateParams {
                n_rows: (sr1 - sr0) as u32,
                n_t: (tr1 - tr0) as u32,
                d: u32_of(d, "d")?,
                n_total: n as u32,
                row0_state: sr0 as u32,
                row0_t: tr0 as u32,
                has_source: use_source as u32,
                has_eval: up.eval.is_some() as u32,
                has_prev: up.previous.is_some() as u32,
                has_vel_out: velocity_out.is_some() as u32,
                first: (cj == 0) as u32,
                last: last as u32,
                guided: op.is_some() as u32,
                obs_every: op.map_or(1, |o| o.every as u32),
                obs_offset: op.map_or(0, |o| o.offset as u32),
                obs_m: m as u32,
                pointwise: op.map_or(0, |o| pointwise_code(o.pointwise)),
                cx,
                ua,
                ub,
                h_new: up.h_new,
                h_old: up.previous.map_or(0.0, |(_, h)| h),
                scale,
                horizon,
                clamp: up.clamp.unwrap_or(0.0),
                _pad: [0; 3],
            };
            let src = match up.source {
                Some(s) if use_source => &s.chunks[cj],
                _ => &gpu.dummy_ro,
            };
            let eval = up.eval.map_or(&gpu.dummy_ro, |e| &e.chunks[ci]);
            let prev = up.previous.map_or(&gpu.dummy_ro, |(v, _)| &v.chunks[ci]);
            let vout = velocity_out
                .as_deref_mut()
                .map_or(&gpu.dummy_rw[0], |v| &v.chunks[ci]);
            let accb = acc.as_ref().unwrap_or(&gpu.dummy_rw[1]);
            // More than 32 means per target block: a tiled matrix product.
            let (kernel, groups) = if tr1 - tr0 > 32 {
                let gx = u32_of(d.div_ceil(64), "d / 64")?;
                let gy = ((sr1 - sr0) as u32).div_ceil(64);
                if gx > 65_535 || gy > 65_535 {
                    return Err(Error::TooLarge {
                        detail: format!("d = {d} is too large for one tiled dispatch"),
                    });
                }
                (&gpu.kernels.update_tiled, (gx, gy, 1))
            } else {
                (&gpu.kernels.update, (g.0, g.1, 1))
            };
            gpu.dispatch(
                kernel,
                &p,
                &[
                    wbuf,
                    &up.target.chunks[cj],
                    src,
                    eval,
                    &state.chunks[ci],
                    prev,
                    vout,
                    ybuf,
                    accb,
                ],
                groups,
            )?;
        }
    }
    Ok(())
}
