//! CPU twins of the flow kernels: pairwise log-weights, row softmax and the fused
//! velocity + guidance + integrator update (ENFF_SPEC §2.2, §3.1, §4.1).
//!
//! Both heavy kernels split the state into column blocks of [`BLOCK`] components, form the
//! block of every path mean `μ_j(t)` (or velocity target `U_j`) once, and reuse it for all `n`
//! members while it sits in cache; each worker owns a contiguous range of blocks.

use rayon::prelude::*;

use super::{grow, ranges, simd, Cpu, CpuBuffer, BLOCK};
use crate::backend::{DeviceBuffer, FlowUpdate, PathCoefficients};
use crate::error::{Error, Result};
use crate::observe::Observe;

/// A raw pointer that workers use to write disjoint column ranges of one matrix.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: used only where every worker touches a disjoint set of elements.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

fn check_shape(name: &str, b: &CpuBuffer, rows: usize, cols: usize) -> Result<()> {
    if b.rows() != rows || b.cols() != cols {
        return Err(Error::shape(
            name,
            format!("{rows} x {cols}"),
            format!("{} x {}", b.rows(), b.cols()),
        ));
    }
    Ok(())
}

fn check_path(path: &PathCoefficients, has_source: bool) -> Result<()> {
    if !(path.s.is_finite() && path.s > 0.0) {
        return Err(Error::invalid(
            "path std s(t)",
            path.s,
            "the conditional std must be positive: use filter.sigma_min > 0",
        ));
    }
    if !has_source && (path.b != 0.0 || path.db != 0.0) {
        return Err(Error::invalid(
            "flow source",
            "none",
            "this path mixes in a source ensemble (F2P): pass the previous analysis",
        ));
    }
    Ok(())
}

/// Fills `out` (`n × w`, stride `w`) with `ca·target + cb·source` over columns `k0..k0+w`.
fn mix_block(
    out: &mut [f32],
    target: &[f32],
    source: Option<&[f32]>,
    ca: f32,
    cb: f32,
    n: usize,
    d: usize,
    k0: usize,
    w: usize,
) {
    for j in 0..n {
        let o = &mut out[j * w..(j + 1) * w];
        let t = &target[j * d + k0..j * d + k0 + w];
        match source {
            Some(s) if cb != 0.0 => {
                let s = &s[j * d + k0..j * d + k0 + w];
                for c in 0..w {
                    o[c] = ca * t[c] + cb * s[c];
                }
            }
            _ => {
                for c in 0..w {
                    o[c] = ca * t[c];
                }
            }
        }
    }
}

pub(crate) fn flow_logits(
    cpu: &Cpu,
    x: &CpuBuffer,
    target: &CpuBuffer,
    source: Option<&CpuBuffer>,
    path: PathCoefficients,
    bias: Option<&CpuBuffer>,
    logits: &mut CpuBuffer,
) -> Result<()> {
    let (n, d) = (x.rows(), x.cols());
    check_shape("flow target", target, n, d)?;
    if let Some(s) = source {
        check_shape("flow source", s, n, d)?;
    }
    check_shape("flow log-weights", logits, n, n)?;
    if let Some(b) = bias {
        check_shape("log-weight bias", b, 1, n)?;
    }
    check_path(&path, source.is_some())?;
    let nn = n * n;
    let parts = cpu.parts_for(nn * d);
    let col_ranges = ranges(d, parts, BLOCK);
    let direct = path.a == 1.0 && (path.b == 0.0 || source.is_none());
    let xs = x.as_slice();
    let ts = target.as_slice();
    let ss = source.map(|s| s.as_slice());
    cpu.with_slots(|slots| {
        let used = col_ranges.len();
        slots[..used]
            .par_iter_mut()
            .zip(col_ranges.par_iter())
            .for_each(|(slot, &(k0, k1))| {
                let acc = grow(&mut slot.f64a, nn);
                acc.iter_mut().for_each(|v| *v = 0.0);
                let mu = grow(&mut slot.f32a, n * BLOCK);
                let mut kb = k0;
                while kb < k1 {
                    let w = BLOCK.min(k1 - kb);
                    if direct {
                        simd::distance_block(&xs[kb..], d, &ts[kb..], d, n, n, w, acc);
                    } else {
                        mix_block(mu, ts, ss, path.a, path.b, n, d, kb, w);
                        simd::distance_block(&xs[kb..], d, mu, w, n, n, w, acc);
                    }
                    kb += w;
                }
            });
        let inv = -1.0 / (2.0 * path.s as f64 * path.s as f64);
        let out = logits.as_mut_slice();
        for i in 0..n {
            for j in 0..n {
                let dist: f64 = slots[..used].iter().map(|s| s.f64a[i * n + j]).sum();
                let b = bias.map_or(0.0, |b| b.as_slice()[j] as f64);
                out[i * n + j] = (dist * inv + b) as f32;
            }
        }
    })
}

pub(crate) fn softmax_rows(logits: &mut CpuBuffer) -> Result<()> {
    let n = logits.cols();
    if logits.rows() != n {
        return Err(Error::shape(
            "flow log-weights",
            "a square n x n matrix",
            format!("{} x {}", logits.rows(), n),
        ));
    }
    for (i, row) in logits.as_mut_slice().chunks_mut(n.max(1)).enumerate() {
        if let Some(j) = row.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: "flow log-weights".into(),
                location: format!("member {i}, pair {j}"),
                value: row[j] as f64,
                hint: "the ensemble or the observation contains NaN/Inf or overflowed; \
                       reduce guidance_scale or check the inputs"
                    .into(),
            });
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
        for l in row.iter_mut() {
            *l = ((*l as f64 - max).exp() / sum) as f32;
        }
    }
    Ok(())
}

/// Guidance term for one component: `scale · h'(x̂) · (y − h(x̂))`, or 0 if unobserved.
#[inline(always)]
fn guidance_at(op: &Observe, y: &[f32], k: usize, xhat: f32, scale: f32) -> f32 {
    if k < op.offset {
        return 0.0;
    }
    let rel = k - op.offset;
    if rel % op.every != 0 {
        return 0.0;
    }
    let r = y[rel / op.every] - op.pointwise.value(xhat);
    scale * op.pointwise.derivative(xhat) * r
}

pub(crate) fn flow_update(
    cpu: &Cpu,
    state: &mut CpuBuffer,
    up: &FlowUpdate<'_, Cpu>,
    mut velocity_out: Option<&mut CpuBuffer>,
) -> Result<()> {
    let (n, d) = (state.rows(), state.cols());
    check_shape("flow weights", up.weights, n, n)?;
    check_shape("flow target", up.target, n, d)?;
    if let Some(e) = up.eval {
        check_shape("flow evaluation point", e, n, d)?;
    }
    if let Some(s) = up.source {
        check_shape("flow source", s, n, d)?;
    }
    if let Some((v, _)) = up.previous {
        check_shape("previous velocity", v, n, d)?;
    }
    if let Some(v) = velocity_out.as_deref() {
        check_shape("velocity output", v, n, d)?;
    }
    check_path(&up.path, up.source.is_some())?;
    let fused = match &up.guidance {
        Some(g) => {
            let m = g.operator.obs_dim(d)?;
            check_shape("observation", g.y, 1, m)?;
            g.operator.builtin()
        }
        None => None,
    };
    let p = up.path;
    let cx = (p.ds as f64 / p.s as f64) as f32;
    // U_j = μ̇_j − (ds/s) μ_j = ua·x_f + ub·x_src
    let ua = p.da - cx * p.a;
    let ub = p.db - cx * p.b;
    let ts = up.target.as_slice();
    let ss = up.source.map(|s| s.as_slice());
    let ws = up.weights.as_slice();
    let guidance_on_rows = up.guidance.is_some() && fused.is_none();
    let eval_ptr = up.eval.map(|e| e.as_slice().as_ptr());
    let state_ptr = SyncPtr(state.as_mut_slice().as_mut_ptr());
    let vel_ptr = velocity_out
        .as_deref_mut()
        .map(|v| SyncPtr(v.as_mut_slice().as_mut_ptr()));

    if guidance_on_rows {
        // General operators: unguided velocities for all rows first, then guidance row by row.
        let g = up.guidance.as_ref().expect("checked above");
        let mut vhat_guard = cpu
            .rows_scratch
            .lock()
            .map_err(|_| Error::Gpu("CPU scratch lock poisoned by an earlier panic".into()))?;
        let vhat = grow(&mut vhat_guard, n * d);
        let vhat_ptr = SyncPtr(vhat.as_mut_ptr());
        velocity_blocks(
            cpu,
            n,
            d,
            ts,
            ss,
            ws,
            ua,
            ub,
            cx,
            state_ptr,
            eval_ptr,
            None,
            |_, _, _, v, _| {
                let _ = v;
            },
            Some(vhat_ptr),
        )?;
        let m = g.operator.obs_dim(d)?;
        let ydata = g.y.as_slice();
        cpu.with_slots(|slots| -> Result<()> {
            let slot = &mut slots[0];
            let xh = grow(&mut slot.f32a, d);
            let gr = grow(&mut slot.f32b, d);
            let hr = grow(&mut slot.f32c, m);
            for i in 0..n {
                let st = &mut state.as_mut_slice()[i * d..(i + 1) * d];
                let xe: &[f32] = match up.eval {
                    Some(e) => &e.as_slice()[i * d..(i + 1) * d],
                    None => st,
                };
                let vrow = &mut vhat[i * d..(i + 1) * d];
                for k in 0..d {
                    xh[k] = xe[k] + g.horizon * vrow[k];
                }
                g.operator.apply(xh, hr);
                for (h, &yk) in hr.iter_mut().zip(ydata) {
                    *h = yk - *h;
                }
                g.operator.adjoint(xh, hr, gr);
                for k in 0..d {
                    vrow[k] += g.scale * gr[k];
                }
                let prev = up
                    .previous
                    .map(|(b, h)| (&b.as_slice()[i * d..(i + 1) * d], h));
                if let Some(vo) = velocity_out.as_deref_mut() {
                    vo.as_mut_slice()[i * d..(i + 1) * d].copy_from_slice(vrow);
                }
                for k in 0..d {
                    let mut v = st[k] + up.h_new * vrow[k];
                    if let Some((pv, h)) = prev {
                        v += h * pv[k];
                    }
                    st[k] = v;
                }
            }
            Ok(())
        })??;
        return Ok(());
    }

    let yv = up.guidance.as_ref().map(|g| g.y.as_slice());
    let gparams = up.guidance.as_ref().map(|g| {
        (
            fused.expect("fused when guidance present here"),
            g.scale,
            g.horizon,
        )
    });
    let prev_ptr = up
        .previous
        .map(|(b, h)| (b.as_slice().as_ptr() as usize, h));
    let h_new = up.h_new;
    velocity_blocks(
        cpu,
        n,
        d,
        ts,
        ss,
        ws,
        ua,
        ub,
        cx,
        state_ptr,
        eval_ptr,
        vel_ptr,
        |i, kb, xe, v, st| {
            let w = v.len();
            if let (Some((op, scale, horizon)), Some(y)) = (gparams, yv) {
                for c in 0..w {
                    let xhat = xe[c] + horizon * v[c];
                    v[c] += guidance_at(&op, y, kb + c, xhat, scale);
                }
            }
            match prev_ptr {
                Some((pp, hp)) => {
                    // SAFETY: the previous velocity is a distinct n x d buffer, read-only here.
                    let pv = unsafe {
                        std::slice::from_raw_parts((pp as *const f32).add(i * d + kb), w)
                    };
                    for c in 0..w {
                        st[c] += h_new * v[c] + hp * pv[c];
                    }
                }
                None => {
                    for c in 0..w {
                        st[c] += h_new * v[c];
                    }
                }
            }
        },
        None,
    )
}

/// Drives the blocked velocity evaluation. For every member `i` and block starting at `kb`,
/// computes the unguided velocity `v` into scratch, then calls
/// `finish(i, kb, x_eval_block, v, state_block)`, which may add guidance and must update the
/// state block. When `store_unguided` is set, the unguided velocity is stored there instead and
/// `finish` is not called. Velocity after `finish` is stored in `vel_out` when given.
#[allow(clippy::too_many_arguments)]
fn velocity_blocks<F>(
    cpu: &Cpu,
    n: usize,
    d: usize,
    ts: &[f32],
    ss: Option<&[f32]>,
    ws: &[f32],
    ua: f32,
    ub: f32,
    cx: f32,
    state_ptr: SyncPtr,
    eval_ptr: Option<*const f32>,
    vel_out: Option<SyncPtr>,
    finish: F,
    store_unguided: Option<SyncPtr>,
) -> Result<()>
where
    F: Fn(usize, usize, &[f32], &mut [f32], &mut [f32]) + Sync,
{
    let parts = cpu.parts_for(n * n * d);
    let col_ranges = ranges(d, parts, BLOCK);
    let eval_addr = eval_ptr.map(|p| p as usize);
    cpu.with_slots(|slots| {
        let used = col_ranges.len();
        slots[..used]
            .par_iter_mut()
            .zip(col_ranges.par_iter())
            .for_each(|(slot, &(k0, k1))| {
                let u = grow(&mut slot.f32a, n * BLOCK);
                let vbuf = grow(&mut slot.f32b, BLOCK);
                let xbuf = grow(&mut slot.f32c, BLOCK);
                let mut kb = k0;
                while kb < k1 {
                    let w = BLOCK.min(k1 - kb);
                    mix_block(u, ts, ss, ua, ub, n, d, kb, w);
                    for i in 0..n {
                        let v = &mut vbuf[..w];
                        // SAFETY: this worker owns columns k0..k1 of the state, the velocity
                        // output and the unguided store; the evaluation point is read-only.
                        let st = unsafe {
                            std::slice::from_raw_parts_mut(state_ptr.get().add(i * d + kb), w)
                        };
                        let xe: &[f32] = match eval_addr {
                            Some(e) => unsafe {
                                std::slice::from_raw_parts((e as *const f32).add(i * d + kb), w)
                            },
                            None => {
                                // Evaluating at the state itself: work on a copy so that the
                                // state block can be written while the old values are read.
                                xbuf[..w].copy_from_slice(st);
                                &xbuf[..w]
                            }
                        };
                        simd::combine_row(v, xe, cx, &ws[i * n..(i + 1) * n], u, w);
                        if let Some(sp) = store_unguided {
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(sp.get().add(i * d + kb), w)
                            };
                            dst.copy_from_slice(v);
                            continue;
                        }
                        finish(i, kb, xe, v, st);
                        if let Some(vp) = vel_out {
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(vp.get().add(i * d + kb), w)
                            };
                            dst.copy_from_slice(v);
                        }
                    }
                    kb += w;
                }
            });
    })
}
