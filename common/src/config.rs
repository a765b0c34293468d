//! `/etc/jfs/jfs.toml`: one file read by every jfs process.
//!
//! Keys follow the seed systems' dotted names (`namespace.backend.type`,
//! `jfs.namespace.server.rpc-address`, ...). TOML nests them; we flatten the
//! document back to dotted keys and check each against the table in
//! [`KEYS`], so an unknown key or a bad value stops start-up with the key's
//! name and what is wrong with it. Settings that differ per node (node id,
//! data directory, listen address) are command-line flags of each daemon.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/jfs/jfs.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {problem}")]
    BadValue { key: String, problem: String },
    #[error("unknown config key `{0}` (check the spelling; `man jfs.toml` lists every key)")]
    UnknownKey(String),
}

/// One member of the metad quorum as written in `initial-conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaPeer {
    /// Raft node id: the position in `initial-conf`, from 1.
    pub id: u64,
    /// host:port of its Raft service.
    pub raft_addr: String,
    /// host:port of its client service.
    pub rpc_addr: String,
}

/// Largest config file accepted.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub peers: Vec<MetaPeer>,
    pub rpc_addresses: Vec<String>,
    pub metad_data_dir: PathBuf,
    pub raft_heartbeat: Duration,
    pub raft_election_timeout: Duration,
    pub raft_snapshot_every: u64,
    pub block_size: u64,
    pub replication: u32,
    pub blockd_data_dir: PathBuf,
    pub blockd_heartbeat: Duration,
    pub blockd_dead_after: Duration,
    /// How long a block nothing refers to is kept before blockds delete it.
    pub block_gc_grace: Duration,
    /// How often the metad leader asks each blockd for a full block report.
    pub block_report_interval: Duration,
    /// Bytes per second the blockd scrubber reads to verify checksums (0 = off).
    pub scrub_rate: u64,
    /// Pause between two full scrub passes.
    pub scrub_interval: Duration,
    /// Blocks one blockd copies from others at a time when healing.
    pub replication_inflight: u32,
    pub client_timeout: Duration,
    /// A client silent this long loses its metadata session (replies kept
    /// for its retries, files it kept open after unlink, its locks).
    pub session_timeout: Duration,
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
    /// Ship every committed change to the table store (DESIGN §7).
    pub mirror_enabled: bool,
    /// Start as a recovery cluster: restore from the table store, read-only.
    pub recovery_mode: bool,
    pub dynamodb: DynamoConfig,
    /// host:port where each kind of daemon serves Prometheus metrics
    /// (`""` = off); `--metrics-listen` overrides it per process.
    pub metad_metrics_address: String,
    pub blockd_metrics_address: String,
    pub mount_metrics_address: String,
    /// Mutual TLS on every connection (`security.tls.enabled`).
    pub tls_enabled: bool,
    /// `ca.crt` and `<role>.crt`/`<role>.key` (`security.tls.dir`).
    pub tls_dir: PathBuf,
}

/// Where the table-store mirror writes, and as whom.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamoConfig {
    /// `http://host:port` of a DynamoDB-compatible server; `None` = AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub table_prefix: String,
    /// Static credentials; `None` = the standard AWS chain (environment,
    /// profile, instance role).
    pub access_key: Option<String>,
    pub access_secret: Option<Secret>,
    /// Applied-but-unshipped entries kept on each metad (the mirror's
    /// backlog); past it the mirror exports the whole namespace again.
    pub max_backlog_entries: u64,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            endpoint: None,
            region: "us-east-1".into(),
            table_prefix: "jfs_".into(),
            access_key: None,
            access_secret: None,
            max_backlog_entries: 1_000_000,
        }
    }
}

/// A credential: kept out of `Debug` output, and so out of every log line
/// and error message that formats a config.
#[derive(Clone, PartialEq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            peers: Vec::new(),
            rpc_addresses: Vec::new(),
            metad_data_dir: PathBuf::from("/var/lib/jfs/metad"),
            // Tuned with the election timeout for a failover under a second
            // (see docs/DECISIONS.md, "Failover timing").
            raft_heartbeat: Duration::from_millis(100),
            raft_election_timeout: Duration::from_millis(600),
            raft_snapshot_every: 20_000,
            block_size: 4 << 20,
            replication: 3,
            blockd_data_dir: PathBuf::from("/var/lib/jfs/blockd"),
            blockd_heartbeat: Duration::from_millis(1000),
            blockd_dead_after: Duration::from_millis(10_000),
            // As Garage: long enough for any reader holding an old chunk map.
            block_gc_grace: Duration::from_secs(600),
            block_report_interval: Duration::from_secs(3600),
            // Garage-like: a slow background pass that never competes with clients.
            scrub_rate: 16 << 20,
            scrub_interval: Duration::from_secs(7 * 24 * 3600),
            replication_inflight: 8,
            client_timeout: Duration::from_secs(60),
            session_timeout: Duration::from_secs(60),
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            mirror_enabled: false,
            recovery_mode: false,
            dynamodb: DynamoConfig::default(),
            // One metad and one blockd per host in a real deployment; a
            // mount per host is not, so mounts export only when asked.
            metad_metrics_address: "0.0.0.0:9410".into(),
            blockd_metrics_address: "0.0.0.0:9420".into(),
            mount_metrics_address: String::new(),
            tls_enabled: false,
            tls_dir: PathBuf::from("/etc/jfs/tls"),
        }
    }
}

type Setter = fn(&mut Config, &toml::Value) -> Result<(), String>;

/// Every key jfs understands, with the code that checks and stores it.
const KEYS: &[(&str, Setter)] = &[
    ("namespace.backend.type", |_, v| match as_str(v)? {
        "raft" => Ok(()),
        "rocksdb" | "dynamodb" => Err("this build supports only \"raft\"".into()),
        other => Err(format!("expected \"raft\", \"rocksdb\" or \"dynamodb\", got {other:?}")),
    }),
    ("namespace.backend.raft.initial-conf", |c, v| {
        c.peers = parse_initial_conf(as_str(v)?)?;
        Ok(())
    }),
    ("namespace.backend.raft.heartbeat-interval-ms", |c, v| {
        c.raft_heartbeat = as_ms(v, 10, 10_000)?;
        Ok(())
    }),
    ("namespace.backend.raft.election-timeout-ms", |c, v| {
        c.raft_election_timeout = as_ms(v, 50, 60_000)?;
        Ok(())
    }),
    ("namespace.backend.raft.snapshot-interval", |c, v| {
        c.raft_snapshot_every = as_int(v, 100, u64::MAX)?;
        Ok(())
    }),
    ("jfs.namespace.server.rpc-address", |c, v| {
        c.rpc_addresses = parse_addr_list(as_str(v)?)?;
        Ok(())
    }),
    ("namespace.data-dir", |c, v| {
        c.metad_data_dir = PathBuf::from(as_str(v)?);
        Ok(())
    }),
    ("namespace.block-size", |c, v| {
        let n = as_int(v, 64 << 10, 64 << 20)?;
        if n % (64 << 10) != 0 {
            return Err("must be a multiple of 65536 (the checksum chunk size)".into());
        }
        c.block_size = n;
        Ok(())
    }),
    ("namespace.replication", |c, v| {
        c.replication = as_int(v, 1, 16)? as u32;
        Ok(())
    }),
    ("blockd.data-dir", |c, v| {
        c.blockd_data_dir = PathBuf::from(as_str(v)?);
        Ok(())
    }),
    ("blockd.heartbeat-interval-ms", |c, v| {
        c.blockd_heartbeat = as_ms(v, 50, 60_000)?;
        Ok(())
    }),
    ("blockd.dead-interval-ms", |c, v| {
        c.blockd_dead_after = as_ms(v, 500, 3_600_000)?;
        Ok(())
    }),
    ("blockd.gc-grace-ms", |c, v| {
        c.block_gc_grace = as_ms(v, 0, 7 * 24 * 3_600_000)?;
        Ok(())
    }),
    ("blockd.block-report-interval-ms", |c, v| {
        c.block_report_interval = as_ms(v, 1_000, 7 * 24 * 3_600_000)?;
        Ok(())
    }),
    ("blockd.scrub-rate-mib", |c, v| {
        c.scrub_rate = as_int(v, 0, 100_000)? << 20;
        Ok(())
    }),
    ("blockd.scrub-interval-ms", |c, v| {
        c.scrub_interval = as_ms(v, 0, 365 * 24 * 3_600_000)?;
        Ok(())
    }),
    ("blockd.replication-max-inflight", |c, v| {
        c.replication_inflight = as_int(v, 1, 64)? as u32;
        Ok(())
    }),
    ("client.session-timeout-ms", |c, v| {
        c.session_timeout = as_ms(v, 1000, 24 * 3_600_000)?;
        Ok(())
    }),
    ("client.timeout-ms", |c, v| {
        c.client_timeout = as_ms(v, 100, 3_600_000)?;
        Ok(())
    }),
    ("mount.attr-timeout-ms", |c, v| {
        c.attr_timeout = as_ms(v, 0, 3_600_000)?;
        Ok(())
    }),
    ("mount.entry-timeout-ms", |c, v| {
        c.entry_timeout = as_ms(v, 0, 3_600_000)?;
        Ok(())
    }),
    ("namespace.backend.raft.async.dynamodb.enabled", |c, v| {
        c.mirror_enabled = as_bool(v)?;
        Ok(())
    }),
    ("namespace.backend.raft.recovery.mode", |c, v| {
        c.recovery_mode = as_bool(v)?;
        Ok(())
    }),
    ("namespace.dynamodb.endpoint", |c, v| {
        let e = as_str(v)?;
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(format!("{e:?} is not an http:// or https:// URL"));
        }
        c.dynamodb.endpoint = Some(e.to_string());
        Ok(())
    }),
    ("namespace.dynamodb.region", |c, v| {
        let r = as_str(v)?;
        if r.is_empty() {
            return Err("must not be empty (e.g. \"us-east-1\")".into());
        }
        c.dynamodb.region = r.to_string();
        Ok(())
    }),
    ("namespace.dynamodb.table-prefix", |c, v| {
        let p = as_str(v)?;
        // DynamoDB table names: 3-255 of [a-zA-Z0-9_.-]; the namespace name
        // (up to 64) and ".meta" follow the prefix.
        if p.len() > 180 || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
            return Err(format!(
                "{p:?}: use up to 180 characters from a-z, A-Z, 0-9, '_', '.' and '-'"
            ));
        }
        c.dynamodb.table_prefix = p.to_string();
        Ok(())
    }),
    ("namespace.dynamodb.access-key", |c, v| {
        c.dynamodb.access_key = Some(as_str(v)?.to_string());
        Ok(())
    }),
    ("namespace.dynamodb.access-secret", |c, v| {
        c.dynamodb.access_secret = Some(Secret(as_str(v)?.to_string()));
        Ok(())
    }),
    ("namespace.dynamodb.max-backlog-entries", |c, v| {
        c.dynamodb.max_backlog_entries = as_int(v, 1000, 1 << 40)?;
        Ok(())
    }),
    ("metad.metrics-address", |c, v| {
        c.metad_metrics_address = as_metrics_addr(v)?;
        Ok(())
    }),
    ("blockd.metrics-address", |c, v| {
        c.blockd_metrics_address = as_metrics_addr(v)?;
        Ok(())
    }),
    ("mount.metrics-address", |c, v| {
        c.mount_metrics_address = as_metrics_addr(v)?;
        Ok(())
    }),
    ("security.tls.enabled", |c, v| {
        c.tls_enabled = as_bool(v)?;
        Ok(())
    }),
    ("security.tls.dir", |c, v| {
        let d = as_str(v)?;
        if d.is_empty() {
            return Err("must be a directory holding ca.crt and <role>.crt/<role>.key".into());
        }
        c.tls_dir = PathBuf::from(d);
        Ok(())
    }),
];

/// An IP:port to listen on, or `""` for off.
fn as_metrics_addr(v: &toml::Value) -> Result<String, String> {
    let a = as_str(v)?;
    if !a.is_empty() && a.parse::<std::net::SocketAddr>().is_err() {
        return Err(format!(
            "{a:?} is not IP:port (e.g. \"0.0.0.0:9410\"), or \"\" to turn metrics off"
        ));
    }
    Ok(a.to_string())
}

/// The dotted name of every key the config file accepts, in [`KEYS`] order
/// (the man page test compares them with jfs.toml(5)).
pub fn known_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|(k, _)| *k)
}

fn as_bool(v: &toml::Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("expected true or false, got {}", v.type_str()))
}

fn as_str(v: &toml::Value) -> Result<&str, String> {
    v.as_str()
        .ok_or_else(|| format!("expected a string, got {}", v.type_str()))
}

fn as_int(v: &toml::Value, min: u64, max: u64) -> Result<u64, String> {
    let n = v
        .as_integer()
        .ok_or_else(|| format!("expected an integer, got {}", v.type_str()))?;
    if n < 0 || (n as u64) < min || (n as u64) > max {
        return Err(format!("{n} is out of range {min}..={max}"));
    }
    Ok(n as u64)
}

fn as_ms(v: &toml::Value, min: u64, max: u64) -> Result<Duration, String> {
    as_int(v, min, max).map(Duration::from_millis)
}

fn check_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{s:?} has a bad port {port:?}"))?;
    Ok(())
}

fn parse_addr_list(s: &str) -> Result<Vec<String>, String> {
    let out: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    if out.is_empty() {
        return Err("expected a comma-separated list of host:port".into());
    }
    for a in &out {
        check_host_port(a)?;
    }
    Ok(out)
}

/// `host:port:flag,...` as JindoFS writes it; the trailing flag is accepted
/// for compatibility and must be 0 (a voter).
fn parse_initial_conf(s: &str) -> Result<Vec<MetaPeer>, String> {
    let mut peers = Vec::new();
    for (i, item) in s.split(',').map(str::trim).filter(|x| !x.is_empty()).enumerate() {
        let parts: Vec<&str> = item.split(':').collect();
        let (host, port) = match parts.as_slice() {
            [h, p] | [h, p, "0"] => (*h, *p),
            [_, _, flag] => return Err(format!("{item:?}: unsupported member flag {flag:?} (only 0)")),
            _ => return Err(format!("{item:?} is not host:port:0")),
        };
        let raft_addr = format!("{host}:{port}");
        check_host_port(&raft_addr)?;
        peers.push(MetaPeer {
            id: i as u64 + 1,
            raft_addr,
            rpc_addr: String::new(),
        });
    }
    if peers.is_empty() {
        return Err("expected at least one host:port:0".into());
    }
    Ok(peers)
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            // A table that is itself a known key's value does not exist in
            // our schema, so every table is a namespace of keys.
            toml::Value::Table(t) => flatten(&key, t, out),
            other => {
                out.insert(key, other.clone());
            }
        }
    }
}

impl Config {
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut flat = BTreeMap::new();
        flatten("", &table, &mut flat);
        let mut cfg = Config::default();
        for (key, value) in &flat {
            let setter = KEYS
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, s)| s)
                .ok_or_else(|| ConfigError::UnknownKey(key.clone()))?;
            setter(&mut cfg, value).map_err(|problem| ConfigError::BadValue {
                key: key.clone(),
                problem,
            })?;
        }
        if cfg.dynamodb.access_key.is_some() != cfg.dynamodb.access_secret.is_some() {
            return Err(ConfigError::BadValue {
                key: "namespace.dynamodb.access-key".into(),
                problem: "set both access-key and access-secret, or neither (to use the standard AWS credential chain)"
                    .into(),
            });
        }
        cfg.link_addresses()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read as _;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        // A config is a few kilobytes; reading at most a bound keeps a
        // wrong path (a device, a huge file) from exhausting memory.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(read_err)?
            .take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::Syntax {
                path: path.to_path_buf(),
                message: format!("larger than {MAX_CONFIG_BYTES} bytes; is this the right file?"),
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        })?;
        Config::from_toml_str(&text, path)
    }

    /// Pairs the i-th Raft address with the i-th client address.
    fn link_addresses(&mut self) -> Result<(), ConfigError> {
        if self.peers.is_empty() {
            return Ok(());
        }
        if self.rpc_addresses.len() != self.peers.len() {
            return Err(ConfigError::BadValue {
                key: "jfs.namespace.server.rpc-address".into(),
                problem: format!(
                    "lists {} addresses but namespace.backend.raft.initial-conf lists {} nodes; list one client address per node, in the same order",
                    self.rpc_addresses.len(),
                    self.peers.len()
                ),
            });
        }
        if self.raft_election_timeout <= self.raft_heartbeat * 2 {
            return Err(ConfigError::BadValue {
                key: "namespace.backend.raft.election-timeout-ms".into(),
                problem: "must be more than twice namespace.backend.raft.heartbeat-interval-ms".into(),
            });
        }
        for (p, a) in self.peers.iter_mut().zip(&self.rpc_addresses) {
            p.rpc_addr = a.clone();
        }
        Ok(())
    }

    pub fn peer(&self, id: u64) -> Option<&MetaPeer> {
        self.peers.iter().find(|p| p.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(s, Path::new("test.toml"))
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
namespace.backend.type = "raft"
namespace.backend.raft.initial-conf = "h1:8103:0,h2:8103:0,h3:8103:0"
jfs.namespace.server.rpc-address = "h1:8101,h2:8101,h3:8101"
namespace.block-size = 1048576
"#,
        )
        .unwrap();
        assert_eq!(c.peers.len(), 3);
        assert_eq!(
            c.peers[1],
            MetaPeer {
                id: 2,
                raft_addr: "h2:8103".into(),
                rpc_addr: "h2:8101".into()
            }
        );
        assert_eq!(c.block_size, 1 << 20);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("namespace.blok-size = 4\n").unwrap_err();
        assert!(e.to_string().contains("namespace.blok-size"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse("namespace.block-size = \"big\"\n").unwrap_err();
        assert!(e.to_string().contains("namespace.block-size"), "{e}");
        let e = parse("namespace.block-size = 100000\n").unwrap_err();
        assert!(e.to_string().contains("65536"), "{e}");
        let e = parse("namespace.backend.raft.initial-conf = \"h1\"\n").unwrap_err();
        assert!(e.to_string().contains("initial-conf"), "{e}");
        let e = parse(
            "namespace.backend.raft.initial-conf = \"a:1:0,b:2:0\"\njfs.namespace.server.rpc-address = \"a:3\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("rpc-address"), "{e}");
    }

    #[test]
    fn mirror_keys_parse_and_the_secret_stays_hidden() {
        let c = parse(
            r#"
namespace.backend.raft.async.dynamodb.enabled = true
namespace.dynamodb.endpoint = "http://127.0.0.1:8000"
namespace.dynamodb.region = "eu-west-1"
namespace.dynamodb.table-prefix = "prod_"
namespace.dynamodb.access-key = "AKIDEXAMPLE"
namespace.dynamodb.access-secret = "wJalrXUtnFEMI"
"#,
        )
        .unwrap();
        assert!(c.mirror_enabled && !c.recovery_mode);
        assert_eq!(c.dynamodb.endpoint.as_deref(), Some("http://127.0.0.1:8000"));
        assert_eq!(c.dynamodb.table_prefix, "prod_");
        assert!(!format!("{c:?}").contains("wJalrXUtnFEMI"));
        let e = parse("namespace.dynamodb.access-key = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("access-secret"), "{e}");
        let e = parse("namespace.dynamodb.table-prefix = \"a b\"\n").unwrap_err();
        assert!(e.to_string().contains("table-prefix"), "{e}");
        let e = parse("namespace.backend.raft.recovery.mode = 1\n").unwrap_err();
        assert!(e.to_string().contains("true or false"), "{e}");
    }

    #[test]
    fn corrupt_toml_is_a_syntax_error() {
        assert!(matches!(
            parse("namespace.block-size = = 3"),
            Err(ConfigError::Syntax { .. })
        ));
    }
}
