//! Python face of the prefix index and of block hashing.

use std::sync::Arc;

use parking_lot::RwLock;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use super::convert;
use crate::hashing;
use crate::index::{ApplyResult, Overlap, PrefixIndex};
use crate::payload::{self, Event, Stored};

#[pyfunction]
#[pyo3(signature = (tokens, block_size, extra_key=None))]
pub fn hash_blocks(
    py: Python<'_>,
    tokens: &Bound<'_, PyAny>,
    block_size: i64,
    extra_key: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<u64>> {
    let bs = convert::block_size(block_size, "block_size")?;
    let toks = convert::tokens(tokens)?;
    let key = convert::extra_key(extra_key)?;
    Ok(py.allow_threads(|| hashing::hash_blocks(&toks, bs as usize, key.as_deref())))
}

#[pyfunction]
pub fn local_block_hash(tokens: &Bound<'_, PyAny>) -> PyResult<u64> {
    Ok(hashing::local_hash(&convert::tokens(tokens)?))
}

#[pyfunction]
pub fn decode_payload<'py>(py: Python<'py>, payload: &[u8]) -> PyResult<Vec<Bound<'py, PyTuple>>> {
    let events = py.allow_threads(|| payload::decode_payload(payload))?;
    events
        .into_iter()
        .map(|e| match e {
            Event::Stored(s) => {
                let tokens = s.tokens.map(|t| {
                    PyBytes::new(
                        py,
                        &t.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
                    )
                });
                let extra = s.extra_key.map(|k| PyBytes::new(py, &k));
                (
                    "stored",
                    s.hashes,
                    s.parent,
                    tokens,
                    s.block_size,
                    s.router_hashes,
                    s.tier.name(),
                    extra,
                )
                    .into_pyobject(py)
            }
            Event::Removed { hashes, tier } => ("removed", hashes, tier.name()).into_pyobject(py),
            Event::Cleared => ("cleared",).into_pyobject(py),
        })
        .collect()
}

#[pymethods]
impl ApplyResult {
    /// The counter names, in order: the one list Python code folds results by.
    #[classattr]
    #[pyo3(name = "FIELDS")]
    fn fields(py: Python<'_>) -> PyResult<Py<PyTuple>> {
        Ok(PyTuple::new(py, ApplyResult::FIELDS)?.unbind())
    }

    /// The counters by name (not `error`).
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, v) in ApplyResult::FIELDS.iter().zip(self.counters()) {
            d.set_item(name, v)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let fields: Vec<String> = ApplyResult::FIELDS
            .iter()
            .zip(self.counters())
            .map(|(n, v)| format!("{n}={v}"))
            .chain(self.error.as_ref().map(|e| format!("error={e:?}")))
            .collect();
        format!("ApplyResult({})", fields.join(", "))
    }
}

#[pymethods]
impl Overlap {
    /// Matched blocks over all tiers.
    #[getter]
    fn blocks(&self) -> u32 {
        self.total()
    }

    fn __repr__(&self) -> String {
        format!(
            "Overlap(gpu={}, host={}, disk={})",
            self.gpu, self.host, self.disk
        )
    }
}

/// Decodes and applies one payload; a malformed payload changes nothing.
pub(crate) fn apply_payload_to(
    idx: &mut PrefixIndex,
    worker: u64,
    events: crate::Result<Vec<Event>>,
) -> ApplyResult {
    match events {
        Ok(events) => {
            let mut total = ApplyResult::default();
            for e in &events {
                total.add(&idx.apply_event(worker, e));
            }
            total
        }
        Err(e) => ApplyResult {
            error: Some(e.to_string()),
            ..idx.note_malformed()
        },
    }
}

pub(crate) fn overlaps_dict<'py>(
    py: Python<'py>,
    m: &[(u64, Overlap)],
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (w, o) in m {
        d.set_item(*w, (o.gpu, o.host, o.disk))?;
    }
    Ok(d)
}

/// Which workers hold which blocks, for one model. Thread-safe: queries share a
/// read lock, updates take the write lock; long calls release the GIL.
#[pyclass(name = "PrefixIndex", module = "kvrouter._core", frozen)]
pub struct PyPrefixIndex {
    pub(crate) inner: Arc<RwLock<PrefixIndex>>,
    #[pyo3(get)]
    block_size: u32,
}

#[pymethods]
impl PyPrefixIndex {
    #[new]
    fn new(block_size: i64) -> PyResult<Self> {
        let bs = convert::block_size(block_size, "block_size")?;
        let idx = PrefixIndex::new(bs)?;
        Ok(PyPrefixIndex {
            inner: Arc::new(RwLock::new(idx)),
            block_size: bs,
        })
    }

    #[pyo3(signature = (worker, hashes, parent=None, token_ids=None, router_hashes=None, tier="gpu", extra_key=None, engine_block_size=None))]
    #[allow(clippy::too_many_arguments)]
    fn apply_stored(
        &self,
        py: Python<'_>,
        worker: u64,
        hashes: &Bound<'_, PyAny>,
        parent: Option<&Bound<'_, PyAny>>,
        token_ids: Option<&Bound<'_, PyAny>>,
        router_hashes: Option<&Bound<'_, PyAny>>,
        tier: &str,
        extra_key: Option<&Bound<'_, PyAny>>,
        engine_block_size: Option<i64>,
    ) -> PyResult<ApplyResult> {
        let ev = Stored {
            hashes: convert::hashes(hashes)?,
            parent: match parent {
                Some(p) if !p.is_none() => Some(convert::hash_value(p)?),
                _ => None,
            },
            tokens: match token_ids {
                Some(t) if !t.is_none() => Some(convert::tokens(t)?),
                _ => None,
            },
            block_size: match engine_block_size {
                Some(b) => convert::block_size(b, "engine_block_size")?,
                None => self.block_size,
            },
            router_hashes: match router_hashes {
                Some(r) if !r.is_none() => Some(convert::hashes(r)?),
                _ => None,
            },
            tier: convert::tier(tier)?,
            extra_key: convert::extra_key(extra_key)?,
        };
        ev.validate()?;
        Ok(py.allow_threads(|| self.inner.write().apply_stored(worker, &ev)))
    }

    #[pyo3(signature = (worker, hashes, tier="gpu"))]
    fn apply_removed(
        &self,
        py: Python<'_>,
        worker: u64,
        hashes: &Bound<'_, PyAny>,
        tier: &str,
    ) -> PyResult<ApplyResult> {
        let hashes = convert::hashes(hashes)?;
        let tier = convert::tier(tier)?;
        Ok(py.allow_threads(|| self.inner.write().apply_removed(worker, &hashes, tier)))
    }

    fn clear_worker(&self, py: Python<'_>, worker: u64) -> ApplyResult {
        py.allow_threads(|| self.inner.write().clear_worker(worker))
    }

    fn remove_worker(&self, py: Python<'_>, worker: u64) -> u64 {
        py.allow_threads(|| self.inner.write().remove_worker(worker))
    }

    fn apply_payload(&self, py: Python<'_>, worker: u64, payload: &[u8]) -> ApplyResult {
        py.allow_threads(|| {
            let events = payload::decode_payload(payload);
            apply_payload_to(&mut self.inner.write(), worker, events)
        })
    }

    fn apply_payloads(
        &self,
        py: Python<'_>,
        batch: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<ApplyResult>> {
        // Copy each payload's bytes out at memcpy speed (a Vec<u8> extraction would
        // walk the bytes object element by element).
        let mut owned: Vec<(u64, Vec<u8>)> = Vec::new();
        for item in batch.try_iter()? {
            let (worker, payload): (u64, Bound<'_, PyBytes>) = item?.extract()?;
            owned.push((worker, payload.as_bytes().to_vec()));
        }
        let batch = owned;
        Ok(py.allow_threads(|| {
            // Decode outside the write lock so queries keep flowing meanwhile.
            let decoded: Vec<(u64, crate::Result<Vec<Event>>)> = batch
                .iter()
                .map(|(w, p)| (*w, payload::decode_payload(p)))
                .collect();
            let mut idx = self.inner.write();
            decoded
                .into_iter()
                .map(|(w, ev)| apply_payload_to(&mut idx, w, ev))
                .collect()
        }))
    }

    fn find_matches<'py>(
        &self,
        py: Python<'py>,
        router_hashes: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let hashes = convert::hashes(router_hashes)?;
        let m = py.allow_threads(|| self.inner.read().find_matches(&hashes));
        overlaps_dict(py, &m)
    }

    #[pyo3(signature = (tokens, extra_key=None))]
    fn find_matches_tokens<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        extra_key: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let toks = convert::tokens(tokens)?;
        let key = convert::extra_key(extra_key)?;
        let bs = self.block_size as usize;
        let m = py.allow_threads(|| {
            let hashes = hashing::hash_blocks(&toks, bs, key.as_deref());
            self.inner.read().find_matches(&hashes)
        });
        overlaps_dict(py, &m)
    }

    fn find_matches_batch<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let qs: Vec<Vec<u64>> = queries
            .try_iter()?
            .map(|q| convert::hashes(&q?))
            .collect::<PyResult<_>>()?;
        let results = py.allow_threads(|| {
            let idx = self.inner.read();
            let mut out = Vec::with_capacity(qs.len());
            for q in &qs {
                out.push(idx.find_matches(q));
            }
            out
        });
        results.iter().map(|m| overlaps_dict(py, m)).collect()
    }

    fn workers(&self) -> Vec<u64> {
        self.inner.read().workers()
    }

    fn blocks_per_worker<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let idx = self.inner.read();
        let d = PyDict::new(py);
        for w in idx.workers() {
            d.set_item(w, idx.worker_blocks(w))?;
        }
        Ok(d)
    }

    fn worker_blocks(&self, worker: u64) -> u64 {
        self.inner.read().worker_blocks(worker)
    }

    fn worker_router_hashes(&self, py: Python<'_>, worker: u64) -> Vec<(u64, u8)> {
        py.allow_threads(|| self.inner.read().worker_router_hashes(worker))
    }

    fn worker_engine_hashes(&self, worker: u64) -> Vec<u64> {
        self.inner.read().worker_engine_hashes(worker)
    }

    fn num_nodes(&self) -> usize {
        self.inner.read().num_nodes()
    }

    fn num_entries(&self) -> u64 {
        self.inner.read().num_entries()
    }

    fn memory_bytes(&self, py: Python<'_>) -> usize {
        py.allow_threads(|| self.inner.read().memory_bytes())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let idx = self.inner.read();
        let s = idx.stats();
        let d = s.totals.as_dict(py)?;
        d.set_item("events", s.events)?;
        d.set_item("nodes", idx.num_nodes())?;
        d.set_item("entries", idx.num_entries())?;
        d.set_item("workers", idx.workers().len())?;
        Ok(d)
    }

    fn snapshot<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let bytes = py.allow_threads(|| self.inner.read().snapshot());
        PyBytes::new(py, &bytes)
    }

    #[staticmethod]
    fn from_snapshot(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let idx = py.allow_threads(|| PrefixIndex::from_snapshot(data))?;
        let bs = idx.block_size();
        Ok(PyPrefixIndex {
            inner: Arc::new(RwLock::new(idx)),
            block_size: bs,
        })
    }

    #[pyo3(signature = (data, worker_map=None))]
    fn load_snapshot(
        &self,
        py: Python<'_>,
        data: &[u8],
        worker_map: Option<std::collections::HashMap<u64, u64>>,
    ) -> PyResult<()> {
        let idx = py.allow_threads(|| {
            let mut idx = PrefixIndex::from_snapshot(data)?;
            if let Some(map) = &worker_map {
                idx.remap_workers(map)?;
            }
            Ok::<_, crate::Error>(idx)
        })?;
        if idx.block_size() != self.block_size {
            return Err(crate::Error::Snapshot(format!(
                "snapshot block size {} differs from this index's {}",
                idx.block_size(),
                self.block_size
            ))
            .into());
        }
        *self.inner.write() = idx;
        Ok(())
    }

    fn __repr__(&self) -> String {
        let idx = self.inner.read();
        format!(
            "PrefixIndex(block_size={}, workers={}, nodes={}, entries={})",
            self.block_size,
            idx.workers().len(),
            idx.num_nodes(),
            idx.num_entries()
        )
    }
}
