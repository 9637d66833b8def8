//! The key of the embedded store's in-memory overlay: ordered exactly as its bytes, but
//! compared without following a pointer in the common case.
//!
//! Why: the overlay is an ordered map of tens of thousands of keys per shard, and a B-tree node
//! search compares the probe with up to eleven keys per level. With `Vec<u8>` keys each
//! comparison reads a separate heap allocation (a likely cache miss), and the keys of a shard
//! share their first bytes (`S`, the shard, the record kind, `acct-`), so the compare runs
//! through them every time. Inserting into the overlay was 12% of `ledgerd`'s CPU at workload
//! (a), nearly all of it in those comparisons (docs/benchmarks.md). Here the first
//! [`HEAD_BYTES`] bytes are kept inline and compared as two big-endian integers: two integer
//! compares decide almost every comparison, and only the rare key longer than the head has
//! bytes on the heap at all (so most keys cost no allocation either).

use std::cmp::Ordering;

/// Bytes of a key kept inline. Covers the shard prefix (6 bytes), an account id of up to 17
/// bytes with its terminator and an entry's version (8 bytes), or a transfer id of up to 25.
pub const HEAD_BYTES: usize = 32;

/// A key of the overlay. Ordered exactly as its bytes (see `Ord`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayKey {
    /// The first [`HEAD_BYTES`] bytes, zero-padded.
    head: [u8; HEAD_BYTES],
    /// The bytes after the head (most keys have none, and then nothing is allocated).
    tail: Box<[u8]>,
    /// The key's length.
    len: u32,
}

impl OverlayKey {
    pub fn new(bytes: &[u8]) -> Self {
        let mut head = [0u8; HEAD_BYTES];
        let n = bytes.len().min(HEAD_BYTES);
        head[..n].copy_from_slice(&bytes[..n]);
        Self {
            head,
            tail: bytes[n..].into(),
            len: u32::try_from(bytes.len()).expect("a key fits in 4 GiB"),
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Appends the key's bytes to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head[..self.len().min(HEAD_BYTES)]);
        out.extend_from_slice(&self.tail);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        self.write_to(&mut out);
        out
    }

    /// The head as two big-endian integers: two compares instead of a byte loop.
    fn words(&self) -> (u128, u128) {
        let (high, low) = self.head.split_at(HEAD_BYTES / 2);
        (
            u128::from_be_bytes(high.try_into().expect("16 bytes")),
            u128::from_be_bytes(low.try_into().expect("16 bytes")),
        )
    }
}

impl Ord for OverlayKey {
    /// The order of the bytes. Zero padding keeps it: if the padded heads differ, they first
    /// differ where the greater one has a real byte above the other's (a real byte or a pad).
    /// If they are equal, keys longer than the head share its bytes and differ in their tails;
    /// a key that ends inside the head is a prefix of any longer key with an equal padded
    /// head (the rest of the head is zeros), so the shorter is first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.words()
            .cmp(&other.words())
            .then_with(|| self.tail.cmp(&other.tail))
            .then_with(|| self.len.cmp(&other.len))
    }
}

impl PartialOrd for OverlayKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair of a set of keys chosen to stress the padding (zero bytes, prefixes of each
    /// other, keys ending at and around the head's length) compares as its bytes do.
    #[test]
    fn orders_exactly_as_the_bytes() {
        let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
        for len in [1, 2, 15, 16, 17, 31, 32, 33, 40] {
            for fill in [0u8, 1, 0x7F, 0xFF] {
                let mut key = vec![fill; len];
                keys.push(key.clone());
                // The same with one byte raised or lowered near the end, and a zero appended.
                let last = len - 1;
                key[last] = fill.wrapping_add(1);
                keys.push(key.clone());
                key[last] = fill.wrapping_sub(1);
                keys.push(key.clone());
                key.push(0);
                keys.push(key);
            }
        }
        // Realistic keys sharing a long prefix.
        for id in [
            "acct-1",
            "acct-10",
            "acct-9",
            "acct-123456789012345678901234",
        ] {
            for version in [0u64, 1, 256, u64::MAX] {
                let mut key = b"S\0\0\0\x03\x03".to_vec();
                key.extend_from_slice(id.as_bytes());
                key.push(0);
                key.extend_from_slice(&version.to_be_bytes());
                keys.push(key);
            }
        }
        let wrapped: Vec<OverlayKey> = keys.iter().map(|k| OverlayKey::new(k)).collect();
        let mut checked = 0;
        for (a, ka) in keys.iter().zip(&wrapped) {
            for (b, kb) in keys.iter().zip(&wrapped) {
                assert_eq!(ka.cmp(kb), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(ka == kb, a == b, "{a:?} vs {b:?}");
                assert_eq!(&ka.to_bytes(), a);
                checked += 1;
            }
        }
        assert!(checked > 10_000, "compared {checked} pairs");
    }

    #[test]
    fn keeps_the_bytes() {
        for len in [0, 1, 31, 32, 33, 100] {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let key = OverlayKey::new(&bytes);
            assert_eq!(key.len(), len);
            assert_eq!(key.to_bytes(), bytes);
            let mut out = vec![7];
            key.write_to(&mut out);
            assert_eq!(out[1..], bytes[..]);
        }
    }
}
