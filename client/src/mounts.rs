//! Reading `/proc/self/mountinfo`: which filesystems are mounted where.
//!
//! Shared by `mount.jfs` (waiting for its daemon's mount to appear) and
//! `jfs local up/down` (is the namespace already mounted, is a mount dead).

use std::path::{Path, PathBuf};

/// One line of mountinfo, the parts jfs needs.
#[derive(Debug, Clone, PartialEq)]
pub struct MountEntry {
    /// `major:minor` of the mount's device (a FUSE connection's bdi name).
    pub device: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the octal escapes the kernel uses for space, tab, newline and backslash.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mount_point options [optional...] - fstype source super_options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 2 {
            continue;
        }
        out.push(MountEntry {
            device: left[2].to_string(),
            mount_point: PathBuf::from(unescape(left[4])),
            fstype: right[0].to_string(),
            source: unescape(right[1]),
        });
    }
    out
}

/// This process's view of the mount table (empty if it cannot be read).
pub fn current() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Mounts stacked on `mp`, oldest first.
pub fn at(mp: &Path) -> Vec<MountEntry> {
    current().into_iter().filter(|m| m.mount_point == mp).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
98 22 0:50 / /tmp/my\\040mnt rw,nosuid,nodev,relatime shared:1 - fuse.jfs default rw,user_id=0,group_id=0
";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mount_point, Path::new("/tmp/my mnt"));
        assert_eq!(m[1].device, "0:50");
        assert_eq!(m[1].fstype, "fuse.jfs");
        assert_eq!(m[1].source, "default");
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
