//! `jfs fsck [jfs://NS/PATH]`: blocks with fewer live copies than their
//! namespace's replication, or none. The check runs on the metad leader
//! (one consistent snapshot); this prints its findings and exits 1 when any
//! block is missing or under-replicated, so scripts and monitoring can use
//! the exit code.

use jfs_client::MetaClient;
use jfs_common::config::Config;
use jfs_common::rpc;

use crate::fs_cmd::JfsUri;
use crate::{CliError, CliResult};

pub async fn run(cfg: &Config, target: Option<&str>) -> CliResult<()> {
    let (namespace, path) = match target {
        Some(t) => {
            let uri = JfsUri::parse(t)?;
            (uri.namespace, uri.path)
        }
        None => (String::new(), String::new()),
    };
    let req = rpc::FsckRequest {
        namespace,
        path: if path == "/" { Vec::new() } else { path.into_bytes() },
        limit: 1000,
    };
    let meta = MetaClient::new(cfg.rpc_addresses.clone(), cfg.client_timeout);
    let r = meta
        .call(|mut c| {
            let req = req.clone();
            async move { c.fsck(req).await }
        })
        .await?;
    for p in &r.problems {
        let whose = if p.path.is_empty() {
            format!("namespace {}", p.namespace)
        } else {
            format!(
                "jfs://{}{} (inode {})",
                p.namespace,
                String::from_utf8_lossy(&p.path),
                p.ino
            )
        };
        crate::say!(
            "block {}: {} — {} of {} copies live — {}",
            p.block_id,
            p.kind,
            p.live,
            p.want,
            whose
        );
    }
    if r.truncated {
        crate::say!("(more problems not listed)");
    }
    let scope = target.unwrap_or("every namespace");
    if target.is_some() {
        crate::say!("{scope}: {} files, {} blocks", r.files, r.blocks);
    } else {
        crate::say!("{scope}: {} blocks", r.blocks);
    }
    crate::say!(
        "healthy {}, under-replicated {}, missing {}, over-replicated {}",
        r.healthy,
        r.under_replicated,
        r.missing,
        r.over_replicated
    );
    if r.missing > 0 || r.under_replicated > 0 {
        return Err(CliError::Failed(format!(
            "jfs fsck: {} blocks missing and {} under-replicated. Missing blocks have no live copy: start the \
             blockds that held them (`jfs admin blockd list` shows which are dead). Under-replicated blocks \
             are being copied by metad in the background; run fsck again in a minute",
            r.missing, r.under_replicated
        )));
    }
    crate::say!("status: HEALTHY");
    Ok(())
}
