//! The store conformance suite (`ledger_store::conformance`) against a real FoundationDB
//! cluster: built with the `fdb` feature and run when `FDB_CLUSTER_FILE` names a cluster file.
//! Each run works in a subspace of its own (the cluster name `conformance-<pid>-<time>`).
//!
//! Without the feature (no `libfdb_c` to link against, as on the machines that build this
//! project) the test is compiled as ignored, saying why; with the feature but no cluster file
//! it says that it skipped, and checks nothing.

#[cfg(feature = "fdb")]
#[test]
fn the_conformance_suite_passes_against_foundationdb() {
    use ledger_store_fdb::{FdbOptions, FdbStore, Network, open_database};

    let Some(cluster_file) = std::env::var_os("FDB_CLUSTER_FILE") else {
        eprintln!(
            "SKIPPED: FDB_CLUSTER_FILE is not set, so there is no FoundationDB cluster to run \
             the conformance suite against"
        );
        return;
    };
    let _network = Network::start();
    let name = format!(
        "conformance-{}-{}",
        std::process::id(),
        std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let db = open_database(&FdbOptions {
        cluster_file: cluster_file.into(),
        cluster_name: name.clone(),
        timeout_ms: 5_000,
        retry_limit: 10,
    })
    .expect("open the FoundationDB cluster");
    let store = FdbStore::new(db, &name, 0);
    ledger_store::conformance::run_all(&store);
}

#[cfg(not(feature = "fdb"))]
#[test]
#[ignore = "needs the `fdb` feature (libfdb_c) and FDB_CLUSTER_FILE: cargo test -p ledger-store-fdb --features fdb"]
fn the_conformance_suite_passes_against_foundationdb() {
    unreachable!("compiled only as an ignored test without the fdb feature");
}
