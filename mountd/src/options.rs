//! Mount options (`-o a,b=c`), as given on the jfs-mountd command line, by
//! mount(8) to the `mount.jfs` helper, or in an /etc/fstab line.
//!
//! jfs options change what the daemon does; the standard options mount(8)
//! and fstab users pass are accepted and ignored; anything else is an error
//! naming the option (unless `-s`, sloppy, was given).

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MountOpts {
    pub conf: Option<PathBuf>,
    pub allow_other: bool,
    /// Kernel permission checks (always on with `allow_other`, see main.rs).
    pub default_permissions: bool,
    pub read_only: bool,
    pub attr_timeout: Option<Duration>,
    pub entry_timeout: Option<Duration>,
    /// Where the detached daemon writes its log (default: nowhere).
    pub log: Option<PathBuf>,
    /// IP:port for Prometheus metrics (default: mount.metrics-address).
    pub metrics: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionError {
    #[error(
        "unknown mount option {0:?} (jfs understands conf=PATH, allow_other, default_permissions, ro, rw, \
         attr_timeout=SECS, entry_timeout=SECS, log=PATH, metrics=IP:PORT)"
    )]
    Unknown(String),
    #[error("mount option {name}: {problem}")]
    BadValue { name: String, problem: String },
}

/// Standard options that mean nothing to jfs (mount(8), fstab, systemd).
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "_netdev",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "nofail",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "async",
    "silent",
    "loud",
];

/// Prefixes of `key=value` options to ignore.
const IGNORED_PREFIXES: &[&str] = &["x-", "comment=", "fsname=", "subtype=", "helper="];

fn seconds(name: &str, v: &str) -> Result<Duration, OptionError> {
    let bad = |problem: &str| OptionError::BadValue {
        name: name.to_string(),
        problem: problem.to_string(),
    };
    let s: f64 = v
        .parse()
        .map_err(|_| bad(&format!("{v:?} is not a number of seconds")))?;
    if !s.is_finite() || !(0.0..=86_400.0).contains(&s) {
        return Err(bad("must be between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(s))
}

impl MountOpts {
    /// Parses every `-o` argument (each a comma-separated list), in order:
    /// a later option overrides an earlier one. With `sloppy`, unknown
    /// options are skipped instead of refused.
    pub fn parse<S: AsRef<str>>(args: &[S], sloppy: bool) -> Result<MountOpts, OptionError> {
        let mut o = MountOpts::default();
        for arg in args {
            for opt in arg.as_ref().split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (name, value) = match opt.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (opt, None),
                };
                let need = |v: Option<&str>| -> Result<String, OptionError> {
                    match v {
                        Some(v) if !v.is_empty() => Ok(v.to_string()),
                        _ => Err(OptionError::BadValue {
                            name: name.to_string(),
                            problem: "needs a value".into(),
                        }),
                    }
                };
                match (name, value) {
                    ("conf", v) => o.conf = Some(PathBuf::from(need(v)?)),
                    ("log", v) => o.log = Some(PathBuf::from(need(v)?)),
                    ("metrics", v) => {
                        let a = need(v)?;
                        if a.parse::<std::net::SocketAddr>().is_err() {
                            return Err(OptionError::BadValue {
                                name: name.to_string(),
                                problem: format!("{a:?} is not IP:PORT (e.g. metrics=127.0.0.1:9430)"),
                            });
                        }
                        o.metrics = Some(a);
                    }
                    ("allow_other", None) => o.allow_other = true,
                    ("default_permissions", None) => o.default_permissions = true,
                    ("ro", None) => o.read_only = true,
                    ("rw", None) => o.read_only = false,
                    ("attr_timeout", v) => o.attr_timeout = Some(seconds(name, &need(v)?)?),
                    ("entry_timeout", v) => o.entry_timeout = Some(seconds(name, &need(v)?)?),
                    (n, None) if IGNORED.contains(&n) => {}
                    _ if IGNORED_PREFIXES.iter().any(|p| opt.starts_with(p)) => {}
                    _ if sloppy => {}
                    _ => return Err(OptionError::Unknown(opt.to_string())),
                }
            }
        }
        Ok(o)
    }

    /// The options as one `-o` string, to hand to the detached daemon.
    pub fn to_arg(&self) -> String {
        let mut v: Vec<String> = Vec::new();
        if let Some(c) = &self.conf {
            v.push(format!("conf={}", c.display()));
        }
        if let Some(l) = &self.log {
            v.push(format!("log={}", l.display()));
        }
        if let Some(m) = &self.metrics {
            v.push(format!("metrics={m}"));
        }
        if self.allow_other {
            v.push("allow_other".into());
        }
        if self.default_permissions {
            v.push("default_permissions".into());
        }
        v.push(if self.read_only { "ro" } else { "rw" }.into());
        if let Some(t) = self.attr_timeout {
            v.push(format!("attr_timeout={}", t.as_secs_f64()));
        }
        if let Some(t) = self.entry_timeout {
            v.push(format!("entry_timeout={}", t.as_secs_f64()));
        }
        v.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jfs_options() {
        let o = MountOpts::parse(
            &[
                "conf=/tmp/j.toml,allow_other",
                "default_permissions,ro,attr_timeout=2.5,entry_timeout=0",
            ],
            false,
        )
        .unwrap();
        assert_eq!(o.conf, Some(PathBuf::from("/tmp/j.toml")));
        assert!(o.allow_other && o.default_permissions && o.read_only);
        assert_eq!(o.attr_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(o.entry_timeout, Some(Duration::ZERO));
    }

    #[test]
    fn standard_options_are_ignored_and_rw_wins_when_last() {
        let o = MountOpts::parse(
            &["defaults,noauto,_netdev,user,nofail,nosuid,nodev,noexec,noatime,ro,rw"],
            false,
        )
        .unwrap();
        assert!(!o.read_only);
        let o = MountOpts::parse(&["x-systemd.automount,comment=foo"], false).unwrap();
        assert_eq!(o, MountOpts::default());
    }

    #[test]
    fn unknown_and_bad_options_are_named() {
        let e = MountOpts::parse(&["allow_other,frobnicate"], false).unwrap_err();
        assert_eq!(e, OptionError::Unknown("frobnicate".into()));
        assert!(e.to_string().contains("frobnicate"));
        let e = MountOpts::parse(&["attr_timeout=soon"], false).unwrap_err();
        assert!(e.to_string().contains("attr_timeout"), "{e}");
        assert!(MountOpts::parse(&["attr_timeout=-1"], false).is_err());
        assert!(MountOpts::parse(&["conf="], false).is_err());
        assert!(MountOpts::parse(&["conf"], false).is_err());
        // A flag given a value is not the flag.
        assert!(MountOpts::parse(&["ro=1"], false).is_err());
    }

    #[test]
    fn sloppy_skips_unknown() {
        let o = MountOpts::parse(&["frobnicate,ro"], true).unwrap();
        assert!(o.read_only);
    }

    #[test]
    fn round_trips_through_to_arg() {
        let o = MountOpts::parse(&["conf=/a b/c.toml,allow_other,attr_timeout=0.5,log=/tmp/x.log"], false).unwrap();
        let back = MountOpts::parse(&[o.to_arg()], false).unwrap();
        assert_eq!(back, o);
    }
}
