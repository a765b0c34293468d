//! The small key-value interface the namespace logic is written against.
//!
//! Filesystem semantics live once, in `namespace`, over [`KvRead`] plus a
//! [`Txn`] that buffers writes and lets later reads in the same command see
//! them. A backend only has to read keys and make a finished `Txn` durable:
//! the Raft state machine turns it into one RocksDB `WriteBatch`; a table
//! store backend could turn it into conditional writes.

use std::collections::BTreeMap;
use std::ops::Bound;

/// A storage failure underneath the namespace: not a filesystem error but a
/// broken disk or database. The state machine stops on these.
#[derive(Debug, thiserror::Error)]
#[error("metadata storage error: {0}")]
pub struct KvError(pub String);

pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Up to `limit` pairs whose key starts with `prefix` and is strictly
    /// greater than `after` (when given), in key order.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError>;
}

/// Buffered writes over a read view. `None` marks a delete.
pub struct Txn<'a, R: KvRead + ?Sized> {
    base: &'a R,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a, R: KvRead + ?Sized> Txn<'a, R> {
    pub fn new(base: &'a R) -> Self {
        Txn {
            base,
            writes: BTreeMap::new(),
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    pub fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        // Ask the base for enough rows that deletes buffered here cannot
        // starve the result, then merge the buffered writes in key order.
        let overlay: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .writes
            .range::<[u8], _>((after.map_or(Bound::Included(prefix), Bound::Excluded), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect();
        let base = self.base.scan(prefix, after, limit.saturating_add(overlay.len()))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
        for (k, v) in overlay {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    /// The buffered writes, in key order, for the backend to persist.
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }
}

/// An in-memory store: the unit tests' backend.
#[cfg(test)]
#[derive(Default, Debug, Clone)]
pub struct MemKv(pub BTreeMap<Vec<u8>, Vec<u8>>);

#[cfg(test)]
impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.0.get(key).cloned())
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        let start = after.map_or(Bound::Included(prefix), Bound::Excluded);
        Ok(self
            .0
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
impl MemKv {
    pub fn apply(&mut self, writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
        for (k, v) in writes {
            match v {
                Some(v) => self.0.insert(k, v),
                None => self.0.remove(&k),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_reads_its_own_writes_and_merges_scans() {
        let mut kv = MemKv::default();
        for k in ["a1", "a2", "a3", "b1"] {
            kv.0.insert(k.as_bytes().to_vec(), b"v".to_vec());
        }
        let mut t = Txn::new(&kv);
        t.delete(b"a2".to_vec());
        t.put(b"a4".to_vec(), b"w".to_vec());
        assert_eq!(t.get(b"a2").unwrap(), None);
        assert_eq!(t.get(b"a4").unwrap(), Some(b"w".to_vec()));
        let keys: Vec<Vec<u8>> = t.scan(b"a", None, 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"a1".to_vec(), b"a3".to_vec(), b"a4".to_vec()]);
        let keys: Vec<Vec<u8>> = t
            .scan(b"a", Some(b"a1"), 1)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![b"a3".to_vec()]);
    }
}
