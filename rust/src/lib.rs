//! kvrouter core: block hashing, the radix prefix index, scoring and load
//! accounting. Pure Rust; the PyO3 binding layer lives in `python/` behind the
//! `python` feature so that `cargo test` needs no Python.

pub mod hashing;
pub mod index;
pub mod load;
pub mod msgpack;
pub mod payload;
pub mod scheduler;
pub mod scoring;
pub mod tier;

#[cfg(feature = "python")]
mod python;
