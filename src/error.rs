//! One error type for the whole library.
//!
//! Every variant carries enough to say what was wrong, the offending value and how to fix it;
//! the `Display` text is what the `enff` command prints before it exits non-zero.

use thiserror::Error;

/// Result alias used throughout enff.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in enff, as a typed value (never a panic).
#[derive(Debug, Error)]
pub enum Error {
    /// A configuration or call parameter is outside its valid range.
    #[error("invalid value for `{name}`: {value} ({fix})")]
    InvalidParameter {
        /// Parameter name as the user writes it (e.g. `filter.sigma_min`).
        name: String,
        /// The rejected value, formatted.
        value: String,
        /// How to fix it.
        fix: String,
    },

    /// Two arrays that must agree in shape do not.
    #[error("shape mismatch for `{name}`: expected {expected}, got {got}")]
    ShapeMismatch {
        /// What was being checked (e.g. `observation`).
        name: String,
        /// The shape that was needed.
        expected: String,
        /// The shape that was given.
        got: String,
    },

    /// A NaN or infinity where only finite numbers make sense.
    #[error("non-finite value in `{name}` at {location}: {value} ({hint})")]
    NonFinite {
        /// Which array (e.g. `observation`, `forecast ensemble`).
        name: String,
        /// Where in it (index, member/component, cycle …).
        location: String,
        /// The value found.
        value: f64,
        /// What probably went wrong / how to fix it.
        hint: String,
    },

    /// The ensemble blew up during a run.
    #[error("divergence at cycle {cycle} during {stage}: {detail}")]
    Diverged {
        /// Assimilation cycle (1-based) where it happened.
        cycle: usize,
        /// `forecast`, `analysis` or `metrics`.
        stage: String,
        /// What was seen.
        detail: String,
    },

    /// A preset name that does not exist.
    #[error("unknown preset `{name}`; known presets: {known}")]
    UnknownPreset {
        /// The name given.
        name: String,
        /// Comma-separated list of valid names.
        known: String,
    },

    /// A filter name that does not exist.
    #[error("unknown filter `{name}`; known filters: {known}")]
    UnknownFilter {
        /// The name given.
        name: String,
        /// Comma-separated list of valid names.
        known: String,
    },

    /// A `--set key=value` whose key is not a setting.
    #[error("unknown setting `{key}`; known settings: {known}")]
    UnknownSetting {
        /// The key given.
        key: String,
        /// Comma-separated list of valid keys.
        known: String,
    },

    /// A `--set key=value` whose value does not parse as the key's type.
    #[error("bad value `{value}` for setting `{key}`: expected {expected}")]
    BadSettingValue {
        /// The key.
        key: String,
        /// The text given.
        value: String,
        /// The expected type, in words.
        expected: String,
    },

    /// The chosen backend cannot run this operation (e.g. a user-defined model on a GPU).
    #[error("backend `{backend}` does not support {what}: {fix}")]
    Unsupported {
        /// Backend name.
        backend: String,
        /// What was asked.
        what: String,
        /// What to do instead.
        fix: String,
    },

    /// A problem too large for the device or for memory, detected before allocating.
    #[error("problem too large: {detail}")]
    TooLarge {
        /// The sizes involved and what would fit.
        detail: String,
    },

    /// A run stopped before its last cycle on request (an interruption).
    #[error("run interrupted after cycle {cycle}{}", checkpoint.as_ref().map_or(String::new(), |c| format!("; checkpoint in {c}: continue with `enff run --resume DIR`")))]
    Interrupted {
        /// Cycles completed.
        cycle: usize,
        /// The checkpoint folder and cycle, if one was written.
        checkpoint: Option<String>,
    },

    /// A run failed after writing a checkpoint: the cause, and how to continue.
    #[error("{source}; the last checkpoint (after cycle {cycle}) is in {dir}: continue with `enff run --resume {dir}`{hint}")]
    Resumable {
        /// What stopped the run.
        source: Box<Error>,
        /// Cycle of the last checkpoint.
        cycle: usize,
        /// Its folder.
        dir: String,
        /// Extra advice (e.g. switch backend).
        hint: String,
    },

    /// A GPU adapter, device, validation or mapping failure.
    #[error("GPU error: {0}")]
    Gpu(String),

    /// An experiment file (TOML) that does not parse or names a bad setting.
    #[error("{}", describe_config_file(.file, *.line, *.column, .key.as_deref(), .message))]
    ConfigFile {
        /// The file (or `<text>` for a string).
        file: String,
        /// 1-based line of the offending text, when known.
        line: Option<usize>,
        /// 1-based column of the offending text, when known.
        column: Option<usize>,
        /// The setting involved (`filter.sigma_min`), when known.
        key: Option<String>,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// An output directory that already holds files.
    #[error(
        "output directory {path} exists and is not empty: choose another --out, or pass --force \
         to write into it (files of the same name are replaced)"
    )]
    OutputExists {
        /// The directory.
        path: String,
    },

    /// A sweep directory that belongs to another sweep.
    #[error(
        "sweep directory {path} holds a different experiment ({reason}): use another --out, or \
         pass --force to discard its results and start afresh"
    )]
    SweepMismatch {
        /// The directory.
        path: String,
        /// What differs.
        reason: String,
    },

    /// A `.npy` file that enff cannot read (truncated, wrong dtype or rank, bad header).
    #[error("cannot read {path}: {problem}")]
    Npy {
        /// The file involved.
        path: String,
        /// What is wrong with it.
        problem: NpyProblem,
    },

    /// Reading or writing a result file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A run cannot be sharded over several processes (MPI ranks) as configured.
    #[error("cannot run over {ranks} MPI ranks: {what} ({fix})")]
    Distributed {
        /// Number of ranks of the job.
        ranks: usize,
        /// What stands in the way.
        what: String,
        /// How to fix it.
        fix: String,
    },
}

impl Error {
    /// The underlying error of a [`Error::Resumable`] (else `self`).
    pub fn root(&self) -> &Error {
        match self {
            Error::Resumable { source, .. } => source.root(),
            other => other,
        }
    }

    /// Shorthand for [`Error::InvalidParameter`].
    pub fn invalid(name: impl Into<String>, value: impl ToString, fix: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name: name.into(),
            value: value.to_string(),
            fix: fix.into(),
        }
    }

    /// Shorthand for [`Error::ShapeMismatch`].
    pub fn shape(name: impl Into<String>, expected: impl ToString, got: impl ToString) -> Self {
        Error::ShapeMismatch {
            name: name.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}

fn describe_config_file(
    file: &str,
    line: Option<usize>,
    column: Option<usize>,
    key: Option<&str>,
    message: &str,
) -> String {
    let mut s = file.to_string();
    if let Some(l) = line {
        s.push_str(&format!(", line {l}"));
        if let Some(c) = column {
            s.push_str(&format!(", column {c}"));
        }
    }
    if let Some(k) = key {
        s.push_str(&format!(": setting `{k}`"));
    }
    format!("{s}: {message}")
}

/// Returns an error naming `name` if `value` is not finite and strictly positive.
pub fn check_positive(name: &str, value: f64, fix: &str) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(name, value, fix))
    }
}

/// Returns an error naming the first non-finite entry of `data`, if any.
pub fn check_finite(name: &str, data: &[f32], cols: usize, hint: &str) -> Result<()> {
    if let Some(idx) = data.iter().position(|v| !v.is_finite()) {
        let location = if cols > 0 && data.len() > cols {
            format!("member {}, component {}", idx / cols, idx % cols)
        } else {
            format!("index {idx}")
        };
        return Err(Error::NonFinite {
            name: name.to_string(),
            location,
            value: data[idx] as f64,
            hint: hint.to_string(),
        });
    }
    Ok(())
}

/// The shape as NumPy prints it.
pub fn shape_text(shape: &[usize]) -> String {
    match shape {
        [k] => format!("({k},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Why a `.npy` file could not be read.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyProblem {
    /// The file does not start with the `.npy` magic string.
    NotNpy,
    /// A format version other than 1.0, 2.0 or 3.0.
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The header is not a dict with `descr`, `fortran_order` and `shape`.
    BadHeader(String),
    /// An element type other than little-endian float32 / float64.
    Dtype(String),
    /// A big-endian float array.
    BigEndian(String),
    /// The array is stored in Fortran (column-major) order.
    FortranOrder,
    /// The array has neither one nor two dimensions.
    Rank(Vec<usize>),
    /// The file ends before all values.
    Truncated {
        /// Data bytes the header announces.
        expected: u64,
        /// Data bytes present.
        got: u64,
    },
    /// Bytes follow the last value.
    TrailingBytes {
        /// Data bytes the header announces.
        expected: u64,
        /// Data bytes present.
        got: u64,
    },
}

impl std::fmt::Display for NpyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NpyProblem::NotNpy => write!(
                f,
                "not a .npy file (no \\x93NUMPY magic): write the array with numpy.save"
            ),
            NpyProblem::UnsupportedVersion { major, minor } => write!(
                f,
                "format version {major}.{minor} is not supported: use version 1.0, 2.0 or 3.0 \
                 (numpy.save writes these)"
            ),
            NpyProblem::BadHeader(why) => write!(
                f,
                "malformed header ({why}): write the array with numpy.save"
            ),
            NpyProblem::Dtype(d) => write!(
                f,
                "dtype `{d}` is not supported: save float32 or float64, e.g. \
                 np.save(path, a.astype(np.float32))"
            ),
            NpyProblem::BigEndian(d) => write!(
                f,
                "big-endian dtype `{d}`: save little-endian floats, e.g. \
                 np.save(path, a.astype('<f4'))"
            ),
            NpyProblem::FortranOrder => write!(
                f,
                "fortran_order is True: save a C-ordered array, e.g. \
                 np.save(path, np.ascontiguousarray(a))"
            ),
            NpyProblem::Rank(shape) => write!(
                f,
                "shape {} has {} dimensions: enff reads 1-D and 2-D arrays (members × \
                 components; reshape to 2-D first)",
                shape_text(shape),
                shape.len()
            ),
            NpyProblem::Truncated { expected, got } => write!(
                f,
                "truncated: the header announces {expected} data bytes but the file holds \
                 {got}: the file was cut short, save it again"
            ),
            NpyProblem::TrailingBytes { expected, got } => write!(
                f,
                "{got} data bytes where the header announces {expected}: the file is not one \
                 array written by numpy.save"
            ),
        }
    }
}
