//! A shard's filter of the transfer ids it has recorded: answers "certainly not recorded" for
//! most new ids, so the idempotency check of a new transfer does not have to search the store.
//!
//! Why: every transfer first looks its id up (a retry must get the original outcome, never be
//! applied twice). For a new id that lookup finds nothing, but only after descending the
//! store's tree to where the id would be: 2.2 us of `ledgerd`'s CPU per one-transfer call at
//! workload (b), 7.7% of its samples at (a) (docs/benchmarks.md).
//!
//! What it is: a blocked Bloom filter. Each id sets [`BITS_PER_ID`] bits in one 64-byte block,
//! so a lookup reads one cache line. It has no false negatives: an id whose bits are not all
//! set was never inserted. It has false positives (an id not recorded, but whose bits are set),
//! which only cost the store lookup the filter exists to skip; under 1% of lookups while it
//! holds at most one id per [`BITS_PER_ID_DESIGN`] bits, more as it fills past that. A filter
//! cannot grow in place: past that load the engine builds a bigger one ([`bytes_for`]), filled
//! the same way as the first (below) while the old one goes on answering, and swaps it in once
//! complete; up to [`crate::Options::transfer_filter_bytes`] per shard. Past that too, it
//! answers "maybe" for more and more ids and the engine reads the store, as without it.
//!
//! When it may be trusted: only once it holds every id the shard's store held when it was
//! made. The engine inserts each id it records from then on (a bigger filter also gets the ids
//! of the batch that made it); a task on the blocking pool ([`fill`], started with the term,
//! or once the batch that made a bigger filter has committed) scans the store's transfer
//! records and inserts those; until that scan has finished ([`IdFilter::is_complete`]) the
//! engine does not use the filter's answers.
//! Both write the filter at once: its bits are atomics, and the scan's last insert happens
//! before its completion is published (release, read with acquire).

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ledger_domain::ShardId;
use ledger_store::Store;

use crate::ReadError;
use crate::{codec, keys};

/// Bits one id sets, all in one block.
pub const BITS_PER_ID: usize = 8;
/// The filter answers with about 1% false positives up to one id per this many bits.
pub const BITS_PER_ID_DESIGN: usize = 12;
/// Ids [`fill`] inserts between two checks that its term still wants the filter.
pub const CHECK_EVERY: usize = 1_024;

/// One cache line of bits.
#[repr(align(64))]
struct Block([AtomicU64; 8]);

pub struct IdFilter {
    blocks: Box<[Block]>,
    /// Keyed per process: ids are chosen by clients, who must not be able to pick ids that
    /// all land in one block.
    hasher: foldhash::quality::RandomState,
    complete: AtomicBool,
    /// Inserts so far (an id the scan and the engine both insert counts twice).
    inserted: AtomicU64,
}

impl std::fmt::Debug for IdFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdFilter")
            .field("bytes", &(self.blocks.len() * 64))
            .field("complete", &self.is_complete())
            .finish()
    }
}

impl IdFilter {
    /// A filter of about `bytes` bytes (whole 64-byte blocks), or none for 0.
    pub fn new(bytes: usize) -> Option<Self> {
        let count = bytes / 64;
        if count == 0 {
            return None;
        }
        let blocks = (0..count)
            .map(|_| Block(std::array::from_fn(|_| AtomicU64::new(0))))
            .collect();
        Some(Self {
            blocks,
            hasher: foldhash::quality::RandomState::default(),
            complete: AtomicBool::new(false),
            inserted: AtomicU64::new(0),
        })
    }

    /// The block and the bits (word, mask) of `id`.
    fn bits(&self, id: &str) -> (&Block, [(usize, u64); BITS_PER_ID]) {
        let hash = self.hasher.hash_one(id);
        // The hash picks the block (multiply-shift: no division, no bias worth the name).
        let block = ((u128::from(hash) * self.blocks.len() as u128) >> 64) as usize;
        // The low half seeds the bits: 9 bits each (word 0-7, bit 0-63) from a SplitMix64
        // sequence, so the bits of one id are independent of which block it is in.
        let mut state = hash;
        let bits = std::array::from_fn(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 61) as usize, 1u64 << ((z >> 55) & 63))
        });
        (&self.blocks[block], bits)
    }

    pub fn insert(&self, id: &str) {
        let (block, bits) = self.bits(id);
        for (word, mask) in bits {
            block.0[word].fetch_or(mask, Ordering::Relaxed);
        }
        self.inserted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> usize {
        self.blocks.len() * 64
    }

    /// Ids inserted so far (about: the scan and the engine may both insert one).
    pub fn inserted(&self) -> u64 {
        self.inserted.load(Ordering::Relaxed)
    }

    /// Ids it holds with about 1% false positives at most; past that, more and more new ids
    /// need the store.
    pub fn design_capacity(&self) -> u64 {
        (self.blocks.len() * 512 / BITS_PER_ID_DESIGN) as u64
    }

    /// Whether `id` may have been inserted (false: it certainly was not).
    pub fn may_contain(&self, id: &str) -> bool {
        let (block, bits) = self.bits(id);
        bits.iter()
            .all(|(word, mask)| block.0[*word].load(Ordering::Relaxed) & mask != 0)
    }

    /// Whether every id the store held when the term began has been inserted.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    fn mark_complete(&self) {
        self.complete.store(true, Ordering::Release);
    }

    /// Certainly not recorded: the filter is complete and `id` was never inserted.
    pub fn certainly_absent(&self, id: &str) -> bool {
        self.is_complete() && !self.may_contain(id)
    }
}

/// The size a filter rebuilt for `ids` ids gets: room for twice as many at the design load, so
/// that it is rebuilt again only after the shard has recorded as many ids again.
pub fn bytes_for(ids: u64) -> usize {
    let ids = usize::try_from(ids).unwrap_or(usize::MAX / 64);
    (ids.saturating_mul(2 * BITS_PER_ID_DESIGN) / 8)
        .max(64)
        .next_power_of_two()
}

/// Inserts every transfer id recorded in `shard`'s store into `filter`, then marks it
/// complete. Returns how many ids it read, or `None` if the term ended first (nobody else holds
/// the filter any more). Run on the blocking pool at the start of a term, and for each bigger
/// filter once the batch that made it has committed; the engine inserts the ids it records
/// meanwhile itself. It reads keys only ([`Store::for_each_key`]: the embedded store copies
/// its in-memory keys out under its lock and reads the rest from a snapshot, so commits go
/// on meanwhile).
pub fn fill(
    store: &dyn Store,
    shard: ShardId,
    filter: &Arc<IdFilter>,
) -> Result<Option<usize>, ReadError> {
    let ended = || Arc::strong_count(filter) == 1;
    if ended() {
        return Ok(None);
    }
    let (start, end) = keys::transfers(shard);
    let mut count = 0;
    let mut stopped = false;
    let mut damaged = None;
    store.for_each_key(&start, &end, &mut |key| {
        if count % CHECK_EVERY == 0 && ended() {
            stopped = true;
            return false;
        }
        match transfer_id(key) {
            Some(id) => {
                filter.insert(&id);
                count += 1;
                true
            }
            None => {
                damaged = Some(key.to_vec());
                false
            }
        }
    })?;
    if let Some(key) = damaged {
        return Err(ReadError::Decode(codec::DecodeError {
            what: "transfer key",
            reason: format!("{key:?}"),
        }));
    }
    if stopped {
        return Ok(None);
    }
    filter.mark_complete();
    Ok(Some(count))
}

/// The id of a transfer record's key (`S <shard> <kind> <id> 0x00`): borrowed in the common
/// case, an id without a 0x00 byte (ids cannot hold one), so a fill allocates nothing per id.
fn transfer_id(key: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let id = key.get(6..)?;
    match id.split_last() {
        Some((0, id)) if !id.contains(&0) => std::str::from_utf8(id).ok().map(Into::into),
        _ => ledger_store::key::read_str(key, 6).map(|(id, _)| id.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_store::Memory;
    use ledger_store::WriteBatch;

    #[test]
    fn no_id_inserted_is_ever_reported_absent() {
        let filter = IdFilter::new(64 << 10).unwrap();
        filter.mark_complete();
        // Four times the design load: false positives rise, false negatives never appear.
        let ids: Vec<String> = (0..4 * (64 << 10) * 8 / BITS_PER_ID_DESIGN)
            .map(|i| format!("t-{i}"))
            .collect();
        for id in &ids {
            filter.insert(id);
        }
        assert!(ids.iter().all(|id| filter.may_contain(id)));
        assert!(ids.iter().all(|id| !filter.certainly_absent(id)));
    }

    #[test]
    fn at_its_design_load_about_one_percent_of_new_ids_need_the_store() {
        let bytes = 64 << 10;
        let filter = IdFilter::new(bytes).unwrap();
        filter.mark_complete();
        for i in 0..bytes * 8 / BITS_PER_ID_DESIGN {
            filter.insert(&format!("in-{i}"));
        }
        let probes = 100_000;
        let maybe = (0..probes)
            .filter(|i| filter.may_contain(&format!("out-{i}")))
            .count();
        assert!(maybe < probes * 3 / 100, "{maybe} of {probes}");
        assert!(maybe > 0, "a filter this full has some false positives");
    }

    #[test]
    fn a_rebuilt_filter_has_room_for_twice_the_ids() {
        assert_eq!(bytes_for(0), 64);
        for ids in [1_000u64, 43_690, 1_000_000] {
            let filter = IdFilter::new(bytes_for(ids)).unwrap();
            assert!(filter.design_capacity() >= 2 * ids, "{ids}");
            assert!(filter.design_capacity() < 4 * ids + 64, "{ids}");
        }
    }

    #[test]
    fn it_counts_its_inserts_against_its_design_capacity() {
        let filter = IdFilter::new(6 * 64).unwrap();
        assert_eq!(
            filter.design_capacity(),
            6 * 512 / BITS_PER_ID_DESIGN as u64
        );
        for i in 0..10 {
            filter.insert(&format!("t{i}"));
        }
        assert_eq!(filter.inserted(), 10);
    }

    #[test]
    fn an_incomplete_filter_and_a_zero_budget_decide_nothing() {
        assert!(IdFilter::new(0).is_none());
        assert!(IdFilter::new(63).is_none());
        let filter = IdFilter::new(4096).unwrap();
        assert!(!filter.certainly_absent("never-inserted"));
        filter.mark_complete();
        assert!(filter.certainly_absent("never-inserted"));
    }

    /// The scan reads every transfer record of its shard across pages, and only those: other
    /// kinds of keys, and other shards' records, are not ids of this shard.
    #[test]
    fn fill_inserts_every_recorded_id_of_its_shard() {
        let store = Memory::default();
        let shard = ShardId(3);
        let mut batch = WriteBatch::default();
        let ids: Vec<String> = (0..ledger_store::KEY_PAGE * 2 + 7)
            .map(|i| format!("x{i}"))
            .collect();
        for id in &ids {
            batch.put(keys::transfer(shard, id), vec![1]);
        }
        batch.put(keys::transfer(ShardId(4), "other-shard"), vec![1]);
        batch.put(keys::hold(shard, "a-hold"), vec![1]);
        batch.put(keys::account(shard, "an-account"), vec![1]);
        store.commit(&batch).unwrap();

        let filter = Arc::new(IdFilter::new(1 << 20).unwrap());
        let read = fill(&store, shard, &Arc::clone(&filter)).unwrap();
        assert_eq!(read, Some(ids.len()));
        assert!(filter.is_complete());
        assert!(ids.iter().all(|id| !filter.certainly_absent(id)));
        for other in ["other-shard", "a-hold", "an-account"] {
            assert!(filter.certainly_absent(other), "{other}");
        }
    }

    #[test]
    fn transfer_ids_are_read_back_from_their_keys() {
        let shard = ShardId(2);
        for id in ["t-1", "", "a\0b", "\0"] {
            assert_eq!(transfer_id(&keys::transfer(shard, id)).as_deref(), Some(id));
        }
        assert_eq!(transfer_id(&keys::transfer(shard, "t-1")[..5]), None);
    }

    #[test]
    fn fill_stops_once_the_term_has_dropped_its_filter() {
        let store = Memory::default();
        let filter = Arc::new(IdFilter::new(4096).unwrap());
        assert_eq!(fill(&store, ShardId(0), &filter).unwrap(), None);
        assert!(!filter.is_complete());
    }
}
