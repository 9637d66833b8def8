//! The store conformance suite: every backend must pass all of it. Backends call [`run_all`]
//! from their own tests (the FoundationDB backend runs it when a cluster is available).

use crate::{CommitError, Expect, Store, WriteBatch};

pub fn run_all(store: &dyn Store) {
    put_get_delete(store);
    scan_is_ordered_and_bounded(store);
    preconditions_gate_the_whole_commit(store);
    stale_epoch_is_fenced(store);
    owned_commits_behave_as_lent_ones(store);
    for_each_key_visits_every_key_in_range(store);
}

fn clear(store: &dyn Store, prefix: &[u8]) {
    let end = crate::key::prefix_end(prefix);
    let mut b = WriteBatch::default();
    for (k, _) in store.scan(prefix, &end, usize::MAX).unwrap() {
        b.delete(k);
    }
    store.commit(&b).unwrap();
}

pub fn put_get_delete(store: &dyn Store) {
    clear(store, b"c1/");
    let mut b = WriteBatch::default();
    b.put(b"c1/a".to_vec(), b"1".to_vec());
    b.put(b"c1/b".to_vec(), b"2".to_vec());
    store.commit(&b).unwrap();
    assert_eq!(store.get(b"c1/a").unwrap(), Some(b"1".to_vec()));
    assert_eq!(store.get(b"c1/zz").unwrap(), None);
    let mut b = WriteBatch::default();
    b.delete(b"c1/a".to_vec());
    b.put(b"c1/b".to_vec(), b"3".to_vec());
    store.commit(&b).unwrap();
    assert_eq!(store.get(b"c1/a").unwrap(), None);
    assert_eq!(store.get(b"c1/b").unwrap(), Some(b"3".to_vec()));
}

pub fn scan_is_ordered_and_bounded(store: &dyn Store) {
    clear(store, b"c2/");
    let mut b = WriteBatch::default();
    for i in [5u8, 1, 9, 3] {
        b.put(vec![b'c', b'2', b'/', i], vec![i]);
    }
    b.put(b"c3".to_vec(), b"outside".to_vec());
    store.commit(&b).unwrap();
    let all = store.scan(b"c2/", b"c2/\xff", 100).unwrap();
    let values: Vec<u8> = all.iter().map(|(_, v)| v[0]).collect();
    assert_eq!(values, vec![1, 3, 5, 9]);
    assert_eq!(store.scan(b"c2/", b"c2/\xff", 2).unwrap().len(), 2);
    assert_eq!(
        store
            .scan(&[b'c', b'2', b'/', 4], &[b'c', b'2', b'/', 9], 100)
            .unwrap()
            .len(),
        1
    );
    assert!(store.scan(b"c2/\xff", b"c2/", 100).unwrap().is_empty());
}

pub fn preconditions_gate_the_whole_commit(store: &dyn Store) {
    clear(store, b"c4/");
    let mut b = WriteBatch::default();
    b.expect(b"c4/v".to_vec(), Expect::Absent);
    b.put(b"c4/v".to_vec(), b"\x00\x01body".to_vec());
    store.commit(&b).unwrap();

    // Absent no longer holds: nothing of this batch may be written.
    let mut b = WriteBatch::default();
    b.expect(b"c4/v".to_vec(), Expect::Absent);
    b.put(b"c4/other".to_vec(), b"x".to_vec());
    assert!(matches!(
        store.commit(&b),
        Err(CommitError::Conflict { .. })
    ));
    assert_eq!(store.get(b"c4/other").unwrap(), None);

    let mut b = WriteBatch::default();
    b.expect(b"c4/v".to_vec(), Expect::Prefix(b"\x00\x01".to_vec()));
    b.expect(b"c4/v".to_vec(), Expect::Equals(b"\x00\x01body".to_vec()));
    b.put(b"c4/v".to_vec(), b"\x00\x02body".to_vec());
    store.commit(&b).unwrap();

    let mut b = WriteBatch::default();
    b.expect(b"c4/v".to_vec(), Expect::Prefix(b"\x00\x01".to_vec()));
    b.put(b"c4/v".to_vec(), b"\x00\x03".to_vec());
    assert!(matches!(
        store.commit(&b),
        Err(CommitError::Conflict { .. })
    ));
    assert_eq!(store.get(b"c4/v").unwrap(), Some(b"\x00\x02body".to_vec()));

    let mut b = WriteBatch::default();
    b.expect(b"c4/missing".to_vec(), Expect::Prefix(Vec::new()));
    assert!(matches!(
        store.commit(&b),
        Err(CommitError::Conflict { .. })
    ));
}

/// The fencing pattern the shard leader uses: every commit expects the lease epoch it holds.
/// Once a newer leader bumps the epoch, the old leader's commits are rejected (I5).
pub fn stale_epoch_is_fenced(store: &dyn Store) {
    clear(store, b"c5/");
    let lease = b"c5/lease".to_vec();
    let epoch = |n: u64| n.to_be_bytes().to_vec();
    let mut b = WriteBatch::default();
    b.expect(lease.clone(), Expect::Absent);
    b.put(lease.clone(), epoch(1));
    store.commit(&b).unwrap();

    // The new leader takes over with epoch 2.
    let mut b = WriteBatch::default();
    b.expect(lease.clone(), Expect::Equals(epoch(1)));
    b.put(lease.clone(), epoch(2));
    store.commit(&b).unwrap();

    // The old leader, still believing in epoch 1, tries to commit.
    let mut b = WriteBatch::default();
    b.expect(lease.clone(), Expect::Equals(epoch(1)));
    b.put(b"c5/data".to_vec(), b"stale".to_vec());
    assert!(matches!(
        store.commit(&b),
        Err(CommitError::Conflict { .. })
    ));
    assert_eq!(store.get(b"c5/data").unwrap(), None);

    let mut b = WriteBatch::default();
    b.expect(lease, Expect::Equals(epoch(2)));
    b.put(b"c5/data".to_vec(), b"current".to_vec());
    store.commit(&b).unwrap();
}

/// `commit_owned` (the leader's path) checks and applies exactly as `commit` does.
pub fn owned_commits_behave_as_lent_ones(store: &dyn Store) {
    clear(store, b"c6/");
    let mut b = WriteBatch::default();
    b.expect(b"c6/v".to_vec(), Expect::Absent);
    b.put(b"c6/v".to_vec(), b"\x00\x01one".to_vec());
    b.put(b"c6/gone".to_vec(), b"x".to_vec());
    store.commit_owned(b).unwrap();
    assert_eq!(store.get(b"c6/v").unwrap(), Some(b"\x00\x01one".to_vec()));

    let mut b = WriteBatch::default();
    b.expect(b"c6/v".to_vec(), Expect::Prefix(b"\x00\x02".to_vec()));
    b.put(b"c6/v".to_vec(), b"\x00\x02stale".to_vec());
    assert!(matches!(
        store.commit_owned(b),
        Err(CommitError::Conflict { .. })
    ));
    assert_eq!(store.get(b"c6/v").unwrap(), Some(b"\x00\x01one".to_vec()));

    let mut b = WriteBatch::default();
    b.expect(b"c6/v".to_vec(), Expect::Prefix(b"\x00\x01".to_vec()));
    b.put(b"c6/v".to_vec(), b"\x00\x02two".to_vec());
    b.delete(b"c6/gone".to_vec());
    store.commit_owned(b).unwrap();
    assert_eq!(store.get(b"c6/v").unwrap(), Some(b"\x00\x02two".to_vec()));
    assert_eq!(store.get(b"c6/gone").unwrap(), None);
    assert_eq!(store.scan(b"c6/", b"c6/\xff", 10).unwrap().len(), 1);
}

/// Every key holding a value in the range is visited, nothing outside it; a deleted key may be,
/// and a key may be more than once (the contract allows both); returning `false` stops.
pub fn for_each_key_visits_every_key_in_range(store: &dyn Store) {
    clear(store, b"c9/");
    let mut b = WriteBatch::default();
    for k in ["a", "b", "c", "d", "e"] {
        b.put(format!("c9/{k}").into_bytes(), k.as_bytes().to_vec());
    }
    b.put(b"c9".to_vec(), b"before".to_vec());
    b.put(b"c9/z".to_vec(), b"after".to_vec());
    store.commit(&b).unwrap();
    let mut b = WriteBatch::default();
    b.delete(b"c9/b".to_vec());
    b.put(b"c9/c".to_vec(), b"again".to_vec());
    store.commit(&b).unwrap();

    let mut seen = std::collections::BTreeSet::new();
    store
        .for_each_key(b"c9/a", b"c9/e", &mut |key| {
            seen.insert(key.to_vec());
            true
        })
        .unwrap();
    seen.remove(b"c9/b".as_slice());
    let want: std::collections::BTreeSet<Vec<u8>> = ["c9/a", "c9/c", "c9/d"]
        .iter()
        .map(|k| k.as_bytes().to_vec())
        .collect();
    assert_eq!(seen, want);

    let mut calls = 0;
    store
        .for_each_key(b"c9/", b"c9/\xff", &mut |_| {
            calls += 1;
            false
        })
        .unwrap();
    assert_eq!(calls, 1);
    store
        .for_each_key(b"c9/e", b"c9/a", &mut |key| {
            panic!("empty range visited {key:?}")
        })
        .unwrap();
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_backend_conforms() {
        super::run_all(&crate::Memory::new());
    }
}
