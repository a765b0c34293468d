//! Every daemon's Prometheus endpoint, read the way Prometheus reads it: an
//! HTTP GET of /metrics (with curl), whose text must parse and carry the
//! series an operator's dashboards and alerts name. And the numbers move:
//! a create on the mount is counted on the leader.

use jfs_tests::*;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// `curl` of one endpoint, once (no retry: a scrape that fails is a failure).
fn scrape(addr: &str) -> String {
    let out = run_cmd(
        Command::new("curl").args(["-sS", "--fail", "--max-time", "10", &format!("http://{addr}/metrics")]),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("curl http://{addr}/metrics: {e}"));
    assert!(out.success(), "curl http://{addr}/metrics failed: {}", out.describe());
    out.stdout
}

/// Parses the text exposition format strictly enough to catch a broken
/// exporter: every line a comment (`# HELP`/`# TYPE` with a valid name) or
/// `name{label="value",...} number`. Returns (series with labels, value).
fn parse(addr: &str, text: &str) -> Vec<(String, f64)> {
    let valid_name = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.split_whitespace();
            let kind = w.next().unwrap_or("");
            let name = w.next().unwrap_or("");
            assert!(
                (kind == "HELP" || kind == "TYPE") && valid_name(name),
                "{addr}: bad comment line {line:?}"
            );
            if kind == "TYPE" {
                let t = w.next().unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "{addr}: bad type in {line:?}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("{addr}: sample line without a value: {line:?}"));
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("{addr}: bad value in {line:?}")),
        };
        let name = series.split('{').next().unwrap_or("");
        assert!(valid_name(name), "{addr}: bad metric name in {line:?}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}') && labels.matches('"').count() % 2 == 0,
                    "{addr}: bad labels in {line:?}"
                );
            }
        }
        out.push((series.to_string(), v));
    }
    assert!(!out.is_empty(), "{addr}: no samples in\n{text}");
    out
}

/// Sum of the samples of `name` whose labels contain every `key="value"` in `labels`.
fn total(samples: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| (s == name || s.starts_with(&format!("{name}{{"))) && labels.iter().all(|l| s.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

fn assert_has(addr: &str, samples: &[(String, f64)], names: &[&str]) {
    let have: BTreeMap<&str, ()> = samples
        .iter()
        .map(|(s, _)| (s.split('{').next().unwrap_or(""), ()))
        .collect();
    let missing: Vec<&&str> = names.iter().filter(|n| !have.contains_key(**n)).collect();
    assert!(
        missing.is_empty(),
        "{addr}: missing {missing:?}; it has {:?}",
        have.keys().collect::<Vec<_>>()
    );
}

fn metad_metrics(c: &Cluster, i: usize) -> String {
    format!("{}:{}", c.ip, 8102 + 10 * (i - 1))
}

#[test]
fn every_daemon_serves_prometheus_text_and_metastatus_reads_it() {
    let c = Cluster::start();
    // Traffic for every kind of series: writes and reads through the mount.
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(c.path("a"), &data).expect("write a");
    assert_eq!(std::fs::read(c.path("a")).expect("read a"), data);
    std::fs::create_dir(c.path("d")).expect("mkdir d");

    let mut raft_served = 0.0;
    for i in 1..=3 {
        let addr = metad_metrics(&c, i);
        let s = parse(&addr, &scrape(&addr));
        assert_has(
            &addr,
            &s,
            &[
                "jfs_raft_term",
                "jfs_raft_is_leader",
                "jfs_raft_last_log_index",
                "jfs_raft_commit_index",
                "jfs_raft_applied_index",
                "jfs_raft_snapshot_index",
                "jfs_raft_log_bytes",
                "jfs_raft_snapshot_bytes",
                "jfs_metad_namespace_bytes",
                "jfs_rpc_requests_total",
                "jfs_rpc_request_duration_seconds_bucket",
                "jfs_rpc_request_duration_seconds_sum",
                "jfs_rpc_request_duration_seconds_count",
            ],
        );
        assert!(total(&s, "jfs_raft_term", &[]) >= 1.0, "{addr}: term 0");
        assert!(total(&s, "jfs_raft_log_bytes", &[]) > 0.0, "{addr}: empty Raft log");
        // The leader serves the mount's calls, followers the leader's Raft
        // messages: every node has served something.
        assert!(
            total(&s, "jfs_rpc_requests_total", &[]) > 0.0,
            "{addr}: no RPCs counted"
        );
        raft_served += total(&s, "jfs_rpc_requests_total", &["service=\"raft\""]);
    }
    assert!(raft_served > 0.0, "no Raft RPCs counted on any metad");
    for j in 1..=3 {
        let addr = format!("{}:{}", c.ip, 8202 + 10 * (j - 1));
        let s = parse(&addr, &scrape(&addr));
        assert_has(
            &addr,
            &s,
            &[
                "jfs_blockd_capacity_bytes",
                "jfs_blockd_free_bytes",
                "jfs_blockd_used_bytes",
                "jfs_blockd_blocks",
                "jfs_blockd_blocks_written_total",
                "jfs_blockd_disk_written_bytes_total",
                "jfs_blockd_block_reads_total",
                "jfs_blockd_disk_read_bytes_total",
                "jfs_blockd_checksum_failures_total",
                "jfs_blockd_blocks_deleted_total",
                "jfs_rpc_requests_total",
            ],
        );
        // Replication 3: every blockd holds a copy of the file's blocks.
        assert!(
            total(&s, "jfs_blockd_blocks_written_total", &[]) >= 1.0,
            "{addr}: no block written"
        );
        assert_eq!(total(&s, "jfs_blockd_checksum_failures_total", &[]), 0.0, "{addr}");
        assert!(
            total(&s, "jfs_rpc_requests_total", &["method=\"WriteBlock\""]) >= 1.0,
            "{addr}: WriteBlock not counted"
        );
    }
    let addr = format!("{}:8401", c.ip);
    let s = parse(&addr, &scrape(&addr));
    assert_has(
        &addr,
        &s,
        &[
            "jfs_fuse_requests_total",
            "jfs_fuse_request_duration_seconds_bucket",
            "jfs_fuse_requests_in_flight",
            "jfs_client_block_cache_hits_total",
            "jfs_client_block_cache_misses_total",
            "jfs_client_meta_calls_in_flight",
        ],
    );
    assert!(
        total(&s, "jfs_fuse_requests_total", &["op=\"write\""]) >= 1.0,
        "{addr}: no write counted"
    );
    assert!(
        total(&s, "jfs_fuse_requests_total", &["op=\"mkdir\""]) >= 1.0,
        "{addr}: no mkdir counted"
    );

    // `jfs metastatus --metrics` finds the endpoints through the nodes.
    let conf = c.conf().to_string_lossy().into_owned();
    let out = c.jfs(&["--conf", &conf, "metastatus", "--metrics"]);
    assert!(out.success(), "metastatus --metrics: {}", out.describe());
    assert!(
        !out.stderr.contains("metrics:"),
        "a node's metrics could not be read:\n{}",
        out.describe()
    );
    let table: Vec<&str> = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("NODE  METRICS ADDRESS"))
        .collect();
    assert_eq!(table.len(), 4, "expected a header and 3 rows:\n{}", out.stdout);
    for i in 1..=3 {
        let row = table
            .iter()
            .find(|l| l.split_whitespace().next() == Some(&i.to_string()))
            .unwrap_or_else(|| panic!("no metrics row for node {i}:\n{}", out.stdout));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], metad_metrics(&c, i), "{row}");
        assert!(cells[2].parse::<u64>().is_ok(), "requests not a number: {row}");
    }
}

#[test]
fn a_create_on_the_mount_moves_the_leaders_mknod_counter() {
    let c = Cluster::start();
    let leader = wait_until("a metad leader", Duration::from_secs(30), || {
        c.leader_index().ok_or_else(|| "no leader yet".to_string())
    });
    let addr = metad_metrics(&c, leader);
    let mknod = |text: &str| {
        total(
            &parse(&addr, text),
            "jfs_rpc_requests_total",
            &["method=\"Mknod\"", "code=\"ok\""],
        )
    };
    let before = mknod(&scrape(&addr));
    std::fs::File::create(c.path("new-file")).expect("create new-file");
    // The count is taken when the reply is sent, before the syscall returns:
    // no waiting needed, but allow for leadership moving meanwhile.
    let after = mknod(&scrape(&addr));
    assert_eq!(
        c.leader_index(),
        Some(leader),
        "leadership moved during the test; the counter was read on the old leader"
    );
    // At least one: a client retry of the same create (exactly-once) counts again.
    assert!(
        after >= before + 1.0,
        "a create did not move the Mknod counter on the leader ({addr}): {before} → {after}"
    );
}

/// What a small file costs the metadata cluster: its create and one commit
/// of its data. Block ids come from a pool the client leases in batches,
/// so there is no allocation call per file, and nothing else is proposed
/// for it. Counted twice: metad's per-method RPC counters, and the
/// leader's Raft log (log entries, the unit of replication and fsync).
#[test]
fn a_small_file_costs_its_create_and_one_data_commit() {
    const FILES: u64 = 64;
    let c = Cluster::start();
    let leader = wait_until("a metad leader", Duration::from_secs(30), || {
        c.leader_index().ok_or_else(|| "no leader yet".to_string())
    });
    // The mount's session, block-id pool and connections exist already.
    write_file(&c.path("warm-up"), &pattern(4096, 0));
    let calls = |method: &str| -> f64 {
        (1..=3)
            .map(|i| {
                let addr = metad_metrics(&c, i);
                total(
                    &parse(&addr, &scrape(&addr)),
                    "jfs_rpc_requests_total",
                    &[&format!("method=\"{method}\""), "code=\"ok\""],
                )
            })
            .sum()
    };
    let addr = metad_metrics(&c, leader);
    let last_index = || total(&parse(&addr, &scrape(&addr)), "jfs_raft_last_log_index", &[]);
    let methods = ["Mknod", "CommitSlices", "AllocateBlocks", "SetAttr", "Lookup"];
    std::fs::create_dir(c.path("small")).expect("mkdir small");
    let index_before = last_index();
    let before: Vec<f64> = methods.iter().map(|m| calls(m)).collect();
    let started = Instant::now();
    for i in 0..FILES {
        // create, write 4 KiB, close: what cp or tar does per small file.
        write_file(&c.path(format!("small/f{i}")), &pattern(4096, i + 1));
    }
    let secs = started.elapsed().as_secs_f64();
    let entries = last_index() - index_before;
    let d: Vec<f64> = methods.iter().zip(&before).map(|(m, b)| calls(m) - b).collect();
    assert_eq!(
        c.leader_index(),
        Some(leader),
        "leadership moved during the test; the log was counted on the old leader"
    );
    let report = format!(
        "{FILES} files of 4 KiB in {secs:.1} s: {} log entries; calls: {}",
        entries,
        methods
            .iter()
            .zip(&d)
            .map(|(m, n)| format!("{m} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("{report}");
    let n = FILES as f64;
    assert_eq!(d[0], n, "one Mknod per file: {report}");
    assert_eq!(d[1], n, "one CommitSlices per file: {report}");
    assert!(d[2] <= (n / 16.0).ceil() + 1.0, "block ids are not pooled: {report}");
    assert_eq!(d[3], 0.0, "a SetAttr per file: {report}");
    // The leader's own proposals (ExpireSessions once a second, block
    // health) come on top; allow three entries a second for them.
    let budget = 2.0 * n + d[2] + 3.0 * secs.ceil() + 4.0;
    assert!(
        entries <= budget,
        "more than two log entries per file (budget {budget}): {report}"
    );
    for i in [0, FILES - 1] {
        assert_eq!(
            std::fs::read(c.path(format!("small/f{i}"))).expect("read back"),
            pattern(4096, i + 1)
        );
    }
}
