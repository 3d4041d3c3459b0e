//! The `speculative={...}` dict that `Engine` and `simulate` take, parsed once, with every bad
//! value a clear `HoraeCoreError` at configuration time.

use horae_core::engine::SpecMethod;
use horae_core::sched::{SpecConfig, MAX_SPEC_TOKENS};
use horae_core::sim::Acceptance;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::HoraeCoreError;

/// Where drafts come from: a real proposer, or the simulator's model of one (per-request
/// acceptance rates ~ Beta(mean, concentration)).
pub(crate) enum Choice {
    Engine(SpecMethod),
    Simulated(Acceptance),
}

const ENGINE_KEYS: &[&str] = &[
    "method",
    "k_max",
    "adaptive",
    "prompt_lookup_min",
    "prompt_lookup_max",
    "model",
    "num_layers",
    "margin",
    "probe_every",
    "rechoose_every",
];
const SIM_KEYS: &[&str] =
    &["method", "k_max", "adaptive", "acceptance", "concentration", "margin", "probe_every", "rechoose_every"];

pub(crate) fn parse(d: &Bound<'_, PyDict>, simulator: bool, seed: u64) -> PyResult<(SpecConfig, Choice)> {
    let err = |m: String| HoraeCoreError::new_err(format!("speculative: {m}"));
    let allowed = if simulator { SIM_KEYS } else { ENGINE_KEYS };
    for key in d.keys() {
        let k: String = key.extract().map_err(|_| err("keys must be strings".into()))?;
        if !allowed.contains(&k.as_str()) {
            return Err(err(format!("unknown key '{k}' (allowed: {})", allowed.join(", "))));
        }
    }
    fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>> {
        match d.get_item(key)? {
            None => Ok(None),
            Some(v) if v.is_none() => Ok(None),
            Some(v) => v.extract::<T>().map(Some).map_err(|e| {
                let e: PyErr = e.into();
                HoraeCoreError::new_err(format!("speculative: '{key}': {e}"))
            }),
        }
    }
    let defaults = SpecConfig::default();
    let k_max: i64 = get(d, "k_max")?.unwrap_or(defaults.k_max as i64);
    if !(1..=MAX_SPEC_TOKENS as i64).contains(&k_max) {
        return Err(err(format!("k_max must be between 1 and {}, got {k_max}", MAX_SPEC_TOKENS)));
    }
    let cfg = SpecConfig {
        k_max: k_max as usize,
        adaptive: get(d, "adaptive")?.unwrap_or(defaults.adaptive),
        margin: get(d, "margin")?.unwrap_or(defaults.margin),
        probe_every: get(d, "probe_every")?.unwrap_or(defaults.probe_every),
        rechoose_every: get(d, "rechoose_every")?.unwrap_or(defaults.rechoose_every),
        ..defaults
    };
    cfg.validate().map_err(|e| err(e.to_string()))?;
    let default_method = if simulator { "simulated" } else { "ngram" };
    let method: String = get(d, "method")?.unwrap_or_else(|| default_method.to_string());
    let method = match (method.as_str(), simulator) {
        ("ngram", false) => {
            let min_n: usize = get(d, "prompt_lookup_min")?.unwrap_or(1);
            let max_n: usize = get(d, "prompt_lookup_max")?.unwrap_or(4);
            if min_n == 0 || max_n < min_n {
                return Err(err(format!("need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n} and {max_n}")));
            }
            Choice::Engine(SpecMethod::Ngram { min_n, max_n })
        }
        ("draft", false) => {
            let num_layers: Option<usize> = get(d, "num_layers")?;
            if num_layers == Some(0) {
                return Err(err("num_layers must be at least 1".into()));
            }
            Choice::Engine(SpecMethod::Draft { model: get(d, "model")?, num_layers })
        }
        ("simulated", true) => {
            let a = Acceptance {
                mean: get(d, "acceptance")?.unwrap_or(0.7),
                concentration: get(d, "concentration")?.unwrap_or(10.0),
                seed,
            };
            a.validate().map_err(|e| err(e.to_string()))?;
            Choice::Simulated(a)
        }
        (m, false) => return Err(err(format!("unknown method '{m}': use 'ngram' or 'draft'"))),
        (m, true) => return Err(err(format!("unknown method '{m}': the simulator models proposers as 'simulated'"))),
    };
    Ok((cfg, method))
}
