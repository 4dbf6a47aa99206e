//! The PyO3 binding layer: converts Python values, releases the GIL around core
//! calls and maps core errors to the named exceptions of `errors`. No routing logic
//! lives here, and nothing here may panic across the boundary.
#![deny(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod convert;
mod errors;
mod index;
mod scheduler;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::scheduler::Config;
use crate::scoring::Policy;

/// The default of every numeric Scheduler keyword, from the core's `Config::default()`:
/// the one definition the Python shell (config, fleet simulator, benches) reads.
fn default_weights(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let c = Config::default();
    let w = c.weights;
    let d = PyDict::new(py);
    d.set_item("prefill_weight", w.prefill)?;
    d.set_item("decode_weight", w.decode)?;
    d.set_item("queue_weight", w.queue)?;
    d.set_item("queued_prefill_weight", w.queued_prefill)?;
    d.set_item("pressure_weight", w.pressure)?;
    d.set_item("temperature", w.temperature)?;
    d.set_item("host_credit", w.host_credit)?;
    d.set_item("disk_credit", w.disk_credit)?;
    d.set_item("lease_s", c.lease_s)?;
    d.set_item("report_ttl_s", c.report_ttl_s)?;
    d.set_item("approx_ttl_s", c.approx_ttl_s)?;
    d.set_item("pending_ttl_s", c.pending_ttl_s)?;
    Ok(d)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("HASH_SEED", crate::hashing::HASH_SEED)?;
    m.add("POLICIES", PyTuple::new(py, Policy::names())?)?;
    m.add("DEFAULT_POLICY", Config::default().policy.name())?;
    m.add("DEFAULT_WEIGHTS", default_weights(py)?)?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(index::hash_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(index::local_block_hash, m)?)?;
    m.add_function(wrap_pyfunction!(index::decode_payload, m)?)?;
    m.add_class::<crate::index::ApplyResult>()?;
    m.add_class::<crate::index::Overlap>()?;
    m.add_class::<index::PyPrefixIndex>()?;
    m.add_class::<crate::scoring::Candidate>()?;
    m.add_class::<scheduler::PyDecision>()?;
    m.add_class::<crate::load::WorkerLoad>()?;
    m.add_class::<scheduler::PyScheduler>()?;
    Ok(())
}
