//! What this client knows about the names in directories, so that a lookup
//! of a name that is not there needs no round trip to metad. Every create
//! starts with such a lookup (the kernel asks before it creates), so for a
//! `cp -r`, an untar or a build it is one metadata call in every two.
//!
//! Knowledge comes from a complete listing (every page carrying the same
//! directory ctime, so no change cut through it) or from this client's own
//! mkdir (an empty directory), and it stays exact through this client's own
//! changes: every entry operation's reply carries each changed directory's
//! ctime before and after, and a directory's ctime moves forward on every
//! change to it, so a `before` equal to the ctime known here proves that
//! nobody else changed the directory in between. Any other `before`, or
//! any failed entry operation, drops what is known about that directory.
//!
//! What another mount changes cannot be seen here without asking, so
//! knowledge answers lookups only while it is younger than `ttl` (the
//! mount's entry timeout, 1 s by default): another mount's new name is
//! found at most that long after it was made, the bound the kernel already
//! applies to the names it caches. Knowledge older than that is kept (a
//! later change of ours with a matching `before` renews it) but not used.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jfs_common::rpc;

/// Directories and names held at most; past either, stale knowledge goes
/// first and, if that is not enough, all of it (it is only a shortcut).
const MAX_DIRS: usize = 4096;
const MAX_NAMES: usize = 1 << 20;
/// A listing longer than this is not kept.
const MAX_LISTING: usize = MAX_NAMES / 4;

pub(crate) struct DirCache {
    /// How long knowledge answers lookups, in nanoseconds; 0 = never.
    ttl_ns: AtomicU64,
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    dirs: HashMap<u64, Dir>,
    names: usize,
}

struct Dir {
    /// The directory's ctime (ns) at which `names` is its exact content.
    ctime: i64,
    names: HashSet<Vec<u8>>,
    /// No later than the moment `names` was exact (the request that
    /// learned it had not been sent yet).
    since: Instant,
}

/// One change of ours to a directory's names.
pub(crate) enum Edit<'a> {
    Add(u64, &'a [u8]),
    Remove(u64, &'a [u8]),
}

impl Known {
    fn remove(&mut self, dir: u64) {
        if let Some(d) = self.dirs.remove(&dir) {
            self.names -= d.names.len();
        }
    }

    /// Room for one more directory of `n` names.
    fn make_room(&mut self, n: usize, ttl: Duration) {
        if self.dirs.len() < MAX_DIRS && self.names + n <= MAX_NAMES {
            return;
        }
        let stale: Vec<u64> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.since.elapsed() >= ttl)
            .map(|(&ino, _)| ino)
            .collect();
        for ino in stale {
            self.remove(ino);
        }
        if self.dirs.len() >= MAX_DIRS || self.names + n > MAX_NAMES {
            self.dirs.clear();
            self.names = 0;
        }
    }
}

impl DirCache {
    pub(crate) fn new() -> DirCache {
        DirCache {
            ttl_ns: AtomicU64::new(0),
            known: Mutex::new(Known::default()),
        }
    }

    /// Turns the cache on for `ttl` (zero turns it off and forgets all).
    pub(crate) fn set_ttl(&self, ttl: Duration) {
        self.ttl_ns
            .store(ttl.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        if ttl.is_zero() {
            *self.lock() = Known::default();
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_nanos(self.ttl_ns.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `name` is known not to be in `dir`.
    pub(crate) fn absent(&self, dir: u64, name: &[u8]) -> bool {
        let ttl = self.ttl();
        if ttl.is_zero() {
            return false;
        }
        let k = self.lock();
        k.dirs
            .get(&dir)
            .is_some_and(|d| d.since.elapsed() < ttl && !d.names.contains(name))
    }

    /// A complete listing of `dir` whose every page carried `ctime`; `asked`
    /// is when its first page was requested.
    pub(crate) fn listed<'a>(
        &self,
        dir: u64,
        ctime: i64,
        names: impl ExactSizeIterator<Item = &'a [u8]>,
        asked: Instant,
    ) {
        let ttl = self.ttl();
        if ttl.is_zero() || names.len() > MAX_LISTING {
            return;
        }
        let mut k = self.lock();
        if k.dirs.get(&dir).is_some_and(|d| d.ctime > ctime) {
            return; // a change of ours since then is known already
        }
        k.remove(dir);
        k.make_room(names.len(), ttl);
        let names: HashSet<Vec<u8>> = names.map(|n| n.to_vec()).collect();
        k.names += names.len();
        k.dirs.insert(
            dir,
            Dir {
                ctime,
                names,
                since: asked,
            },
        );
    }

    /// A directory this client just made (empty), with its ctime.
    pub(crate) fn made(&self, dir: u64, ctime: i64, asked: Instant) {
        self.listed(dir, ctime, std::iter::empty(), asked);
    }

    /// Applies one of our entry operations: `stamps` from its reply, `edits`
    /// what it did to the names. A directory whose `before` is not the ctime
    /// known here was changed by someone else too: forgotten.
    pub(crate) fn changed(&self, stamps: &[rpc::DirStamp], edits: &[Edit<'_>], asked: Instant) {
        if self.ttl().is_zero() {
            return;
        }
        let mut k = self.lock();
        for s in stamps {
            let Some(d) = k.dirs.get_mut(&s.ino) else { continue };
            if d.ctime != s.before {
                k.remove(s.ino);
                continue;
            }
            let mut delta: isize = 0;
            for e in edits {
                match *e {
                    Edit::Remove(dir, name) if dir == s.ino => delta -= d.names.remove(name) as isize,
                    Edit::Add(dir, name) if dir == s.ino => delta += d.names.insert(name.to_vec()) as isize,
                    _ => {}
                }
            }
            d.ctime = s.after;
            d.since = d.since.max(asked);
            k.names = k.names.saturating_add_signed(delta);
        }
    }

    /// Drops what is known about `dir` (an entry operation in it failed, or
    /// it was removed).
    pub(crate) fn forget(&self, dir: u64) {
        if self.ttl().is_zero() {
            return;
        }
        self.lock().remove(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, before: i64, after: i64) -> rpc::DirStamp {
        rpc::DirStamp { ino, before, after }
    }

    fn cache() -> DirCache {
        let c = DirCache::new();
        c.set_ttl(Duration::from_secs(60));
        c
    }

    #[test]
    fn off_by_default() {
        let c = DirCache::new();
        c.made(5, 100, Instant::now());
        assert!(!c.absent(5, b"x"));
    }

    #[test]
    fn a_listing_answers_for_names_not_in_it() {
        let c = cache();
        c.listed(5, 100, [b"a".as_slice(), b"b"].into_iter(), Instant::now());
        assert!(c.absent(5, b"x"));
        assert!(!c.absent(5, b"a"), "a listed name is not absent");
        assert!(!c.absent(6, b"x"), "nothing is known about another directory");
    }

    #[test]
    fn our_own_changes_keep_it_exact() {
        let c = cache();
        let t = Instant::now();
        c.made(5, 100, t);
        c.changed(&[stamp(5, 100, 200)], &[Edit::Add(5, b"f")], t);
        assert!(!c.absent(5, b"f"), "a name we created");
        assert!(c.absent(5, b"g"));
        c.changed(&[stamp(5, 200, 300)], &[Edit::Remove(5, b"f")], t);
        assert!(c.absent(5, b"f"), "a name we removed");
        // A rename from 5 to 6, both known.
        c.made(6, 50, t);
        c.changed(&[stamp(5, 300, 400)], &[Edit::Add(5, b"r")], t);
        c.changed(
            &[stamp(5, 400, 500), stamp(6, 50, 60)],
            &[Edit::Remove(5, b"r"), Edit::Add(6, b"s")],
            t,
        );
        assert!(c.absent(5, b"r") && !c.absent(6, b"s") && c.absent(6, b"r"));
        assert_eq!(c.lock().names, 1);
    }

    #[test]
    fn someone_elses_change_in_between_forgets_the_directory() {
        let c = cache();
        let t = Instant::now();
        c.made(5, 100, t);
        // Our create found the directory at 150: another client changed it
        // after 100, so what we knew may miss a name.
        c.changed(&[stamp(5, 150, 200)], &[Edit::Add(5, b"f")], t);
        assert!(!c.absent(5, b"anything"));
        assert!(c.lock().dirs.is_empty());
    }

    #[test]
    fn an_older_listing_does_not_replace_newer_knowledge() {
        let c = cache();
        let t = Instant::now();
        c.made(5, 100, t);
        c.changed(&[stamp(5, 100, 200)], &[Edit::Add(5, b"f")], t);
        // A listing taken before our create (ctime 100) arrives late.
        c.listed(5, 100, std::iter::empty(), t);
        assert!(!c.absent(5, b"f"));
    }

    #[test]
    fn stale_knowledge_answers_nothing_until_renewed() {
        let c = DirCache::new();
        c.set_ttl(Duration::from_millis(20));
        let t = Instant::now();
        c.made(5, 100, t);
        assert!(c.absent(5, b"x"));
        while t.elapsed() < Duration::from_millis(25) {
            std::thread::yield_now();
        }
        assert!(!c.absent(5, b"x"), "older than the ttl");
        // Our next change with a matching `before` renews it.
        c.changed(&[stamp(5, 100, 200)], &[Edit::Add(5, b"f")], Instant::now());
        assert!(c.absent(5, b"x"));
    }

    #[test]
    fn forget_and_turning_off() {
        let c = cache();
        c.made(5, 100, Instant::now());
        c.forget(5);
        assert!(!c.absent(5, b"x"));
        c.made(5, 100, Instant::now());
        c.set_ttl(Duration::ZERO);
        assert!(!c.absent(5, b"x"));
        assert!(c.lock().dirs.is_empty());
    }
}
