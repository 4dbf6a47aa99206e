//! Decoder of the kvrouter event payload (DESIGN §3.2; encoder: kvrouter.events.codec).
//!
//! A payload is a msgpack array of maps with string keys. Unknown keys are skipped
//! and absent optional keys take defaults, so the format can grow. Decoding is
//! all-or-nothing: a malformed payload yields an error and no events, which lets
//! the index apply a batch atomically.

use crate::msgpack::{Reader, Value};
use crate::tier::Tier;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Stored(Stored),
    Removed { hashes: Vec<u64>, tier: Tier },
    Cleared,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    pub hashes: Vec<u64>,
    pub parent: Option<u64>,
    /// Flattened token ids, `block_size` per engine hash.
    pub tokens: Option<Vec<u32>>,
    pub block_size: u32,
    pub router_hashes: Option<Vec<u64>>,
    pub tier: Tier,
    pub extra_key: Option<Vec<u8>>,
}

impl Stored {
    /// Checks the invariants the index relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.hashes.is_empty() {
            return Err("stored event without block hashes".into());
        }
        match (&self.tokens, &self.router_hashes) {
            (None, None) => return Err("stored event needs tokens or router_hashes".into()),
            (Some(t), _) => {
                if self.block_size == 0 {
                    return Err("stored event with tokens needs block_size > 0".into());
                }
                if t.len() != self.block_size as usize * self.hashes.len() {
                    return Err(format!(
                        "stored event has {} token ids for {} blocks of {}",
                        t.len(),
                        self.hashes.len(),
                        self.block_size
                    ));
                }
            }
            (None, Some(r)) => {
                if r.len() != self.hashes.len() {
                    return Err(format!(
                        "stored event has {} router hashes for {} blocks",
                        r.len(),
                        self.hashes.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Normalises an engine hash value: u64, negative i64 (two's complement) or up to
/// 32 bytes (low 64 bits, big-endian, as sha256-style digests are truncated).
fn engine_hash(v: &Value) -> Result<u64, String> {
    match v {
        Value::UInt(u) => Ok(*u),
        Value::Int(i) => Ok(*i as u64),
        Value::Bin(b) if !b.is_empty() && b.len() <= 32 => {
            let tail = &b[b.len().saturating_sub(8)..];
            Ok(tail.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
        }
        other => Err(format!("block hash must be an integer or 1..32 bytes, got {}", other.kind())),
    }
}

fn hash_list(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    match v {
        Value::Array(items) => items.iter().map(engine_hash).collect::<Result<_, _>>().map_err(|e| format!("{what}: {e}")),
        other => Err(format!("{what} must be an array, got {}", other.kind())),
    }
}

fn tokens_from(v: &Value) -> Result<Option<Vec<u32>>, String> {
    match v {
        Value::Nil => Ok(None),
        Value::Bin(b) => {
            if b.len() % 4 != 0 {
                return Err(format!("tokens: {} bytes is not a whole number of u32", b.len()));
            }
            Ok(Some(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        }
        Value::Array(items) => items
            .iter()
            .map(|x| match x {
                Value::UInt(u) if *u <= u64::from(u32::MAX) => Ok(*u as u32),
                other => Err(format!("token id must be a u32, got {}", other.describe())),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        other => Err(format!("tokens must be bytes or an array, got {}", other.kind())),
    }
}

fn tier_from(v: &Value) -> Result<Tier, String> {
    match v {
        Value::Nil => Ok(Tier::Gpu),
        Value::Str(s) => Tier::parse(s),
        Value::UInt(u) => Tier::from_index(*u),
        other => Err(format!("tier must be a string, got {}", other.kind())),
    }
}

fn decode_event(v: &Value) -> Result<Event, String> {
    let Value::Map(fields) = v else {
        return Err(format!("event must be a map, got {}", v.kind()));
    };
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let kind = match get("type") {
        Some(Value::Str(s)) => s.as_str(),
        Some(other) => return Err(format!("event type must be a string, got {}", other.kind())),
        None => return Err("event without a type".into()),
    };
    match kind {
        "stored" => {
            let mut s = Stored {
                hashes: hash_list(get("hashes").ok_or("stored event without hashes")?, "hashes")?,
                ..Stored::default()
            };
            s.parent = match get("parent") {
                None | Some(Value::Nil) => None,
                Some(p) => Some(engine_hash(p).map_err(|e| format!("parent: {e}"))?),
            };
            s.tokens = match get("tokens") {
                None => None,
                Some(t) => tokens_from(t)?,
            };
            s.block_size = match get("block_size") {
                None | Some(Value::Nil) => 0,
                Some(Value::UInt(u)) if *u <= u64::from(u32::MAX) => *u as u32,
                Some(other) => return Err(format!("block_size must be a u32, got {}", other.describe())),
            };
            s.router_hashes = match get("router_hashes") {
                None | Some(Value::Nil) => None,
                Some(r) => Some(hash_list(r, "router_hashes")?),
            };
            s.tier = match get("tier") {
                None => Tier::Gpu,
                Some(t) => tier_from(t)?,
            };
            s.extra_key = match get("extra_key") {
                None | Some(Value::Nil) => None,
                Some(Value::Bin(b)) => Some(b.clone()),
                Some(Value::Str(s)) => Some(s.as_bytes().to_vec()),
                Some(other) => return Err(format!("extra_key must be bytes or str, got {}", other.kind())),
            };
            s.validate()?;
            Ok(Event::Stored(s))
        }
        "removed" => {
            let hashes = hash_list(get("hashes").ok_or("removed event without hashes")?, "hashes")?;
            let tier = match get("tier") {
                None => Tier::Gpu,
                Some(t) => tier_from(t)?,
            };
            Ok(Event::Removed { hashes, tier })
        }
        "cleared" => Ok(Event::Cleared),
        other => Err(format!("unknown event type {other:?}")),
    }
}

/// Decodes a whole payload, or fails without partial results.
pub fn decode_payload(bytes: &[u8]) -> Result<Vec<Event>, String> {
    let mut r = Reader::new(bytes);
    let v = r.read_value(0)?;
    if !r.is_at_end() {
        return Err(format!("{} trailing bytes after the payload", r.remaining()));
    }
    let Value::Array(items) = v else {
        return Err(format!("payload must be an array of events, got {}", v.kind()));
    };
    items.iter().enumerate().map(|(i, e)| decode_event(e).map_err(|m| format!("event {i}: {m}"))).collect()
}
