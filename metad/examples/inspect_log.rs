//! Prints the Raft log bounds of a metad database (read-only), for debugging:
//! `inspect_log /var/lib/jfs/metad/node1/db`.
fn main() {
    let path = std::env::args().nth(1).expect("usage: inspect_log DB_DIR");
    let opts = rocksdb::Options::default();
    let db = rocksdb::DB::open_cf_for_read_only(&opts, &path, ["log", "raft", "sm", "sm_meta"], false).expect("open");
    let raft = db.cf_handle("raft").expect("cf");
    for k in ["vote", "committed", "last_purged"] {
        println!("{k}: {:?}", db.get_cf(raft, k).expect("get").map(|v| v.len()));
    }
    let log = db.cf_handle("log").expect("cf");
    let mut it = db.iterator_cf(log, rocksdb::IteratorMode::Start);
    let first = it
        .next()
        .map(|r| r.map(|(k, _)| u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]))));
    let last = db
        .iterator_cf(log, rocksdb::IteratorMode::End)
        .next()
        .map(|r| r.map(|(k, _)| u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]))));
    println!("first log index {first:?}, last {last:?}");
}
