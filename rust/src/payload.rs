//! Decoder of the kvrouter event payload (docs/design.md §3.2; encoder: kvrouter.events.codec).
//!
//! A payload is a msgpack array of maps with string keys. Unknown keys are skipped
//! and absent optional keys take defaults, so the format can grow. Decoding is
//! all-or-nothing: a malformed payload yields an error and no events, which lets
//! the index apply a batch atomically.

use crate::error::Error;
use crate::msgpack::Reader;
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
    pub fn validate(&self) -> crate::Result<()> {
        if self.hashes.is_empty() {
            return Err(Error::invalid("stored event without block hashes"));
        }
        match (&self.tokens, &self.router_hashes) {
            (None, None) => {
                return Err(Error::invalid("stored event needs tokens or router_hashes"))
            }
            (Some(t), _) => {
                if self.block_size == 0 {
                    return Err(Error::invalid(
                        "stored event with tokens needs block_size > 0",
                    ));
                }
                if t.len() != self.block_size as usize * self.hashes.len() {
                    return Err(Error::invalid(format!(
                        "stored event has {} token ids for {} blocks of {}",
                        t.len(),
                        self.hashes.len(),
                        self.block_size
                    )));
                }
            }
            (None, Some(r)) => {
                if r.len() != self.hashes.len() {
                    return Err(Error::invalid(format!(
                        "stored event has {} router hashes for {} blocks",
                        r.len(),
                        self.hashes.len()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// An engine hash: u64, negative i64 (two's complement) or up to 32 bytes (low 64
/// bits, big-endian, as sha256-style digests are truncated).
fn engine_hash(r: &mut Reader<'_>) -> Result<u64, String> {
    if r.is_int_next()? {
        return r.read_int_u64();
    }
    let b = r
        .read_bin()
        .map_err(|_| "block hash must be an integer or 1..32 bytes".to_string())?;
    if b.is_empty() || b.len() > 32 {
        return Err(format!("block hash of {} bytes (expected 1..32)", b.len()));
    }
    let tail = &b[b.len().saturating_sub(8)..];
    Ok(tail.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
}

fn hash_list(r: &mut Reader<'_>, what: &str) -> Result<Vec<u64>, String> {
    let n = r.read_array_len().map_err(|e| format!("{what}: {e}"))?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(engine_hash(r).map_err(|e| format!("{what}: {e}"))?);
    }
    Ok(v)
}

fn tokens(r: &mut Reader<'_>) -> Result<Option<Vec<u32>>, String> {
    if r.read_nil()? {
        return Ok(None);
    }
    if r.is_array_next()? {
        let n = r.read_array_len()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = r.read_uint()?;
            v.push(u32::try_from(t).map_err(|_| format!("token id must be a u32, got {t}"))?);
        }
        return Ok(Some(v));
    }
    let b = r
        .read_bin()
        .map_err(|_| "tokens must be bytes or an array".to_string())?;
    if b.len() % 4 != 0 {
        return Err(format!(
            "tokens: {} bytes is not a whole number of u32",
            b.len()
        ));
    }
    Ok(Some(
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    ))
}

fn tier(r: &mut Reader<'_>) -> Result<Tier, String> {
    if r.read_nil()? {
        return Ok(Tier::Gpu);
    }
    if r.is_int_next()? {
        return Tier::from_index(r.read_uint()?).map_err(|e| e.to_string());
    }
    Tier::parse(
        r.read_str()
            .map_err(|_| "tier must be a string".to_string())?,
    )
    .map_err(|e| e.to_string())
}

fn decode_event(r: &mut Reader<'_>) -> Result<Event, String> {
    let n = r
        .read_map_len()
        .map_err(|_| "event must be a map".to_string())?;
    let mut kind: Option<&str> = None;
    let mut s = Stored::default();
    let mut has_hashes = false;
    for _ in 0..n {
        let key = r
            .read_str()
            .map_err(|_| "event keys must be strings".to_string())?;
        match key {
            "type" => {
                kind = Some(
                    r.read_str()
                        .map_err(|_| "event type must be a string".to_string())?,
                )
            }
            "hashes" => {
                s.hashes = hash_list(r, "hashes")?;
                has_hashes = true;
            }
            "parent" => {
                s.parent = if r.read_nil()? {
                    None
                } else {
                    Some(engine_hash(r).map_err(|e| format!("parent: {e}"))?)
                }
            }
            "tokens" => s.tokens = tokens(r)?,
            "block_size" => {
                if !r.read_nil()? {
                    let b = r.read_uint()?;
                    s.block_size = u32::try_from(b)
                        .map_err(|_| format!("block_size must be a u32, got {b}"))?;
                }
            }
            "router_hashes" => {
                s.router_hashes = if r.read_nil()? {
                    None
                } else {
                    Some(hash_list(r, "router_hashes")?)
                }
            }
            "tier" => s.tier = tier(r)?,
            "extra_key" => {
                s.extra_key = if r.read_nil()? {
                    None
                } else {
                    Some(
                        r.read_bytes_or_str()
                            .map_err(|_| "extra_key must be bytes or str".to_string())?
                            .to_vec(),
                    )
                }
            }
            _ => r.skip_value()?,
        }
    }
    match kind {
        None => Err("event without a type".into()),
        Some("stored") => {
            if !has_hashes {
                return Err("stored event without hashes".into());
            }
            s.validate().map_err(|e| e.to_string())?;
            Ok(Event::Stored(s))
        }
        Some("removed") => {
            if !has_hashes {
                return Err("removed event without hashes".into());
            }
            Ok(Event::Removed {
                hashes: s.hashes,
                tier: s.tier,
            })
        }
        Some("cleared") => Ok(Event::Cleared),
        Some(other) => Err(format!("unknown event type {other:?}")),
    }
}

/// Decodes a whole payload, or fails without partial results.
pub fn decode_payload(bytes: &[u8]) -> crate::Result<Vec<Event>> {
    decode(bytes).map_err(Error::MalformedPayload)
}

fn decode(bytes: &[u8]) -> Result<Vec<Event>, String> {
    let mut r = Reader::new(bytes);
    let n = r
        .read_array_len()
        .map_err(|_| "payload must be an array of events".to_string())?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(decode_event(&mut r).map_err(|m| format!("event {i}: {m}"))?);
    }
    if !r.is_at_end() {
        return Err(format!(
            "{} trailing bytes after the payload",
            r.remaining()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hand-assembled msgpack, so these tests do not depend on an encoder.
    fn s(x: &str) -> Vec<u8> {
        let mut v = vec![0xa0 | x.len() as u8];
        v.extend_from_slice(x.as_bytes());
        v
    }

    #[test]
    fn stored_with_tokens_and_unknown_keys() {
        let mut p = vec![0x91, 0x86];
        p.extend(s("type"));
        p.extend(s("stored"));
        p.extend(s("hashes"));
        p.extend([
            0x92, 0x01, 0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]); // [1, -1]
        p.extend(s("parent"));
        p.push(0xc0);
        p.extend(s("tokens"));
        p.extend([0xc4, 8, 1, 0, 0, 0, 2, 0, 0, 0]);
        p.extend(s("block_size"));
        p.push(0x01);
        p.extend(s("future"));
        p.extend([0x81, 0xa1, b'k', 0x90]); // {"k": []}, skipped
        let ev = decode_payload(&p).unwrap();
        let Event::Stored(st) = &ev[0] else {
            panic!("not stored")
        };
        assert_eq!(st.hashes, vec![1, u64::MAX]);
        assert_eq!(st.tokens.as_deref(), Some(&[1u32, 2][..]));
        assert_eq!(st.tier, Tier::Gpu);
    }

    #[test]
    fn removed_cleared_and_32_byte_hashes() {
        let mut p = vec![0x92, 0x83];
        p.extend(s("type"));
        p.extend(s("removed"));
        p.extend(s("hashes"));
        let mut digest = vec![0u8; 32];
        digest[31] = 7;
        p.extend([0x91, 0xc4, 32]);
        p.extend(&digest);
        p.extend(s("tier"));
        p.extend(s("host"));
        p.push(0x81);
        p.extend(s("type"));
        p.extend(s("cleared"));
        let ev = decode_payload(&p).unwrap();
        assert_eq!(
            ev[0],
            Event::Removed {
                hashes: vec![7],
                tier: Tier::Host
            }
        );
        assert_eq!(ev[1], Event::Cleared);
    }

    #[test]
    fn strings_are_not_bytes_but_extra_key_takes_either() {
        let event = |key: &[u8]| {
            let mut p = vec![0x91, 0x85];
            p.extend(s("type"));
            p.extend(s("stored"));
            p.extend(s("hashes"));
            p.extend([0x91, 0x05]);
            p.extend(s("router_hashes"));
            p.extend([0x91, 0x07]);
            p.extend(s("block_size"));
            p.push(0x01);
            p.extend(s("extra_key"));
            p.extend(key);
            p
        };
        let key = |p: &[u8]| match &decode_payload(p).unwrap()[0] {
            Event::Stored(st) => st.extra_key.clone(),
            other => panic!("not stored: {other:?}"),
        };
        let as_str = key(&event(&s("lora")));
        assert_eq!(as_str.as_deref(), Some(&b"lora"[..]));
        assert_eq!(key(&event(&[0xc4, 4, b'l', b'o', b'r', b'a'])), as_str);
        // A bin where a string belongs (the event type) is refused.
        let mut p = vec![0x91, 0x81];
        p.extend(s("type"));
        p.extend([0xc4, 7]);
        p.extend(b"cleared");
        assert!(decode_payload(&p).is_err());
    }

    #[test]
    fn malformed_is_an_error_not_a_panic() {
        for bad in [
            &[][..],
            &[0x91][..],
            &[0x91, 0x80][..],
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0x90, 0x00][..],
        ] {
            assert!(decode_payload(bad).is_err(), "{bad:?}");
        }
        // Every truncation of a valid payload fails cleanly.
        let mut p = vec![0x91, 0x82];
        p.extend(s("type"));
        p.extend(s("removed"));
        p.extend(s("hashes"));
        p.extend([0x91, 0x05]);
        assert!(decode_payload(&p).is_ok());
        for cut in 0..p.len() {
            assert!(decode_payload(&p[..cut]).is_err());
        }
    }
}
