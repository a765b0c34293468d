//! Prometheus metrics every jfs daemon exports.
//!
//! Each daemon installs one global recorder (the `metrics` facade) and an
//! HTTP listener that serves the text exposition format at `/metrics`, on the
//! address its `*.metrics-address` key or `--metrics-listen` flag names. Code
//! anywhere in the process records with the `metrics` macros; in a process
//! that installed nothing (the `jfs` CLI) they cost a load and a branch.
//!
//! Every gRPC server is wrapped in [`RpcMetricsLayer`], so request counts and
//! latencies per method come from one place instead of from each handler.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Latency buckets (seconds): from a cached stat (~50 µs) to a call that
/// waited out a failover or a client timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics address {0:?} is not host:port (e.g. 0.0.0.0:9410, or \"\" to turn metrics off)")]
    BadAddress(String),
    #[error(
        "cannot serve metrics on {addr}: {message}. Another process may hold the port: pick another with \
         --metrics-listen or the *.metrics-address key, or \"\" to turn metrics off"
    )]
    Listen { addr: SocketAddr, message: String },
}

/// Starts serving metrics on `addr` (`""` = off) from the current tokio
/// runtime. `daemon` becomes a `daemon` label on every series, so one
/// Prometheus job can scrape all kinds of jfs process.
pub fn serve(addr: &str, daemon: &'static str) -> Result<Option<SocketAddr>, TelemetryError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let sock: SocketAddr = addr.parse().map_err(|_| TelemetryError::BadAddress(addr.into()))?;
    // Bind here, so a port in use fails start-up with a clear message rather
    // than inside the exporter's background task.
    let probe = std::net::TcpListener::bind(sock).map_err(|e| TelemetryError::Listen {
        addr: sock,
        message: e.to_string(),
    })?;
    let bound = probe.local_addr().map_err(|e| TelemetryError::Listen {
        addr: sock,
        message: e.to_string(),
    })?;
    drop(probe);
    PrometheusBuilder::new()
        .with_http_listener(bound)
        .add_global_label("daemon", daemon)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| TelemetryError::Listen {
            addr: bound,
            message: e.to_string(),
        })?
        .install()
        .map_err(|e| TelemetryError::Listen {
            addr: bound,
            message: e.to_string(),
        })?;
    Ok(Some(bound))
}

/// What a series is, for [`describe`].
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// A counter without labels: shown as 0 from the first scrape.
    Counter,
    /// A counter whose labels are only known when it moves: described only.
    LabelledCounter,
    Gauge,
    Histogram,
}

/// Gives each series its `# HELP` text and makes unlabelled counters and
/// gauges appear at 0 from the start: an alert on checksum failures must see
/// 0, not "no data", on a blockd that has never had one.
pub fn describe(series: &[(&'static str, Kind, &'static str)]) {
    for &(name, kind, help) in series {
        match kind {
            Kind::Counter => {
                metrics::describe_counter!(name, help);
                metrics::counter!(name).increment(0);
            }
            Kind::LabelledCounter => metrics::describe_counter!(name, help),
            Kind::Gauge => {
                metrics::describe_gauge!(name, help);
                metrics::gauge!(name).increment(0.0);
            }
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// The gRPC series every server exports through [`RpcMetricsLayer`].
pub const RPC_SERIES: &[(&str, Kind, &str)] = &[
    (
        "jfs_rpc_requests_total",
        Kind::LabelledCounter,
        "gRPC requests served, by service, method and gRPC status code",
    ),
    (
        "jfs_rpc_request_duration_seconds",
        Kind::Histogram,
        "time from a gRPC request to its response headers, by service and method",
    ),
];

/// Starts the endpoint (see [`serve`]). A failure is logged, not fatal: a
/// daemon that cannot export metrics must still serve metadata and data.
pub fn start(addr: &str, daemon: &'static str) -> Option<SocketAddr> {
    match serve(addr, daemon) {
        Ok(Some(bound)) => {
            describe(RPC_SERIES);
            tracing::info!(%bound, "serving Prometheus metrics at http://{bound}/metrics");
            Some(bound)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::error!("{e}; this {daemon} runs without metrics");
            None
        }
    }
}

/// Where others reach an endpoint bound to `bound`: a wildcard address is
/// replaced by `host`, the host this process is known by (its RPC address).
pub fn advertised(bound: SocketAddr, host: &str) -> String {
    if bound.ip().is_unspecified() && !host.is_empty() {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, bound.port()).to_string(),
            Err(_) => format!("{host}:{}", bound.port()),
        }
    } else {
        bound.to_string()
    }
}

/// A tower layer for tonic servers: counts every call by method and gRPC
/// status (`jfs_rpc_requests_total`) and times it to the response headers
/// (`jfs_rpc_request_duration_seconds`; for a streamed reply that is the
/// time to its first message).
#[derive(Clone, Copy, Debug)]
pub struct RpcMetricsLayer {
    service: &'static str,
}

impl RpcMetricsLayer {
    /// `service` labels the series: "meta", "raft", "block".
    pub fn new(service: &'static str) -> Self {
        RpcMetricsLayer { service }
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            service: self.service,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
    service: &'static str,
}

/// gRPC method name from a request path (`/jfs.Meta/Create` → `Create`).
/// Only names that look like methods become label values; the server answers
/// anything else with Unimplemented, which is labelled `unknown` so a
/// scanner cannot grow the series without bound.
fn method_of(path: &str) -> String {
    // A gRPC path is exactly `/package.Service/Method`.
    let ok_name = |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, name)) if ok_name(name) && service.split('.').all(ok_name) && service.contains('.') => {
            name.to_string()
        }
        _ => "unknown".to_string(),
    }
}

/// The gRPC status of a reply: errors come as trailers-only responses,
/// whose status is in the headers; a reply without one succeeded so far.
fn grpc_code(headers: &http::HeaderMap) -> &'static str {
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        None | Some("0") => "ok",
        Some("1") => "cancelled",
        Some("2") => "unknown",
        Some("3") => "invalid_argument",
        Some("4") => "deadline_exceeded",
        Some("5") => "not_found",
        Some("6") => "already_exists",
        Some("7") => "permission_denied",
        Some("8") => "resource_exhausted",
        Some("9") => "failed_precondition",
        Some("10") => "aborted",
        Some("11") => "out_of_range",
        Some("12") => "unimplemented",
        Some("13") => "internal",
        Some("14") => "unavailable",
        Some("15") => "data_loss",
        Some("16") => "unauthenticated",
        Some(_) => "other",
    }
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut method = method_of(req.uri().path());
        let service = self.service;
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => grpc_code(r.headers()),
                Err(_) => "transport_error",
            };
            if code == "unimplemented" {
                method = "unknown".into();
            }
            metrics::counter!("jfs_rpc_requests_total", "service" => service, "method" => method.clone(),
                "code" => code)
            .increment(1);
            metrics::histogram!("jfs_rpc_request_duration_seconds", "service" => service, "method" => method)
                .record(start.elapsed().as_secs_f64());
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_bounded() {
        assert_eq!(method_of("/jfs.Meta/Create"), "Create");
        assert_eq!(method_of("/jfs.Block/WriteBlock"), "WriteBlock");
        assert_eq!(method_of("/"), "unknown");
        assert_eq!(method_of("/x/../../etc"), "unknown");
        assert_eq!(method_of(&format!("/a/{}", "x".repeat(65))), "unknown");
    }

    #[test]
    fn grpc_codes_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_code(&h), "ok");
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_code(&h), "not_found");
        h.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(grpc_code(&h), "other");
    }

    #[test]
    fn wildcard_binds_advertise_the_rpc_host() {
        let any: SocketAddr = "0.0.0.0:9410".parse().unwrap();
        assert_eq!(advertised(any, "10.1.2.3"), "10.1.2.3:9410");
        assert_eq!(advertised(any, "meta1.example"), "meta1.example:9410");
        assert_eq!(advertised(any, "[::1]"), "[::1]:9410");
        let one: SocketAddr = "127.0.0.5:8102".parse().unwrap();
        assert_eq!(advertised(one, "10.1.2.3"), "127.0.0.5:8102");
    }

    #[test]
    fn bad_addresses_are_refused_with_the_fix() {
        assert!(matches!(serve("", "test"), Ok(None)));
        let e = serve("nonsense", "test").unwrap_err();
        assert!(e.to_string().contains("host:port"), "{e}");
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let e = serve(&addr, "test").unwrap_err();
        assert!(e.to_string().contains("Another process may hold the port"), "{e}");
    }
}
