//! `jfs admin`: cluster-level administration through the metad leader.
//!
//! Namespaces (create, list, replication) and blockds (list, decommission,
//! remove). Calls go through jfs-client's
//! leader-following `MetaClient`, so they work whichever node leads and
//! survive a failover in the middle (mutations are sent exactly once).

use jfs_client::MetaClient;
use jfs_common::config::Config;
use jfs_common::{rpc, FsError};

use crate::metastatus::format_table;
use crate::{CliError, CliResult};

fn meta_client(cfg: &Config) -> MetaClient {
    MetaClient::new(cfg.rpc_addresses.clone(), cfg.client_timeout)
}

/// Namespace names end up in URIs (`jfs://NAME/`) and mount sources, so keep them plain.
pub fn check_namespace_name(name: &str) -> CliResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{name:?} is not a valid namespace name: use 1 to 64 letters, digits, '-', '_' or '.' \
             (not starting with '.'), e.g. `projects`"
        )))
    }
}

pub async fn create_namespace(
    cfg: &Config,
    name: &str,
    block_size: Option<u64>,
    replication: Option<u32>,
    if_not_exists: bool,
) -> CliResult<()> {
    check_namespace_name(name)?;
    if let Some(bs) = block_size {
        if bs == 0 || bs % (64 << 10) != 0 || bs > 64 << 20 {
            return Err(CliError::Usage(format!(
                "--block-size {bs}: must be a multiple of 65536 between 65536 and 67108864 (e.g. 4194304 for 4 MiB)"
            )));
        }
    }
    if let Some(r) = replication {
        if r == 0 || r > 16 {
            return Err(CliError::Usage(format!("--replication {r}: must be between 1 and 16")));
        }
    }
    let ns = meta_client(cfg)
        .create_namespace(name, block_size.unwrap_or(0), replication.unwrap_or(0), if_not_exists)
        .await?;
    crate::say!(
        "namespace {:?}: id {}, block size {}, replication {} — use it as jfs://{}/",
        ns.name,
        ns.id,
        ns.block_size,
        ns.replication,
        ns.name
    );
    Ok(())
}

pub async fn list_namespaces(cfg: &Config) -> CliResult<()> {
    let mut list = meta_client(cfg).list_namespaces().await?;
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.id.to_string(),
                n.block_size.to_string(),
                n.replication.to_string(),
                if n.recovery_mode {
                    "recovery (read-only)".into()
                } else {
                    "normal".into()
                },
                grants_text(n),
            ]
        })
        .collect();
    let table = format_table(&["NAME", "ID", "BLOCK SIZE", "REPLICATION", "MODE", "GRANTS"], &rows);
    crate::say!("{}", table.trim_end());
    Ok(())
}

pub async fn set_replication(cfg: &Config, name: &str, replication: u32) -> CliResult<()> {
    if replication == 0 || replication > 16 {
        return Err(CliError::Usage(format!(
            "replication {replication}: must be between 1 and 16"
        )));
    }
    let name = name.to_string();
    let ns = meta_client(cfg)
        .call_mut(|mut c, hdr| {
            let req = rpc::SetReplicationRequest {
                hdr: Some(hdr),
                namespace: name.clone(),
                replication,
            };
            async move { c.set_replication(req).await }
        })
        .await?;
    crate::say!(
        "namespace {:?}: replication {} — existing blocks are copied or trimmed to match in the background \
         (`jfs fsck jfs://{}/` shows progress)",
        ns.name,
        ns.replication,
        ns.name
    );
    Ok(())
}

/// Grants as `jfs admin list-namespaces` shows them: `*:rw alice:ro`.
fn grants_text(n: &rpc::NamespaceInfo) -> String {
    if n.grants.is_empty() {
        return "(none)".into();
    }
    n.grants
        .iter()
        .map(|g| format!("{}:{}", g.principal, if g.read_only { "ro" } else { "rw" }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `jfs admin namespace grant|revoke`: `read_only` is `None` to revoke.
pub async fn set_access(cfg: &Config, name: &str, principal: &str, read_only: Option<bool>) -> CliResult<()> {
    check_namespace_name(name)?;
    if principal.is_empty() || principal.chars().count() > 64 || principal.chars().any(char::is_control) {
        return Err(CliError::Usage(format!(
            "{principal:?}: name a client certificate (its --name, 1 to 64 printable characters) or \"*\" for every \
             client"
        )));
    }
    let (name, principal) = (name.to_string(), principal.to_string());
    let ns = meta_client(cfg)
        .call_mut(|mut c, hdr| {
            let req = rpc::SetNamespaceAccessRequest {
                hdr: Some(hdr),
                namespace: name.clone(),
                principal: principal.clone(),
                read_only: read_only.unwrap_or(false),
                revoke: read_only.is_none(),
            };
            async move { c.set_namespace_access(req).await }
        })
        .await?;
    crate::say!("namespace {:?}: grants {}", ns.name, grants_text(&ns));
    if !cfg.tls_enabled {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "warning: security.tls.enabled is false in this config: if the cluster runs without TLS, nobody \
             is authenticated and grants are not enforced"
        );
    }
    Ok(())
}

/// `jfs admin recovery wait`: polls the leader's recovery state.
pub async fn recovery_wait(cfg: &Config, timeout: Option<std::time::Duration>) -> CliResult<()> {
    use std::io::IsTerminal;
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("restoring {bar:40} {pos}/{len} rows ({per_sec}, {eta} left)")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last_line = String::new();
    loop {
        let leader = crate::metastatus::collect(cfg, false)
            .await
            .into_iter()
            .filter_map(|r| r.status.ok())
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term);
        if let Some(l) = leader {
            match l.recovery_state.as_str() {
                "FINISH" => {
                    bar.finish_and_clear();
                    crate::say!(
                        "FINISH: {} rows restored; namespaces are read-only until `jfs admin recovery finish`",
                        l.recovery_total
                    );
                    return Ok(());
                }
                "RUNNING" => {
                    bar.set_length(l.recovery_total);
                    bar.set_position(l.recovery_restored.min(l.recovery_total));
                    let line = format!("RUNNING {}/{}", l.recovery_restored, l.recovery_total);
                    if bar.is_hidden() && line != last_line {
                        crate::say!("{line}");
                        last_line = line;
                    }
                }
                "LEFT" => {
                    bar.finish_and_clear();
                    return Err(CliError::Failed(
                        "this cluster already left recovery mode: it is writable".into(),
                    ));
                }
                _ => {
                    // The leader may not have started the restore yet.
                    if started.elapsed() > std::time::Duration::from_secs(30) {
                        bar.finish_and_clear();
                        return Err(CliError::Failed(
                            "the cluster is not in recovery mode: start every jfs-metad with \
                             namespace.backend.raft.recovery.mode = true on an empty data directory"
                                .into(),
                        ));
                    }
                }
            }
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            bar.finish_and_clear();
            return Err(CliError::Failed(format!(
                "the restore did not finish within {} s (it goes on; run this again to keep waiting)",
                started.elapsed().as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Longest `jfs admin mirror verify` waits for its answer.
const VERIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// `jfs admin mirror verify`.
pub async fn mirror_verify(cfg: &Config) -> CliResult<()> {
    // Reading every table takes a while (about 10 s per 100,000 rows on the
    // local table store): more than one normal attempt may take.
    let client = MetaClient::for_slow_calls(cfg.rpc_addresses.clone(), VERIFY_TIMEOUT);
    let r = client
        .call(|mut c| async move { c.mirror_verify(rpc::MirrorVerifyRequest {}).await })
        .await?;
    crate::say!(
        "index {}: {} rows compared, {} missing, {} extra, {} different, {} log items pending",
        r.index,
        r.rows,
        r.missing,
        r.extra,
        r.different,
        r.log_items
    );
    for e in &r.examples {
        crate::say!("  {e}");
    }
    if r.missing + r.extra + r.different > 0 {
        return Err(CliError::Failed("the mirror tables differ from the namespace".into()));
    }
    Ok(())
}

/// `jfs admin recovery finish`: leaves recovery mode online.
pub async fn recovery_finish(cfg: &Config) -> CliResult<()> {
    meta_client(cfg)
        .call_mut(|mut c, hdr| {
            let req = rpc::RecoveryFinishRequest { hdr: Some(hdr) };
            async move { c.recovery_finish(req).await }
        })
        .await?;
    crate::say!(
        "recovery mode ended: namespaces are writable. Set namespace.backend.raft.recovery.mode = false in \
         the config before the next restart"
    );
    Ok(())
}

/// Bytes in binary units, one decimal (`1.5 MiB`).
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub async fn list_blockds(cfg: &Config) -> CliResult<()> {
    let reply = meta_client(cfg)
        .call(|mut c| async move { c.list_blockds(rpc::ListBlockdsRequest {}).await })
        .await?;
    let mut list = reply.blockds;
    list.sort_by(|a, b| a.address.cmp(&b.address).then(a.id.cmp(&b.id)));
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.address.clone(),
                b.state.clone(),
                bytes(b.capacity_bytes),
                bytes(b.capacity_bytes.saturating_sub(b.free_bytes)),
                b.block_count.to_string(),
                b.listed_blocks.to_string(),
                if b.last_heartbeat_ms_ago < 0 {
                    "never (since this leader took over)".into()
                } else {
                    format!("{:.1}s ago", b.last_heartbeat_ms_ago as f64 / 1000.0)
                },
            ]
        })
        .collect();
    let table = format_table(
        &[
            "ID",
            "ADDRESS",
            "STATE",
            "CAPACITY",
            "USED",
            "BLOCKS",
            "LISTED",
            "LAST HEARTBEAT",
        ],
        &rows,
    );
    crate::say!("{}", table.trim_end());
    Ok(())
}

/// `state`: "decommission", "normal" or "remove".
pub async fn set_blockd_state(cfg: &Config, id: &str, state: &str) -> CliResult<()> {
    let (id, st) = (id.to_string(), state.to_string());
    meta_client(cfg)
        .call_mut(|mut c, hdr| {
            let req = rpc::SetBlockdStateRequest {
                hdr: Some(hdr),
                id: id.clone(),
                state: st.clone(),
            };
            async move { c.set_blockd_state(req).await }
        })
        .await
        .map_err(|e| match e {
            FsError::NotFound => CliError::Failed(format!(
                "no blockd with id {id:?}; `jfs admin blockd list` shows the ids"
            )),
            e => e.into(),
        })?;
    match state {
        "decommission" => crate::say!(
            "blockd {id}: decommissioning — its blocks are being copied elsewhere; it is safe to stop once \
             `jfs admin blockd list` shows it decommissioned"
        ),
        "normal" => crate::say!("blockd {id}: back in normal service"),
        _ => crate::say!("blockd {id}: removed; blocks it held are re-replicated from the other copies"),
    }
    Ok(())
}

/// Makes sure namespace `name` exists; true when this call created it.
pub async fn ensure_namespace(cfg: &Config, name: &str) -> CliResult<bool> {
    let meta = meta_client(cfg);
    match meta.get_namespace(name).await {
        Ok(_) => Ok(false),
        Err(FsError::NamespaceNotFound(_)) | Err(FsError::NotFound) => {
            // if_not_exists: another `jfs local up` racing us is not an error.
            meta.create_namespace(name, 0, 0, true).await?;
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names() {
        assert!(check_namespace_name("default").is_ok());
        assert!(check_namespace_name("a-b_c.1").is_ok());
        assert!(check_namespace_name("").is_err());
        assert!(check_namespace_name("a/b").is_err());
        assert!(check_namespace_name(".hidden").is_err());
        assert!(check_namespace_name(&"x".repeat(65)).is_err());
    }
}
