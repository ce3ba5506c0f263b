//! Experiment files: a whole [`Config`] as TOML, with every field written out, read back with
//! unknown keys refused and errors that name the key, line and column.
//!
//! ```toml
//! name = "lorenz96_sakov2008"   # optional: the name results are filed under
//!
//! [model]
//! system = "lorenz96"
//! d = 40
//! # … every setting of every section
//! ```

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

use super::config::{Config, EnsembleConfig, FilterConfig, ModelConfig, ObserveConfig, RunConfig};
use crate::error::{Error, Result};

/// The file layout: an optional name, then the five sections of [`Config`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLayout {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    model: ModelConfig,
    observe: ObserveConfig,
    ensemble: EnsembleConfig,
    filter: FilterConfig,
    experiment: RunConfig,
}

/// A parsed and validated experiment file.
#[derive(Clone, Debug, PartialEq)]
pub struct ExperimentFile {
    /// The `name` key, if the file has one.
    pub name: Option<String>,
    /// The configuration.
    pub config: Config,
}

/// The configuration as a TOML document with every field, headed by `# ` comment lines (one per
/// line of `comment`) and `name = "…"`.
pub fn to_toml(name: &str, comment: &str, config: &Config) -> Result<String> {
    let layout = FileLayout {
        name: Some(name.to_string()),
        model: config.model.clone(),
        observe: config.observe.clone(),
        ensemble: config.ensemble.clone(),
        filter: config.filter.clone(),
        experiment: config.experiment.clone(),
    };
    let body = toml::to_string(&layout).map_err(|e| {
        // The one value TOML cannot hold: an integer above i64::MAX (a seed).
        Error::invalid(
            "experiment.seed",
            config.experiment.seed,
            format!("cannot be written as TOML ({e}): use a seed below 2^63"),
        )
    })?;
    let mut text = String::new();
    for line in comment.lines() {
        text.push_str("# ");
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(&body);
    Ok(text)
}

/// Parses and validates an experiment file's text; `file` names it in errors.
pub fn parse_toml(text: &str, file: &str) -> Result<ExperimentFile> {
    let layout: FileLayout = toml::from_str(text).map_err(|e| {
        let span = e.span();
        let (line, column) = span.as_ref().map(|s| line_column(text, s.start)).unzip();
        let mut key = span.as_ref().and_then(|s| key_at(text, s.start));
        let message = e.message().trim().to_string();
        // serde reports a missing field at the table that lacks it.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            key = Some(match key {
                Some(section) => format!("{section}.{field}"),
                None => field.to_string(),
            });
        }
        Error::ConfigFile {
            file: file.to_string(),
            line,
            column,
            key,
            message,
        }
    })?;
    let config = Config {
        model: layout.model,
        observe: layout.observe,
        ensemble: layout.ensemble,
        filter: layout.filter,
        experiment: layout.experiment,
    };
    config.validate().map_err(|e| {
        let key = match &e {
            Error::InvalidParameter { name, .. } => Some(name.clone()),
            Error::UnknownFilter { .. } => Some("filter.kind".to_string()),
            _ => None,
        };
        let (line, column) = key
            .as_deref()
            .and_then(|k| span_of(text, k))
            .map(|s| line_column(text, s.start))
            .unzip();
        Error::ConfigFile {
            file: file.to_string(),
            line,
            column,
            key,
            message: e.to_string(),
        }
    })?;
    Ok(ExperimentFile {
        name: layout.name,
        config,
    })
}

/// Reads, parses and validates an experiment file.
pub fn read_toml(path: &Path) -> Result<ExperimentFile> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_toml(&text, &path.display().to_string())
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The dotted key whose key or value covers byte `pos`, the deepest one.
fn key_at(text: &str, pos: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    key_in(doc.get_ref(), pos, "")
}

fn key_in(table: &DeTable<'_>, pos: usize, prefix: &str) -> Option<String> {
    for (k, v) in table.iter() {
        let path = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        if contains(&k.span(), pos) {
            return Some(path);
        }
        if let DeValue::Table(inner) = v.get_ref() {
            if let Some(p) = key_in(inner, pos, &path) {
                return Some(p);
            }
        }
        if contains(&v.span(), pos) {
            return Some(path);
        }
    }
    None
}

fn contains(span: &Range<usize>, pos: usize) -> bool {
    span.start <= pos && pos < span.end.max(span.start + 1)
}

/// Span of the key `section.field` in `text`, if it is there.
fn span_of(text: &str, dotted: &str) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref() == part)?;
        if i + 1 == parts.len() {
            return Some(k.span());
        }
        match v.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::{preset, PRESETS};

    #[test]
    fn every_preset_round_trips_through_toml() {
        for name in PRESETS {
            let p = preset(name).unwrap();
            let text = to_toml(name, p.description, &p.config).unwrap();
            let back = parse_toml(&text, "preset.toml").unwrap();
            assert_eq!(back.config, p.config, "{name}:\n{text}");
            assert_eq!(back.name.as_deref(), Some(name));
        }
    }

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_column("a\nbc = 1\n", 2), (2, 1));
        assert_eq!(line_column("a\nbc = 1\n", 7), (2, 6));
        assert_eq!(line_column("x", 0), (1, 1));
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named_with_their_line() {
        let p = preset("lorenz96_sakov2008").unwrap();
        let text = to_toml(p.name, "", &p.config).unwrap();
        let cases = [
            ("d = 40", "d = \"forty\"", "model.d", "string"),
            ("d = 40", "dd = 40", "model.dd", "unknown field"),
            ("d = 40", "d = 40.5", "model.d", "float"),
            (
                "sigma_min = ",
                "sigma_mn = ",
                "filter.sigma_mn",
                "unknown field",
            ),
            ("n = 40", "n = 1", "ensemble.n", "at least 2"),
            (
                "noise_std = 1.0",
                "noise_std = -1.0",
                "observe.noise_std",
                "positive",
            ),
        ];
        for (from, to, key, needle) in cases {
            assert!(text.contains(from), "{from} not in\n{text}");
            let bad = text.replacen(from, to, 1);
            let line = bad.lines().position(|l| l.starts_with(to)).unwrap() + 1;
            let e = parse_toml(&bad, "x.toml").unwrap_err();
            match &e {
                Error::ConfigFile {
                    key: Some(k),
                    line: Some(l),
                    ..
                } => {
                    assert_eq!(k, key, "{e}");
                    assert_eq!(*l, line, "{e}");
                }
                other => panic!("{to}: expected a located ConfigFile error, got {other}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg}");
            assert!(msg.contains(&format!("line {line}")), "{msg}");
        }
    }

    #[test]
    fn missing_sections_keys_and_broken_syntax_are_errors() {
        let p = preset("lorenz63_spantini2022").unwrap();
        let text = to_toml(p.name, "", &p.config).unwrap();
        let no_dt: String = text
            .lines()
            .filter(|l| !l.starts_with("dt ="))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = parse_toml(&no_dt, "x.toml").unwrap_err().to_string();
        assert!(e.contains("model.dt"), "{e}");
        let e = parse_toml("name = \"x\"\n[model\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml, line 2"), "{e}");
        let e = parse_toml("bogus = 1\n", "x.toml").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
