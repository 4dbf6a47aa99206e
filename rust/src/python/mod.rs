//! The PyO3 binding layer: converts Python values, releases the GIL around core
//! calls and maps errors to ValueError / TypeError. No routing logic lives here.

mod convert;
mod index;
mod scheduler;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("HASH_SEED", crate::hashing::HASH_SEED)?;
    m.add_function(wrap_pyfunction!(index::hash_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(index::local_block_hash, m)?)?;
    m.add_function(wrap_pyfunction!(index::decode_payload, m)?)?;
    m.add_class::<index::PyApplyResult>()?;
    m.add_class::<index::PyPrefixIndex>()?;
    m.add_class::<scheduler::PyCandidate>()?;
    m.add_class::<scheduler::PyDecision>()?;
    m.add_class::<scheduler::PyWorkerLoad>()?;
    m.add_class::<scheduler::PyScheduler>()?;
    Ok(())
}
