//! The core's error type. The binding layer maps each variant to a named Python
//! exception (rust/src/python/errors.rs), so callers never parse messages.

/// Everything a core call can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The worker is not registered (scheduler) or not known (index).
    #[error("unknown worker {0}")]
    UnknownWorker(u64),
    #[error("unknown policy {0:?} (expected one of {list})", list = crate::scoring::Policy::names().join(", "))]
    UnknownPolicy(String),
    /// No candidate worker is registered and routable for the request.
    #[error("no routable worker for this model")]
    NoRoutableWorker,
    /// The request id already holds a reservation.
    #[error("request {0:?} already holds a reservation")]
    DuplicateRequest(String),
    /// A snapshot is corrupt, truncated, of another version or does not fit.
    #[error("{0}")]
    Snapshot(String),
    /// An event payload that does not decode (nothing of it was applied).
    #[error("{0}")]
    MalformedPayload(String),
    /// An argument or an event is out of range or inconsistent.
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::InvalidArgument(msg.into())
    }
}
