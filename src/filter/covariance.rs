//! Covariance guidance for EnFF (`filter.guidance = "covariance"`): the innovation at the
//! predicted endpoint carried through a localized ensemble Kalman gain.
//!
//! # The guidance
//!
//! The paper's local guidance `g = λ J_hᵀ(y − h(x̂₁))/σ_y²` (ENFF_SPEC §3.1) moves each
//! component only by its own observation, so it never reaches unobserved components and, with
//! accurate observations, becomes stiff. Covariance guidance replaces the identity
//! preconditioner by the forecast-ensemble covariance, in the bounded Kalman-gain form
//!
//! ```text
//!   g = λ · K(τ) · (y − h(x̂₁)),     K(τ) = P Hᵀ (τ·H P Hᵀ + R)⁻¹,
//! ```
//!
//! with `x̂₁ = x + (1 − t)·v̂` the member's predicted endpoint (as in §3.1), `P` the forecast
//! covariance (localized, below), `H` the Jacobian of `h` at the forecast mean and `R = σ_y² I`.
//! `‖τ·H K(τ)‖ < 1` for every `τ`, so the step is bounded however small `σ_y` is.
//!
//! # The schedule (why the tempered stages)
//!
//! With one-hot flow weights the transport velocity does not depend on a member's offset from
//! its path, so an offset `δ` added by the guidance is carried to `t = 1`, and the innovation at
//! `x̂₁` sees it: `y − h(x̂₁) = y − h(x_f) − Hδ` for a linear `h`. Feeding back this way, a
//! constant gain cannot reproduce the Kalman update: along a direction where `HK` has the
//! eigenvalue `μ`, explicit steps leave the fraction `∏(1 − λΔt μ)` of the innovation instead of
//! `1 − μ` (`≈ e^{−μ}` at λ = 1: 37 % instead of 10 % at μ = 0.9). The tempered ("homotopy")
//! schedule fixes this exactly. The flow applies `S` guidance stages; stage `s` moves the
//! tempering exponent of the likelihood from `τ_s = λs/S` to `τ_{s+1}` with
//!
//! ```text
//!   δ ← δ + (τ_{s+1} − τ_s) · K(τ_{s+1}) · (y − h(x̂₁)).
//! ```
//!
//! In an eigendirection of `P^{1/2}HᵀR⁻¹HP^{1/2}` (eigenvalue `γ`) the remaining innovation is
//! multiplied by `1 − (τ_{s+1} − τ_s)γ/(1 + τ_{s+1}γ) = (1 + τ_sγ)/(1 + τ_{s+1}γ)`; the product
//! over the stages telescopes to `1/(1 + λγ)`, which is the Kalman update for the likelihood
//! raised to the power `λ` (`R → R/λ`). So, **for linear `h`, at `λ = 1`, one analysis moves
//! every member by `K(y − H x_f)` and the analysis mean is the Kalman mean** for any number of
//! stages, and each stage is a contraction (no step size can make it diverge). For nonlinear
//! `h` the stages re-linearize the innovation at the current endpoint, like an iterated EnKF.
//! `λ > 1` over-weights the observations (useful from a cold start); `λ < 1` under-weights them.
//!
//! # Member deviations: the deterministic-EnKF split
//!
//! Every member carrying its own innovation `y − h(x̂₁[k])` through the gain would update the
//! deviations from the mean by `I − KH` — the Kalman gain without perturbed observations, whose
//! spread is too small (`(I − KH)P(I − KH)ᵀ` instead of `(I − KH)P`); from a cold start with
//! accurate observations it collapses the ensemble in one cycle and the filter then ignores the
//! data. As in Sakov and Oke's deterministic EnKF, the innovation is split about the ensemble
//! mean `h̄` of `h(x̂₁)`: member `k` sees `(y − h̄) − ½·(h(x̂₁[k]) − h̄)`
//! ([`ANOMALY_WEIGHT`]). The mean update is unchanged (still exact); the deviations are updated
//! by `I − ½KH ≈ (I − KH)^{1/2}`, the square-root filter's to first order. Measured on the
//! cold-start arctan Lorenz-96 (d = 100, λ = 2, inflation 1.05): time-mean RMSE 0.06 with the
//! split, 2.1 (lost track) without.
//!
//! # Transport weights at the unguided position
//!
//! The schedule above assumes one-hot flow weights that keep each member on its own path.
//! In a few dimensions (Lorenz-63, Rotation2D) one stage can move a member farther than the
//! spacing between members, and the weights, evaluated at the guided state, then switch it to
//! another member's path: it is carried by that member's transport velocity from there on
//! (on Rotation2D the spread collapses on some seeds, and RMSE doubles).
//! [`EnffConfig::unguided_weights`](crate::filter::EnffConfig::unguided_weights) evaluates the
//! weights at the member's unguided position instead, the source sample moved by the transport
//! velocity alone (one more velocity evaluation per step), so the guidance only adds its
//! offset and every member ends on its own forecast. Covariance guidance turns it on by
//! default on models without a spatial geometry; on a ring or torus the members are far apart
//! and the paper's choice (weights at the guided state) is kept.
//!
//! # Linearization
//!
//! `H` is the Jacobian of `h` at the mean of the predicted endpoints `x̂₁` of the stage, so
//! later stages re-linearize where the analysis is heading (an iterated EnKF in pseudo-time);
//! `P` stays the forecast covariance. With one stage this is the forecast mean (up to the
//! transport), the classical EnKF linearization.
//!
//! # Stages at the price of one: a shared linearization
//!
//! What the stages of one analysis share is everything but `τ`: with `H` fixed, every stage's
//! gain comes from the same ensemble-space matrix `G_i` of component `i` (below), whose
//! construction (`O(n²·w)`) dominates a stage's cost. By default (`filter.relinearize =
//! false`) the first stage builds the gain tables of all stages in one
//! [`Backend::local_gains`] call, linearized at its endpoint mean: `G_i` is formed once and
//! each stage adds one Cholesky factorization of `I + τ_s·G_i` (`n³/6`; for `n ≤ 48` and a
//! few stages cheaper than the one eigendecomposition after which `(I + τG)⁻¹` would be a
//! diagonal rescale). Later stages compute only the mean observed endpoint `h̄` of their own
//! endpoints (a statistics-only call) and apply their table. The constant schedule's equal
//! exponents share one table. For linear `h` this is exactly the per-stage computation (tested
//! on both backends); `filter.relinearize = true` re-linearizes and recomputes the gains at
//! every stage (an iterated EnKF in pseudo-time). The tables take `S·d·w` values, as many
//! at a time as fit one kernel argument of the backend ([`Backend::max_binding_bytes`]);
//! when they come in several groups the first stage's endpoints are kept, so that every
//! group is linearized at the same point.
//!
//! `filter.gain_schedule = "constant"` is the plain form `g = λ·K(1)·(y − h(x̂₁))` at every flow
//! step, kept for comparison.
//!
//! # Safeguards for saturating observations: the innovation bound and adaptive inflation
//!
//! The stages are exact for linear `h`. With a saturating `h` (arctan) and a cold start the
//! linearization can be badly off: where the gain's Jacobian `h'(l)` is small, `K ≈ P h'/σ_y²`
//! is large, while the innovation `y − h(x̂₁)` is bounded but does not shrink as the member
//! moves (the observation has saturated), so a Gauss–Newton stage overshoots by many forecast
//! standard deviations; the next forecast starts from states far outside the attractor and the
//! run diverges. Measured on the half-observed cold start (d = 400, 3 seeds): divergence or a
//! time-mean RMSE of 0.8–3 for every λ and fixed inflation tried.
//!
//! * **Innovation bound** (`filter.innovation_clip = c`, default 2, 0 = off). Each innovation
//!   is clamped to `±c·s_q` with `s_q² = h'(l_c)² v_c + σ_y²` — the innovation standard
//!   deviation of the linear-Gaussian model the gain assumes (`l` the gain's linearization
//!   point, `v_c` the forecast variance of the observed component `c`). In that model
//!   `|K_iq|·s_q ≤ √P_ii`, so one stage moves a component by at most about `c` forecast
//!   standard deviations per observation, whatever `h'`. It is the classical background check,
//!   applied as a clamp (Huber) rather than a rejection, so a cold start still moves towards
//!   the observations. For a consistent Gaussian ensemble only the innovations beyond `c`
//!   standard deviations are touched (4.6 % at `c = 2`); the Kalman-limit tests switch it off.
//! * **Adaptive prior inflation** (`filter.adaptive_inflation = γ_max`, 1.0 = off): the forecast
//!   is inflated by the factor its innovation statistics ask for, within `[1, γ_max]`
//!   ([`crate::filter::inflation`]). A cold start's spread is far below its error; without it
//!   the gains are too small to pull the unobserved components in.
//!
//! Together, at the Kalman-consistent `λ = 1` and no fixed inflation: half-observed cold start
//! 0.17 ± 0.05 (d = 2000, 3 seeds; plain EnFF 1.4), fully observed 0.048 (d = 1000; 0.054
//! before with `λ = 2` and inflation 1.05). With well-behaved observations (identity,
//! `σ_y = 1`) the bound rarely binds and `lorenz96_sakov2008` is unchanged.
//!
//! # Localization and the banded gain
//!
//! The gain is computed from the forecast ensemble, locally per state
//! component like the LETKF (ENFF_SPEC §6.5): row `i` of `K(τ)` uses only the observations
//! within the Gaspari–Cohn support (`2·1.82·filter.loc_radius` grid spacings on the model's
//! [`Geometry`]), each weighted by its taper `ρ` (R-localization, `R⁻¹ → ρ R⁻¹`). In ensemble
//! space, with `A` the scaled forecast anomalies (`P = AAᵀ`, `n` columns) and
//! `b_q = h'(x̄_q) A_q / σ_y` the scaled observed anomalies,
//!
//! ```text
//!   G_i = Σ_q ρ_iq b_q b_qᵀ  (n × n),    K(τ)[i, q] = (ρ_iq/σ_y) · b_qᵀ (I + τ G_i)⁻¹ a_i,
//! ```
//!
//! one Cholesky factorization per component and stage, O(n²·w + n³) with `w` the observations
//! in the window (the O(n²·w) part once per analysis when the stages share a linearization).
//! Row `i` is stored banded: `w` gains and the indices of their observations (`d × w` each,
//! one gain table per stage), zero-padded, and the kernel [`Backend::gain_step`] applies a
//! stage's table at the flow step that carries it, O(n·d·w).
//!
//! # Where the gains are computed, and what crosses to the host
//!
//! The windows (observation index and taper of every entry, `d × w` each) depend only on the
//! geometry, the operator and the radius: [`gain_windows`] builds them once on the host and
//! the filter uploads them once and keeps them (with the gain table and `h̄`) from cycle to
//! cycle. Everything else runs on the backend, [`Backend::local_gains`] (at the first stage,
//! or at every stage when re-linearizing): the column means of the forecast and of the
//! endpoints (the linearization point), `h̄` and the
//! linearized innovation variances `h'(l_c)² v_c + σ_y²` of the innovation bound (the two rows
//! of the stage's `2 × m` observation statistics), and the local gains, written into the
//! device's gain table, which [`Backend::gain_step`] applies. Per analysis nothing of size
//! `n × d` is read back; only the deferred error flags are, and, with adaptive inflation, the
//! `2·m` observed moments of the forecast and `y` (an `m`-sized read, no ensemble).
//! A sharded run ([`crate::partition::halo`]) extends each rank's slab by halo components
//! through the host: the forecast once per analysis and the endpoints once per stage.
//!
//! Each component's system is solved in whichever space is smaller. In observation space
//! (the Woodbury form, with `D = diag(ρ_i)` and `B` the `n × w` matrix of the `b_q`),
//!
//! ```text
//!   K_i = (1/σ_y) · D^{1/2} (I + τ·D^{1/2} BᵀB D^{1/2})⁻¹ D^{1/2} Bᵀ a_i,
//! ```
//!
//! a `w × w` Cholesky whose entries are tapered forecast covariances `h'_q h'_r P(c_q, c_r)`;
//! in ensemble space, the `n × n` system above. Both are the same matrix identity. The GPU
//! kernels (`shaders/gain_local.wgsl`, one workgroup per component, the matrix and a tile
//! of anomalies in workgroup memory) make the twin's choice of space
//! ([`crate::backend::gpu::gain_space`]): observation space for windows of at most
//! `min(n, 48)` entries, ensemble space for wider windows (a torus, a long radius) with at
//! most 48 members. Only ensembles split into member blocks, and problems with both `n` and
//! `w` above 48, fall back to the CPU twin on the host, with a logged line.
//! The CPU twin (`backend/cpu/gain.rs`) solves sixteen components at a time in f32
//! lanes, in observation space when `w ≤ n` and in ensemble space otherwise; the f64 host
//! function [`local_gains`] is the reference the tests compare both against. The cost per
//! re-linearized stage is `O(d·(n·w² + w³))` or `O(d·(n²·w + n³))`, against `O(n²·d)` per flow
//! step of the transport; shared stages pay the `n²·w` (or `n·w²`) part once. On the CPU the
//! 4-stage analysis costs about 3.5× the plain one shared, 8× re-linearized (BENCHMARKS.md).
//!
//! # What is tested
//!
//! With linear `h`, a Gaussian forecast ensemble, no localization and `λ = 1`, one analysis
//! gives the ETKF analysis mean of the same ensemble (to 2e-3, for 1 and 4 stages) and
//! converges to the population Kalman mean as `n` grows (20 → 320 members);
//! the constant schedule misses it (`tests/covariance_guidance.rs`). The backends' local gains
//! agree with the f64 reference [`local_gains`] on odd rings and tori, in both spaces
//! (`tests/covariance_guidance.rs` for the CPU twin, `tests/covariance_guidance.rs` for the kernels and
//! their host fallbacks).

use rayon::prelude::*;

use crate::backend::{Backend, MAX_GAIN_OBS};
use crate::error::{Error, Result};
use crate::flow::GainSchedule;
use crate::localization::gaspari_cohn;
use crate::model::Geometry;
use crate::observe::Observe;

/// Weight of the member deviations in the innovation (the deterministic EnKF's half gain):
/// member `k` sees `(y − h̄) − ½·(h(x̂₁[k]) − h̄)`.
pub const ANOMALY_WEIGHT: f32 = 0.5;

/// One component's local observations `(index, taper)` and its gains for every `τ`.
type LocalRow = (Vec<(usize, f64)>, Vec<f64>);

/// Taper below which an observation is left out of a local gain.
const RHO_MIN: f64 = 1e-6;

/// The local gains of one analysis, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct BandedGains {
    /// Entries per component (the widest local window).
    pub w: usize,
    /// Observation index of every entry (`d × w`, exact integers; padding is index 0, gain 0).
    pub index: Vec<f32>,
    /// One `d × w` table per exponent in `taus`.
    pub tables: Vec<Vec<f32>>,
}

/// Checks a localization radius.
pub fn check_radius(radius: f64) -> Result<()> {
    if radius.is_finite() && radius > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            "filter.loc_radius",
            radius,
            "the localization radius must be a positive number of grid spacings (2-8 is typical)",
        ))
    }
}

/// The tempering exponents and step weights of `stages` guidance stages at scale `lambda`:
/// `(τ_{s+1}, weight_s)` for every stage (see the module documentation).
pub fn stages(schedule: GainSchedule, stages: usize, lambda: f64) -> Vec<(f64, f64)> {
    let s = stages.max(1);
    match schedule {
        GainSchedule::Homotopy => (0..s)
            .map(|k| {
                let (t0, t1) = (
                    lambda * k as f64 / s as f64,
                    lambda * (k + 1) as f64 / s as f64,
                );
                (t1, t1 - t0)
            })
            .collect(),
        GainSchedule::Constant => (0..s).map(|_| (1.0, lambda / s as f64)).collect(),
    }
}

/// The exponents whose gain tables the stages of `stages` ([`stages`]) share one
/// linearization of, and the table of every stage: consecutive equal exponents (the constant
/// schedule's) share one table.
pub fn stage_tables(stages: &[(f64, f64)]) -> (Vec<f32>, Vec<usize>) {
    let mut taus: Vec<f32> = Vec::new();
    let mut table = Vec::with_capacity(stages.len());
    for &(tau, _) in stages {
        let tau = tau as f32;
        if taus.last() != Some(&tau) {
            taus.push(tau);
        }
        table.push(taus.len() - 1);
    }
    (taus, table)
}

/// The flow step at which stage `s` of `stages` is applied, for `flow_steps ≥ stages` steps:
/// spread evenly, the first stage at the first step.
pub fn stage_step(s: usize, stages: usize, flow_steps: usize) -> usize {
    s * flow_steps / stages.max(1)
}

/// The static localization windows of covariance guidance: for every state component its
/// observations inside the Gaspari–Cohn support and their tapers, sorted by observation index
/// and zero-padded to the widest window. They depend only on the geometry, the operator and
/// the radius, so a filter builds them once on the host and keeps them on the backend.
#[derive(Clone, Debug, PartialEq)]
pub struct GainWindows {
    /// Entries per component (the widest local window, at least 1).
    pub w: usize,
    /// Observation index of every entry (`d × w`, exact integers; padding is index 0).
    pub index: Vec<f32>,
    /// Taper `ρ` of every entry (`d × w`; padding is 0).
    pub taper: Vec<f32>,
}

/// The windows of `op` on `geometry` (`d` components) for a Gaspari–Cohn taper of radius
/// `radius`: observations within `2·1.82·radius` whose taper exceeds 1e-6.
pub fn gain_windows(
    op: &Observe,
    d: usize,
    geometry: Geometry,
    radius: f64,
) -> Result<GainWindows> {
    check_radius(radius)?;
    if !geometry.is_spatial() {
        return Err(Error::invalid(
            "filter.guidance",
            "covariance",
            "covariance guidance localizes on the model's geometry, and this model has none: \
             use guidance = \"local\" (or a model with a ring or torus geometry)",
        ));
    }
    if geometry.dim() != Some(d) {
        return Err(Error::shape(
            "model geometry",
            format!("{d} components"),
            format!("{:?}", geometry.dim()),
        ));
    }
    let m = crate::observe::ObservationOperator::obs_dim(op, d)?;
    if m > MAX_GAIN_OBS {
        return Err(Error::TooLarge {
            detail: format!("covariance guidance indexes at most {MAX_GAIN_OBS} observations"),
        });
    }
    let reach = 2.0 * 1.82 * radius;
    let rows: Vec<Vec<(usize, f64)>> = (0..d)
        .into_par_iter()
        .map(|i| {
            let mut local: Vec<(usize, f64)> = geometry
                .neighbours(i, reach)
                .into_iter()
                .filter(|&(c, _)| c >= op.offset && (c - op.offset).is_multiple_of(op.every))
                .map(|(c, dist)| ((c - op.offset) / op.every, gaspari_cohn(dist, radius)))
                .filter(|&(q, rho)| q < m && rho > RHO_MIN)
                .collect();
            local.sort_by_key(|p| p.0);
            local
        })
        .collect();
    let w = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut index = vec![0.0f32; d * w];
    let mut taper = vec![0.0f32; d * w];
    for (i, local) in rows.iter().enumerate() {
        for (e, &(q, rho)) in local.iter().enumerate() {
            index[i * w + e] = q as f32;
            taper[i * w + e] = rho as f32;
        }
    }
    Ok(GainWindows { w, index, taper })
}

/// Most entries of a global gain table (`d × m`): 2²⁴, 64 MiB of f32 per table.
pub const MAX_GLOBAL_GAIN_ENTRIES: usize = 1 << 24;

/// The windows of the global gain (`filter.loc_radius = none`, or a model without a spatial
/// geometry): every component sees every observation, untapered, so each component's gain is
/// the ensemble-space Kalman gain `K(τ) = A (I + τ BᵀB)⁻¹ Bᵀ / σ_y` of the whole ensemble — the
/// ETKF's gain for linear `h` and `λ = 1`. The table is `d × m`; a problem larger than
/// [`MAX_GLOBAL_GAIN_ENTRIES`] is refused (localize it instead).
pub fn global_windows(op: &Observe, d: usize) -> Result<GainWindows> {
    let m = crate::observe::ObservationOperator::obs_dim(op, d)?;
    if m > MAX_GAIN_OBS {
        return Err(Error::TooLarge {
            detail: format!("covariance guidance indexes at most {MAX_GAIN_OBS} observations"),
        });
    }
    if d.saturating_mul(m) > MAX_GLOBAL_GAIN_ENTRIES {
        return Err(Error::invalid(
            "filter.loc_radius",
            "none",
            format!(
                "global covariance guidance keeps a d × m = {d} × {m} gain table, more than \
                 {MAX_GLOBAL_GAIN_ENTRIES} entries: set filter.loc_radius (4 is typical) to \
                 localize the gains"
            ),
        ));
    }
    let w = m.max(1);
    let mut index = vec![0.0f32; d * w];
    let mut taper = vec![0.0f32; d * w];
    for i in 0..d {
        for q in 0..m {
            index[i * w + q] = q as f32;
            taper[i * w + q] = 1.0;
        }
    }
    Ok(GainWindows { w, index, taper })
}

/// The f64 host reference of the local gains (the backends compute them with
/// [`Backend::local_gains`]; the tests compare against this).
///
/// Local Kalman gains `K(τ)` for every `τ` in `taus`, from the forecast ensemble `x` (`n × d`,
/// row-major) observed through `op` with noise std `sigma`, localized on `geometry` with a
/// Gaspari–Cohn taper of radius `radius`. The Jacobian `H` is taken at `linearize_at` (`d`
/// values; `None` = the forecast mean).
#[allow(clippy::too_many_arguments)]
pub fn local_gains(
    x: &[f32],
    n: usize,
    d: usize,
    op: &Observe,
    sigma: f64,
    geometry: Geometry,
    radius: f64,
    taus: &[f64],
    linearize_at: Option<&[f64]>,
) -> Result<BandedGains> {
    let windows = gain_windows(op, d, geometry, radius)?;
    if n < 2 {
        return Err(Error::invalid(
            "ensemble.n",
            n,
            "a covariance needs at least 2 members",
        ));
    }
    let m = crate::observe::ObservationOperator::obs_dim(op, d)?;
    // Scaled anomalies, component-major: a[c*n + k] = (x[k,c] − x̄_c)/√(n−1).
    let scale = 1.0 / ((n - 1) as f64).sqrt();
    let mut a = vec![0.0f64; n * d];
    let mut mean = vec![0.0f64; d];
    a.par_chunks_mut(n)
        .zip(mean.par_iter_mut())
        .enumerate()
        .for_each(|(c, (col, mu))| {
            let s: f64 = (0..n).map(|k| x[k * d + c] as f64).sum();
            *mu = s / n as f64;
            for (k, v) in col.iter_mut().enumerate() {
                *v = (x[k * d + c] as f64 - *mu) * scale;
            }
        });
    // Scaled observed anomalies b_q = h'(x̄) a_comp(q) / σ.
    if let Some(l) = linearize_at {
        if l.len() != d {
            return Err(Error::shape(
                "linearization point",
                format!("{d} values"),
                format!("{} values", l.len()),
            ));
        }
    }
    let lin = linearize_at.unwrap_or(&mean);
    let mut b = vec![0.0f64; n * m];
    b.par_chunks_mut(n).enumerate().for_each(|(q, col)| {
        let c = op.component(q);
        let dh = op.pointwise.derivative(lin[c] as f32) as f64 / sigma;
        for (v, av) in col.iter_mut().zip(&a[c * n..(c + 1) * n]) {
            *v = dh * av;
        }
    });
    let ww = windows.w;
    // Per component: its observations with tapers (as stored in the windows, f32), and one
    // gain row per τ.
    let rows: Vec<LocalRow> = (0..d)
        .into_par_iter()
        .map_init(
            || (vec![0.0f64; n * n], vec![0.0f64; n * n], vec![0.0f64; n]),
            |(g, l, w), i| {
                let local: Vec<(usize, f64)> = (0..ww)
                    .filter(|&e| windows.taper[i * ww + e] > 0.0)
                    .map(|e| {
                        (
                            windows.index[i * ww + e] as usize,
                            windows.taper[i * ww + e] as f64,
                        )
                    })
                    .collect();
                let ml = local.len();
                let mut out = vec![0.0f64; taus.len() * ml];
                if ml == 0 {
                    return (local, out);
                }
                // G = Σ ρ b bᵀ (lower triangle).
                g.iter_mut().for_each(|v| *v = 0.0);
                for &(q, rho) in &local {
                    let bq = &b[q * n..(q + 1) * n];
                    for r in 0..n {
                        let s = rho * bq[r];
                        for c in 0..=r {
                            g[r * n + c] += s * bq[c];
                        }
                    }
                }
                let ai = &a[i * n..(i + 1) * n];
                for (t, &tau) in taus.iter().enumerate() {
                    // L Lᵀ = I + τ G, then w = (I + τ G)⁻¹ a_i.
                    for r in 0..n {
                        for c in 0..=r {
                            l[r * n + c] = tau * g[r * n + c] + if r == c { 1.0 } else { 0.0 };
                        }
                    }
                    cholesky_in_place(l, n);
                    w.copy_from_slice(ai);
                    cholesky_solve(l, n, w);
                    for (e, &(q, rho)) in local.iter().enumerate() {
                        let bq = &b[q * n..(q + 1) * n];
                        let dot: f64 = bq.iter().zip(w.iter()).map(|(p, v)| p * v).sum();
                        out[t * ml + e] = rho / sigma * dot;
                    }
                }
                (local, out)
            },
        )
        .collect();
    let w = ww;
    let index = windows.index;
    let mut tables = vec![vec![0.0f32; d * w]; taus.len()];
    for (i, (local, out)) in rows.iter().enumerate() {
        let ml = local.len();
        for e in 0..ml {
            for (t, table) in tables.iter_mut().enumerate() {
                table[i * w + e] = out[t * ml + e] as f32;
            }
        }
    }
    if let Some(t) = tables.iter().find(|t| t.iter().any(|v| !v.is_finite())) {
        let e = t.iter().position(|v| !v.is_finite()).expect("found");
        return Err(Error::NonFinite {
            name: "covariance guidance gain".into(),
            location: format!("component {}, entry {}", e / w, e % w),
            value: t[e] as f64,
            hint: "the forecast ensemble overflowed; check the model step".into(),
        });
    }
    Ok(BandedGains { w, index, tables })
}

/// In-place Cholesky factorization of the SPD matrix in the lower triangle of `l` (`n × n`).
/// The diagonal is floored so that round-off cannot produce a NaN (the matrix is `I + τG` with
/// `G ⪰ 0`, so its eigenvalues are at least 1).
fn cholesky_in_place(l: &mut [f64], n: usize) {
    for j in 0..n {
        let mut s = l[j * n + j];
        for k in 0..j {
            s -= l[j * n + k] * l[j * n + k];
        }
        let djj = s.max(1e-12).sqrt();
        l[j * n + j] = djj;
        for r in j + 1..n {
            let mut s = l[r * n + j];
            for k in 0..j {
                s -= l[r * n + k] * l[j * n + k];
            }
            l[r * n + j] = s / djj;
        }
    }
}

/// Solves `L Lᵀ v = rhs` in place.
fn cholesky_solve(l: &[f64], n: usize, v: &mut [f64]) {
    for r in 0..n {
        let mut s = v[r];
        for k in 0..r {
            s -= l[r * n + k] * v[k];
        }
        v[r] = s / l[r * n + r];
    }
    for r in (0..n).rev() {
        let mut s = v[r];
        for k in r + 1..n {
            s -= l[k * n + r] * v[k];
        }
        v[r] = s / l[r * n + r];
    }
}

/// Device copies of the static windows (uploaded once), the gain table of the current stage
/// and the mean observed endpoint `h̄`, reused from stage to stage and cycle to cycle while the
/// state dimension, operator, geometry and radius stay the same.
pub(crate) struct DeviceGains<B: Backend> {
    key: (usize, Observe, Option<u64>, Geometry, usize),
    /// Window observation indices (`d × w`).
    pub(crate) index: B::Buffer,
    /// Window tapers (`d × w`).
    pub(crate) taper: B::Buffer,
    /// The gain tables (`(G·d) × w`): `G` of the stages' exponents when the stages share one
    /// linearization (all of them when they fit one kernel argument, else a group at a time),
    /// else the current stage's alone.
    pub(crate) gain: B::Buffer,
    /// Tables held by `gain` (`G`).
    pub(crate) group: usize,
    /// The group of exponents whose tables `gain` holds now (shared linearization).
    pub(crate) loaded: Option<usize>,
    /// The first stage's endpoints, kept when the shared tables come in several groups: every
    /// group is linearized where the first was.
    pub(crate) lin_endpoint: Option<B::Buffer>,
    /// The observation statistics of the gains' linearization (`2 × m`): the mean observed
    /// endpoint `h̄` and the linearized innovation variances of the innovation bound.
    pub(crate) hbar: B::Buffer,
    /// The mean observed endpoint `h̄` of a later stage (`1 × m`) when the stages share one
    /// linearization.
    pub(crate) stage_hbar: B::Buffer,
    /// Whether the host path of the gains has been reported (once per filter).
    pub(crate) host_logged: bool,
}

impl<B: Backend> DeviceGains<B> {
    /// `old` when it was built for the same problem; otherwise builds the windows on the host
    /// and uploads them (the only host work of covariance guidance), with room for up to
    /// `tables` gain tables (as many as fit one kernel argument of `backend`).
    pub(crate) fn prepare(
        backend: &B,
        op: Observe,
        d: usize,
        geometry: Geometry,
        radius: Option<f64>,
        tables: usize,
        old: Option<Self>,
    ) -> Result<Self> {
        let key = (d, op, radius.map(f64::to_bits), geometry, tables);
        let host_logged = old.as_ref().is_some_and(|o| o.host_logged);
        if let Some(mut o) = old.filter(|o| o.key == key) {
            o.loaded = None;
            return Ok(o);
        }
        let win = match radius {
            Some(r) => gain_windows(&op, d, geometry, r)?,
            None => global_windows(&op, d)?,
        };
        let table_bytes = (d.max(1) * win.w * 4) as u64;
        let group = tables
            .min((backend.max_binding_bytes() / table_bytes) as usize)
            .max(1);
        let m = crate::observe::ObservationOperator::obs_dim(&op, d)?;
        Ok(DeviceGains {
            key,
            index: backend.upload(d, win.w, &win.index)?,
            taper: backend.upload(d, win.w, &win.taper)?,
            gain: backend.zeros(group * d, win.w)?,
            group,
            loaded: None,
            lin_endpoint: None,
            hbar: backend.zeros(2, m)?,
            stage_hbar: backend.zeros(1, m)?,
            host_logged,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Pointwise;

    /// Dense reference: K = P_loc Hᵀ (τ H P_loc Hᵀ + R)⁻¹ is *not* the R-localized gain, but
    /// without localization (a radius covering everything, all tapers ≈ 1 at short range)
    /// both agree: check against the dense formula on a tiny ring with a huge radius.
    #[test]
    fn banded_gain_matches_the_dense_kalman_gain_without_localization() {
        let (n, d) = (6, 5);
        let x: Vec<f32> = (0..n * d)
            .map(|e| ((e * 37 % 11) as f32 - 5.0) * 0.3 + (e % d) as f32 * 0.1)
            .collect();
        let op = Observe::full(Pointwise::Identity).subsample(2, 1).unwrap();
        let sigma = 0.7;
        let taus = [0.5, 1.0];
        // Radius so large that the taper is 1 − O(1e-5) over distance ≤ 2.
        let g = local_gains(
            &x,
            n,
            d,
            &op,
            sigma,
            Geometry::Ring { len: d },
            1e4,
            &taus,
            None,
        )
        .unwrap();
        let m = 2;
        // Dense P.
        let mean: Vec<f64> = (0..d)
            .map(|c| (0..n).map(|k| x[k * d + c] as f64).sum::<f64>() / n as f64)
            .collect();
        let p = |i: usize, j: usize| {
            (0..n)
                .map(|k| (x[k * d + i] as f64 - mean[i]) * (x[k * d + j] as f64 - mean[j]))
                .sum::<f64>()
                / (n - 1) as f64
        };
        for (t, &tau) in taus.iter().enumerate() {
            // S = τ H P Hᵀ + R (2 × 2), K = P Hᵀ S⁻¹.
            let c = [op.component(0), op.component(1)];
            let s = [
                [tau * p(c[0], c[0]) + sigma * sigma, tau * p(c[0], c[1])],
                [tau * p(c[1], c[0]), tau * p(c[1], c[1]) + sigma * sigma],
            ];
            let det = s[0][0] * s[1][1] - s[0][1] * s[1][0];
            let inv = [
                [s[1][1] / det, -s[0][1] / det],
                [-s[1][0] / det, s[0][0] / det],
            ];
            for i in 0..d {
                for (q, _) in c.iter().enumerate() {
                    let want: f64 = (0..m).map(|r| p(i, c[r]) * inv[r][q]).sum();
                    let e = (0..g.w)
                        .find(|&e| {
                            g.index[i * g.w + e] as usize == q && g.tables[t][i * g.w + e] != 0.0
                        })
                        .expect("every observation is in the window");
                    let got = g.tables[t][i * g.w + e] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "τ={tau} i={i} q={q}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn homotopy_stages_telescope_to_the_kalman_factor() {
        for s in [1usize, 2, 4, 19] {
            for lambda in [0.5, 1.0, 3.0] {
                for gamma in [0.01, 1.0, 400.0] {
                    let mut e = 1.0f64;
                    for (tau, wgt) in stages(GainSchedule::Homotopy, s, lambda) {
                        e *= 1.0 - wgt * gamma / (1.0 + tau * gamma);
                    }
                    let want = 1.0 / (1.0 + lambda * gamma);
                    assert!((e - want).abs() < 1e-12, "S={s} λ={lambda} γ={gamma}");
                }
            }
        }
        assert_eq!(stage_step(0, 4, 19), 0);
        assert_eq!(stage_step(3, 4, 19), 14);
    }

    #[test]
    fn bad_radius_and_missing_geometry_name_the_parameter() {
        let x = vec![0.5f32; 4 * 3];
        let op = Observe::identity();
        for r in [0.0, -1.0, f64::NAN] {
            let e = local_gains(
                &x,
                4,
                3,
                &op,
                1.0,
                Geometry::Ring { len: 3 },
                r,
                &[1.0],
                None,
            );
            assert!(e.unwrap_err().to_string().contains("filter.loc_radius"));
        }
        let e = local_gains(&x, 4, 3, &op, 1.0, Geometry::None, 2.0, &[1.0], None);
        assert!(e.unwrap_err().to_string().contains("filter.guidance"));
    }
}
