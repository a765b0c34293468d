//! tlsprobe: makes one gRPC call to a jfs server as a chosen identity and
//! prints what came back, for the security tests.
//!
//! `tlsprobe [--tls-dir DIR --role ROLE] [--expect SERVER_ROLE] ADDR CALL`
//! dials ADDR with DIR/ROLE.crt and DIR/ROLE.key (or in plaintext without
//! `--tls-dir`), expecting the server to hold a SERVER_ROLE certificate, and
//! makes CALL: status, create-namespace, mknod, heartbeat,
//! get-namespace=NAME, mknod-in=NAME (Meta service), vote (Raft),
//! read-block (Block). Prints `OK`, `ERR <grpc code> <jfs
//! code> <message>` for a refused call, or `TRANSPORT <error>` when no
//! call could be made; exits 0 in all those cases (the test judges).
//! `fingerprint` instead prints the SHA-256 of the certificate the server
//! presents, to check that rotation took.

use std::time::Duration;

use jfs_common::rpc;
use jfs_common::tls::Role;

fn usage() -> ! {
    eprintln!("usage: tlsprobe [--tls-dir DIR --role ROLE] [--expect metad|blockd] ADDR CALL");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut role, mut expect, mut pos) = (None, None, Role::Metad, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tls-dir" => dir = args.next(),
            "--role" => role = args.next().and_then(|r| Role::parse(&r)),
            "--expect" => expect = args.next().and_then(|r| Role::parse(&r)).unwrap_or_else(|| usage()),
            _ => pos.push(a),
        }
    }
    let [addr, call] = pos.as_slice() else { usage() };
    if let Some(dir) = &dir {
        let cfg = jfs_common::config::Config {
            tls_enabled: true,
            tls_dir: dir.into(),
            ..Default::default()
        };
        let role = role.unwrap_or_else(|| usage());
        if let Err(e) = jfs_common::tls::init_client(&cfg, role) {
            println!("SETUP {e}");
            return;
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if call == "fingerprint" {
        let creds = dir.as_ref().zip(role).map(|(d, r)| {
            let d = jfs_common::tls::TlsDir::new(d);
            (d.cert(r), d.key(r))
        });
        println!("{}", rt.block_on(fingerprint(addr, creds)));
        return;
    }
    println!("{}", rt.block_on(probe(addr, call, expect)));
}

async fn probe(addr: &str, call: &str, expect: Role) -> String {
    let ep = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(ep) => ep
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10)),
        Err(e) => return format!("SETUP bad address: {e}"),
    };
    let ch = match jfs_common::tls::connect(ep, expect).await {
        Ok(ch) => ch,
        Err(e) => return format!("TRANSPORT {}", error_chain(&e)),
    };
    let mut meta = rpc::meta_client::MetaClient::new(ch.clone());
    let r: Result<(), tonic::Status> = match call {
        "status" => meta.status(rpc::StatusRequest::default()).await.map(drop),
        "create-namespace" => meta
            .create_namespace(rpc::CreateNamespaceRequest {
                name: "probe-ns".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "mknod" => meta.mknod(rpc::MknodRequest::default()).await.map(drop),
        "heartbeat" => meta.heartbeat(rpc::HeartbeatRequest::default()).await.map(drop),
        c if c.starts_with("get-namespace=") => meta
            .get_namespace(rpc::GetNamespaceRequest {
                name: c["get-namespace=".len()..].into(),
            })
            .await
            .map(drop),
        // Creates a file in the root of a namespace, found by name with an
        // admin-free call the caller may make.
        c if c.starts_with("mknod-in=") => {
            match meta
                .get_namespace(rpc::GetNamespaceRequest {
                    name: c["mknod-in=".len()..].into(),
                })
                .await
            {
                Ok(ns) => {
                    let ns = ns.into_inner();
                    meta.mknod(rpc::MknodRequest {
                        ns: ns.id,
                        parent: ns.root_ino,
                        name: format!("tlsprobe-{}", std::process::id()).into_bytes(),
                        mode: libc::S_IFREG | 0o644,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                }
                Err(e) => Err(e),
            }
        }
        "vote" => rpc::raft_client::RaftClient::new(ch)
            .vote(rpc::RaftPayload { data: vec![1, 2, 3] })
            .await
            .map(drop),
        "read-block" => rpc::block_client::BlockClient::new(ch)
            .read_range(rpc::ReadBlockRequest {
                block_id: 1 << 60,
                offset: 0,
                len: 1,
            })
            .await
            .map(drop),
        _ => usage(),
    };
    match r {
        Ok(()) => "OK".into(),
        Err(st) => {
            let code = st
                .metadata()
                .get(jfs_common::error::CODE_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            // A refused handshake or a connection the server would not
            // speak HTTP/2 on surfaces as a status that no handler made.
            let transport = matches!(
                st.code(),
                tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Cancelled
            );
            if transport && code == "-" {
                return format!("TRANSPORT {}", st.message());
            }
            format!("ERR {:?} {code} {}", st.code(), st.message())
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The server's certificate, as hex SHA-256 of its DER, read with openssl
/// so that the probe trusts nothing of ours.
async fn fingerprint(addr: &str, creds: Option<(std::path::PathBuf, std::path::PathBuf)>) -> String {
    let creds = creds
        .map(|(c, k)| format!("-cert '{}' -key '{}'", c.display(), k.display()))
        .unwrap_or_default();
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -alpn h2 {creds} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .await;
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Err(e) => format!("SETUP openssl: {e}"),
    }
}
