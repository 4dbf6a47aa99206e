//! kvrouter core: block hashing, the radix prefix index, scoring and load
//! accounting. Pure Rust; the PyO3 binding layer lives in `python/` behind the
//! `python` feature so that `cargo test` needs no Python.

pub mod approx;
pub mod error;
pub mod hashing;
pub mod index;
pub mod load;
pub mod msgpack;
pub mod payload;
pub mod pending;
pub mod scheduler;
pub mod scoring;
pub mod tier;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};

/// Decrements a counter that must not go below zero: a debug build stops at the
/// accounting bug, a release build clamps at 0 instead of wrapping to 2^64 - 1.
#[inline]
pub(crate) fn decrement(counter: &mut u64, by: u64) {
    debug_assert!(*counter >= by, "counter underflow: {} - {by}", *counter);
    *counter = counter.saturating_sub(by);
}
