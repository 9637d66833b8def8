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
use std::collections::BTreeMap;
use std::ops::RangeBounds;

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

/// Bytes of one arena chunk of an [`Overlay`] (a value bigger than this gets a chunk of its own).
pub const ARENA_CHUNK_BYTES: usize = 256 << 10;

/// Where an overlay entry's value lies in its overlay's arena, or a delete.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    chunk: u32,
    start: u32,
    /// [`Slot::DELETED`] for a delete.
    len: u32,
}

impl Slot {
    const DELETED: u32 = u32::MAX;
}

/// The embedded store's in-memory overlay: an ordered map from keys to values or deletes, whose
/// values are copied into a few large arena chunks instead of each living in an allocation
/// of its own.
///
/// Why: an overlay lives for a checkpoint interval (seconds) and is then freed on another
/// thread. With a value per allocation, every value the engine encoded stayed live that long,
/// so each new allocation found its memory cold (one cache miss per allocation in mimalloc's
/// free list, 6% of all the machine's samples at workload (a)) and every free crossed threads. Copying
/// the values into the arena lets the committing thread free the batch's own buffers at once,
/// and the next batch reuses them while they are still in cache (docs/benchmarks.md).
#[derive(Debug, Default)]
pub struct Overlay {
    map: BTreeMap<OverlayKey, Slot>,
    arena: Vec<Vec<u8>>,
}

impl Overlay {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Sets `key` to `value` (`None`: deleted). A replaced value's bytes stay in the arena
    /// until the overlay is dropped; the store counts every write's bytes for that reason.
    pub fn insert(&mut self, key: &[u8], value: Option<&[u8]>) {
        let slot = match value {
            None => Slot {
                chunk: 0,
                start: 0,
                len: Slot::DELETED,
            },
            Some(value) => self.store(value),
        };
        self.map.insert(OverlayKey::new(key), slot);
    }

    fn store(&mut self, value: &[u8]) -> Slot {
        let len = u32::try_from(value.len())
            .ok()
            .filter(|n| *n != Slot::DELETED)
            .expect("a value fits in 4 GiB");
        let fits = self
            .arena
            .last()
            .is_some_and(|chunk| chunk.capacity() - chunk.len() >= value.len());
        if !fits {
            self.arena
                .push(Vec::with_capacity(ARENA_CHUNK_BYTES.max(value.len())));
        }
        let chunk_index = self.arena.len() - 1;
        let chunk = &mut self.arena[chunk_index];
        let start = chunk.len();
        chunk.extend_from_slice(value);
        Slot {
            chunk: u32::try_from(chunk_index).expect("fewer than 4 billion chunks"),
            start: u32::try_from(start).expect("a chunk is under 4 GiB"),
            len,
        }
    }

    fn value(&self, slot: Slot) -> Option<&[u8]> {
        (slot.len != Slot::DELETED).then(|| {
            let start = slot.start as usize;
            &self.arena[slot.chunk as usize][start..start + slot.len as usize]
        })
    }

    /// `Some(value)` if the overlay has `key` (`Some(None)`: deleted here), else `None`.
    pub fn get(&self, key: &OverlayKey) -> Option<Option<&[u8]>> {
        self.map.get(key).map(|slot| self.value(*slot))
    }

    /// The entries in `range`, in key order.
    pub fn range<'a>(
        &'a self,
        range: impl RangeBounds<OverlayKey>,
    ) -> impl Iterator<Item = (&'a OverlayKey, Option<&'a [u8]>)> + 'a {
        self.map
            .range(range)
            .map(move |(key, slot)| (key, self.value(*slot)))
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&OverlayKey, Option<&[u8]>)> {
        self.map.iter().map(|(key, slot)| (key, self.value(*slot)))
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

    /// Values of every size (empty, small, filling a chunk's end, bigger than a chunk),
    /// overwritten and deleted, read back as a plain map of the same writes holds them.
    #[test]
    fn the_overlay_reads_back_what_a_plain_map_holds() {
        let mut overlay = Overlay::new();
        let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..3_000u64 {
            let key = format!("key-{:04}", next() % 700).into_bytes();
            let value = match next() % 10 {
                0 => None,
                1 => Some(Vec::new()),
                2 if i % 50 == 0 => Some(vec![i as u8; ARENA_CHUNK_BYTES + 7]),
                _ => Some(vec![i as u8; (next() % 3_000) as usize]),
            };
            overlay.insert(&key, value.as_deref());
            model.insert(key, value);
        }
        assert!(overlay.arena.len() > 2, "the writes spanned several chunks");
        assert_eq!(overlay.len(), model.len());
        for (key, value) in &model {
            assert_eq!(
                overlay.get(&OverlayKey::new(key)),
                Some(value.as_deref()),
                "{key:?}"
            );
        }
        assert_eq!(overlay.get(&OverlayKey::new(b"key-")), None);
        let all: Vec<_> = overlay
            .iter()
            .map(|(k, v)| (k.to_bytes(), v.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(all, model.clone().into_iter().collect::<Vec<_>>());
        let (from, to) = (OverlayKey::new(b"key-0100"), OverlayKey::new(b"key-0200"));
        let some: Vec<_> = overlay
            .range((
                std::ops::Bound::Included(&from),
                std::ops::Bound::Excluded(&to),
            ))
            .map(|(k, _)| k.to_bytes())
            .collect();
        let expected: Vec<_> = model
            .range(b"key-0100".to_vec()..b"key-0200".to_vec())
            .map(|(k, _)| k.clone())
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(some, expected);
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
