//! CPU twins of the flow kernels: pairwise log-weights, row softmax and the fused
//! velocity + guidance + integrator update (ENFF_SPEC §2.2, §3.1, §4.1).
//!
//! Both heavy kernels split the state into column blocks of [`BLOCK`] components; each worker
//! owns a contiguous range of blocks (the same split in both kernels, see [`split_for`]).
//! `flow_logits` forms the block of every path mean `μ_j(t)` once (or reads the target or
//! source in place when `μ_j` is one of them) and accumulates the pairwise squared distances
//! from differences, register-blocked, in f32 within a block and f64 across blocks.
//! `flow_update` combines, per member and block, the few velocity targets with non-zero weight
//! (or a shared block of all `U_j` when the weights are dense), adds guidance and steps.
//!
//! **Fusion.** One Euler step reads the state, the forecast and the source twice: once for the
//! distances, once for the update. To halve that traffic, `flow_update` (when it evaluates the
//! velocity at the state itself) also accumulates, block by block while the new state is in
//! cache, the pairwise distances of the *updated* state to the means at the next pseudo-time
//! `t + h_new`, and leaves them in the scratch with the stamps of the three buffers and the
//! mean coefficients. The next `flow_logits` call uses them only when its state, target and
//! source still carry those stamps and it asks for exactly those coefficients; otherwise (or
//! after any other flow call) it computes from scratch. Both paths run the same blocks through
//! the same loops in the same order, so the logits are bit-for-bit the same either way.

use rayon::prelude::*;

use super::{grow, simd, Cpu, CpuBuffer, Slot, Split, BLOCK};
use crate::backend::{check_path, DeviceBuffer, FlowUpdate, PathCoefficients};
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

/// Pairwise distances a fused flow update accumulated for the next `flow_logits` call; the
/// per-worker sums are in `Slot::f64b` of the first `split.count()` slots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct NextLogits {
    /// Stamp of the updated state (the `x` of the next call).
    x: u64,
    target: u64,
    source: Option<u64>,
    n: usize,
    d: usize,
    /// Bits of the mean coefficients `a`, `b` the distances belong to.
    a: u32,
    b: u32,
    split: Split,
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

/// The column split shared by `flow_logits` and `flow_update` for an `n × d` ensemble.
///
/// Large jobs get [`PARTS_PER_THREAD`] parts per worker thread, so that rayon's work stealing
/// evens out a core that is slowed down by other work on the machine.
fn split_for(cpu: &Cpu, n: usize, d: usize) -> Split {
    let parts = cpu.parts_for(n * n * d);
    let parts = if parts > 1 {
        parts * PARTS_PER_THREAD
    } else {
        1
    };
    Split::new(d, parts, BLOCK)
}

/// Column parts per worker thread of a large flow kernel.
const PARTS_PER_THREAD: usize = 4;

/// Where the path means `μ_j = a·x_f + b·x_src` come from for one flow step.
#[derive(Clone, Copy)]
enum Means<'a> {
    /// `μ_j` is a row of this ensemble (the target when `a = 1, b = 0`, the source when
    /// `a = 0, b = 1`): read in place.
    Rows(&'a [f32]),
    /// `μ_j` is formed per block.
    Mix {
        target: &'a [f32],
        source: Option<&'a [f32]>,
        a: f32,
        b: f32,
    },
}

impl<'a> Means<'a> {
    fn new(target: &'a [f32], source: Option<&'a [f32]>, a: f32, b: f32) -> Self {
        if a == 1.0 && (b == 0.0 || source.is_none()) {
            Means::Rows(target)
        } else if let Some(s) = source.filter(|_| a == 0.0 && b == 1.0) {
            Means::Rows(s)
        } else {
            Means::Mix {
                target,
                source,
                a,
                b,
            }
        }
    }

    /// Adds the distances of the `n` rows of `x` (row `i` of the block at `x[i * x_stride]`)
    /// to the means over columns `kb..kb + w` into `acc` (`n × n`), using `mu` as scratch.
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        self,
        x: &[f32],
        x_stride: usize,
        mu: &mut [f32],
        n: usize,
        d: usize,
        kb: usize,
        w: usize,
        acc: &mut [f64],
    ) {
        match self {
            Means::Rows(m) => simd::distance_block(x, x_stride, &m[kb..], d, n, n, w, acc),
            Means::Mix {
                target,
                source,
                a,
                b,
            } => {
                let sb = source.map(|s| &s[kb..]);
                simd::mix_block(mu, &target[kb..], sb, a, b, n, d, w);
                simd::distance_block(x, x_stride, mu, w, n, n, w, acc);
            }
        }
    }
}

/// Runs `work(slot, range)` for every range of `split`, in parallel when there are several.
fn for_each_part<F>(slots: &mut Vec<Slot>, split: Split, work: F)
where
    F: Fn(&mut Slot, (usize, usize)) + Sync,
{
    let used = split.count();
    if slots.len() < used {
        // Once per backend (the split of a given problem never changes).
        slots.resize_with(used, Slot::default);
    }
    if used == 1 {
        work(&mut slots[0], split.get(0));
    } else {
        slots[..used]
            .par_iter_mut()
            .zip(split.par_iter())
            .for_each(|(slot, r)| work(slot, r));
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
    let split = split_for(cpu, n, d);
    let wanted = NextLogits {
        x: x.stamp(),
        target: target.stamp(),
        source: source.map(|s| s.stamp()),
        n,
        d,
        a: path.a.to_bits(),
        b: path.b.to_bits(),
        split,
    };
    let xs = x.as_slice();
    let means = Means::new(
        target.as_slice(),
        source.map(|s| s.as_slice()),
        path.a,
        path.b,
    );
    cpu.with_scratch(|scratch| {
        let fused = scratch.next_logits.take() == Some(wanted);
        let slots = &mut scratch.slots;
        if !fused {
            for_each_part(slots, split, |slot, (k0, k1)| {
                let acc = grow(&mut slot.f64a, nn);
                acc.iter_mut().for_each(|v| *v = 0.0);
                let mu = grow(&mut slot.f32a, n * BLOCK);
                let mut kb = k0;
                while kb < k1 {
                    let w = BLOCK.min(k1 - kb);
                    means.accumulate(&xs[kb..], d, mu, n, d, kb, w, acc);
                    kb += w;
                }
            });
        }
        let parts = &slots[..split.count()];
        let inv = -1.0 / (2.0 * path.s as f64 * path.s as f64);
        let out = logits.as_mut_slice();
        if let ([one], true) = (parts, n > 0) {
            // One part: its sums are the distances (a sum of one term from −0.0 is the term).
            let dist = if fused {
                &one.f64b[..nn]
            } else {
                &one.f64a[..nn]
            };
            let bias = bias.map(|b| b.as_slice());
            for (row, drow) in out.chunks_exact_mut(n).zip(dist.chunks_exact(n)) {
                simd::logits_row(row, drow, inv, bias);
            }
            return;
        }
        for i in 0..n {
            for j in 0..n {
                let dist: f64 = parts
                    .iter()
                    .map(|s| {
                        if fused {
                            s.f64b[i * n + j]
                        } else {
                            s.f64a[i * n + j]
                        }
                    })
                    .sum();
                let b = bias.map_or(0.0, |b| b.as_slice()[j] as f64);
                out[i * n + j] = (dist * inv + b) as f32;
            }
        }
    })
}

/// Softmax of the finite rows of `data` (`n ≤ S` values each), [`SOFTMAX_GROUP`] rows at a
/// time: each exponential once, kept on the stack (`S` values a row); the rows of a group are
/// summed side by side (each in its own order, from −0.0 as `Iterator::sum`), so that the
/// latency of one row's additions overlaps the others'.
fn softmax_groups<const S: usize>(data: &mut [f32], n: usize) {
    let max_of = |row: &[f32]| row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let mut e = [[0.0f64; S]; SOFTMAX_GROUP];
    for group in data.chunks_mut(n * SOFTMAX_GROUP) {
        for (er, row) in e.iter_mut().zip(group.chunks(n)) {
            let max = max_of(row);
            for (ej, &l) in er.iter_mut().zip(row) {
                *ej = (l as f64 - max).exp();
            }
        }
        let mut sums = [-0.0f64; SOFTMAX_GROUP];
        for j in 0..n {
            for (s, er) in sums.iter_mut().zip(&e) {
                *s += er[j];
            }
        }
        for ((row, er), &sum) in group.chunks_mut(n).zip(&e).zip(&sums) {
            simd::normalize(row, &er[..n], sum);
        }
    }
}

/// Rows up to this length use the small stack buffer of [`softmax_groups`].
const SOFTMAX_SMALL: usize = 32;

/// Rows up to this length keep their exponentials on the stack.
const SOFTMAX_STACK: usize = 256;

/// Rows of the softmax summed side by side.
const SOFTMAX_GROUP: usize = 4;

pub(crate) fn softmax_rows(logits: &mut CpuBuffer) -> Result<()> {
    let n = logits.cols();
    if logits.rows() != n {
        return Err(Error::shape(
            "flow log-weights",
            "a square n x n matrix",
            format!("{} x {}", logits.rows(), n),
        ));
    }
    let data = logits.as_mut_slice();
    if !simd::all_finite(data) {
        let k = data.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(Error::NonFinite {
            name: "flow log-weights".into(),
            location: format!("member {}, pair {}", k / n.max(1), k % n.max(1)),
            value: data[k] as f64,
            hint: "the ensemble or the observation contains NaN/Inf or overflowed; \
                   reduce guidance_scale or check the inputs"
                .into(),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let max_of = |row: &[f32]| row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    if n > SOFTMAX_STACK {
        for row in data.chunks_mut(n) {
            let max = max_of(row);
            let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            for l in row.iter_mut() {
                *l = ((*l as f64 - max).exp() / sum) as f32;
            }
        }
        return Ok(());
    }
    if n <= SOFTMAX_SMALL {
        softmax_groups::<SOFTMAX_SMALL>(data, n);
    } else {
        softmax_groups::<SOFTMAX_STACK>(data, n);
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
    if !rel.is_multiple_of(op.every) {
        return 0.0;
    }
    let r = y[rel / op.every] - op.pointwise.value(xhat);
    scale * op.pointwise.derivative(xhat) * r
}

/// Adds the guidance of a built-in operator to the velocity `v` of one block row starting at
/// component `kb`, evaluated at `x̂ = x + horizon · v`.
fn guide_block(
    op: &Observe,
    y: &[f32],
    kb: usize,
    x: &[f32],
    v: &mut [f32],
    scale: f32,
    horizon: f32,
) {
    let w = v.len();
    if op.every == 1 && op.offset == 0 {
        simd::guide_full(v, x, &y[kb..kb + w], op.pointwise, scale, horizon);
        return;
    }
    // Subsampled: visit only the observed components of the block.
    let mut k = if kb <= op.offset {
        op.offset
    } else {
        kb + (op.every - (kb - op.offset) % op.every) % op.every
    };
    while k < kb + w {
        let c = k - kb;
        let xhat = x[c] + horizon * v[c];
        v[c] += guidance_at(op, y, k, xhat, scale);
        k += op.every;
    }
}

/// The mean coefficients of the path at `t + h`, predicted from the coefficients at `t` the way
/// the paths of [`crate::flow::Path::at`] compute them (`a` linear in `t`; `a + b` constant
/// when `da = −db`, as for F2P's `b = 1 − t`), so that the prediction is usually exact.
fn predict_means(p: &PathCoefficients, h: f32) -> (f32, f32) {
    let a = p.a + p.da * h;
    let b = if p.db != 0.0 && p.da == -p.db {
        (p.a + p.b) - a
    } else {
        p.b + p.db * h
    };
    (a, b)
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
    let target = up.target.as_slice();
    let source = up.source.map(|s| s.as_slice());
    let vel = Velocity {
        n,
        d,
        target,
        source: if ub != 0.0 { source } else { None },
        weights: up.weights.as_slice(),
        ua,
        ub,
        cx,
        eval: up.eval.map(|e| e.as_slice()),
    };
    let split = split_for(cpu, n, d);
    let guidance_on_rows = up.guidance.is_some() && fused.is_none();

    if guidance_on_rows {
        // General operators: unguided velocities for all rows first, then guidance row by row.
        let g = up.guidance.as_ref().expect("checked above");
        let mut vhat_guard = cpu
            .rows_scratch
            .lock()
            .map_err(|_| Error::Gpu("CPU scratch lock poisoned by an earlier panic".into()))?;
        let vhat = grow(&mut vhat_guard, n * d);
        let vhat_ptr = SyncPtr(vhat.as_mut_ptr());
        let state_ptr = SyncPtr(state.as_mut_slice().as_mut_ptr());
        cpu.with_scratch(|scratch| {
            scratch.next_logits = None;
            velocity_blocks(
                &mut scratch.slots,
                split,
                &vel,
                state_ptr,
                None,
                |i, kb, _, v, _| {
                    // SAFETY: this worker owns columns kb..kb+w of every row of the n x d store.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(vhat_ptr.get().add(i * d + kb), v.len())
                    };
                    dst.copy_from_slice(v);
                    false
                },
            )
        })?;
        let m = g.operator.obs_dim(d)?;
        let ydata = g.y.as_slice();
        cpu.with_slots(|slots| -> Result<()> {
            let slot = &mut slots[0];
            let xh = grow(&mut slot.f32a, d);
            let gr = grow(&mut slot.f32b, d);
            let hr = grow(&mut slot.f32c, m);
            let states = state.as_mut_slice();
            for i in 0..n {
                let st = &mut states[i * d..(i + 1) * d];
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
                if let Some(c) = up.clamp {
                    vrow.iter_mut().for_each(|v| *v = v.clamp(-c, c));
                }
                let prev = up
                    .previous
                    .map(|(b, h)| (&b.as_slice()[i * d..(i + 1) * d], h));
                if let Some(vo) = velocity_out.as_deref_mut() {
                    vo.as_mut_slice()[i * d..(i + 1) * d].copy_from_slice(vrow);
                }
                simd::step(st, vrow, up.h_new, prev);
            }
            Ok(())
        })??;
        return Ok(());
    }

    // Speculate on the next flow_logits call when this is a step at the state itself that
    // does not reach the end of the flow (the velocity is never evaluated at t = 1).
    let next_means = (up.eval.is_none() && up.h_new != 0.0 && p.t + up.h_new < 1.0).then(|| {
        let (a, b) = predict_means(&p, up.h_new);
        (Means::new(target, source, a, b), a, b)
    });
    let yv = up.guidance.as_ref().map(|g| g.y.as_slice());
    let gparams = up.guidance.as_ref().map(|g| {
        (
            fused.expect("fused when guidance present here"),
            g.scale,
            g.horizon,
        )
    });
    let prev = up.previous.map(|(b, h)| (b.as_slice(), h));
    let h_new = up.h_new;
    let clamp = up.clamp;
    let vel_ptr = velocity_out.map(|v| SyncPtr(v.as_mut_slice().as_mut_ptr()));
    let state_ptr = SyncPtr(state.as_mut_slice().as_mut_ptr());
    let finish = |i: usize, kb: usize, xe: Option<&[f32]>, v: &mut [f32], st: &mut [f32]| {
        let w = v.len();
        if let (Some((op, scale, horizon)), Some(y)) = (gparams, yv) {
            guide_block(&op, y, kb, xe.unwrap_or(st), v, scale, horizon);
        }
        if let Some(c) = clamp {
            v.iter_mut().for_each(|e| *e = e.clamp(-c, c));
        }
        let old = prev.map(|(pv, hp)| (&pv[i * d + kb..i * d + kb + w], hp));
        simd::step(st, v, h_new, old);
        if let Some(vp) = vel_ptr {
            // SAFETY: this worker owns columns kb..kb+w of the velocity output, a buffer
            // distinct from every input.
            let dst = unsafe { std::slice::from_raw_parts_mut(vp.get().add(i * d + kb), w) };
            dst.copy_from_slice(v);
        }
        true
    };
    let spec = next_means.map(|(m, _, _)| m);
    cpu.with_scratch(|scratch| {
        scratch.next_logits = None;
        velocity_blocks(&mut scratch.slots, split, &vel, state_ptr, spec, finish);
        if let Some((_, a, b)) = next_means {
            scratch.next_logits = Some(NextLogits {
                x: state.stamp(),
                target: up.target.stamp(),
                source: up.source.map(|s| s.stamp()),
                n,
                d,
                a: a.to_bits(),
                b: b.to_bits(),
                split,
            });
        }
    })
}

/// Floats in a 64-byte cache line.
const CACHE_LINE_FLOATS: usize = 16;

/// The inputs of the Monte-Carlo velocity `v_i = cx·x_i + Σ_j W_ij (ua·x_f^(j) + ub·x_src^(j))`.
struct Velocity<'a> {
    n: usize,
    d: usize,
    target: &'a [f32],
    /// The source ensemble, `None` when `ub = 0`.
    source: Option<&'a [f32]>,
    weights: &'a [f32],
    ua: f32,
    ub: f32,
    cx: f32,
    /// Where to evaluate (`None` = at the state).
    eval: Option<&'a [f32]>,
}

/// Drives the blocked velocity evaluation. For every member `i` and block starting at `kb`,
/// computes the unguided velocity `v` into scratch, then calls
/// `finish(i, kb, x_eval_block, v, state_block)`, which may add guidance and update the state
/// block and returns whether it did; `x_eval_block` is `None` when the velocity is evaluated at
/// the state itself (then the state block still holds the old values when `finish` starts).
///
/// With few non-zero weights (one-hot at small σ_min) each row combines its own few target
/// and source rows directly; with many, the block of every `U_j = ua·x_f + ub·x_src` is formed
/// once and shared by all rows.
///
/// With `next` set, the updated state block is also copied to scratch and its pairwise
/// distances to those means are accumulated into `Slot::f64b`, exactly as `flow_logits` would.
fn velocity_blocks<F>(
    slots: &mut Vec<Slot>,
    split: Split,
    vel: &Velocity<'_>,
    state_ptr: SyncPtr,
    next: Option<Means<'_>>,
    finish: F,
) where
    F: Fn(usize, usize, Option<&[f32]>, &mut [f32], &mut [f32]) -> bool + Sync,
{
    let (n, d) = (vel.n, vel.d);
    let nnz = vel.weights.iter().filter(|w| **w != 0.0).count();
    let shared_u = vel.source.is_some() && nnz > 2 * n;
    for_each_part(slots, split, |slot, (k0, k1)| {
        let Slot {
            f32a,
            f32b,
            f32c,
            f64b,
            ..
        } = slot;
        // f32a: shared U block or next means; f32b: velocity rows (two); f32c: updated state
        // block.
        let u = grow(f32a, n * BLOCK);
        // The velocity rows start on a cache line, so that their vector loads and stores
        // never straddle two (whatever alignment the allocator gave the scratch).
        let vraw = grow(f32b, 2 * BLOCK + CACHE_LINE_FLOATS);
        let off = vraw.as_ptr().align_offset(64).min(CACHE_LINE_FLOATS);
        let vbuf = &mut vraw[off..off + 2 * BLOCK];
        let xblk = grow(f32c, if next.is_some() { n * BLOCK } else { 0 });
        let acc = grow(f64b, if next.is_some() { n * n } else { 0 });
        acc.iter_mut().for_each(|v| *v = 0.0);
        let mut kb = k0;
        while kb < k1 {
            let w = BLOCK.min(k1 - kb);
            if shared_u {
                let sb = vel.source.map(|s| &s[kb..]);
                simd::mix_block(u, &vel.target[kb..], sb, vel.ua, vel.ub, n, d, w);
            }
            let (nb, nw) = (kb + w, BLOCK.min(k1.saturating_sub(kb + w)));
            let src = if shared_u {
                simd::Sources {
                    a: u,
                    ca: 1.0,
                    b: None,
                    cb: 0.0,
                    stride: w,
                }
            } else {
                simd::Sources {
                    a: &vel.target[kb..],
                    ca: vel.ua,
                    b: vel.source.map(|s| &s[kb..]),
                    cb: vel.ub,
                    stride: d,
                }
            };
            // Short blocks combine two members at a time (shared loads, twice the independent
            // chains); each member's velocity is the same as alone, and the second member's
            // inputs are not touched by the first one's `finish`.
            let rows_at_once = if w <= simd::PAIR_WIDTH { 2 } else { 1 };
            let mut i = 0;
            while i < n {
                let rows = rows_at_once.min(n - i);
                for r in i..i + rows {
                    if nw > 0 {
                        let range = r * d + nb..r * d + nb + nw;
                        simd::prefetch(&vel.target[range.clone()]);
                        if let Some(s) = vel.source {
                            simd::prefetch(&s[range.clone()]);
                        }
                        // SAFETY: read-only view of this worker's columns of row r, not
                        // aliased by any live mutable slice (the state slices below cover
                        // block kb only).
                        let next_state = unsafe {
                            std::slice::from_raw_parts(state_ptr.get().add(r * d + nb), nw)
                        };
                        simd::prefetch(next_state);
                    }
                }
                // SAFETY: this worker owns columns k0..k1 of the state; rows i and i + 1 are
                // distinct, and no other slice of this block of them is alive while these are.
                let row_state = |r: usize| unsafe {
                    std::slice::from_raw_parts_mut(state_ptr.get().add(r * d + kb), w)
                };
                let eval_at = |r: usize| vel.eval.map(|e| &e[r * d + kb..r * d + kb + w]);
                let weights_of = |r: usize| &vel.weights[r * n..(r + 1) * n];
                let (v0, v1) = vbuf.split_at_mut(BLOCK);
                let (v0, v1) = (&mut v0[..w], &mut v1[..w]);
                let (st0, xe0) = (row_state(i), eval_at(i));
                if rows == 2 {
                    let (st1, xe1) = (row_state(i + 1), eval_at(i + 1));
                    let x_now: [&[f32]; 2] = [xe0.unwrap_or(st0), xe1.unwrap_or(st1)];
                    simd::combine2(
                        [&mut *v0, &mut *v1],
                        x_now.map(Some),
                        vel.cx,
                        [weights_of(i), weights_of(i + 1)],
                        src,
                    );
                    if finish(i, kb, xe0, v0, st0) && next.is_some() {
                        xblk[i * w..(i + 1) * w].copy_from_slice(st0);
                    }
                    if finish(i + 1, kb, xe1, v1, st1) && next.is_some() {
                        xblk[(i + 1) * w..(i + 2) * w].copy_from_slice(st1);
                    }
                } else {
                    let x_now: &[f32] = xe0.unwrap_or(st0);
                    simd::combine(
                        v0,
                        Some(x_now),
                        vel.cx,
                        weights_of(i),
                        src.a,
                        src.ca,
                        src.b,
                        src.cb,
                        src.stride,
                    );
                    if finish(i, kb, xe0, v0, st0) && next.is_some() {
                        xblk[i * w..(i + 1) * w].copy_from_slice(st0);
                    }
                }
                i += rows;
            }
            if let Some(means) = next {
                means.accumulate(xblk, w, u, n, d, kb, w, acc);
            }
            kb += w;
        }
    });
}

/// `out_i = Σ_j W_ij x_j` (the ensemble transform of the Kalman-type filters), blocked over
/// columns like the flow update's combination.
pub(super) fn ensemble_transform(
    cpu: &Cpu,
    weights: &CpuBuffer,
    x: &CpuBuffer,
    out: &mut CpuBuffer,
) -> Result<()> {
    let (n, d) = (x.rows, x.cols);
    Cpu::same_shape("transform weights", weights, n, n)?;
    Cpu::same_shape("transform output", out, n, d)?;
    if n == 0 || d == 0 {
        return Ok(());
    }
    let split = Split::new(d, cpu.parts_for(n * n * d), BLOCK);
    let xs = x.as_slice();
    let ws = weights.as_slice();
    let optr = SyncPtr(out.as_mut_slice().as_mut_ptr());
    split.for_each(|(k0, k1)| {
        let mut kb = k0;
        while kb < k1 {
            let w = BLOCK.min(k1 - kb);
            for i in 0..n {
                // SAFETY: each part owns columns k0..k1 of `out`, a buffer distinct from
                // `x` and `weights` (the borrow checker guarantees it).
                let v = unsafe { std::slice::from_raw_parts_mut(optr.get().add(i * d + kb), w) };
                simd::combine(
                    v,
                    None,
                    0.0,
                    &ws[i * n..(i + 1) * n],
                    &xs[kb..],
                    1.0,
                    None,
                    0.0,
                    d,
                );
            }
            kb += w;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Guidance};
    use crate::flow::{time_grid, Path, PathKind};
    use crate::rng::{NoiseKey, Stream};

    /// An F2P problem: (previous analysis, forecast, state near the previous analysis, y).
    fn problem(cpu: &Cpu, n: usize, d: usize) -> [CpuBuffer; 4] {
        let key = NoiseKey::new(11, Stream::User, 0);
        let mut prev = cpu.zeros(n, d).unwrap();
        cpu.fill_normal(&mut prev, key, None, 1.0).unwrap();
        let mut fc = cpu.zeros(n, d).unwrap();
        cpu.fill_normal(&mut fc, key.with_step(1), Some(&prev), 0.3)
            .unwrap();
        let mut x = cpu.zeros(n, d).unwrap();
        cpu.fill_normal(&mut x, key.with_step(2), Some(&prev), 0.05)
            .unwrap();
        let mut y = cpu.zeros(1, d).unwrap();
        cpu.fill_normal(&mut y, key.with_step(3), None, 0.5)
            .unwrap();
        [prev, fc, x, y]
    }

    fn logits(cpu: &Cpu, x: &CpuBuffer, fc: &CpuBuffer, prev: &CpuBuffer, t: f32) -> Vec<f32> {
        let n = x.rows();
        let mut out = cpu.zeros(n, n).unwrap();
        let p = Path::new(PathKind::F2p, 0.2).unwrap().at(t);
        flow_logits(cpu, x, fc, Some(prev), p, None, &mut out).unwrap();
        out.as_slice().to_vec()
    }

    /// One guided Euler step of F2P from `t0` to `t1` on `cpu`, leaving its speculation.
    fn euler_step(cpu: &Cpu, bufs: &mut [CpuBuffer; 4], t0: f32, t1: f32) {
        let [prev, fc, x, y] = bufs;
        let n = x.rows();
        let mut w = cpu.zeros(n, n).unwrap();
        let path = Path::new(PathKind::F2p, 0.2).unwrap();
        flow_logits(cpu, x, fc, Some(prev), path.at(t0), None, &mut w).unwrap();
        softmax_rows(&mut w).unwrap();
        let op = Observe::arctan();
        let up = FlowUpdate {
            eval: None,
            weights: &w,
            target: fc,
            source: Some(prev),
            path: path.at(t0),
            guidance: Some(Guidance {
                operator: &op,
                y,
                scale: 0.5,
                horizon: 1.0 - t0,
            }),
            h_new: t1 - t0,
            previous: None,
            clamp: None,
        };
        flow_update(cpu, x, &up, None).unwrap();
    }

    #[test]
    fn softmax_equals_the_row_by_row_formula() {
        // Rows summed in groups of four (with a short last group), the small and the large
        // stack buffer, and rows longer than the stack buffer.
        for n in [1usize, 2, 3, 5, 20, 33, 257] {
            let cpu = Cpu::new();
            let mut logits = cpu.zeros(n, n).unwrap();
            let key = NoiseKey::new(9, Stream::User, n as u32);
            cpu.fill_normal(&mut logits, key, None, 40.0).unwrap();
            let want: Vec<f32> = logits
                .as_slice()
                .chunks(n)
                .flat_map(|row| {
                    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                    let e: Vec<f64> = row.iter().map(|&l| (l as f64 - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    e.into_iter().map(move |ej| (ej / sum) as f32)
                })
                .collect();
            softmax_rows(&mut logits).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(logits.as_slice()), bits(&want), "n {n}");
        }
    }

    #[test]
    fn softmax_names_the_first_non_finite_log_weight() {
        let cpu = Cpu::new();
        let mut logits = cpu.upload(3, 3, &[0.0; 9]).unwrap();
        logits.as_mut_slice()[7] = f32::NAN;
        let err = softmax_rows(&mut logits).unwrap_err().to_string();
        assert!(err.contains("member 2, pair 1"), "{err}");
    }

    fn pending(cpu: &Cpu) -> Option<NextLogits> {
        cpu.with_scratch(|s| s.next_logits).unwrap()
    }

    #[test]
    fn fused_update_hands_bit_identical_logits_to_the_next_call() {
        // 7 x 3001: parallel split, a 2x4 tile remainder and a column tail.
        let (n, d) = (7, 3001);
        let cpu = Cpu::new();
        let mut bufs = problem(&cpu, n, d);
        let grid = time_grid(9);
        euler_step(&cpu, &mut bufs, grid[3], grid[4]);
        let next = pending(&cpu).expect("the update speculated on the next step");
        let want = Path::new(PathKind::F2p, 0.2).unwrap().at(grid[4]);
        assert_eq!((next.a, next.b), (want.a.to_bits(), want.b.to_bits()));
        let [prev, fc, x, _] = &bufs;
        let fused = logits(&cpu, x, fc, prev, grid[4]);
        assert!(pending(&cpu).is_none(), "the speculation is used once");
        let fresh = logits(&Cpu::new(), x, fc, prev, grid[4]);
        assert_eq!(fused, fresh);
        assert!(fused.iter().all(|l| l.is_finite() && *l <= 0.0));
    }

    #[test]
    fn speculation_is_ignored_when_an_input_changed() {
        let (n, d) = (4, 700);
        let grid = time_grid(5);
        for change in 0..4 {
            let cpu = Cpu::new();
            let mut bufs = problem(&cpu, n, d);
            euler_step(&cpu, &mut bufs, grid[1], grid[2]);
            let mut t = grid[2];
            match change {
                0 => bufs[2].as_mut_slice()[3] += 1.0,     // the state
                1 => bufs[1].as_mut_slice()[d + 5] -= 2.0, // the forecast
                2 => cpu.write(&mut bufs[0], &vec![0.25; n * d]).unwrap(), // the source
                _ => t = grid[3],                          // other coefficients
            }
            let [prev, fc, x, _] = &bufs;
            let got = logits(&cpu, x, fc, prev, t);
            assert_eq!(got, logits(&Cpu::new(), x, fc, prev, t), "change {change}");
        }
    }

    #[test]
    fn predicted_coefficients_match_the_paths_on_uniform_grids() {
        // The prediction is exact for both paths on every grid the filter uses, so every
        // Euler step but the last hands its distances on.
        for kind in [PathKind::F2p, PathKind::Ot] {
            let path = Path::new(kind, 0.01).unwrap();
            for steps in (1..=64).chain([99, 100, 199]) {
                let grid = time_grid(steps);
                for k in 0..steps - 1 {
                    let (a, b) = predict_means(&path.at(grid[k]), grid[k + 1] - grid[k]);
                    let want = path.at(grid[k + 1]);
                    assert_eq!(
                        (a, b),
                        (want.a, want.b),
                        "{kind:?}, {steps} steps, step {k}"
                    );
                }
            }
        }
    }
}
