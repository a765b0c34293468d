//! `jfs bench meta`: metadata throughput over RPC, without FUSE.
//!
//! Each simulated client is a real `Client` with its own session and its
//! own connections, as separate mounts would be. The clients create, stat
//! (lookup) and unlink their share of the files in one directory, phase by
//! phase, so a phase's rate is what the quorum sustains for that mix of
//! concurrent callers. Beside it the command measures the floor one
//! synchronous caller cannot beat: one round trip to the leader plus one
//! fsync of the disk the metadata lives on.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jfs_client::Client;
use jfs_common::config::Config;
use serde::Serialize;

use crate::{say, CliError, CliResult};

/// What `jfs bench meta` was asked to do.
pub struct MetaBenchArgs {
    pub namespace: String,
    pub clients: Vec<usize>,
    pub files: usize,
    pub fsync_dir: PathBuf,
    pub json: bool,
}

#[derive(Serialize)]
struct PhaseResult {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Serialize)]
struct RunResult {
    clients: usize,
    files: usize,
    create: PhaseResult,
    stat: PhaseResult,
    unlink: PhaseResult,
}

#[derive(Serialize)]
struct Floor {
    round_trip_ms: f64,
    fsync_ms: f64,
    floor_ms: f64,
    floor_ops_per_sec: f64,
}

#[derive(Serialize)]
struct Report {
    floor: Floor,
    runs: Vec<RunResult>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn phase(elapsed: Duration, ops: usize, mut lat: Vec<Duration>) -> PhaseResult {
    lat.sort_unstable();
    PhaseResult {
        ops_per_sec: ops as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
    }
}

#[derive(Clone, Copy)]
enum Op {
    Create,
    Stat,
    Unlink,
}

/// Runs one phase: every client does its names, all at once. Any failure
/// ends the run: a benchmark that skips errors measures something else.
async fn run_phase(
    clients: &[Client],
    dir: u64,
    names: &[Vec<Vec<u8>>],
    op: Op,
) -> CliResult<(Duration, Vec<Duration>)> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, mine) in clients.iter().zip(names) {
        let (c, mine) = (c.clone(), mine.clone());
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(mine.len());
            for name in &mine {
                let t = Instant::now();
                match op {
                    Op::Create => c.create(dir, name, 0o644, 0, 0, true).await.map(drop)?,
                    Op::Stat => c.lookup(dir, name).await.map(drop)?,
                    Op::Unlink => c.unlink(dir, name).await.map(drop)?,
                }
                lat.push(t.elapsed());
            }
            Ok::<_, jfs_common::FsError>(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let lat = r.map_err(|e| CliError::Failed(format!("a benchmark client task died: {e}")))??;
        all.extend(lat);
    }
    Ok((start.elapsed(), all))
}

/// p50 of a cheap linearizable read (GetAttr of the root): one client
/// round trip to the leader, served from its lease.
async fn round_trip(client: &Client) -> CliResult<f64> {
    let root = client.root_ino();
    let mut lat = Vec::with_capacity(500);
    for _ in 0..500 {
        let t = Instant::now();
        client.getattr(root).await?;
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    Ok(percentile(&lat, 0.5))
}

/// p50 of a 4 KiB overwrite + fdatasync in `dir`: what the Raft log pays per
/// flush (RocksDB recycles its WAL files, so its appends are overwrites).
fn fsync_cost(dir: &Path) -> CliResult<f64> {
    use std::os::unix::fs::FileExt as _;
    let path = dir.join(format!(".jfs-bench-fsync-{}", std::process::id()));
    let run = || -> std::io::Result<f64> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let buf = vec![0x5au8; 4096];
        for i in 0..64u64 {
            f.write_all_at(&buf, i * 4096)?;
        }
        f.sync_all()?;
        let mut lat = Vec::with_capacity(400);
        for i in 0..400u64 {
            let t = Instant::now();
            f.write_all_at(&buf, (i % 64) * 4096)?;
            f.sync_data()?;
            lat.push(t.elapsed());
        }
        lat.sort_unstable();
        Ok(percentile(&lat, 0.5))
    };
    let res = run();
    let _ = std::fs::remove_file(&path);
    res.map_err(|e| CliError::Failed(format!("cannot measure fsync in {}: {e}", dir.display())))
}

pub async fn meta(cfg: &Config, args: MetaBenchArgs) -> CliResult<()> {
    if args.files == 0 || args.clients.iter().any(|&c| c == 0 || c > 1024) {
        return Err(CliError::Usage(
            "--files must be at least 1 and every --clients value between 1 and 1024".into(),
        ));
    }
    let first = Client::connect(cfg, &args.namespace).await?;
    let rtt = round_trip(&first).await?;
    let fsync = fsync_cost(&args.fsync_dir)?;
    let floor = Floor {
        round_trip_ms: rtt,
        fsync_ms: fsync,
        floor_ms: rtt + fsync,
        floor_ops_per_sec: 1e3 / (rtt + fsync).max(1e-6),
    };
    if !args.json {
        say!(
            "floor for one synchronous client: round trip {:.3} ms (GetAttr of the root, p50) + fsync {:.3} ms \
             (4 KiB overwrite + fdatasync in {}, p50) = {:.3} ms, {:.0} ops/s",
            floor.round_trip_ms,
            floor.fsync_ms,
            args.fsync_dir.display(),
            floor.floor_ms,
            floor.floor_ops_per_sec
        );
        say!(
            "{:>7} {:>7} {:>10} {:>10} {:>10} {:>16} {:>16}",
            "clients",
            "files",
            "create/s",
            "stat/s",
            "unlink/s",
            "create p50/p99",
            "unlink p50/p99"
        );
    }
    let mut runs = Vec::new();
    for &n in &args.clients {
        let mut clients = vec![first.clone()];
        for _ in 1..n {
            clients.push(Client::connect(cfg, &args.namespace).await?);
        }
        let dir_name = format!(
            "jfs-bench-meta-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let dir = first.mkdir(first.root_ino(), dir_name.as_bytes(), 0o755, 0, 0).await?;
        let names: Vec<Vec<Vec<u8>>> = (0..n)
            .map(|c| {
                (c..args.files)
                    .step_by(n)
                    .map(|i| format!("f{i:08}").into_bytes())
                    .collect()
            })
            .collect();
        let mut results = Vec::new();
        for op in [Op::Create, Op::Stat, Op::Unlink] {
            let (elapsed, lat) = run_phase(&clients, dir.ino, &names, op).await?;
            results.push(phase(elapsed, args.files, lat));
        }
        first.rmdir(first.root_ino(), dir_name.as_bytes()).await?;
        let mut it = results.into_iter();
        let (create, stat, unlink) = match (it.next(), it.next(), it.next()) {
            (Some(c), Some(s), Some(u)) => (c, s, u),
            _ => return Err(CliError::Failed("a benchmark phase produced no result".into())),
        };
        let run = RunResult {
            clients: n,
            files: args.files,
            create,
            stat,
            unlink,
        };
        if !args.json {
            say!(
                "{:>7} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>16} {:>16}",
                run.clients,
                run.files,
                run.create.ops_per_sec,
                run.stat.ops_per_sec,
                run.unlink.ops_per_sec,
                format!("{:.2}/{:.2} ms", run.create.p50_ms, run.create.p99_ms),
                format!("{:.2}/{:.2} ms", run.unlink.p50_ms, run.unlink.p99_ms)
            );
        }
        runs.push(run);
        // End the extra sessions now rather than leaving them to expire.
        for c in clients.iter().skip(1) {
            c.meta().close().await;
        }
    }
    if args.json {
        let report = Report { floor, runs };
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::Failed(format!("cannot encode the report: {e}")))?;
        let _ = writeln!(std::io::stdout(), "{text}");
    }
    Ok(())
}
