//! Where an experiment comes from: a preset name or an experiment file (TOML), with the
//! filter, settings and seed a caller changes on top of it. The command line, the Python
//! package and tests all start an experiment here, so they resolve the same configuration.

use std::path::Path;

use super::{file, preset, Config, Experiment, Preset};
use crate::error::Result;

/// An experiment's source: a preset or a TOML file, with the name its results are filed under.
#[derive(Clone, Debug)]
pub struct Source {
    /// The name results are filed under (the preset's, the file's `name`, or its stem).
    pub name: String,
    /// The configuration, with the changes applied so far.
    pub config: Config,
    /// The preset whose expected RMSE band applies while the filter settings are its own.
    pub preset: Option<Preset>,
}

impl Source {
    /// `arg` is a file when it names an existing path or ends in `.toml`, else a preset.
    pub fn load(arg: &str) -> Result<Source> {
        let path = Path::new(arg);
        if path.exists() || arg.ends_with(".toml") {
            let f = file::read_toml(path)?;
            let name = f.name.clone().unwrap_or_else(|| {
                path.file_stem()
                    .map_or("custom".into(), |s| s.to_string_lossy().into_owned())
            });
            let preset = preset(&name).ok();
            Ok(Source {
                name,
                config: f.config,
                preset,
            })
        } else {
            let p = preset(arg)?;
            Ok(Source {
                name: p.name.to_string(),
                config: p.config.clone(),
                preset: Some(p),
            })
        }
    }

    /// Applies a filter name, `key=value` settings and a seed, in that order. A change of
    /// EnFF guidance brings that guidance's own defaults for the settings not named
    /// ([`super::config::GuidanceDefaults`]); a setting the resolved guidance does not read
    /// is logged as a warning. Returns the warnings.
    pub fn apply(
        &mut self,
        filter: Option<&str>,
        sets: &[String],
        seed: Option<u64>,
    ) -> Result<Vec<String>> {
        let before = self.config.filter.guidance;
        if let Some(f) = filter {
            self.config.set(&format!("filter.kind={f}"))?;
        }
        for s in sets {
            self.config.set(s)?;
        }
        if let Some(seed) = seed {
            self.config.experiment.seed = seed;
        }
        let warnings = self.config.resolve_guidance(before, sets);
        for w in &warnings {
            log::warn!("{w}");
        }
        Ok(warnings)
    }

    /// The preset's expected RMSE band, when the filter settings of `config` are still the
    /// preset's.
    pub fn expected(&self, config: &Config) -> Option<(f64, f64)> {
        self.preset
            .as_ref()
            .filter(|p| p.config.filter == config.filter)
            .map(|p| p.expected_rmse)
    }

    /// The experiment (validated).
    pub fn experiment(&self) -> Result<Experiment> {
        Experiment::new(&self.name, self.config.clone(), self.expected(&self.config))
    }
}
