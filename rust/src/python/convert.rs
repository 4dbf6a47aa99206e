//! Python -> Rust conversions with errors that say what is wrong and where.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyString, PyTuple};

use super::errors::invalid;
use crate::tier::Tier;

fn le_u32s(bytes: &[u8]) -> PyResult<Vec<u32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(invalid(format!(
            "token bytes must be little-endian u32 ids: {} bytes is not a multiple of 4",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn check_range<T: Copy + TryInto<u32> + std::fmt::Display>(v: Vec<T>) -> PyResult<Vec<u32>> {
    v.iter()
        .enumerate()
        .map(|(i, x)| {
            (*x).try_into()
                .map_err(|_| invalid(format!("token id {x} at position {i} is outside 0..2^32")))
        })
        .collect()
}

/// Token ids from a list/tuple of ints, array('I'), a numpy integer array, or
/// bytes-like little-endian u32. Buffers are read without per-element Python work.
pub fn tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let py = obj.py();
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return le_u32s(b.as_bytes());
    }
    if let Ok(b) = obj.downcast::<PyByteArray>() {
        return le_u32s(&b.to_vec());
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "token ids must be integers, not a str",
        ));
    }
    if let Ok(list) = obj.downcast::<PyList>() {
        return seq_items(list.iter().map(Ok));
    }
    if let Ok(tuple) = obj.downcast::<PyTuple>() {
        return seq_items(tuple.iter().map(Ok));
    }
    if let Ok(buf) = PyBuffer::<u32>::get(obj) {
        return buf.to_vec(py);
    }
    if let Ok(buf) = PyBuffer::<i64>::get(obj) {
        return check_range(buf.to_vec(py)?);
    }
    if let Ok(buf) = PyBuffer::<u64>::get(obj) {
        return check_range(buf.to_vec(py)?);
    }
    if let Ok(buf) = PyBuffer::<i32>::get(obj) {
        return check_range(buf.to_vec(py)?);
    }
    if let Ok(buf) = PyBuffer::<u16>::get(obj) {
        return Ok(buf.to_vec(py)?.into_iter().map(u32::from).collect());
    }
    if let Ok(buf) = PyBuffer::<i16>::get(obj) {
        return check_range(buf.to_vec(py)?);
    }
    if let Ok(buf) = PyBuffer::<u8>::get(obj) {
        // Byte buffers (memoryview over bytes) carry little-endian u32 ids.
        return le_u32s(&buf.to_vec(py)?);
    }
    match obj.try_iter() {
        // An iterable that raises mid-way surfaces its own exception.
        Ok(it) => seq_items(it),
        Err(_) => Err(PyTypeError::new_err(format!(
            "token ids must be a sequence of ints, an integer array or bytes, not {}",
            obj.get_type().name()?
        ))),
    }
}

/// Items of a list, a tuple or an iterator (whose every step may raise).
fn seq_items<'py>(items: impl Iterator<Item = PyResult<Bound<'py, PyAny>>>) -> PyResult<Vec<u32>> {
    let mut out = Vec::with_capacity(items.size_hint().0);
    for (i, item) in items.enumerate() {
        let item = item?;
        match item.extract::<u32>() {
            Ok(v) => out.push(v),
            Err(_) => {
                return Err(match item.extract::<i128>() {
                    Ok(v) => invalid(format!("token id {v} at position {i} is outside 0..2^32")),
                    Err(_) => PyTypeError::new_err(format!(
                        "token id at position {i} must be an int, not {}",
                        item.get_type().name()?
                    )),
                })
            }
        }
    }
    Ok(out)
}

/// An engine or router hash: u64, or a negative i64 read as its two's complement.
pub fn hash_value(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(v) = obj.extract::<u64>() {
        return Ok(v);
    }
    match obj.extract::<i64>() {
        Ok(v) => Ok(v as u64),
        Err(_) => Err(match obj.extract::<i128>() {
            Ok(v) => invalid(format!(
                "hash {v} is outside the signed or unsigned 64-bit range"
            )),
            Err(_) => PyTypeError::new_err(format!(
                "hash must be an int, not {}",
                obj.get_type().name()?
            )),
        }),
    }
}

pub fn hashes(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err("hashes must be a sequence of ints"));
    }
    // Lists first: probing the buffer protocol on a list raises (slowly) inside.
    if let Ok(list) = obj.downcast::<PyList>() {
        let mut out = Vec::with_capacity(list.len());
        for item in list.iter() {
            out.push(hash_value(&item)?);
        }
        return Ok(out);
    }
    if !obj.is_instance_of::<PyTuple>() {
        if let Ok(buf) = PyBuffer::<u64>::get(obj) {
            return buf.to_vec(obj.py());
        }
    }
    obj.try_iter()
        .map_err(|_| PyTypeError::new_err("hashes must be a sequence of ints"))?
        .map(|x| hash_value(&x?))
        .collect()
}

pub fn extra_key(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
    let Some(obj) = obj else { return Ok(None) };
    if obj.is_none() {
        return Ok(None);
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(Some(s.to_str()?.as_bytes().to_vec()));
    }
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(Some(b.as_bytes().to_vec()));
    }
    Err(PyTypeError::new_err(format!(
        "extra_key must be bytes, str or None, not {}",
        obj.get_type().name()?
    )))
}

pub fn tier(name: &str) -> PyResult<Tier> {
    Ok(Tier::parse(name)?)
}

pub fn block_size(v: i64, what: &str) -> PyResult<u32> {
    if v <= 0 || v > i64::from(u32::MAX) {
        return Err(invalid(format!(
            "{what} must be a positive integer, got {v}"
        )));
    }
    Ok(v as u32)
}

pub fn non_negative(v: i64, what: &str) -> PyResult<u64> {
    if v < 0 {
        return Err(invalid(format!("{what} must be >= 0, got {v}")));
    }
    Ok(v as u64)
}
