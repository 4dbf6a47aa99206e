//! Block hashing (docs/design.md §3.1): the one hash function used for requests and events.
//!
//! A prompt is cut into full blocks of `block_size` tokens; the trailing partial
//! block is not hashed. The local hash of a block is xxh3-64 over its token ids as
//! little-endian u32 with [`HASH_SEED`]; the sequence hash of block i chains the
//! parent's: xxh3-64(parent_seq LE u64 || local LE u64). The chain starts from a
//! root that is 0, or derived from an extra key (LoRA adapter, cache salt) so that
//! such sequences never match plain ones.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of every kvrouter block hash ("kvrouter" in ASCII). Changing it changes
/// every golden vector and breaks every running fleet's index: never change it.
pub const HASH_SEED: u64 = 0x6b76_726f_7574_6572;

/// Root of the chain: 0 for plain requests, a hash of the extra key otherwise.
#[inline]
pub fn chain_root(extra_key: Option<&[u8]>) -> u64 {
    match extra_key {
        Some(key) if !key.is_empty() => xxh3_64_with_seed(key, HASH_SEED ^ 0x6578_7472_616b_6579),
        _ => 0,
    }
}

/// Local hash of one block's token ids.
#[inline]
pub fn local_hash(tokens: &[u32]) -> u64 {
    xxh3_64_with_seed(&le_bytes(tokens), HASH_SEED)
}

/// The token ids as little-endian bytes: a free view on little-endian hosts.
#[cfg(target_endian = "little")]
#[inline]
fn le_bytes(tokens: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Borrowed(bytemuck::cast_slice(tokens))
}

#[cfg(target_endian = "big")]
#[inline]
fn le_bytes(tokens: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Owned(tokens.iter().flat_map(|t| t.to_le_bytes()).collect())
}

/// Sequence hash of a block given its parent's sequence hash (or the chain root).
#[inline]
pub fn chain(parent: u64, local: u64) -> u64 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&parent.to_le_bytes());
    buf[8..].copy_from_slice(&local.to_le_bytes());
    xxh3_64_with_seed(&buf, HASH_SEED)
}

/// Sequence hashes computed on demand: a prefix match that stops early hashes no further.
pub struct BlockHashes<'a> {
    blocks: std::slice::ChunksExact<'a, u32>,
    prev: u64,
}

impl<'a> BlockHashes<'a> {
    pub fn new(tokens: &'a [u32], block_size: usize, parent: u64) -> Self {
        BlockHashes {
            blocks: tokens.chunks_exact(block_size),
            prev: parent,
        }
    }
}

impl Iterator for BlockHashes<'_> {
    type Item = u64;
    #[inline]
    fn next(&mut self) -> Option<u64> {
        let block = self.blocks.next()?;
        self.prev = chain(self.prev, local_hash(block));
        Some(self.prev)
    }
}

/// Sequence hashes of the full blocks of `tokens`, continuing from `parent`.
pub fn hash_blocks_from(tokens: &[u32], block_size: usize, parent: u64, out: &mut Vec<u64>) {
    debug_assert!(block_size > 0);
    out.reserve(tokens.len() / block_size);
    out.extend(BlockHashes::new(tokens, block_size, parent));
}

/// Sequence hashes of the full blocks of `tokens`.
pub fn hash_blocks(tokens: &[u32], block_size: usize, extra_key: Option<&[u8]>) -> Vec<u64> {
    let mut out = Vec::new();
    hash_blocks_from(tokens, block_size, chain_root(extra_key), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_block_is_not_hashed() {
        let t: Vec<u32> = (0..10).collect();
        assert_eq!(hash_blocks(&t, 4, None).len(), 2);
        assert_eq!(hash_blocks(&t[..3], 4, None).len(), 0);
    }

    #[test]
    fn chain_depends_on_prefix() {
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let b: Vec<u32> = vec![9, 2, 3, 4, 5, 6, 7, 8];
        let ha = hash_blocks(&a, 4, None);
        let hb = hash_blocks(&b, 4, None);
        assert_ne!(ha[0], hb[0]);
        // Same second block content, different parent: different sequence hash.
        assert_ne!(ha[1], hb[1]);
        assert_eq!(local_hash(&a[4..]), local_hash(&b[4..]));
    }

    #[test]
    fn extra_key_changes_every_hash() {
        let a: Vec<u32> = (0..64).collect();
        let plain = hash_blocks(&a, 16, None);
        let lora = hash_blocks(&a, 16, Some(b"adapter-x"));
        assert!(plain.iter().zip(&lora).all(|(p, l)| p != l));
        assert_eq!(hash_blocks(&a, 16, Some(b"")), plain);
    }

    #[test]
    fn prefix_property() {
        let a: Vec<u32> = (0..100).collect();
        let full = hash_blocks(&a, 8, None);
        let part = hash_blocks(&a[..40], 8, None);
        assert_eq!(&full[..5], &part[..]);
        let mut cont = Vec::new();
        hash_blocks_from(&a[40..96], 8, part[4], &mut cont);
        assert_eq!(&full[5..12], &cont[..]);
    }

    #[test]
    fn large_blocks() {
        let a: Vec<u32> = (0..1024).collect();
        let h = hash_blocks(&a, 512, None);
        assert_eq!(h.len(), 2);
        let bytes: Vec<u8> = a[..512].iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(local_hash(&a[..512]), xxh3_64_with_seed(&bytes, HASH_SEED));
    }
}
