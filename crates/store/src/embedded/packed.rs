//! Packed groups: how the embedded store keeps append-only records (a ledger's entries) in redb
//! as a few large rows instead of one row each.
//!
//! Why: a checkpoint inserting every entry as a row of its own spent most of its time in redb's
//! per-row work (a descent from the root, a shift inside the leaf, splits), and checkpoints
//! were a third of `ledgerd`'s CPU at workload (a) (docs/benchmarks.md). An account's entries
//! are written once, in version order, and read as ranges (statements), so a checkpoint can
//! write each account's new entries as one row: one descent per chunk of up to
//! [`MEMBERS_MAX`] entries.
//!
//! The store packs a key only if its [`GroupOf`] rule says it belongs to a group. The rule's
//! contract, which the caller guarantees:
//!
//! - a member is written once and never overwritten (a delete is refused at commit);
//! - group prefixes are prefix-free (no group's prefix is a prefix of another group's key), so
//!   a group's members are one contiguous range of the key space;
//! - members of a group are normally written in increasing key order. If one is not, nothing
//!   is lost: a chunk that would overlap an existing one is written as plain rows instead.
//!
//! Layout: table `packed`, keyed by a chunk's *last* member's full key; the value is the
//! members in order, each as `u16 LE` suffix length, the suffix (the key after the group
//! prefix), `u32 LE` value length, the value. Chunks never overlap, so the chunk that may hold
//! key `k` is the first row whose key is at least `k`, if that row is in `k`'s group.

use redb::{ReadableTable, TableDefinition};

use crate::{Cause, Error};

pub(crate) const PACKED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("packed");

/// Given a key, the length of its group prefix if the key is a member of a packed group.
pub type GroupOf = fn(&[u8]) -> Option<usize>;

/// The group prefix length of `key` under `rule`, if it is a member of a packed group. A rule
/// that answers a length longer than the key is taken to say "not a member".
pub(crate) fn group(rule: Option<GroupOf>, key: &[u8]) -> Option<usize> {
    rule.and_then(|g| g(key)).filter(|g| *g <= key.len())
}

/// Most members in one chunk: a point read decodes at most this many.
pub const MEMBERS_MAX: usize = 64;
/// Most bytes of members in one chunk (a chunk closes once it holds this much).
pub const CHUNK_BYTES_MAX: usize = 16 << 10;

fn corrupt(row: &[u8], why: &'static str) -> Error {
    Error::Damaged {
        what: format!("packed row {}", String::from_utf8_lossy(row)),
        why,
    }
}

/// A decoded member of a chunk: its key's suffix (after the group prefix) and its value.
type Member<'a> = (&'a [u8], &'a [u8]);

/// The members of one chunk, decoded, in key order.
pub(crate) fn members<'a>(row: &[u8], chunk: &'a [u8]) -> Result<Vec<Member<'a>>, Error> {
    let mut out = Vec::new();
    let mut rest = chunk;
    while !rest.is_empty() {
        let take = |rest: &mut &'a [u8], n: usize| -> Result<&'a [u8], Error> {
            if rest.len() < n {
                return Err(corrupt(row, "truncated member"));
            }
            let (head, tail) = rest.split_at(n);
            *rest = tail;
            Ok(head)
        };
        let suffix_len = u16::from_le_bytes(take(&mut rest, 2)?.try_into().expect("2 bytes"));
        let suffix = take(&mut rest, usize::from(suffix_len))?;
        let value_len = u32::from_le_bytes(take(&mut rest, 4)?.try_into().expect("4 bytes"));
        let value_len =
            usize::try_from(value_len).map_err(|_| corrupt(row, "value length overflows"))?;
        let value = take(&mut rest, value_len)?;
        out.push((suffix, value));
    }
    if out.is_empty() {
        return Err(corrupt(row, "no members"));
    }
    Ok(out)
}

/// The value of `key` (whose group prefix is `group` bytes long) if a chunk holds it.
pub(crate) fn get(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
    group: usize,
) -> Result<Option<Vec<u8>>, Error> {
    let io = |e: redb::StorageError| Error::Io(e.into());
    let Some(row) = table.range(key..).map_err(io)?.next() else {
        return Ok(None);
    };
    let (row_key, chunk) = row.map_err(io)?;
    let (row_key, chunk) = (row_key.value(), chunk.value());
    let (prefix, suffix) = key.split_at(group);
    if !row_key.starts_with(prefix) {
        return Ok(None);
    }
    let members = members(row_key, chunk)?;
    Ok(members
        .binary_search_by(|(s, _)| (*s).cmp(suffix))
        .ok()
        .map(|i| members[i].1.to_vec()))
}

/// Every packed member with a key in `[start, end)`, in key order, as owned pairs.
pub(crate) struct Range<'t> {
    rows: redb::Range<'t, &'static [u8], &'static [u8]>,
    group_of: GroupOf,
    start: Vec<u8>,
    end: Vec<u8>,
    /// Members of the current chunk not yet returned, reversed (next one last).
    pending: Vec<(Vec<u8>, Vec<u8>)>,
    done: bool,
}

impl<'t> Range<'t> {
    pub(crate) fn new(
        table: &'t impl ReadableTable<&'static [u8], &'static [u8]>,
        group_of: GroupOf,
        start: &[u8],
        end: &[u8],
    ) -> Result<Self, Error> {
        // A chunk is keyed by its last member: the first that can reach `start` is the first
        // row at or after it.
        let rows = table
            .range::<&[u8]>(start..)
            .map_err(|e| Error::Io(e.into()))?;
        Ok(Self {
            rows,
            group_of,
            start: start.to_vec(),
            end: end.to_vec(),
            pending: Vec::new(),
            done: false,
        })
    }

    fn next_chunk(&mut self) -> Result<(), Error> {
        let Some(row) = self.rows.next() else {
            self.done = true;
            return Ok(());
        };
        let (row_key, chunk) = row.map_err(|e| Error::Io(e.into()))?;
        let (row_key, chunk) = (row_key.value(), chunk.value());
        let group = group(Some(self.group_of), row_key)
            .ok_or_else(|| corrupt(row_key, "its key is not in a packed group"))?;
        let prefix = &row_key[..group];
        let mut out = Vec::new();
        for (suffix, value) in members(row_key, chunk)? {
            let mut key = Vec::with_capacity(prefix.len() + suffix.len());
            key.extend_from_slice(prefix);
            key.extend_from_slice(suffix);
            if key.as_slice() >= self.end.as_slice() {
                // Chunks are disjoint and ordered: every later member is past the end too.
                self.done = true;
                break;
            }
            if key.as_slice() >= self.start.as_slice() {
                out.push((key, value.to_vec()));
            }
        }
        out.reverse();
        self.pending = out;
        Ok(())
    }
}

impl Iterator for Range<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(pair) = self.pending.pop() {
                return Some(Ok(pair));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.next_chunk() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

/// Collects a checkpoint's members group by group and writes them as chunks.
pub(crate) struct Packer {
    /// The open chunk's group prefix.
    prefix: Vec<u8>,
    /// The open chunk's first and last member keys.
    first: Vec<u8>,
    last: Vec<u8>,
    members: usize,
    chunk: Vec<u8>,
}

impl Packer {
    pub(crate) fn new() -> Self {
        Self {
            prefix: Vec::new(),
            first: Vec::new(),
            last: Vec::new(),
            members: 0,
            chunk: Vec::new(),
        }
    }

    /// Adds a member (keys arrive in order); closes the open chunk first if `key` is in another
    /// group or the chunk is full.
    pub(crate) fn push(
        &mut self,
        packed: &mut redb::Table<&'static [u8], &'static [u8]>,
        kv: &mut redb::Table<&'static [u8], &'static [u8]>,
        key: &[u8],
        group: usize,
        value: &[u8],
    ) -> Result<(), Cause> {
        let (prefix, suffix) = key.split_at(group);
        let suffix_len = u16::try_from(suffix.len())
            .map_err(|_| format!("a packed key's suffix is {} bytes", suffix.len()))?;
        let value_len = u32::try_from(value.len())
            .map_err(|_| format!("a packed value is {} bytes", value.len()))?;
        if self.members > 0
            && (self.prefix != prefix
                || self.members >= MEMBERS_MAX
                || self.chunk.len() >= CHUNK_BYTES_MAX)
        {
            self.flush(packed, kv)?;
        }
        if self.members == 0 {
            self.prefix.clear();
            self.prefix.extend_from_slice(prefix);
            self.first.clear();
            self.first.extend_from_slice(key);
        }
        self.last.clear();
        self.last.extend_from_slice(key);
        self.chunk.extend_from_slice(&suffix_len.to_le_bytes());
        self.chunk.extend_from_slice(suffix);
        self.chunk.extend_from_slice(&value_len.to_le_bytes());
        self.chunk.extend_from_slice(value);
        self.members += 1;
        Ok(())
    }

    /// Writes the open chunk. If the group already has a chunk at or after its first member
    /// (members written out of order), the chunk would overlap it: its members become plain
    /// rows instead, which reads also consult.
    pub(crate) fn flush(
        &mut self,
        packed: &mut redb::Table<&'static [u8], &'static [u8]>,
        kv: &mut redb::Table<&'static [u8], &'static [u8]>,
    ) -> Result<(), Cause> {
        if self.members == 0 {
            return Ok(());
        }
        let overlaps = match packed.range::<&[u8]>(self.first.as_slice()..)?.next() {
            Some(row) => row?.0.value().starts_with(&self.prefix),
            None => false,
        };
        if overlaps {
            let mut key = Vec::new();
            for (suffix, value) in members(&self.last, &self.chunk)? {
                key.clear();
                key.extend_from_slice(&self.prefix);
                key.extend_from_slice(suffix);
                kv.insert(key.as_slice(), value)?;
            }
        } else {
            packed.insert(self.last.as_slice(), self.chunk.as_slice())?;
        }
        self.members = 0;
        self.chunk.clear();
        Ok(())
    }
}
