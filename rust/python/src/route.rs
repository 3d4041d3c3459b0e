//! Routing across replicas from Python (the Ray Serve deployment's request router): the core's
//! `route::Router` over the stats dicts replicas publish, a replica's own stats as such a dict,
//! and a tokenizer without a model for the ingress.

use std::path::PathBuf;
use std::sync::Arc;

use horae_core::kv::hash::token_block_hashes;
use horae_core::route::{BlockBloom, CachedBlocks, ReplicaStats, RetryShed, RouteRequest, Router, RouterKind};
use horae_core::tokenizer::{checked_ids, Tokenizer};
use horae_core::HoraeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::to_py;

/// A replica's routing stats as published: counts, the forecast against the pool, and its prefix
/// cache as a Bloom filter of block hashes (`cached_bloom`, bytes).
pub(crate) fn stats_dict<'py>(py: Python<'py>, s: &ReplicaStats, block_size: usize) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("waiting", s.waiting)?;
    d.set_item("running", s.running)?;
    d.set_item("waiting_tokens", s.waiting_tokens)?;
    d.set_item("capacity_tokens", s.capacity_tokens)?;
    d.set_item("predicted_peak_tokens", s.predicted_peak_tokens)?;
    d.set_item("planned_output", s.planned_output)?;
    d.set_item("prefill_rate", s.prefill_rate)?;
    d.set_item("block_size", block_size)?;
    let bloom = match &s.cached {
        CachedBlocks::Index(m) => {
            d.set_item("cached_blocks", m.len())?;
            BlockBloom::from_hashes(m.keys().copied())
        }
        CachedBlocks::Bloom(b) => b.clone(),
    };
    d.set_item("cached_bloom", PyBytes::new(py, &bloom.to_bytes()))?;
    Ok(d)
}

fn field<'py>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Bound<'py, PyAny>> {
    d.get_item(key)?.ok_or_else(|| to_py(HoraeError::InvalidConfig(format!("routing stats lack {key:?}"))))
}

fn count(d: &Bound<'_, PyDict>, key: &str) -> PyResult<u64> {
    field(d, key)?.extract::<u64>().map_err(|e| to_py(HoraeError::InvalidConfig(format!("routing stats {key:?}: {e}"))))
}

fn parse_stats(d: &Bound<'_, PyDict>) -> PyResult<(ReplicaStats, usize)> {
    let bloom: Vec<u8> = field(d, "cached_bloom")?
        .extract()
        .map_err(|e| to_py(HoraeError::InvalidConfig(format!("routing stats \"cached_bloom\": {e}"))))?;
    let stats = ReplicaStats {
        waiting: count(d, "waiting")? as usize,
        running: count(d, "running")? as usize,
        waiting_tokens: count(d, "waiting_tokens")?,
        capacity_tokens: count(d, "capacity_tokens")?,
        predicted_peak_tokens: count(d, "predicted_peak_tokens")?,
        planned_output: count(d, "planned_output")?,
        prefill_rate: field(d, "prefill_rate")?
            .extract::<f64>()
            .map_err(|e| to_py(HoraeError::InvalidConfig(format!("routing stats \"prefill_rate\": {e}"))))?,
        cached: CachedBlocks::Bloom(BlockBloom::from_bytes(&bloom).map_err(to_py)?),
    };
    Ok((stats, count(d, "block_size")? as usize))
}

/// `horae._core.Router(kind, seed=0)`: the core's router over the stats replicas publish.
/// `publish(i, stats)` parses replica `i`'s stats dict once (a new publication: what the router
/// sent it since is in them now); `choose(token_ids, max_tokens, tried=[])` is the index of the
/// replica for a request, never one of `tried` unless every replica is.
#[pyclass(name = "Router", module = "horae._core")]
pub(crate) struct PyRouter {
    router: Router,
    stats: Vec<ReplicaStats>,
    block_size: usize,
}

#[pymethods]
impl PyRouter {
    #[new]
    #[pyo3(signature = (kind, seed = 0))]
    fn new(kind: &str, seed: u64) -> PyResult<Self> {
        let kind: RouterKind = kind.parse().map_err(to_py)?;
        Ok(PyRouter { router: Router::new(kind, seed), stats: Vec::new(), block_size: 16 })
    }

    #[getter]
    fn kind(&self) -> &'static str {
        self.router.kind().as_str()
    }

    /// Replicas published so far.
    fn __len__(&self) -> usize {
        self.stats.len()
    }

    fn publish(&mut self, i: usize, stats: Bound<'_, PyDict>) -> PyResult<()> {
        let (parsed, block_size) = parse_stats(&stats)?;
        if i > self.stats.len() {
            return Err(to_py(HoraeError::InvalidConfig(format!(
                "replica {i} published before replica {}: publish in order",
                self.stats.len()
            ))));
        }
        if i == self.stats.len() {
            self.stats.push(parsed);
        } else {
            self.stats[i] = parsed;
        }
        self.block_size = block_size.max(1);
        self.router.refreshed(i);
        Ok(())
    }

    /// `ttft`: seconds the request may still wait for its first token (None: no bound).
    /// `cache_salt`: the request's (vLLM's), whose prefix blocks only its salt's prompts share.
    #[pyo3(signature = (token_ids, max_tokens, tried = Vec::new(), ttft = None, cache_salt = None))]
    fn choose(
        &mut self,
        py: Python<'_>,
        token_ids: Vec<u32>,
        max_tokens: usize,
        tried: Vec<usize>,
        ttft: Option<f64>,
        cache_salt: Option<String>,
    ) -> PyResult<usize> {
        let req = (&token_ids[..], max_tokens, ttft, cache_salt.as_deref());
        self.with_request(py, req, |router, req, stats| router.choose_except(req, stats, &tried))
    }

    /// Where a request that replicas `tried` shed, and that may wait `ttft` more seconds for its
    /// first token, should go by `rule` (`RETRY_RULES`; `route::Router::retry_target`), or None.
    #[pyo3(signature = (token_ids, max_tokens, tried, ttft = None, rule = "always", cache_salt = None))]
    #[allow(clippy::too_many_arguments)]
    fn retry_target(
        &mut self,
        py: Python<'_>,
        token_ids: Vec<u32>,
        max_tokens: usize,
        tried: Vec<usize>,
        ttft: Option<f64>,
        rule: &str,
        cache_salt: Option<String>,
    ) -> PyResult<Option<usize>> {
        let rule: RetryShed = rule.parse().map_err(to_py)?;
        let req = (&token_ids[..], max_tokens, ttft, cache_salt.as_deref());
        self.with_request(py, req, |router, req, stats| router.retry_target(req, stats, &tried, rule))
    }
}

impl PyRouter {
    /// `f` on the router, the request (token ids, max_tokens, ttft, cache salt) as it sees it
    /// (its prompt's block hashes) and the stats, without the GIL.
    fn with_request<T: Send>(
        &mut self,
        py: Python<'_>,
        (token_ids, max_tokens, ttft, cache_salt): (&[u32], usize, Option<f64>, Option<&str>),
        f: impl FnOnce(&mut Router, &RouteRequest, &[ReplicaStats]) -> T + Send,
    ) -> PyResult<T> {
        if self.stats.is_empty() {
            return Err(to_py(HoraeError::InvalidConfig("routing needs at least one replica's stats".into())));
        }
        let (router, stats, block_size) = (&mut self.router, &self.stats, self.block_size);
        Ok(py.detach(|| {
            let hashes = token_block_hashes(token_ids, block_size, cache_salt);
            let req = RouteRequest { block_hashes: &hashes, block_size, prompt_len: token_ids.len(), max_tokens, ttft };
            f(router, &req, stats)
        }))
    }
}

/// `horae._core.Tokenizer(model_dir, vocab_size)`: a model folder's tokenizer without its weights
/// (the ingress in front of replicas tokenizes with it).
#[pyclass(name = "Tokenizer", module = "horae._core", frozen)]
pub(crate) struct PyTokenizer {
    inner: Arc<Tokenizer>,
    vocab: usize,
}

#[pymethods]
impl PyTokenizer {
    #[new]
    fn new(model_dir: PathBuf, vocab_size: usize) -> PyResult<Self> {
        Ok(PyTokenizer { inner: Arc::new(Tokenizer::from_dir(&model_dir).map_err(to_py)?), vocab: vocab_size })
    }

    #[pyo3(signature = (text, add_special_tokens = false))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        self.inner.encode(text, add_special_tokens).map_err(to_py)
    }

    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        self.inner.decode(&checked_ids(&ids, self.vocab).map_err(to_py)?, skip_special_tokens).map_err(to_py)
    }

    /// A token's own bytes (`Tokenizer::token_bytes`).
    fn token_bytes<'py>(&self, py: Python<'py>, token: i64) -> PyResult<Bound<'py, PyBytes>> {
        let id = checked_ids(&[token], self.vocab).map_err(to_py)?[0];
        Ok(PyBytes::new(py, &self.inner.token_bytes(id).map_err(to_py)?))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRouter>()?;
    m.add_class::<PyTokenizer>()?;
    Ok(())
}
