//! The filters of enff by name: one enum that every configuration, driver and table uses.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// An analysis method, as named in configurations (`filter.kind`) and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterKind {
    /// EnFF with the filtering-to-predictive path (the previous analysis as the source).
    EnffF2p,
    /// EnFF with the optimal-transport path (a standard-normal source).
    EnffOt,
    /// The ensemble score filter.
    Ensf,
    /// The ensemble transform Kalman filter.
    Etkf,
    /// The local ensemble transform Kalman filter.
    Letkf,
    /// The stochastic EnKF with perturbed observations.
    Enkf,
    /// The bootstrap particle filter.
    Bpf,
    /// The exact Kalman filter (linear models).
    Kf,
}

impl FilterKind {
    /// Every filter, in the order tables list them.
    pub const ALL: [FilterKind; 8] = [
        FilterKind::EnffF2p,
        FilterKind::EnffOt,
        FilterKind::Ensf,
        FilterKind::Etkf,
        FilterKind::Letkf,
        FilterKind::Enkf,
        FilterKind::Bpf,
        FilterKind::Kf,
    ];

    /// The name used in configurations and summaries (`enff-f2p`, `etkf` …).
    pub fn name(self) -> &'static str {
        match self {
            FilterKind::EnffF2p => "enff-f2p",
            FilterKind::EnffOt => "enff-ot",
            FilterKind::Ensf => "ensf",
            FilterKind::Etkf => "etkf",
            FilterKind::Letkf => "letkf",
            FilterKind::Enkf => "enkf",
            FilterKind::Bpf => "bpf",
            FilterKind::Kf => "kf",
        }
    }

    /// The filter named `name`, or [`Error::UnknownFilter`] listing the known ones.
    pub fn parse(name: &str) -> Result<FilterKind> {
        FilterKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| Error::UnknownFilter {
                name: name.to_string(),
                known: FilterKind::names().join(", "),
            })
    }

    /// Every filter's name.
    pub fn names() -> Vec<&'static str> {
        FilterKind::ALL.iter().map(|k| k.name()).collect()
    }

    /// True for the Ensemble Flow Filter (either path).
    pub fn is_enff(self) -> bool {
        matches!(self, FilterKind::EnffF2p | FilterKind::EnffOt)
    }
}

impl fmt::Display for FilterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FilterKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        FilterKind::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_kind_and_others_are_refused() {
        for k in FilterKind::ALL {
            assert_eq!(FilterKind::parse(k.name()).unwrap(), k);
            assert_eq!(k.to_string(), k.name());
        }
        let e = FilterKind::parse("enff").unwrap_err();
        assert!(matches!(e, Error::UnknownFilter { .. }), "{e}");
        assert!(e.to_string().contains("enff-f2p, enff-ot"), "{e}");
    }
}
