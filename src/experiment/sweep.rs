//! Parameter sweeps: every point of a grid (and/or of seeded random draws from ranges) × every
//! seed, each finished run appended to `results.csv` at once, resumable, ending in a ranking.
//!
//! ```text
//! OUT/sweep.json    what was swept (base configuration, axes, seeds) and its hash
//! OUT/base.toml     the base configuration, runnable on its own
//! OUT/results.csv   point,seed,<swept keys…>,rmse_mean,spread_mean,…,error   (one row per run)
//! OUT/best.csv      the points ranked by mean rmse over seeds (written at the end)
//! ```
//!
//! Re-running the same sweep in the same directory skips the (point, seed) rows already in
//! `results.csv`; a directory that holds a different sweep is refused with what differs.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::Config;
use super::output::is_vacant;
use super::report::Summary;
use super::run::Experiment;
use crate::backend::Backend;
use crate::cycle::CycleMetrics;
use crate::error::{Error, Result};
use crate::io::{io_err, write_atomic};
use crate::rng::{self, NoiseKey, Stream};

/// One grid axis: a setting and the values it takes (`filter.sigma_min=1e-3,1e-2`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    /// The setting (`section.key`).
    pub key: String,
    /// Its values, as `--set` would take them.
    pub values: Vec<String>,
}

impl Axis {
    /// Parses `key=v1,v2,…`.
    pub fn parse(spec: &str) -> Result<Axis> {
        let (key, values) = spec.split_once('=').ok_or_else(|| {
            Error::invalid(
                "--grid",
                spec,
                "write a grid axis as section.key=v1,v2,…, e.g. filter.sigma_min=1e-3,1e-2",
            )
        })?;
        let key = key.trim().to_string();
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(Error::invalid(
                "--grid",
                spec,
                format!("empty grid for `{key}`: list at least one value, e.g. {key}=1,2"),
            ));
        }
        Ok(Axis { key, values })
    }
}

/// A range random points are drawn from (`filter.guidance_scale=0.01:1:log`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Range {
    /// The setting (`section.key`).
    pub key: String,
    /// Lower end.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Uniform in log(value) rather than in value.
    pub log: bool,
}

impl Range {
    /// Parses `key=lo:hi` or `key=lo:hi:log` (`:lin` is the default).
    pub fn parse(spec: &str) -> Result<Range> {
        let bad = |fix: &str| Error::invalid("--range", spec, fix);
        let (key, rest) = spec
            .split_once('=')
            .ok_or_else(|| bad("write a range as section.key=lo:hi or section.key=lo:hi:log"))?;
        let parts: Vec<&str> = rest.split(':').map(str::trim).collect();
        let log = match parts.get(2) {
            None | Some(&"lin") => false,
            Some(&"log") => true,
            Some(_) => return Err(bad("the third part of a range is log or lin")),
        };
        if !(2..=3).contains(&parts.len()) {
            return Err(bad(
                "write a range as section.key=lo:hi or section.key=lo:hi:log",
            ));
        }
        let num = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite());
        let (lo, hi) = match (num(parts[0]), num(parts[1])) {
            (Some(lo), Some(hi)) if lo < hi => (lo, hi),
            _ => return Err(bad("lo and hi must be finite numbers with lo < hi")),
        };
        if log && lo <= 0.0 {
            return Err(bad("a log range needs lo > 0"));
        }
        Ok(Range {
            key: key.trim().to_string(),
            lo,
            hi,
            log,
        })
    }
}

/// One point of a sweep: the settings that differ from the base configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Position in [`Sweep::points`].
    pub index: usize,
    /// `(key, value)` in the order of [`Sweep::keys`].
    pub settings: Vec<(String, String)>,
}

/// A validated sweep.
#[derive(Clone, Debug)]
pub struct Sweep {
    name: String,
    base: Config,
    grid: Vec<Axis>,
    random: usize,
    ranges: Vec<Range>,
    seeds: usize,
    points: Vec<Point>,
}

/// What `sweep.json` records; two sweeps are the same experiment when their hashes agree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// FNV-1a (64-bit, hex) of everything below.
    pub hash: String,
    /// The base configuration.
    pub base: Value,
    /// Grid axes.
    pub grid: Vec<Axis>,
    /// Number of random draws.
    pub random: usize,
    /// Ranges of the random draws.
    pub ranges: Vec<Range>,
    /// Seeds per point.
    pub seeds: usize,
}

/// Scores of one finished run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Time-mean analysis RMSE after burn-in.
    pub rmse_mean: f64,
    /// Time-mean analysis spread after burn-in.
    pub spread_mean: f64,
    /// Time-mean forecast RMSE after burn-in.
    pub rmse_forecast_mean: f64,
    /// RMSE of the last cycle.
    pub rmse_last: f64,
    /// Wall time per cycle.
    pub seconds_per_cycle: f64,
}

impl From<&Summary> for Scores {
    fn from(s: &Summary) -> Self {
        Scores {
            rmse_mean: s.rmse_mean,
            spread_mean: s.spread_mean,
            rmse_forecast_mean: s.rmse_forecast_mean,
            rmse_last: s.rmse_last,
            seconds_per_cycle: s.seconds_per_cycle,
        }
    }
}

/// One line of `results.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Point index.
    pub point: usize,
    /// Seed the run used.
    pub seed: u64,
    /// Values of the swept keys.
    pub values: Vec<String>,
    /// The scores, or why the run failed (a divergence).
    pub outcome: std::result::Result<Scores, String>,
}

/// Progress reports of [`run_sweep`].
#[derive(Debug)]
pub enum Event<'a> {
    /// Before the first run: runs in all, and how many are already in `results.csv`.
    Begin {
        /// Points × seeds.
        runs: usize,
        /// Already finished.
        done: usize,
    },
    /// A run starts.
    RunStart {
        /// Its point.
        point: &'a Point,
        /// Its seed.
        seed: u64,
    },
    /// A cycle of the running run finished.
    Cycle(&'a CycleMetrics),
    /// A run finished and its row is on disk. Answer `ControlFlow::Break` to stop the sweep
    /// here (it resumes from the next run).
    RunEnd(&'a Row),
}

/// What [`run_sweep`] did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Every row of `results.csv`, earlier ones included, in file order.
    pub rows: Vec<Row>,
    /// Runs done by this call.
    pub ran: usize,
    /// Runs skipped because `results.csv` already had them.
    pub skipped: usize,
    /// True when the callback stopped the sweep early.
    pub stopped: bool,
}

/// A point's results over its seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct PointScore {
    /// The point.
    pub point: Point,
    /// Runs that finished with scores.
    pub runs: usize,
    /// Runs that failed (diverged).
    pub failed: usize,
    /// Mean and sample std of `rmse_mean` over the seeds.
    pub rmse: (f64, f64),
    /// Mean and sample std of `spread_mean` over the seeds.
    pub spread: (f64, f64),
    /// Mean wall time per cycle.
    pub seconds_per_cycle: f64,
}

const MANIFEST: &str = "sweep.json";
const RESULTS: &str = "results.csv";
const SCORE_COLUMNS: [&str; 6] = [
    "rmse_mean",
    "spread_mean",
    "rmse_forecast_mean",
    "rmse_last",
    "seconds_per_cycle",
    "error",
];

impl Sweep {
    /// A sweep of `base` (named `name`) over grid axes and/or `random` draws from `ranges`,
    /// each point run with seeds `seed, seed+1, …, seed+seeds-1` (`seed` = the base's). Every
    /// point's configuration is built and validated here, before anything runs.
    pub fn new(
        name: &str,
        base: Config,
        grid: Vec<Axis>,
        random: usize,
        ranges: Vec<Range>,
        seeds: usize,
    ) -> Result<Sweep> {
        if seeds == 0 {
            return Err(Error::invalid(
                "--seeds",
                0,
                "run at least one seed per point",
            ));
        }
        if grid.is_empty() && random == 0 {
            return Err(Error::invalid(
                "--grid",
                "(none)",
                "a sweep needs at least one --grid section.key=v1,v2,… or --random N with \
                 --range section.key=lo:hi",
            ));
        }
        if let Some(a) = grid.iter().find(|a| a.values.is_empty()) {
            return Err(Error::invalid(
                "--grid",
                format!("{}=", a.key),
                format!("empty grid for `{}`: list at least one value", a.key),
            ));
        }
        if random > 0 && ranges.is_empty() {
            return Err(Error::invalid(
                "--random",
                random,
                "random points need at least one --range section.key=lo:hi[:log]",
            ));
        }
        if random == 0 && !ranges.is_empty() {
            return Err(Error::invalid(
                "--range",
                &ranges[0].key,
                "ranges are sampled by --random N: say how many points to draw",
            ));
        }
        base.validate()?;
        let tree = serde_json::to_value(&base)
            .map_err(|e| Error::invalid("config", e, "internal serialization error"))?;
        let mut seen = HashSet::new();
        let keys = grid
            .iter()
            .map(|a| &a.key)
            .chain(ranges.iter().map(|r| &r.key));
        for key in keys {
            if !seen.insert(key.clone()) {
                return Err(Error::invalid(
                    "--grid/--range",
                    key,
                    "each setting may be swept by one --grid or --range only",
                ));
            }
        }
        for r in &ranges {
            let slot = lookup(&tree, &r.key);
            if let Some(Value::Number(n)) = slot {
                if n.is_u64() && r.lo.ceil() > r.hi.floor() {
                    return Err(Error::invalid(
                        "--range",
                        format!("{}={}:{}", r.key, r.lo, r.hi),
                        format!(
                            "`{}` is an integer setting: the range holds no integer",
                            r.key
                        ),
                    ));
                }
            } else {
                // Unknown keys get the usual list of settings from `Config::set`.
                base.clone().set(&format!("{}={}", r.key, r.lo))?;
                return Err(Error::invalid(
                    "--range",
                    &r.key,
                    "ranges apply to numeric settings; sweep others with --grid",
                ));
            }
        }
        let mut sweep = Sweep {
            name: name.to_string(),
            base,
            grid,
            random,
            ranges,
            seeds,
            points: Vec::new(),
        };
        sweep.points = sweep.make_points(&tree);
        for p in &sweep.points {
            sweep.config(p, 0)?.validate()?;
        }
        Ok(sweep)
    }

    fn make_points(&self, tree: &Value) -> Vec<Point> {
        // Grid: the cartesian product, first axis slowest.
        let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for axis in &self.grid {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    axis.values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((axis.key.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        // Random draws: counter-based, so draw j is the same whatever else is swept.
        let key = NoiseKey::new(self.base.experiment.seed, Stream::User, 0);
        let draws: Vec<Vec<(String, String)>> = if self.random == 0 {
            vec![Vec::new()]
        } else {
            (0..self.random)
                .map(|j| {
                    self.ranges
                        .iter()
                        .enumerate()
                        .map(|(r, range)| {
                            let u = rng::uniform(&key, j as u32, r);
                            let v = if range.log {
                                (range.lo.ln() + u * (range.hi.ln() - range.lo.ln())).exp()
                            } else {
                                range.lo + u * (range.hi - range.lo)
                            };
                            let integer =
                                matches!(lookup(tree, &range.key), Some(Value::Number(n)) if n.is_u64());
                            let text = if integer {
                                format!("{}", v.round().clamp(range.lo.ceil(), range.hi.floor()))
                            } else {
                                format!("{}", (v as f32))
                            };
                            (range.key.clone(), text)
                        })
                        .collect()
                })
                .collect()
        };
        let mut points = Vec::new();
        for c in &combos {
            for d in &draws {
                let mut settings = c.clone();
                settings.extend(d.iter().cloned());
                points.push(Point {
                    index: points.len(),
                    settings,
                });
            }
        }
        points
    }

    /// The swept keys, grid axes first.
    pub fn keys(&self) -> Vec<String> {
        self.grid
            .iter()
            .map(|a| a.key.clone())
            .chain(self.ranges.iter().map(|r| r.key.clone()))
            .collect()
    }

    /// Every point, in run order.
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// Seeds per point.
    pub fn seeds(&self) -> usize {
        self.seeds
    }

    /// The base configuration.
    pub fn base(&self) -> &Config {
        &self.base
    }

    /// The name runs are filed under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The seed of replicate `s` (0-based) of every point.
    pub fn seed(&self, s: usize) -> u64 {
        self.base.experiment.seed.wrapping_add(s as u64)
    }

    /// The configuration of `point` with replicate `s` of the seeds.
    pub fn config(&self, point: &Point, s: usize) -> Result<Config> {
        let mut c = self.base.clone();
        for (k, v) in &point.settings {
            c.set(&format!("{k}={v}"))?;
        }
        c.experiment.seed = c.experiment.seed.wrapping_add(s as u64);
        Ok(c)
    }

    /// The manifest of this sweep.
    pub fn manifest(&self) -> Manifest {
        let base = serde_json::to_value(&self.base).unwrap_or(Value::Null);
        let mut m = Manifest {
            hash: String::new(),
            base,
            grid: self.grid.clone(),
            random: self.random,
            ranges: self.ranges.clone(),
            seeds: self.seeds,
        };
        m.hash = m.compute_hash();
        m
    }

    /// The header of `results.csv`.
    pub fn header(&self) -> String {
        let mut cols = vec!["point".to_string(), "seed".to_string()];
        cols.extend(self.keys());
        cols.extend(SCORE_COLUMNS.iter().map(|s| s.to_string()));
        cols.join(",")
    }
}

impl Manifest {
    fn compute_hash(&self) -> String {
        let body = serde_json::to_string(&(
            &self.base,
            &self.grid,
            self.random,
            &self.ranges,
            self.seeds,
        ))
        .unwrap_or_default();
        format!("{:016x}", fnv1a(body.as_bytes()))
    }

    /// Why `self` (found on disk) and `other` (asked for now) are different sweeps.
    fn difference(&self, other: &Manifest) -> String {
        let mut reasons = Vec::new();
        let mut keys = Vec::new();
        diff_values(&self.base, &other.base, "", &mut keys);
        if !keys.is_empty() {
            let shown: Vec<String> = keys.iter().take(3).cloned().collect();
            reasons.push(format!(
                "base configuration differs at {}",
                shown.join("; ")
            ));
        }
        let axes = |g: &[Axis]| {
            g.iter()
                .map(|a| format!("{}={}", a.key, a.values.join(",")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if self.grid != other.grid {
            reasons.push(format!(
                "grid was `{}`, now `{}`",
                axes(&self.grid),
                axes(&other.grid)
            ));
        }
        if self.random != other.random || self.ranges != other.ranges {
            reasons.push("random points or ranges differ".to_string());
        }
        if self.seeds != other.seeds {
            reasons.push(format!("seeds was {}, now {}", self.seeds, other.seeds));
        }
        if reasons.is_empty() {
            reasons.push(format!("manifest hash {} ≠ {}", self.hash, other.hash));
        }
        reasons.join("; ")
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn lookup<'a>(tree: &'a Value, dotted: &str) -> Option<&'a Value> {
    let (section, field) = dotted.split_once('.')?;
    tree.get(section)?.get(field)
}

fn diff_values(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_values(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &p,
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("`{path}` ({a} there, {b} here)")),
        _ => {}
    }
}

impl Row {
    fn to_csv(&self) -> String {
        let mut s = format!("{},{}", self.point, self.seed);
        for v in &self.values {
            s.push(',');
            s.push_str(v);
        }
        match &self.outcome {
            Ok(sc) => {
                let _ = write!(
                    s,
                    ",{},{},{},{},{},",
                    sc.rmse_mean,
                    sc.spread_mean,
                    sc.rmse_forecast_mean,
                    sc.rmse_last,
                    sc.seconds_per_cycle
                );
            }
            Err(e) => {
                let clean: String = e
                    .chars()
                    .map(|c| {
                        if c == ',' || c == '\n' || c == '\r' {
                            ';'
                        } else {
                            c
                        }
                    })
                    .collect();
                let _ = write!(s, ",,,,,,{clean}");
            }
        }
        s.push('\n');
        s
    }

    fn parse(line: &str, n_keys: usize) -> Option<Row> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 2 + n_keys + SCORE_COLUMNS.len() {
            return None;
        }
        let point = f[0].parse().ok()?;
        let seed = f[1].parse().ok()?;
        let values = f[2..2 + n_keys].iter().map(|v| v.to_string()).collect();
        let s = &f[2 + n_keys..];
        let outcome = if s[0].is_empty() {
            Err(s[5].to_string())
        } else {
            let num = |i: usize| s[i].parse::<f64>().ok();
            Ok(Scores {
                rmse_mean: num(0)?,
                spread_mean: num(1)?,
                rmse_forecast_mean: num(2)?,
                rmse_last: num(3)?,
                seconds_per_cycle: num(4)?,
            })
        };
        Some(Row {
            point,
            seed,
            values,
            outcome,
        })
    }
}

/// Opens (or starts) the sweep directory and returns the rows already finished.
fn open_dir(sweep: &Sweep, dir: &Path, force: bool) -> Result<Vec<Row>> {
    let manifest = sweep.manifest();
    let manifest_path = dir.join(MANIFEST);
    let results_path = dir.join(RESULTS);
    let refuse = |reason: String| Error::SweepMismatch {
        path: dir.display().to_string(),
        reason,
    };
    if manifest_path.exists() && !force {
        let text = fs::read_to_string(&manifest_path).map_err(|e| io_err(&manifest_path, e))?;
        let old: Manifest = serde_json::from_str(&text)
            .map_err(|e| refuse(format!("{MANIFEST} is not a sweep manifest: {e}")))?;
        if old.hash != manifest.hash || old.compute_hash() != manifest.hash {
            return Err(refuse(old.difference(&manifest)));
        }
    } else if !force && !is_vacant(dir) {
        return Err(Error::OutputExists {
            path: dir.display().to_string(),
        });
    } else {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let _ = fs::remove_file(&results_path);
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::invalid("manifest", e, "internal serialization error"))?;
        write_atomic(&manifest_path, text.as_bytes())?;
        let toml = super::file::to_toml(
            &sweep.name,
            "Base configuration of this sweep; the swept keys are in sweep.json",
            &sweep.base,
        )?;
        write_atomic(&dir.join("base.toml"), toml.as_bytes())?;
    }
    let header = sweep.header();
    let text = match fs::read_to_string(&results_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&results_path, e)),
    };
    // Complete lines only: a line without its newline was cut off by an interruption.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut lines = complete.lines();
    let mut rows = Vec::new();
    match lines.next() {
        None => {}
        Some(h) if h == header => {}
        Some(h) => {
            return Err(refuse(format!(
                "{RESULTS} has columns `{h}`, this sweep writes `{header}`"
            )))
        }
    }
    let n_keys = sweep.keys().len();
    let mut seen = HashSet::new();
    for (i, line) in lines.enumerate() {
        let row = Row::parse(line, n_keys).ok_or_else(|| {
            refuse(format!(
                "{RESULTS} line {} is not a result row: `{line}`",
                i + 2
            ))
        })?;
        let belongs = sweep
            .points
            .get(row.point)
            .is_some_and(|p| p.settings.iter().map(|(_, v)| v).eq(row.values.iter()))
            && (0..sweep.seeds).any(|s| sweep.seed(s) == row.seed);
        if !belongs {
            return Err(refuse(format!(
                "{RESULTS} line {} (point {}, seed {}) is not a run of this sweep",
                i + 2,
                row.point,
                row.seed
            )));
        }
        if seen.insert((row.point, row.seed)) {
            rows.push(row);
        }
    }
    if complete.is_empty() || complete.len() != text.len() {
        // Start the file, or drop a cut-off last line, in one atomic step.
        let mut fresh = format!("{header}\n");
        for r in &rows {
            fresh.push_str(&r.to_csv());
        }
        write_atomic(&results_path, fresh.as_bytes())?;
    }
    Ok(rows)
}

fn append_row(path: &Path, row: &Row) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.write_all(row.to_csv().as_bytes())
        .and_then(|_| f.flush())
        .and_then(|_| f.sync_data())
        .map_err(|e| io_err(path, e))
}

/// Runs every (point, seed) of `sweep` not yet in `DIR/results.csv` on `backend`, appending
/// each finished run to it at once. `force` discards whatever `dir` holds (another sweep's
/// results included); without it a directory with other files, or another sweep's manifest,
/// is refused. A run that diverges is recorded as a failed row and the sweep goes on.
pub fn run_sweep<B: Backend + 'static>(
    sweep: &Sweep,
    dir: &Path,
    force: bool,
    backend: &B,
    mut on_event: impl FnMut(Event<'_>) -> ControlFlow<()>,
) -> Result<Outcome> {
    let mut rows = open_dir(sweep, dir, force)?;
    let done: HashSet<(usize, u64)> = rows.iter().map(|r| (r.point, r.seed)).collect();
    let runs = sweep.points.len() * sweep.seeds;
    let _ = on_event(Event::Begin {
        runs,
        done: done.len(),
    });
    let results_path = dir.join(RESULTS);
    let (mut ran, mut skipped, mut stopped) = (0, 0, false);
    'points: for point in &sweep.points {
        for s in 0..sweep.seeds {
            let seed = sweep.seed(s);
            if done.contains(&(point.index, seed)) {
                skipped += 1;
                continue;
            }
            let _ = on_event(Event::RunStart { point, seed });
            let experiment = Experiment::new(&sweep.name, sweep.config(point, s)?, None)?;
            let result = experiment.run(backend, |m| {
                let _ = on_event(Event::Cycle(m));
            });
            let outcome = match result {
                Ok(report) => Ok(Scores::from(&report.summary)),
                Err(e @ (Error::Diverged { .. } | Error::NonFinite { .. })) => Err(e.to_string()),
                Err(e) => return Err(e),
            };
            let row = Row {
                point: point.index,
                seed,
                values: point.settings.iter().map(|(_, v)| v.clone()).collect(),
                outcome,
            };
            append_row(&results_path, &row)?;
            ran += 1;
            let flow = on_event(Event::RunEnd(&row));
            rows.push(row);
            if flow.is_break() {
                stopped = true;
                break 'points;
            }
        }
    }
    Ok(Outcome {
        rows,
        ran,
        skipped,
        stopped,
    })
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The points ranked: those whose every seed finished first, by mean `rmse_mean`; then those
/// with failed seeds; points without rows are left out.
pub fn rank(sweep: &Sweep, rows: &[Row]) -> Vec<PointScore> {
    let mut scores: Vec<PointScore> = sweep
        .points
        .iter()
        .filter_map(|p| {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.point == p.index).collect();
            if mine.is_empty() {
                return None;
            }
            let ok: Vec<Scores> = mine
                .iter()
                .filter_map(|r| r.outcome.as_ref().ok().copied())
                .collect();
            let col = |f: fn(&Scores) -> f64| ok.iter().map(f).collect::<Vec<f64>>();
            Some(PointScore {
                point: p.clone(),
                runs: ok.len(),
                failed: mine.len() - ok.len(),
                rmse: mean_std(&col(|s| s.rmse_mean)),
                spread: mean_std(&col(|s| s.spread_mean)),
                seconds_per_cycle: mean_std(&col(|s| s.seconds_per_cycle)).0,
            })
        })
        .collect();
    scores.sort_by(|a, b| {
        (a.failed > 0 || a.runs == 0)
            .cmp(&(b.failed > 0 || b.runs == 0))
            .then(a.rmse.0.total_cmp(&b.rmse.0))
            .then(a.point.index.cmp(&b.point.index))
    });
    scores
}

/// The ranking as CSV (`rank,point,<keys…>,runs,failed,rmse_mean,rmse_std,spread_mean,…`).
pub fn ranking_csv(sweep: &Sweep, ranking: &[PointScore]) -> String {
    let mut s = String::from("rank,point,");
    for k in sweep.keys() {
        s.push_str(&k);
        s.push(',');
    }
    s.push_str("runs,failed,rmse_mean,rmse_std,spread_mean,spread_std,seconds_per_cycle\n");
    for (i, p) in ranking.iter().enumerate() {
        let _ = write!(s, "{},{},", i + 1, p.point.index);
        for (_, v) in &p.point.settings {
            let _ = write!(s, "{v},");
        }
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{}",
            p.runs, p.failed, p.rmse.0, p.rmse.1, p.spread.0, p.spread.1, p.seconds_per_cycle
        );
    }
    s
}

/// Writes `DIR/best.csv` (the ranking).
pub fn write_ranking(dir: &Path, sweep: &Sweep, ranking: &[PointScore]) -> Result<()> {
    write_atomic(
        &dir.join("best.csv"),
        ranking_csv(sweep, ranking).as_bytes(),
    )
}

/// The `seeds.csv` of a multi-seed run: one row per seed, then `mean` and `std` rows.
pub fn seeds_csv(summaries: &[Summary]) -> String {
    let mut s = String::from("seed,rmse_mean,spread_mean,rmse_forecast_mean,rmse_last\n");
    for r in summaries {
        let _ = writeln!(
            s,
            "{},{},{},{},{}",
            r.seed, r.rmse_mean, r.spread_mean, r.rmse_forecast_mean, r.rmse_last
        );
    }
    let cols: [fn(&Summary) -> f64; 4] = [
        |r| r.rmse_mean,
        |r| r.spread_mean,
        |r| r.rmse_forecast_mean,
        |r| r.rmse_last,
    ];
    let stats: Vec<(f64, f64)> = cols
        .iter()
        .map(|f| mean_std(&summaries.iter().map(f).collect::<Vec<_>>()))
        .collect();
    let line = |pick: fn(&(f64, f64)) -> f64| {
        stats
            .iter()
            .map(|st| pick(st).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let _ = writeln!(s, "mean,{}", line(|st| st.0));
    let _ = writeln!(s, "std,{}", line(|st| st.1));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::preset;

    fn base() -> Config {
        let mut c = preset("lorenz63_spantini2022").unwrap().config;
        for s in [
            "experiment.cycles=6",
            "experiment.burn_in=1",
            "experiment.spinup=10",
        ] {
            c.set(s).unwrap();
        }
        c
    }

    #[test]
    fn axes_and_ranges_parse_and_refuse_bad_specs() {
        let a = Axis::parse("filter.sigma_min= 1e-3, 1e-2 ,").unwrap();
        assert_eq!(a.values, vec!["1e-3", "1e-2"]);
        for bad in ["filter.sigma_min=", "filter.sigma_min= , ", "nokey"] {
            let e = Axis::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--grid"), "{e}");
        }
        let r = Range::parse("filter.guidance_scale=0.01:1:log").unwrap();
        assert!(r.log && r.lo == 0.01 && r.hi == 1.0);
        for bad in [
            "k=1",
            "k=2:1",
            "k=0:1:log",
            "k=a:b",
            "k=0:1:cubic",
            "k=0:1:log:x",
        ] {
            assert!(Range::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grid_points_are_the_cartesian_product_first_axis_slowest() {
        let s = Sweep::new(
            "t",
            base(),
            vec![
                Axis::parse("filter.sigma_min=0.01,0.1").unwrap(),
                Axis::parse("filter.flow_steps=3,4,5").unwrap(),
            ],
            0,
            vec![],
            2,
        )
        .unwrap();
        assert_eq!(s.points().len(), 6);
        assert_eq!(
            s.points()[4].settings,
            vec![
                ("filter.sigma_min".to_string(), "0.1".to_string()),
                ("filter.flow_steps".to_string(), "4".to_string())
            ]
        );
        let c = s.config(&s.points()[4], 1).unwrap();
        assert_eq!(c.filter.flow_steps, 4);
        assert_eq!(c.experiment.seed, base().experiment.seed + 1);
    }

    #[test]
    fn random_points_stay_in_their_ranges_and_repeat_with_the_seed() {
        let make = || {
            Sweep::new(
                "t",
                base(),
                vec![],
                40,
                vec![
                    Range::parse("filter.guidance_scale=0.001:1:log").unwrap(),
                    Range::parse("filter.flow_steps=2:9").unwrap(),
                ],
                1,
            )
            .unwrap()
        };
        let (a, b) = (make(), make());
        assert_eq!(a.points(), b.points());
        let g: Vec<f64> = a
            .points()
            .iter()
            .map(|p| p.settings[0].1.parse().unwrap())
            .collect();
        assert!(g.iter().all(|v| (0.001..=1.0).contains(v)), "{g:?}");
        // Log-uniform: about half the draws below the geometric midpoint 0.0316.
        let below = g.iter().filter(|v| **v < 0.0316).count();
        assert!(
            (8..=32).contains(&below),
            "{below} of 40 below the log midpoint"
        );
        for p in a.points() {
            let k: usize = p.settings[1]
                .1
                .parse()
                .expect("integer setting drawn as integer");
            assert!((2..=9).contains(&k));
        }
    }

    #[test]
    fn empty_or_bad_sweeps_are_refused_before_running() {
        // (grid, random, ranges, seeds, text the error must hold)
        type Case = (Vec<Axis>, usize, Vec<Range>, usize, &'static str);
        let cases: Vec<Case> = vec![
            (vec![], 0, vec![], 1, "--grid"),
            (
                vec![Axis {
                    key: "filter.sigma_min".into(),
                    values: vec![],
                }],
                0,
                vec![],
                1,
                "empty grid",
            ),
            (
                vec![Axis::parse("filter.sigma_min=1").unwrap()],
                0,
                vec![],
                0,
                "--seeds",
            ),
            (
                vec![Axis::parse("filter.sigma_mn=1").unwrap()],
                0,
                vec![],
                1,
                "filter.sigma_mn",
            ),
            (
                vec![Axis::parse("filter.sigma_min=0.1,-1").unwrap()],
                0,
                vec![],
                1,
                "filter.sigma_min",
            ),
            (
                vec![Axis::parse("ensemble.n=4,x").unwrap()],
                0,
                vec![],
                1,
                "ensemble.n",
            ),
            (vec![], 3, vec![], 1, "--range"),
            (
                vec![],
                3,
                vec![Range::parse("filter.kind=0:1").unwrap()],
                1,
                "numeric",
            ),
            (
                vec![Axis::parse("filter.sigma_min=1").unwrap()],
                2,
                vec![Range::parse("filter.sigma_min=0.1:1").unwrap()],
                1,
                "one --grid or --range",
            ),
        ];
        for (grid, random, ranges, seeds, needle) in cases {
            let e = Sweep::new("t", base(), grid, random, ranges, seeds)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "`{needle}` not in: {e}");
        }
    }

    #[test]
    fn manifest_hash_tracks_the_experiment_not_the_name() {
        let grid = || vec![Axis::parse("filter.sigma_min=0.01,0.1").unwrap()];
        let a = Sweep::new("a", base(), grid(), 0, vec![], 2)
            .unwrap()
            .manifest();
        let b = Sweep::new("b", base(), grid(), 0, vec![], 2)
            .unwrap()
            .manifest();
        assert_eq!(a.hash, b.hash);
        let mut other = base();
        other.set("ensemble.n=30").unwrap();
        let c = Sweep::new("a", other, grid(), 0, vec![], 2)
            .unwrap()
            .manifest();
        assert_ne!(a.hash, c.hash);
        assert!(
            a.difference(&c).contains("ensemble.n"),
            "{}",
            a.difference(&c)
        );
        let d = Sweep::new("a", base(), grid(), 0, vec![], 3)
            .unwrap()
            .manifest();
        assert!(a.difference(&d).contains("seeds was 2, now 3"));
    }

    #[test]
    fn rows_round_trip_through_csv() {
        let row = Row {
            point: 3,
            seed: 17,
            values: vec!["0.1".into(), "4".into()],
            outcome: Ok(Scores {
                rmse_mean: 0.123456789,
                spread_mean: 1e-7,
                rmse_forecast_mean: 2.5,
                rmse_last: 0.3,
                seconds_per_cycle: 0.001,
            }),
        };
        let line = row.to_csv();
        assert_eq!(Row::parse(line.trim_end(), 2), Some(row));
        let failed = Row {
            point: 0,
            seed: 1,
            values: vec!["a".into(), "b".into()],
            outcome: Err("divergence at cycle 3, during analysis\nx".into()),
        };
        let back = Row::parse(failed.to_csv().trim_end(), 2).unwrap();
        assert!(back
            .outcome
            .unwrap_err()
            .contains("divergence at cycle 3; during"));
        assert_eq!(Row::parse("1,2,3", 2), None);
    }

    #[test]
    fn mean_std_is_the_sample_standard_deviation() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-15);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
        assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }
}
