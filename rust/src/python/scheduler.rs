//! Python face of the scheduler: one call hashes, matches, scores and reserves.

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use pyo3::prelude::*;

use super::convert;
use super::errors::invalid;
use super::index::PyPrefixIndex;
use crate::hashing;
use crate::index::PrefixIndex;
use crate::load::{External, Report, WorkerLoad};
use crate::scheduler::{Config, Decision, Prompt, RouteRequest, Scheduler};
use crate::scoring::{Candidate, Policy};

#[pymethods]
impl Candidate {
    #[getter]
    fn gpu_blocks(&self) -> u32 {
        self.overlap.gpu
    }
    #[getter]
    fn host_blocks(&self) -> u32 {
        self.overlap.host
    }
    #[getter]
    fn disk_blocks(&self) -> u32 {
        self.overlap.disk
    }
    fn __repr__(&self) -> String {
        format!(
            "Candidate(worker={}, gpu={}, host={}, disk={}, pending={}, new_prefill_tokens={}, decode_blocks={}, queue={}, evicted_blocks={}, pressure_cost={:.3}, cost={:.3})",
            self.worker, self.overlap.gpu, self.overlap.host, self.overlap.disk, self.pending_blocks, self.new_prefill_tokens, self.decode_blocks, self.queue, self.evicted_blocks, self.pressure_cost, self.cost
        )
    }
}

#[pyclass(name = "Decision", module = "kvrouter._core", frozen)]
pub struct PyDecision {
    d: Decision,
    #[pyo3(get)]
    request_id: Option<String>,
}

#[pymethods]
impl PyDecision {
    #[getter]
    fn worker(&self) -> u64 {
        self.d.worker
    }
    #[getter]
    fn overlap_blocks(&self) -> u32 {
        self.d.overlap.total()
    }
    #[getter]
    fn gpu_blocks(&self) -> u32 {
        self.d.overlap.gpu
    }
    #[getter]
    fn host_blocks(&self) -> u32 {
        self.d.overlap.host
    }
    #[getter]
    fn disk_blocks(&self) -> u32 {
        self.d.overlap.disk
    }
    #[getter]
    fn prompt_blocks(&self) -> u64 {
        self.d.prompt_blocks
    }
    #[getter]
    fn prompt_tokens(&self) -> u64 {
        self.d.prompt_tokens
    }
    #[getter]
    fn policy(&self) -> &'static str {
        self.d.policy.name()
    }
    #[getter]
    fn candidates(&self) -> Vec<Candidate> {
        self.d.candidates.clone()
    }
    fn __repr__(&self) -> String {
        format!(
            "Decision(worker={}, overlap_blocks={}, prompt_blocks={}, policy={})",
            self.d.worker,
            self.d.overlap.total(),
            self.d.prompt_blocks,
            self.d.policy.name()
        )
    }
}

#[pymethods]
impl WorkerLoad {
    fn __repr__(&self) -> String {
        format!(
            "WorkerLoad(worker={}, routable={}, prefill_tokens={}, decode_blocks={}, queue={}, reserved_requests={}, kv_capacity_blocks={}, approx={})",
            self.worker, self.routable, self.prefill_tokens, self.decode_blocks, self.queue, self.reserved_requests, self.kv_capacity_blocks, self.approx
        )
    }
}

fn policy(name: Option<&str>) -> PyResult<Option<Policy>> {
    Ok(name.map(Policy::parse).transpose()?)
}

/// Scheduler settings given from Python; None keeps the current value.
struct Settings<'a> {
    policy: Option<&'a str>,
    prefill_weight: Option<f64>,
    decode_weight: Option<f64>,
    queue_weight: Option<f64>,
    queued_prefill_weight: Option<f64>,
    pressure_weight: Option<f64>,
    temperature: Option<f64>,
    host_credit: Option<f64>,
    disk_credit: Option<f64>,
    lease_s: Option<f64>,
    report_ttl_s: Option<f64>,
    approx_ttl_s: Option<f64>,
    pending_ttl_s: Option<f64>,
}

/// `c` with the given settings applied and validated.
fn configured(mut c: Config, s: Settings<'_>) -> crate::Result<Config> {
    if let Some(p) = s.policy {
        c.policy = Policy::parse(p)?;
    }
    let w = &mut c.weights;
    w.prefill = s.prefill_weight.unwrap_or(w.prefill);
    w.decode = s.decode_weight.unwrap_or(w.decode);
    w.queue = s.queue_weight.unwrap_or(w.queue);
    w.queued_prefill = s.queued_prefill_weight.unwrap_or(w.queued_prefill);
    w.pressure = s.pressure_weight.unwrap_or(w.pressure);
    w.temperature = s.temperature.unwrap_or(w.temperature);
    w.host_credit = s.host_credit.unwrap_or(w.host_credit);
    w.disk_credit = s.disk_credit.unwrap_or(w.disk_credit);
    c.lease_s = s.lease_s.unwrap_or(c.lease_s);
    c.report_ttl_s = s.report_ttl_s.unwrap_or(c.report_ttl_s);
    c.approx_ttl_s = s.approx_ttl_s.unwrap_or(c.approx_ttl_s);
    c.pending_ttl_s = s.pending_ttl_s.unwrap_or(c.pending_ttl_s);
    c.validate()?;
    Ok(c)
}

/// The keyword options `route` and `route_hashes` share, as Python passed them
/// (PyO3 needs each method's parameters spelled out; the checks live in `route_prompt`).
struct RouteOptions<'a> {
    request_id: Option<String>,
    expected_output_tokens: i64,
    candidates: Option<Vec<u64>>,
    policy: Option<&'a str>,
    explain: bool,
    reserve: bool,
    now: Option<f64>,
    prefill_weight: Option<f64>,
}

/// A prompt owned across the GIL release: hashes, or tokens hashed during the match.
enum OwnedPrompt {
    Hashes(Vec<u64>),
    Tokens(Vec<u32>, u64),
}

/// Scores workers for one model (docs/design.md §3.3) and accounts the load it creates.
#[pyclass(name = "Scheduler", module = "kvrouter._core", frozen)]
pub struct PyScheduler {
    index: Arc<RwLock<PrefixIndex>>,
    inner: Mutex<Scheduler>,
}

impl PyScheduler {
    fn at(&self, s: &Scheduler, now: Option<f64>) -> f64 {
        now.unwrap_or_else(|| s.clock())
    }

    /// Routes `prompt` (of `prompt_tokens` tokens) with the options both route methods share.
    fn route_prompt(
        &self,
        py: Python<'_>,
        prompt: OwnedPrompt,
        prompt_tokens: u64,
        o: RouteOptions<'_>,
    ) -> PyResult<PyDecision> {
        let expected = convert::non_negative(o.expected_output_tokens, "expected_output_tokens")?;
        let policy = policy(o.policy)?;
        if o.request_id.as_deref() == Some("") {
            return Err(invalid("request_id must not be empty"));
        }
        let d = py.allow_threads(|| {
            let idx = self.index.read();
            let mut s = self.inner.lock();
            let now = self.at(&s, o.now);
            let req = RouteRequest {
                prompt: match &prompt {
                    OwnedPrompt::Hashes(h) => Prompt::Hashes(h),
                    OwnedPrompt::Tokens(t, root) => Prompt::Tokens {
                        tokens: t,
                        root: *root,
                    },
                },
                prompt_tokens,
                request_id: o.request_id.as_deref(),
                expected_output_tokens: expected,
                candidates: o.candidates.as_deref(),
                policy,
                explain: o.explain,
                reserve: o.reserve,
                now,
                prefill_weight: o.prefill_weight,
            };
            s.route(&idx, &req)
        });
        Ok(PyDecision {
            d: d?,
            request_id: o.request_id,
        })
    }
}

#[pymethods]
impl PyScheduler {
    /// Every setting left out (or None) takes the core's default (`Config::default()`).
    #[new]
    #[pyo3(signature = (index, policy=None, prefill_weight=None, decode_weight=None, queue_weight=None, queued_prefill_weight=None, temperature=None, host_credit=None, disk_credit=None, lease_s=None, report_ttl_s=None, seed=None, pressure_weight=None, approx_ttl_s=None, pending_ttl_s=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        index: &PyPrefixIndex,
        policy: Option<&str>,
        prefill_weight: Option<f64>,
        decode_weight: Option<f64>,
        queue_weight: Option<f64>,
        queued_prefill_weight: Option<f64>,
        temperature: Option<f64>,
        host_credit: Option<f64>,
        disk_credit: Option<f64>,
        lease_s: Option<f64>,
        report_ttl_s: Option<f64>,
        seed: Option<u64>,
        pressure_weight: Option<f64>,
        approx_ttl_s: Option<f64>,
        pending_ttl_s: Option<f64>,
    ) -> PyResult<Self> {
        let defaults = Config::default();
        let config = configured(
            defaults,
            Settings {
                policy,
                prefill_weight,
                decode_weight,
                queue_weight,
                queued_prefill_weight,
                pressure_weight,
                temperature,
                host_credit,
                disk_credit,
                lease_s,
                report_ttl_s,
                approx_ttl_s,
                pending_ttl_s,
            },
        )?;
        let seed = seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let s = Scheduler::new(config, seed)?;
        Ok(PyScheduler {
            index: index.inner.clone(),
            inner: Mutex::new(s),
        })
    }

    #[getter]
    fn policy(&self) -> &'static str {
        self.inner.lock().config.policy.name()
    }

    /// Changes the given settings; the others keep their current values.
    #[pyo3(signature = (policy=None, prefill_weight=None, decode_weight=None, queue_weight=None, queued_prefill_weight=None, temperature=None, host_credit=None, disk_credit=None, lease_s=None, report_ttl_s=None, pressure_weight=None, approx_ttl_s=None, pending_ttl_s=None))]
    #[allow(clippy::too_many_arguments)]
    fn configure(
        &self,
        policy: Option<&str>,
        prefill_weight: Option<f64>,
        decode_weight: Option<f64>,
        queue_weight: Option<f64>,
        queued_prefill_weight: Option<f64>,
        temperature: Option<f64>,
        host_credit: Option<f64>,
        disk_credit: Option<f64>,
        lease_s: Option<f64>,
        report_ttl_s: Option<f64>,
        pressure_weight: Option<f64>,
        approx_ttl_s: Option<f64>,
        pending_ttl_s: Option<f64>,
    ) -> PyResult<()> {
        let mut s = self.inner.lock();
        s.config = configured(
            s.config.clone(),
            Settings {
                policy,
                prefill_weight,
                decode_weight,
                queue_weight,
                queued_prefill_weight,
                pressure_weight,
                temperature,
                host_credit,
                disk_credit,
                lease_s,
                report_ttl_s,
                approx_ttl_s,
                pending_ttl_s,
            },
        )?;
        s.approx.ttl_s = s.config.approx_ttl_s;
        s.pending.ttl_s = s.config.pending_ttl_s;
        if !s.pending.enabled() {
            s.pending = crate::pending::PendingPrefixes::new(0.0);
        }
        Ok(())
    }

    fn add_worker(&self, worker: u64) {
        self.inner.lock().load.add_worker(worker);
    }

    fn remove_worker(&self, worker: u64) -> Vec<String> {
        self.inner.lock().remove_worker(worker)
    }

    /// Approximate mode for `worker` (True): its cache is predicted from this scheduler's
    /// routing decisions instead of KV events. Switching either way starts it empty.
    fn set_approx(&self, worker: u64, approx: bool) -> PyResult<()> {
        Ok(self.inner.lock().set_approx(worker, approx)?)
    }

    fn is_approx(&self, worker: u64) -> bool {
        self.inner.lock().approx.contains(worker)
    }

    /// Blocks predicted on an approximate worker (0 for exact workers).
    fn approx_blocks(&self, worker: u64) -> u64 {
        self.inner.lock().approx.blocks(worker)
    }

    /// Load reports whose KV capacity was missing/0 or absurd (the pressure term was off
    /// for the worker until a valid one): {"missing": n, "absurd": n}.
    fn capacity_reports(&self) -> std::collections::HashMap<&'static str, u64> {
        let c = self.inner.lock().capacity_reports;
        std::collections::HashMap::from([("missing", c.missing), ("absurd", c.absurd)])
    }

    fn set_routable(&self, worker: u64, routable: bool) -> PyResult<()> {
        self.inner.lock().load.set_routable(worker, routable)?;
        Ok(())
    }

    fn workers(&self) -> Vec<u64> {
        let s = self.inner.lock();
        let mut v: Vec<u64> = s.load.workers.keys().copied().collect();
        v.sort_unstable();
        v
    }

    #[pyo3(signature = (tokens, extra_key=None, request_id=None, expected_output_tokens=0, candidates=None, policy=None, explain=false, reserve=true, now=None, prefill_weight=None))]
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        extra_key: Option<&Bound<'_, PyAny>>,
        request_id: Option<String>,
        expected_output_tokens: i64,
        candidates: Option<Vec<u64>>,
        policy: Option<&str>,
        explain: bool,
        reserve: bool,
        now: Option<f64>,
        prefill_weight: Option<f64>,
    ) -> PyResult<PyDecision> {
        let toks = convert::tokens(tokens)?;
        if toks.is_empty() {
            return Err(invalid("prompt has no tokens"));
        }
        let key = convert::extra_key(extra_key)?;
        let root = hashing::chain_root(key.as_deref());
        let n = toks.len() as u64;
        let o = RouteOptions {
            request_id,
            expected_output_tokens,
            candidates,
            policy,
            explain,
            reserve,
            now,
            prefill_weight,
        };
        self.route_prompt(py, OwnedPrompt::Tokens(toks, root), n, o)
    }

    #[pyo3(signature = (router_hashes, prompt_tokens, request_id=None, expected_output_tokens=0, candidates=None, policy=None, explain=false, reserve=true, now=None, prefill_weight=None))]
    #[allow(clippy::too_many_arguments)]
    fn route_hashes(
        &self,
        py: Python<'_>,
        router_hashes: &Bound<'_, PyAny>,
        prompt_tokens: i64,
        request_id: Option<String>,
        expected_output_tokens: i64,
        candidates: Option<Vec<u64>>,
        policy: Option<&str>,
        explain: bool,
        reserve: bool,
        now: Option<f64>,
        prefill_weight: Option<f64>,
    ) -> PyResult<PyDecision> {
        let hashes = convert::hashes(router_hashes)?;
        let prompt = convert::non_negative(prompt_tokens, "prompt_tokens")?;
        if prompt == 0 {
            return Err(invalid("prompt has no tokens"));
        }
        let o = RouteOptions {
            request_id,
            expected_output_tokens,
            candidates,
            policy,
            explain,
            reserve,
            now,
            prefill_weight,
        };
        self.route_prompt(py, OwnedPrompt::Hashes(hashes), prompt, o)
    }

    #[pyo3(signature = (worker, request_id, prefill_tokens, decode_blocks, now=None))]
    fn reserve(
        &self,
        worker: u64,
        request_id: &str,
        prefill_tokens: i64,
        decode_blocks: i64,
        now: Option<f64>,
    ) -> PyResult<()> {
        let p = convert::non_negative(prefill_tokens, "prefill_tokens")?;
        let d = convert::non_negative(decode_blocks, "decode_blocks")?;
        let mut s = self.inner.lock();
        let now = self.at(&s, now);
        Ok(s.reserve(worker, request_id, p, d, now)?)
    }

    #[pyo3(signature = (request_id, now=None))]
    fn mark_prefill_done(&self, request_id: &str, now: Option<f64>) -> bool {
        let mut s = self.inner.lock();
        let now = self.at(&s, now);
        s.mark_prefill_done(request_id, now)
    }

    fn release(&self, request_id: &str) -> bool {
        self.inner.lock().release(request_id)
    }

    fn has_reservation(&self, request_id: &str) -> bool {
        self.inner.lock().load.has(request_id)
    }

    fn reservation_worker(&self, request_id: &str) -> Option<u64> {
        self.inner.lock().load.holder(request_id)
    }

    #[pyo3(signature = (now=None))]
    fn expire(&self, now: Option<f64>) -> Vec<String> {
        let mut s = self.inner.lock();
        let now = self.at(&s, now);
        s.expire_leases(now)
    }

    #[pyo3(signature = (worker, running, queued, kv_used_blocks, kv_free_blocks, queued_prefill_tokens=0, now=None, kv_capacity_blocks=0, kv_cached_blocks=0))]
    #[allow(clippy::too_many_arguments)]
    fn report_load(
        &self,
        worker: u64,
        running: i64,
        queued: i64,
        kv_used_blocks: i64,
        kv_free_blocks: i64,
        queued_prefill_tokens: i64,
        now: Option<f64>,
        kv_capacity_blocks: i64,
        kv_cached_blocks: i64,
    ) -> PyResult<()> {
        let report = Report {
            running: convert::non_negative(running, "running")?,
            queued: convert::non_negative(queued, "queued")?,
            kv_used_blocks: convert::non_negative(kv_used_blocks, "kv_used_blocks")?,
            kv_free_blocks: convert::non_negative(kv_free_blocks, "kv_free_blocks")?,
            queued_prefill_tokens: convert::non_negative(
                queued_prefill_tokens,
                "queued_prefill_tokens",
            )?,
            kv_capacity_blocks: convert::non_negative(kv_capacity_blocks, "kv_capacity_blocks")?,
            kv_cached_blocks: convert::non_negative(kv_cached_blocks, "kv_cached_blocks")?,
            ..Report::default()
        };
        let mut s = self.inner.lock();
        let at = self.at(&s, now);
        Ok(s.report_load(worker, Report { at, ..report })?)
    }

    fn set_external_load(
        &self,
        worker: u64,
        prefill_tokens: i64,
        decode_blocks: i64,
        requests: i64,
    ) -> PyResult<()> {
        let ext = External {
            prefill_tokens: convert::non_negative(prefill_tokens, "prefill_tokens")?,
            decode_blocks: convert::non_negative(decode_blocks, "decode_blocks")?,
            requests: convert::non_negative(requests, "requests")?,
        };
        Ok(self.inner.lock().set_external(worker, ext)?)
    }

    #[pyo3(signature = (worker, now=None))]
    fn load(&self, worker: u64, now: Option<f64>) -> PyResult<WorkerLoad> {
        let s = self.inner.lock();
        let now = self.at(&s, now);
        Ok(s.load.summary(worker, now, s.config.report_ttl_s)?)
    }

    #[pyo3(signature = (now=None))]
    fn loads(&self, now: Option<f64>) -> Vec<WorkerLoad> {
        let s = self.inner.lock();
        let now = self.at(&s, now);
        s.load.summaries(now, s.config.report_ttl_s)
    }

    fn now(&self) -> f64 {
        self.inner.lock().clock()
    }
}
