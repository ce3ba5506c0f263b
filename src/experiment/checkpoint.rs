//! Checkpoints: everything a run needs to continue after an interruption, in one file written
//! atomically (temporary file, then rename).
//!
//! A checkpoint taken after cycle `k` holds the analysis ensemble and the truth at cycle `k`,
//! the filter's own state (the Kalman filter's covariance; the ensemble filters keep none
//! between cycles), the metrics so far, the fully resolved configuration with a hash of it and
//! the enff version. Random streams are counter-based and keyed by `(seed, stream, cycle, …)`,
//! so the cycle index *is* the stream state: a resumed run draws exactly the numbers the
//! uninterrupted run would have drawn, and on the same backend ends with identical metrics.
//! (The previous analysis that EnFF-F2P needs is the checkpointed ensemble itself.)
//!
//! File layout (`checkpoint.enff`, little endian): the magic `ENFFCKPT`, a `u64` header length,
//! the header as JSON, the ensemble (`n·d` f32), the truth (`d` f32), the filter state (f64s),
//! and an FNV-1a 64-bit checksum of everything before it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::Config;
use crate::cycle::{CycleMetrics, DivergenceEvent};
use crate::error::{Error, Result};

/// File name of the checkpoint inside a run's output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.enff";
const MAGIC: &[u8; 8] = b"ENFFCKPT";
const FORMAT: u32 = 1;

/// The JSON part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    /// File format version.
    pub format: u32,
    /// enff version that wrote it.
    pub enff_version: String,
    /// Hash of the resolved configuration ([`config_hash`]).
    pub config_hash: String,
    /// The resolved configuration.
    pub config: Config,
    /// Preset name the run came from.
    pub preset: String,
    /// The preset's expected RMSE band, if any.
    pub expected_rmse: Option<(f64, f64)>,
    /// Backend that wrote it (`cpu`, `gpu`).
    pub backend: String,
    /// Cycles completed.
    pub cycle: usize,
    /// Ensemble size and state dimension.
    pub n: usize,
    /// State dimension.
    pub d: usize,
    /// Metrics of the completed cycles.
    pub metrics: Vec<CycleMetrics>,
    /// Divergence events recorded so far.
    pub divergences: Vec<DivergenceEvent>,
    /// Seconds spent so far: total, forecast, analysis.
    pub seconds: [f64; 3],
    /// Number of f64 values of filter state.
    pub filter_state_len: usize,
}

/// A checkpoint in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Everything but the arrays.
    pub header: CheckpointHeader,
    /// The analysis ensemble after `header.cycle`, `n × d` row-major.
    pub ensemble: Vec<f32>,
    /// The truth at the same time.
    pub truth: Vec<f32>,
    /// The filter's own state ([`crate::filter::Filter::save_state`]).
    pub filter_state: Vec<f64>,
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A stable hash of a resolved configuration (of its canonical JSON form).
pub fn config_hash(config: &Config) -> String {
    let json = serde_json::to_string(config).unwrap_or_default();
    format!("{:016x}", fnv1a(json.as_bytes()))
}

fn corrupt(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::invalid(
        "--resume",
        path.display(),
        format!(
            "the checkpoint is unreadable ({why}); it was not written by this version of enff \
             or was damaged: start the run again"
        ),
    )
}

impl Checkpoint {
    /// The checkpoint file inside a run folder.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(CHECKPOINT_FILE)
    }

    /// Serializes to bytes (see the module documentation for the layout).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_vec(&self.header)
            .map_err(|e| Error::invalid("checkpoint", e, "internal serialization error"))?;
        let mut out = Vec::with_capacity(
            24 + header.len() + 4 * (self.ensemble.len() + self.truth.len()) + 8 * 8,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for v in self.ensemble.iter().chain(&self.truth) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in &self.filter_state {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        Ok(out)
    }

    /// Parses bytes written by [`Checkpoint::to_bytes`]; `path` names the file in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            return Err(corrupt(path, "not an enff checkpoint"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if fnv1a(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
            return Err(corrupt(
                path,
                "checksum mismatch: the file is truncated or damaged",
            ));
        }
        let hlen = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")) as usize;
        let rest = &body[16..];
        if hlen > rest.len() {
            return Err(corrupt(path, "header longer than the file"));
        }
        let header: CheckpointHeader = serde_json::from_slice(&rest[..hlen])
            .map_err(|e| corrupt(path, format!("header: {e}")))?;
        if header.format != FORMAT {
            return Err(corrupt(
                path,
                format!("format {} (this build reads {FORMAT})", header.format),
            ));
        }
        let data = &rest[hlen..];
        let floats = header
            .n
            .checked_mul(header.d)
            .and_then(|nd| nd.checked_add(header.d))
            .ok_or_else(|| corrupt(path, "sizes overflow"))?;
        let want = floats
            .checked_mul(4)
            .and_then(|b| b.checked_add(header.filter_state_len.checked_mul(8)?))
            .ok_or_else(|| corrupt(path, "sizes overflow"))?;
        if data.len() != want {
            return Err(corrupt(
                path,
                format!(
                    "{} data bytes where the header announces {want}",
                    data.len()
                ),
            ));
        }
        let f32s: Vec<f32> = data[..4 * floats]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let filter_state = data[4 * floats..]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let nd = header.n * header.d;
        Ok(Checkpoint {
            ensemble: f32s[..nd].to_vec(),
            truth: f32s[nd..].to_vec(),
            filter_state,
            header,
        })
    }

    /// Writes `DIR/checkpoint.enff` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        crate::io::write_atomic(&Checkpoint::path_in(dir), &self.to_bytes()?)
    }

    /// Reads `DIR/checkpoint.enff` (or the file itself when `path` is a file).
    pub fn read(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            Checkpoint::path_in(path)
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::Io {
            path: file.display().to_string(),
            source: e,
        })?;
        Checkpoint::from_bytes(&bytes, &file)
    }

    /// Refuses a checkpoint that this build cannot continue, or that belongs to another
    /// configuration than `config`, with the reason.
    pub fn check_compatible(&self, config: &Config) -> Result<()> {
        let h = &self.header;
        let version = env!("CARGO_PKG_VERSION");
        if h.enff_version != version {
            return Err(Error::invalid(
                "--resume",
                &h.enff_version,
                format!(
                    "the checkpoint was written by enff {} and this is enff {version}: results \
                     would not be reproducible; resume with that version or start again",
                    h.enff_version
                ),
            ));
        }
        if config_hash(&h.config) != h.config_hash {
            return Err(Error::invalid(
                "--resume",
                &h.config_hash,
                "the checkpoint's configuration does not match its own hash: the file was \
                 edited or damaged; start the run again",
            ));
        }
        let want = config_hash(config);
        if want != h.config_hash {
            let ours = serde_json::to_value(config).unwrap_or_default();
            let theirs = serde_json::to_value(&h.config).unwrap_or_default();
            let diff = diff_keys(&ours, &theirs, "");
            return Err(Error::invalid(
                "--resume",
                &h.config_hash,
                format!(
                    "the checkpoint belongs to a different configuration (differs in: {}); \
                     resume without --set/--filter/--seed changes, or start a new run",
                    if diff.is_empty() {
                        "unknown".to_string()
                    } else {
                        diff.join(", ")
                    }
                ),
            ));
        }
        if self.ensemble.len() != h.n * h.d || self.truth.len() != h.d {
            return Err(Error::shape(
                "checkpoint ensemble",
                format!("{} × {}", h.n, h.d),
                self.ensemble.len(),
            ));
        }
        Ok(())
    }
}

/// Dotted keys whose values differ between two JSON objects.
fn diff_keys(a: &serde_json::Value, b: &serde_json::Value, prefix: &str) -> Vec<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => diff_keys(u, v, &p),
                        _ => vec![p],
                    }
                })
                .collect()
        }
        _ if a == b => vec![],
        _ => vec![prefix.to_string()],
    }
}
