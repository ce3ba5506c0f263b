//! Where numbers live and kernels run.
//!
//! [`Backend`] is the set of kernel operations that filters, models and the experiment loop
//! need, over typed device buffers ([`Backend::Buffer`]). Filters and models are written once,
//! generic over `B: Backend`; each backend implements every operation. The CPU backend
//! ([`cpu::Cpu`]) is the reference: every GPU kernel is checked against it.
//!
//! Storage contract: f32, row-major `rows × cols` (an ensemble is `n × d`, member-major; an
//! observation is `1 × m`; flow weights are `n × n`). Reductions over `d` are summed from
//! differences and accumulated in f64 on the CPU.

use crate::error::Result;
use crate::model::Model;
use crate::observe::{ObservationOperator, Observe};
use crate::rng::NoiseKey;

pub mod cpu;
pub mod gpu;

pub use cpu::ensemble_space::{LocalAnalysis, LETKF_MAX_MEMBERS};

/// A matrix of f32 owned by a backend.
pub trait DeviceBuffer: Send + Sync {
    /// Number of rows (members).
    fn rows(&self) -> usize;
    /// Number of columns (state or observation components).
    fn cols(&self) -> usize;
    /// `rows * cols`.
    fn len(&self) -> usize {
        self.rows() * self.cols()
    }
    /// True when the buffer holds no values.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Gaussian conditional probability path of a flow, evaluated at one pseudo-time `t`
/// (ENFF_SPEC §2.1): `μ_j(t) = a·x_f^(j) + b·x_src^(j)`, `μ̇_j = da·x_f^(j) + db·x_src^(j)`,
/// standard deviation `s(t)` with derivative `ds`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathCoefficients {
    /// Pseudo-time in `[0, 1]`.
    pub t: f32,
    /// Weight of the target (forecast) member in the mean.
    pub a: f32,
    /// Weight of the source member (previous analysis; 0 when the path has none).
    pub b: f32,
    /// `da/dt`.
    pub da: f32,
    /// `db/dt`.
    pub db: f32,
    /// Conditional standard deviation `s(t) > 0`.
    pub s: f32,
    /// `ds/dt`.
    pub ds: f32,
}

/// Observation guidance for a flow update: `g = scale · J_h(x̂₁)ᵀ (y − h(x̂₁))` evaluated at the
/// predicted endpoint `x̂₁ = x + horizon · v̂` (ENFF_SPEC §3.1).
pub struct Guidance<'a, B: Backend + ?Sized> {
    /// The observation operator `h`.
    pub operator: &'a dyn ObservationOperator,
    /// The observation `y` (`1 × m`).
    pub y: &'a B::Buffer,
    /// `λ / σ_y²`.
    pub scale: f32,
    /// Look-ahead to the endpoint, `1 − t`.
    pub horizon: f32,
}

/// Everything a fused flow update reads (ENFF_SPEC §2.2, §3.1, §4.1).
///
/// The kernel evaluates, for every member `i` and component `k`, the Monte-Carlo velocity
/// `v̂_i = (ds/s)·x_i + Σ_j W_ij (μ̇_j − (ds/s)·μ_j)` at `x = eval` (or at the state itself),
/// adds guidance, optionally clamps, and writes `state ← base + h_new·v + h_old·v_old`, where
/// `base` is the state itself. Optionally it also stores `v` (for Heun's second stage).
pub struct FlowUpdate<'a, B: Backend + ?Sized> {
    /// Where to evaluate the velocity; `None` = at the state being updated.
    pub eval: Option<&'a B::Buffer>,
    /// Row-stochastic weights `W` (`n × n`), from [`Backend::softmax_rows`].
    pub weights: &'a B::Buffer,
    /// Target ensemble `x_f` (`n × d`).
    pub target: &'a B::Buffer,
    /// Source ensemble (F2P: previous analysis), required when `path.b` or `path.db` ≠ 0.
    pub source: Option<&'a B::Buffer>,
    /// Path at the evaluation time.
    pub path: PathCoefficients,
    /// Observation guidance, if any.
    pub guidance: Option<Guidance<'a, B>>,
    /// Step applied to the newly evaluated velocity.
    pub h_new: f32,
    /// A previously stored velocity and its step (Heun's corrector).
    pub previous: Option<(&'a B::Buffer, f32)>,
    /// Clamp the guided velocity component-wise to `[−c, c]` before the step (EnSF's score
    /// clamp, ENFF_SPEC §4.2); `None` for the flow filters.
    pub clamp: Option<f32>,
}

/// One step of covariance guidance with a banded gain (see [`crate::filter::covariance`]):
///
/// `state[k,i] += h_velocity·velocity[k,i]
///               + h_gain·Σ_c gain[i,c]·(y[q] − h(endpoint[k, comp(q)]))`, `q = index[i,c]`
///
/// (with the innovation split of [`GainStep::mean_obs`] when given),
///
/// where `comp(q) = offset + q·every` is the state component observation `q` sees. The gain is
/// stored banded: row `i` holds the weights of the (at most `w`) observations inside the
/// localization window of component `i`, padded with zero weights.
pub struct GainStep<'a, B: Backend + ?Sized> {
    /// The built-in observation operator (pointwise map and subsampling).
    pub observe: Observe,
    /// The observation `y` (`1 × m`).
    pub y: &'a B::Buffer,
    /// Banded gains (`(S·d) × w`: `S ≥ 1` tables of `d` rows, as [`Backend::local_gains`]
    /// writes them for `S` stages).
    pub gain: &'a B::Buffer,
    /// The table of `gain` this step applies (rows `table·d ..`).
    pub table: usize,
    /// Observation index of every gain entry (`d × w`, exact integers stored as f32, `< 2²⁴`).
    pub index: &'a B::Buffer,
    /// Where the innovation is evaluated, the predicted endpoint `x̂₁` (`n × d`).
    pub endpoint: &'a B::Buffer,
    /// The unguided velocity (`n × d`).
    pub velocity: &'a B::Buffer,
    /// Step applied to the velocity.
    pub h_velocity: f32,
    /// Step applied to the gain term (0 = no guidance in this step).
    pub h_gain: f32,
    /// Deterministic-EnKF split of the innovation: with `Some((h̄, α))` (`h̄` is `1 × m`, the
    /// ensemble mean of `h(x̂₁)`), the innovation of member `k` is
    /// `(y − h̄) − α·(h(x̂₁[k]) − h̄)` instead of `y − h(x̂₁[k])` (`α = 1` is the same thing).
    pub mean_obs: Option<(&'a B::Buffer, f32)>,
    /// Innovation clipping (a background check): when given, every innovation is clamped to
    /// `±scale·s_q`, `s_q² = h'(l_c)²·v_c + σ_y²` the innovation variance of the linearized
    /// model the gain assumes (`c = comp(q)`, `l` the gain's linearization point, `v` the
    /// forecast variance), so that one stage moves a component by at most about `scale`
    /// forecast standard deviations per observation (see [`crate::filter::covariance`]).
    pub clip: Option<InnovationClip<'a, B>>,
}

/// The bound of [`GainStep::clip`].
pub struct InnovationClip<'a, B: Backend + ?Sized> {
    /// Observation statistics of the stage (`2 × m`), as [`Backend::local_gains`] writes
    /// them: row 1 holds `s_q²` (row 0, `h̄`, may serve [`GainStep::mean_obs`] too).
    pub innovation_var: &'a B::Buffer,
    /// Bound in standard deviations of the innovation (`> 0`).
    pub scale: f32,
}

/// The local Kalman gains of one or more covariance-guidance stages, computed where the
/// ensemble lives (see [`crate::filter::covariance`]): for every state component `i`, with the
/// window of observations `q = index[i, e]` and Gaspari–Cohn tapers `ρ_e = taper[i, e]`
/// (`ρ = 0` marks padding), and every exponent `τ_s` of [`LocalGains::taus`],
///
/// `gain[s·d + i, e] = (ρ_e/σ_y) · b_qᵀ (I + τ_s·G_i)⁻¹ a_i`, `G_i = Σ_e ρ_e b_q b_qᵀ`,
///
/// where `a_c` are the forecast anomalies of component `c` scaled by `1/√(n − 1)` and
/// `b_q = h'(x̄̂₁[comp(q)])·a_comp(q)/σ_y`, linearized at the mean of the predicted endpoints
/// `x̂₁`. `G_i` (the `O(n²·w)` part) is built once per component and shared by the stages;
/// each stage adds one `n × n` (or `w × w`) factorization. The same call writes `h̄` (`1 × m`),
/// the ensemble mean of `h(x̂₁)`, for the innovation split of [`GainStep::mean_obs`]; when that
/// buffer is `2 × m`, row 1 receives the linearized innovation variances
/// `s_q² = h'(x̄̂₁[c])²·var(x_f[c]) + σ_y²` (`c = comp(q)`) for [`GainStep::clip`]. Only the
/// `S` gain tables and these `m`-vectors are written; nothing of size `n × d` leaves the
/// backend.
pub struct LocalGains<'a, B: Backend + ?Sized> {
    /// The built-in observation operator (pointwise map and subsampling).
    pub observe: Observe,
    /// The forecast ensemble (`n × d`), whose covariance the gain carries.
    pub forecast: &'a B::Buffer,
    /// The predicted endpoints `x̂₁` (`n × d`): linearization point and `h̄`.
    pub endpoint: &'a B::Buffer,
    /// Observation index of every window entry (`d × w`, exact integers stored as f32).
    pub index: &'a B::Buffer,
    /// Taper `ρ` of every window entry (`d × w`; 0 = padding).
    pub taper: &'a B::Buffer,
    /// Observation noise std `σ_y > 0`.
    pub noise_std: f32,
    /// Tempering exponents `τ_s ≥ 0` of the stages: `gain` holds one `d × w` table per
    /// exponent, in this order. None: only `h̄` (and the innovation variances) are written, the
    /// statistics of a later stage whose gains were built with an earlier one's.
    pub taus: &'a [f32],
}

/// Ensemble statistics against the truth, reduced where the ensemble lives.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EnsembleStats {
    /// RMSE of the ensemble mean against the truth (ENFF_SPEC §9.1).
    pub rmse: f64,
    /// Spread: square root of the mean unbiased member variance.
    pub spread: f64,
}

/// The kernel operations of enff, over one kind of buffer.
pub trait Backend: Send + Sync {
    /// A `rows × cols` matrix of f32 living on this backend.
    type Buffer: DeviceBuffer;

    /// Short name (`cpu`, `gpu`).
    fn name(&self) -> &'static str;

    /// One line describing the device (CPU threads, adapter name …).
    fn describe(&self) -> String;

    /// Memory this backend can hold its buffers in, bytes, where known: a GPU's device-local
    /// memory, the host's available memory for the CPU. Experiments compare their estimate
    /// with it before allocating anything.
    fn memory_capacity(&self) -> Option<u64> {
        None
    }

    /// The largest buffer, in bytes, one kernel argument can hold whole (a GPU's storage
    /// binding; unlimited on the CPU). Operations that need a table in one piece, like the
    /// banded gains of [`Backend::gain_step`], size their tables by it.
    fn max_binding_bytes(&self) -> u64 {
        u64::MAX
    }

    // ---- memory ------------------------------------------------------------------------------

    /// A zero-filled `rows × cols` buffer.
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Buffer>;

    /// A buffer holding `data` (row-major, `rows * cols` values).
    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Buffer>;

    /// Overwrites a buffer with `data` (same length).
    fn write(&self, buf: &mut Self::Buffer, data: &[f32]) -> Result<()>;

    /// Copies a buffer to the host.
    fn read(&self, buf: &Self::Buffer) -> Result<Vec<f32>>;

    /// Copies `src` into `dst` (same shape).
    fn copy(&self, src: &Self::Buffer, dst: &mut Self::Buffer) -> Result<()>;

    // ---- element-wise ------------------------------------------------------------------------

    /// `out[i,k] = mean[i,k] + scale · z(key, i, k)` with `z` the Philox normals of
    /// [`crate::rng`]; `mean = None` means zero, and a `1 × cols` mean is broadcast over rows.
    fn fill_normal(
        &self,
        out: &mut Self::Buffer,
        key: NoiseKey,
        mean: Option<&Self::Buffer>,
        scale: f32,
    ) -> Result<()>;

    /// Multiplicative inflation about the ensemble mean: `x ← x̄ + γ (x − x̄)` (ENFF_SPEC §7).
    fn inflate(&self, ensemble: &mut Self::Buffer, gamma: f32) -> Result<()>;

    /// A [`crate::Error::NonFinite`] naming the first NaN/Inf in `buf`, if any. Backends that
    /// queue work (the GPU) may report it at the next [`Backend::sync`] instead.
    fn check_finite(&self, buf: &Self::Buffer, name: &str) -> Result<()>;

    /// Waits for queued work and reports deferred errors: non-finite flags raised by kernels,
    /// validation errors, a lost device. The CPU backend has nothing deferred.
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    // ---- models and observations -------------------------------------------------------------

    /// Advances every row of `states` by `steps` model steps.
    fn advance(&self, model: &Model, states: &mut Self::Buffer, steps: usize) -> Result<()>;

    /// `out[i] = h(x[i])` for every row (`out` is `rows × m`).
    fn observe(
        &self,
        operator: &dyn ObservationOperator,
        x: &Self::Buffer,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    /// Per-member energy `E_i = ‖y − h(x_i)‖² / (2σ²)` written as `out[0, i] = −E_i`
    /// (log-likelihood up to a constant; `out` is `1 × n`).
    fn log_likelihoods(
        &self,
        operator: &dyn ObservationOperator,
        x: &Self::Buffer,
        y: &Self::Buffer,
        obs_noise_std: f32,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    /// Mean and variance over the members of the observed ensemble: `out` (`2 × m`) receives
    /// the mean of `h(x_i)` (row 0) and its unbiased variance (row 1). Used by covariance
    /// guidance (the innovation bound) and adaptive inflation; only `2·m` values, and only
    /// where a filter needs them, cross to the host.
    fn observed_moments(
        &self,
        operator: &dyn ObservationOperator,
        x: &Self::Buffer,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    // ---- flow kernels ------------------------------------------------------------------------

    /// Pairwise log-weights `ℓ_ij = −‖x_i − μ_j(t)‖² / (2 s²) + bias_j` (ENFF_SPEC §2.2), summed
    /// from differences; `logits` is `n × n`, `bias` (optional) `1 × n`.
    fn flow_logits(
        &self,
        x: &Self::Buffer,
        target: &Self::Buffer,
        source: Option<&Self::Buffer>,
        path: PathCoefficients,
        bias: Option<&Self::Buffer>,
        logits: &mut Self::Buffer,
    ) -> Result<()>;

    /// Row-wise max-subtracted softmax, in place. A non-finite logit is an error (we do not
    /// replicate the reference's silent fallback to uniform weights).
    fn softmax_rows(&self, logits: &mut Self::Buffer) -> Result<()>;

    /// The fused velocity + guidance + integrator update described on [`FlowUpdate`].
    /// `velocity_out`, if given, receives the guided velocity.
    fn flow_update(
        &self,
        state: &mut Self::Buffer,
        update: &FlowUpdate<'_, Self>,
        velocity_out: Option<&mut Self::Buffer>,
    ) -> Result<()>;

    /// The banded-gain guidance step described on [`GainStep`] (covariance guidance).
    fn gain_step(&self, state: &mut Self::Buffer, step: &GainStep<'_, Self>) -> Result<()>;

    /// The local gains of the covariance-guidance stages described on [`LocalGains`], into
    /// `gain` (`(S·d) × w`, one table per stage) and `hbar` (`1 × m` or `2 × m`), where the
    /// ensembles live (CPU twin: [`cpu::gain::local_gains`]).
    fn local_gains(
        &self,
        g: &LocalGains<'_, Self>,
        gain: &mut Self::Buffer,
        hbar: &mut Self::Buffer,
    ) -> Result<()>;

    // ---- ensemble transforms (Kalman-type filters, resampling) -------------------------------

    /// `out_i = Σ_j W_ij x_j`: a right-multiplication of the ensemble by an `n × n` matrix, the
    /// one device operation of the ETKF, the EnKF in ensemble space and particle resampling.
    ///
    /// The default runs the fused flow update with a path whose velocity targets are the
    /// members themselves (`U_j = x_j`, no state term) on a zeroed output.
    fn ensemble_transform(
        &self,
        weights: &Self::Buffer,
        x: &Self::Buffer,
        out: &mut Self::Buffer,
    ) -> Result<()> {
        self.fill_normal(
            out,
            NoiseKey::new(0, crate::rng::Stream::User, 0),
            None,
            0.0,
        )?;
        let identity_path = PathCoefficients {
            t: 0.0,
            a: 0.0,
            b: 0.0,
            da: 1.0,
            db: 0.0,
            s: 1.0,
            ds: 0.0,
        };
        self.flow_update(
            out,
            &FlowUpdate {
                eval: None,
                weights,
                target: x,
                source: None,
                path: identity_path,
                guidance: None,
                h_new: 1.0,
                previous: None,
                clamp: None,
            },
            None,
        )
    }

    /// Ensemble-space products of the observed anomalies `ã_i = hx_i − ȳ` (`hx` is `n × m`):
    /// `out` (`(n + 1 + e) × n`) receives the Gram matrix `ã_i · ã_j` (rows `0..n`), the
    /// projected innovation `ã_j · (y − ȳ)` (row `n`) and, when `eta` (`e × m`) is given, the
    /// projected perturbations `ã_j · η_r` (rows `n + 1 + r`). Only this `n`-sized result needs
    /// to reach the host (CPU twin: [`cpu::ensemble_space::observed_products`]).
    fn observed_products(
        &self,
        hx: &Self::Buffer,
        y: &Self::Buffer,
        eta: Option<&Self::Buffer>,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    /// True when the buffers live in device memory apart from the host, so that reading one
    /// back is a transfer (the GPU); false for the CPU backend. A fact filters use to choose
    /// between a device kernel and a host path, not a policy.
    fn on_device(&self) -> bool {
        false
    }

    /// The batched LETKF: replaces `ensemble` (`n × d`, `n ≤` [`LETKF_MAX_MEMBERS`]) by its
    /// analysis, one local ensemble-space analysis per cell of `local`, from `hx = h(ensemble)`
    /// and the observation `y` (no inflation) (CPU twin:
    /// [`cpu::ensemble_space::letkf_analysis`]).
    fn letkf_analysis(
        &self,
        ensemble: &mut Self::Buffer,
        hx: &Self::Buffer,
        y: &Self::Buffer,
        local: &LocalAnalysis,
    ) -> Result<()>;

    // ---- metrics -----------------------------------------------------------------------------

    /// RMSE of the ensemble mean and spread against `truth` (`1 × d`).
    fn ensemble_stats(
        &self,
        ensemble: &Self::Buffer,
        truth: &Self::Buffer,
    ) -> Result<EnsembleStats>;
}

/// Checks the shapes of a [`GainStep`] against an `n × d` state; returns `(m, w)`. Both
/// backends call it before dispatching.
pub(crate) fn check_gain_step<B: Backend + ?Sized>(
    state: &B::Buffer,
    step: &GainStep<'_, B>,
) -> Result<(usize, usize)> {
    let GainStep {
        observe,
        y,
        gain,
        index,
        endpoint,
        velocity,
        ..
    } = step;
    let (y, gain, index, endpoint, velocity) = (*y, *gain, *index, *endpoint, *velocity);
    let mean_obs = step.mean_obs.map(|p| p.0);
    let clip = step.clip.as_ref().map(|c| (c.innovation_var, c.scale));
    let (n, d) = (state.rows(), state.cols());
    let m = observe.obs_dim(d)?;
    let w = gain.cols();
    let tables = gain.rows().checked_div(d).unwrap_or(1);
    if step.table >= tables.max(1) {
        return Err(crate::Error::invalid(
            "gain table",
            step.table,
            format!("the banded gain holds {tables} table(s) of {d} rows; pick one of them"),
        ));
    }
    for (name, b, rows, cols) in [
        ("observation", y, 1, m),
        ("banded gain", gain, tables.max(1) * d, w),
        ("gain observation index", index, d, w),
        ("guidance endpoint", endpoint, n, d),
        ("guidance velocity", velocity, n, d),
        (
            "mean observed endpoint",
            mean_obs.unwrap_or(y),
            mean_obs.map_or(1, |b| b.rows().clamp(1, 2)),
            m,
        ),
        (
            "innovation variances",
            clip.map_or(y, |c| c.0),
            if clip.is_some() { 2 } else { 1 },
            m,
        ),
    ] {
        if b.rows() != rows || b.cols() != cols {
            return Err(crate::Error::shape(
                name,
                format!("{rows} x {cols}"),
                format!("{} x {}", b.rows(), b.cols()),
            ));
        }
    }
    if let Some((_, scale)) = clip {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(crate::Error::invalid(
                "filter.innovation_clip",
                scale,
                "the innovation bound is a positive number of standard deviations (0 = off)",
            ));
        }
    }
    if m > MAX_GAIN_OBS {
        return Err(crate::Error::TooLarge {
            detail: format!(
                "covariance guidance indexes at most {MAX_GAIN_OBS} observations, got m = {m}"
            ),
        });
    }
    Ok((m, w))
}

/// Sizes of a [`LocalGains`] call: members, components, observations, window entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GainShape {
    /// Members `n ≥ 2`.
    pub n: usize,
    /// State components `d`.
    pub d: usize,
    /// Observations `m`.
    pub m: usize,
    /// Window entries per component `w`.
    pub w: usize,
}

/// [`Backend::local_gains`] through the host: reads the inputs back, runs the CPU twin
/// ([`cpu::gain::local_gains`]) and writes the gains and `hbar`: the explicit path a filter
/// takes when a backend answers [`crate::Error::Unsupported`] for a problem its kernels do not
/// take.
pub fn local_gains_on_host<B: Backend + ?Sized>(
    b: &B,
    g: &LocalGains<'_, B>,
    gain: &mut B::Buffer,
    hbar: &mut B::Buffer,
) -> Result<()> {
    let shape = check_local_gains(g, gain, hbar)?;
    let (x, xh) = (b.read(g.forecast)?, b.read(g.endpoint)?);
    let (index, taper) = (b.read(g.index)?, b.read(g.taper)?);
    let mut k = vec![0.0f32; if g.taus.is_empty() { 0 } else { gain.len() }];
    let mut hb = vec![0.0f32; hbar.len()];
    cpu::gain::local_gains(
        &cpu::gain::GainInputs {
            x: &x,
            xh: &xh,
            index: &index,
            taper: &taper,
            shape,
            observe: g.observe,
            noise_std: g.noise_std,
            taus: g.taus,
        },
        &mut k,
        &mut hb,
    )?;
    if !g.taus.is_empty() {
        b.write(gain, &k)?;
    }
    b.write(hbar, &hb)
}

/// Checks the shapes and scalars of a [`LocalGains`] call against its outputs.
pub(crate) fn check_local_gains<B: Backend + ?Sized>(
    g: &LocalGains<'_, B>,
    gain: &B::Buffer,
    hbar: &B::Buffer,
) -> Result<GainShape> {
    let (n, d) = (g.forecast.rows(), g.forecast.cols());
    if n < 2 {
        return Err(crate::Error::invalid(
            "ensemble.n",
            n,
            "a covariance needs at least 2 members",
        ));
    }
    let m = g.observe.obs_dim(d)?;
    let w = g.index.cols();
    for (name, b, rows, cols) in [
        ("guidance endpoint", g.endpoint, n, d),
        ("gain observation index", g.index, d, w),
        ("gain window taper", g.taper, d, w),
        // (No exponents: only the statistics are written, the gain buffer is not touched.)
        (
            "banded gain",
            gain,
            if g.taus.is_empty() {
                gain.rows()
            } else {
                g.taus.len() * d
            },
            w,
        ),
        ("mean observed endpoint", hbar, hbar.rows().clamp(1, 2), m),
    ] {
        if b.rows() != rows || b.cols() != cols {
            return Err(crate::Error::shape(
                name,
                format!("{rows} x {cols}"),
                format!("{} x {}", b.rows(), b.cols()),
            ));
        }
    }
    if m > MAX_GAIN_OBS {
        return Err(crate::Error::TooLarge {
            detail: format!(
                "covariance guidance indexes at most {MAX_GAIN_OBS} observations, got m = {m}"
            ),
        });
    }
    if !(g.noise_std.is_finite() && g.noise_std > 0.0) {
        return Err(crate::Error::invalid(
            "observe.noise_std",
            g.noise_std,
            "the observation noise std σ_y must be positive",
        ));
    }
    if let Some(&tau) = g.taus.iter().find(|t| !(t.is_finite() && **t >= 0.0)) {
        return Err(crate::Error::invalid(
            "tempering exponent τ",
            tau,
            "a guidance stage's exponent is finite and non-negative (λ·s/S)",
        ));
    }
    Ok(GainShape { n, d, m, w })
}

/// Most observations a banded gain can index (f32 represents every integer below 2²⁴).
pub const MAX_GAIN_OBS: usize = 1 << 24;

/// Checks the path coefficients every flow kernel relies on.
pub(crate) fn check_path(path: &PathCoefficients, has_source: bool) -> Result<()> {
    if !(path.s.is_finite() && path.s > 0.0) {
        return Err(crate::Error::invalid(
            "path std s(t)",
            path.s,
            "the conditional std must be positive: use filter.sigma_min > 0",
        ));
    }
    if !has_source && (path.b != 0.0 || path.db != 0.0) {
        return Err(crate::Error::invalid(
            "flow source",
            "none",
            "this path mixes in a source ensemble (F2P): pass the previous analysis",
        ));
    }
    Ok(())
}

/// Checks that a noise mean is `rows × cols` or one `1 × cols` row to broadcast.
pub(crate) fn check_noise_mean<B: DeviceBuffer>(out: &B, mean: Option<&B>) -> Result<()> {
    if let Some(m) = mean {
        let (rows, cols) = (out.rows(), out.cols());
        if m.cols() != cols || (m.rows() != rows && m.rows() != 1) {
            return Err(crate::Error::shape(
                "noise mean",
                format!("{rows} x {cols} or 1 x {cols}"),
                format!("{} x {}", m.rows(), m.cols()),
            ));
        }
    }
    Ok(())
}

/// Checks a multiplicative inflation factor.
pub(crate) fn check_inflation(gamma: f32) -> Result<()> {
    if gamma.is_finite() && gamma > 0.0 {
        Ok(())
    } else {
        Err(crate::Error::invalid(
            "filter.inflation",
            gamma,
            "inflation must be a finite positive factor (1.0 = none)",
        ))
    }
}
