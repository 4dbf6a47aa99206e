//! The core's errors as named Python exceptions: one class per `Error` variant under
//! `KvrouterError`, each also a subclass of the builtin callers already catch
//! (ValueError, KeyError), so code written before the classes existed keeps working.

use pyo3::exceptions::{PyException, PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::Error;

struct Types {
    base: Py<PyType>,
    unknown_worker: Py<PyType>,
    no_routable_worker: Py<PyType>,
    invalid_argument: Py<PyType>,
    unknown_policy: Py<PyType>,
    duplicate_request: Py<PyType>,
    malformed_payload: Py<PyType>,
    snapshot: Py<PyType>,
}

static TYPES: GILOnceCell<Types> = GILOnceCell::new();

/// A class made with `type(name, bases, ns)`: create_exception! allows one base only.
fn class(
    py: Python<'_>,
    name: &str,
    doc: &str,
    bases: &[&Bound<'_, PyType>],
) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", "kvrouter._core")?;
    ns.set_item("__doc__", doc)?;
    // KeyError's str() quotes its message; keep the plain message.
    ns.set_item("__str__", py.get_type::<PyException>().getattr("__str__")?)?;
    let t = py
        .get_type::<PyType>()
        .call1((name, PyTuple::new(py, bases)?, ns))?;
    Ok(t.downcast_into::<PyType>()?.unbind())
}

fn types(py: Python<'_>) -> PyResult<&'static Types> {
    TYPES.get_or_try_init(py, || {
        let value_error = py.get_type::<PyValueError>();
        let key_error = py.get_type::<PyKeyError>();
        let base = class(
            py,
            "KvrouterError",
            "Base of every error the kvrouter core raises.",
            &[&py.get_type::<PyException>()],
        )?;
        let b = base.bind(py);
        let invalid_argument = class(
            py,
            "InvalidArgument",
            "An argument or an event is out of range or inconsistent.",
            &[b, &value_error],
        )?;
        let ia = invalid_argument.bind(py);
        Ok(Types {
            unknown_worker: class(
                py,
                "UnknownWorker",
                "The worker is not registered. A KeyError, and a ValueError for callers of reserve().",
                &[b, &key_error, &value_error],
            )?,
            no_routable_worker: class(
                py,
                "NoRoutableWorker",
                "No candidate worker is registered and routable for the request.",
                &[b, &value_error],
            )?,
            unknown_policy: class(
                py,
                "UnknownPolicy",
                "The policy name is not one of POLICIES.",
                &[ia],
            )?,
            duplicate_request: class(
                py,
                "DuplicateRequest",
                "The request id already holds a reservation.",
                &[ia],
            )?,
            malformed_payload: class(
                py,
                "MalformedPayload",
                "An event payload that does not decode.",
                &[ia],
            )?,
            snapshot: class(
                py,
                "SnapshotError",
                "A snapshot is corrupt, truncated, of another version or does not fit this index.",
                &[b, &value_error],
            )?,
            invalid_argument: invalid_argument.clone_ref(py),
            base,
        })
    })
}

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let t = types(m.py())?;
    for ty in [
        &t.base,
        &t.unknown_worker,
        &t.no_routable_worker,
        &t.invalid_argument,
        &t.unknown_policy,
        &t.duplicate_request,
        &t.malformed_payload,
        &t.snapshot,
    ] {
        let ty = ty.bind(m.py());
        m.add(ty.name()?, ty)?;
    }
    Ok(())
}

/// An InvalidArgument with this message (argument checks of the binding layer).
pub fn invalid(msg: impl Into<String>) -> PyErr {
    to_py(Error::InvalidArgument(msg.into()))
}

/// The Python exception of a core error.
pub fn to_py(e: Error) -> PyErr {
    Python::with_gil(|py| {
        let t = match types(py) {
            Ok(t) => t,
            Err(err) => return err,
        };
        let ty = match &e {
            Error::UnknownWorker(_) => &t.unknown_worker,
            Error::UnknownPolicy(_) => &t.unknown_policy,
            Error::NoRoutableWorker => &t.no_routable_worker,
            Error::DuplicateRequest(_) => &t.duplicate_request,
            Error::Snapshot(_) => &t.snapshot,
            Error::MalformedPayload(_) => &t.malformed_payload,
            Error::InvalidArgument(_) => &t.invalid_argument,
        };
        PyErr::from_type(ty.bind(py).clone(), e.to_string())
    })
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        to_py(e)
    }
}
