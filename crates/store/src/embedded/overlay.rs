//! The embedded store's in-memory overlay ([`Overlay`]) and its key ([`OverlayKey`]): ordered
//! exactly as its bytes, but compared and hashed without following a pointer in the common
//! case.
//!
//! Why such a key: sorting the overlay for ordered reads and checkpoints compares keys many
//! times, and every lookup compares the probe with the key it finds. With `Vec<u8>` keys each
//! comparison reads a separate heap allocation (a likely cache miss), and the keys of a shard
//! share their first bytes (`S`, the shard, the record kind, `acct-`), so the compare runs
//! through them every time. When the overlay was a B-tree, inserting into it was 12% of
//! `ledgerd`'s CPU at workload (a), nearly all of it in those comparisons (docs/benchmarks.md).
//! Here the first [`HEAD_BYTES`] bytes are kept inline and compared as two big-endian integers:
//! two integer compares decide almost every comparison, and only the rare key longer than the
//! head has bytes on the heap at all (so most keys cost no allocation either).

use std::cmp::Ordering;
use std::hash::BuildHasher as _;
use std::ops::{Bound, RangeBounds};
use std::sync::{Mutex, MutexGuard, PoisonError};

use foldhash::fast::RandomState;
use hashbrown::hash_table::{Entry, HashTable};

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

impl std::hash::Hash for OverlayKey {
    /// The head as two integers and the length, then the tail if there is one: what `Eq`
    /// compares, in as few steps of the hasher as that takes.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (high, low) = self.words();
        state.write_u128(high);
        state.write_u128(low);
        state.write_u32(self.len);
        if !self.tail.is_empty() {
            state.write(&self.tail);
        }
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

/// What an overlay entry costs in memory besides its key's and value's bytes: the key's inline
/// part and its value's handle, its slot in the hash index (an index and a control byte), and
/// its place in the sorted runs. Counted so that the overlay's byte limit is close to the memory
/// it takes: with small values the headers are about as big as the data (docs/benchmarks.md).
pub const ENTRY_OVERHEAD_BYTES: usize = std::mem::size_of::<(OverlayKey, Slot)>() + 9;

/// The embedded store's in-memory overlay: a map from keys to values or deletes, read by key
/// through a hash index and in key order through sorted runs built only when an ordered read
/// asks for them. Its values are copied into a few large arena chunks instead of each living in
/// an allocation of its own.
///
/// Why a hash index: every commit inserts each of its writes (five for a transfer) and reads
/// the accounts it touches. In a B-tree of tens of thousands of keys each insert followed
/// four or five nodes, a cache miss each: 11% of `ledgerd`'s CPU at workload (b). A hash
/// probe touches one or two cache lines. Ordered reads (a scan such as an account's entries,
/// and the checkpoint writing the overlay into redb) are rare next to that, so order is built
/// only for them. A scan sorts up to [`RUN_KEYS_MAX`] of the keys written since the last
/// ordered read into a new run (merging small runs as a binary counter merges digits, up to
/// that length), finds its range in each run by binary search, and looks at the keys not yet
/// in a run one by one: under the store's lock a scan sorts at most that many keys and passes
/// once over the rest, never sorts the whole overlay. A checkpoint sorts the whole frozen
/// overlay on its own thread.
///
/// Why an arena: an overlay lives for a checkpoint interval (seconds) and is then freed on
/// another thread. With a value per allocation, every value the engine encoded stayed live that
/// long, so each new allocation found its memory cold (one cache miss per allocation in
/// mimalloc's free list, 6% of all the machine's samples at workload (a)) and every free
/// crossed threads. Copying the values into the arena lets the committing thread free the
/// batch's own buffers at once, and the next batch reuses them while they are still in cache.
pub struct Overlay {
    /// Every key once, in the order it was first written, with where its latest value lies.
    entries: Vec<(OverlayKey, Slot)>,
    /// Indices into `entries`, by the key's hash.
    index: HashTable<u32>,
    /// Keyed per overlay: ids are chosen by clients, so their hashes must not be predictable.
    hasher: RandomState,
    arena: Vec<Vec<u8>>,
    /// The key order, for ordered reads. A frozen overlay is shared with the checkpoint thread
    /// and read by scans at once, hence the lock; commits never take it.
    order: Mutex<Order>,
}

/// Keys one ordered read sorts into a new run at most, and the longest run two runs are merged
/// into: bounds what one read does under the store's lock. Measured on 45 000 keys written
/// since the last ordered read: sorting them all took 4.3 ms, a scan as it is now 0.5-0.65 ms.
pub const RUN_KEYS_MAX: usize = 4_096;

/// Sorted runs of indices into [`Overlay::entries`], covering `entries[..covered]`; each key is
/// in exactly one run. Runs are at most [`RUN_KEYS_MAX`] long.
#[derive(Default)]
struct Order {
    runs: Vec<Vec<u32>>,
    covered: usize,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("entries", &self.entries.len())
            .field("chunks", &self.arena.len())
            .finish()
    }
}

impl Default for Overlay {
    fn default() -> Self {
        Self::new()
    }
}

impl Overlay {
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
            index: HashTable::new(),
            hasher: RandomState::default(),
            arena: Vec::new(),
            order: Mutex::new(Order::default()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// An overlay with room for `keys` keys before its index or entries grow. A store sizes
    /// each new overlay like the one it froze: growing them by doubling rehashed and copied
    /// every key several times, 2-3% of the machine at workload (a) (docs/benchmarks.md).
    pub fn with_capacity(keys: usize) -> Self {
        let mut overlay = Self::new();
        overlay.entries.reserve_exact(keys);
        // The table is empty, so nothing is rehashed: the hasher is never called.
        overlay.index.reserve(keys, |_| 0);
        overlay
    }

    /// Keys held (each once, whether its value is a value or a delete).
    pub fn len(&self) -> usize {
        self.entries.len()
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
        let key = OverlayKey::new(key);
        let hash = self.hasher.hash_one(&key);
        let (entries, hasher) = (&mut self.entries, &self.hasher);
        match self.index.entry(
            hash,
            |&i| entries[i as usize].0 == key,
            |&i| hasher.hash_one(&entries[i as usize].0),
        ) {
            Entry::Occupied(found) => entries[*found.get() as usize].1 = slot,
            Entry::Vacant(vacant) => {
                vacant.insert(index(entries.len()));
                entries.push((key, slot));
            }
        }
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

    fn key(&self, i: u32) -> &OverlayKey {
        &self.entries[i as usize].0
    }

    fn item(&self, i: u32) -> (&OverlayKey, Option<&[u8]>) {
        let (key, slot) = &self.entries[i as usize];
        (key, self.value(*slot))
    }

    /// `Some(value)` if the overlay has `key` (`Some(None)`: deleted here), else `None`.
    pub fn get(&self, key: &OverlayKey) -> Option<Option<&[u8]>> {
        let hash = self.hasher.hash_one(key);
        self.index
            .find(hash, |&i| self.key(i) == key)
            .map(|&i| self.item(i).1)
    }

    /// The order, brought up to date as far as one ordered read may take it: up to
    /// [`RUN_KEYS_MAX`] of the keys written since the last ordered read become a sorted run,
    /// and the newest runs are merged while the newest is at least half as long as the one
    /// before it and the merged run stays within [`RUN_KEYS_MAX`]. Keys past `covered` are left
    /// for later reads, which look at them one by one meanwhile.
    fn order(&self) -> MutexGuard<'_, Order> {
        let mut order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let n = self.entries.len();
        if order.covered < n {
            let to = n.min(order.covered + RUN_KEYS_MAX);
            let mut run: Vec<u32> = (order.covered..to).map(index).collect();
            self.by_key(&mut run);
            order.runs.push(run);
            order.covered = to;
            while let [.., older, newer] = order.runs.as_slice()
                && newer.len() * 2 >= older.len()
                && older.len() + newer.len() <= RUN_KEYS_MAX
            {
                let newer = order.runs.pop().expect("two runs");
                let older = order.runs.pop().expect("two runs");
                order.runs.push(self.merge(&older, &newer));
            }
        }
        order
    }

    fn merge(&self, a: &[u32], b: &[u32]) -> Vec<u32> {
        let mut out = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            if self.key(a[i]) < self.key(b[j]) {
                out.push(a[i]);
                i += 1;
            } else {
                out.push(b[j]);
                j += 1;
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
        out
    }

    fn by_key(&self, indices: &mut [u32]) {
        indices.sort_unstable_by(|&a, &b| self.key(a).cmp(self.key(b)));
    }

    /// The entries in `range`, in key order. Work done under the overlay's order lock (and so,
    /// for a store's scan, under the store's lock): a binary search per run, sorting at most
    /// [`RUN_KEYS_MAX`] new keys, and a look at each key not yet in a run.
    pub fn range<'a>(
        &'a self,
        range: impl RangeBounds<OverlayKey>,
    ) -> impl Iterator<Item = (&'a OverlayKey, Option<&'a [u8]>)> + 'a {
        let mut hits = Vec::new();
        {
            let order = self.order();
            let before_end = |key: &OverlayKey| match range.end_bound() {
                Bound::Included(to) => key <= to,
                Bound::Excluded(to) => key < to,
                Bound::Unbounded => true,
            };
            for run in &order.runs {
                let first = match range.start_bound() {
                    Bound::Included(from) => run.partition_point(|&i| self.key(i) < from),
                    Bound::Excluded(from) => run.partition_point(|&i| self.key(i) <= from),
                    Bound::Unbounded => 0,
                };
                hits.extend(
                    run[first..]
                        .iter()
                        .take_while(|&&i| before_end(self.key(i))),
                );
            }
            hits.extend(
                (order.covered..self.entries.len())
                    .map(index)
                    .filter(|&i| range.contains(self.key(i))),
            );
        }
        // Each run's hits are in order already; sorting them together is cheap next to
        // what the caller does with them.
        self.by_key(&mut hits);
        hits.into_iter().map(move |i| self.item(i))
    }

    /// The keys with `from <= key < to` that hold a value, in the order they were first
    /// written: no sorting, for a caller that does not need key order.
    pub fn keys_between<'a>(
        &'a self,
        from: &'a OverlayKey,
        to: &'a OverlayKey,
    ) -> impl Iterator<Item = &'a OverlayKey> + 'a {
        self.entries
            .iter()
            .filter(move |(key, slot)| slot.len != Slot::DELETED && key >= from && key < to)
            .map(|(key, _)| key)
    }

    /// Every entry, in key order (a checkpoint writing the overlay into redb). The order is
    /// built here, on the caller's thread, without the overlay's order lock: scans of a frozen
    /// overlay do not wait for it.
    pub fn iter(&self) -> impl Iterator<Item = (&OverlayKey, Option<&[u8]>)> {
        let mut all: Vec<u32> = (0..self.entries.len()).map(index).collect();
        self.by_key(&mut all);
        all.into_iter().map(move |i| self.item(i))
    }
}

/// An index into [`Overlay::entries`] as the index and the runs keep it.
fn index(i: usize) -> u32 {
    u32::try_from(i).expect("fewer than 4 billion keys")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A repeatable stream of pseudo-random numbers (xorshift64) from a nonzero seed.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

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
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
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

    /// Ordered reads between writes (each sorting some of the keys written since the last into
    /// a run, merging runs, and looking at the rest one by one) see every key once, in order,
    /// with its latest value, whether the key was last written before or after the run that
    /// holds it was built; and the runs stay few and short.
    #[test]
    fn ordered_reads_between_writes_see_each_key_once_with_its_latest_value() {
        let mut overlay = Overlay::new();
        let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let mut next = xorshift(0x2545_F491_4F6C_DD1D);
        let mut reads = 0;
        let mut left_out = false;
        for i in 0..20_000u64 {
            // Keys longer than the inline head too, so ties on the head go to the tails.
            let key = match next() % 4 {
                0 => format!("{:0>40}", next() % 3_000).into_bytes(),
                _ => format!("k{:05}", next() % 3_000).into_bytes(),
            };
            let value = (!next().is_multiple_of(8)).then(|| i.to_be_bytes().to_vec());
            overlay.insert(&key, value.as_deref());
            model.insert(key, value);
            // Reads after 1, 2, 3, ... writes, then none for a long stretch (more new keys
            // than one read sorts into a run), then every hundred writes or so: runs of every
            // size, and keys left out of runs.
            if i < 64 || (i > 12_000 && next().is_multiple_of(100)) {
                reads += 1;
                let lo = format!("k{:05}", next() % 3_000).into_bytes();
                let hi = format!("k{:05}", next() % 3_000).into_bytes();
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                let got: Vec<_> = overlay
                    .range(OverlayKey::new(&lo)..OverlayKey::new(&hi))
                    .map(|(k, v)| (k.to_bytes(), v.map(<[u8]>::to_vec)))
                    .collect();
                let expected: Vec<_> = model
                    .range(lo.clone()..hi.clone())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(got, expected, "range {lo:?}..{hi:?} after {i} writes");
                let order = overlay.order.lock().unwrap();
                left_out |= order.covered < overlay.len();
                let bound = overlay.len() / (RUN_KEYS_MAX / 2) + 13;
                assert!(
                    order.runs.len() <= bound,
                    "{} runs for {} keys",
                    order.runs.len(),
                    overlay.len()
                );
                assert!(order.runs.iter().all(|run| run.len() <= RUN_KEYS_MAX));
            }
        }
        assert!(reads > 100, "{reads} ordered reads");
        assert!(left_out, "some reads found keys not yet in a run");
        let all: Vec<_> = overlay
            .iter()
            .map(|(k, v)| (k.to_bytes(), v.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
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
