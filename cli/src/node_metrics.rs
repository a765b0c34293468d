//! `jfs metastatus --metrics`: what each metad's Prometheus endpoint says.
//!
//! Each node advertises its endpoint in Meta.Status (`metrics_address`); the
//! CLI fetches `/metrics` from every node once, over plain HTTP/1.1, and
//! condenses the text into one row per node: requests served, failures,
//! latency, and the sizes an operator watches for a disk filling up. A full
//! HTTP client would be a large dependency for one GET to a server we run,
//! whose replies (the exporter's) always carry a Content-Length.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::admin::bytes;
use crate::metastatus::{format_table, NodeReport};

/// A scrape is a few hundred lines; anything far bigger is not our exporter.
const MAX_SCRAPE_BYTES: u64 = 16 << 20;

/// One sample line of the text format: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// Fetches `http://addr/metrics` once.
pub async fn fetch(addr: &str, timeout: Duration) -> Result<String, String> {
    let work = async {
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/plain\r\n\r\n");
        conn.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("cannot send the request: {e}"))?;
        let mut raw = Vec::new();
        conn.take(MAX_SCRAPE_BYTES)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("cannot read the reply: {e}"))?;
        http_body(&raw)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// The body of a complete HTTP/1.x response with status 200.
fn http_body(raw: &[u8]) -> Result<String, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the reply is not HTTP (no end of headers)")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with("HTTP/1.") || code != "200" {
        return Err(format!("the endpoint answered {status:?}"));
    }
    for h in lines {
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && !v.eq_ignore_ascii_case("identity") {
                return Err(format!(
                    "unexpected transfer-encoding {v:?} (is this a jfs metrics endpoint?)"
                ));
            }
            if k == "content-length" {
                let want: usize = v.parse().map_err(|_| format!("bad content-length {v:?}"))?;
                if body.len() < want {
                    return Err(format!("the reply was cut short ({} of {want} bytes)", body.len()));
                }
                return String::from_utf8(body[..want].to_vec()).map_err(|_| "the reply is not UTF-8".into());
            }
        }
    }
    String::from_utf8(body.to_vec()).map_err(|_| "the reply is not UTF-8".into())
}

/// Parses the Prometheus text exposition format (comments skipped). A line
/// that does not parse is an error: this also serves the tests' check that
/// an endpoint's output is valid.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|e| format!("line {}: {e}: {line:?}", n + 1))?);
    }
    Ok(out)
}

fn valid_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return Err("no value".into()),
    };
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches([' ', ',']);
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=').ok_or("label without '='")?;
            let key = r[..eq].trim();
            if !valid_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            let mut chars = r[eq + 1..].char_indices();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            let mut end = None;
            let mut escaped = false;
            for (i, c) in chars {
                match (escaped, c) {
                    (true, 'n') => value.push('\n'),
                    (true, c) => value.push(c),
                    (false, '\\') => {
                        escaped = true;
                        continue;
                    }
                    (false, '"') => {
                        end = Some(eq + 1 + i + 1);
                        break;
                    }
                    (false, c) => value.push(c),
                }
                escaped = false;
            }
            let end = end.ok_or("unterminated label value")?;
            labels.insert(key.to_string(), value);
            r = &r[end..];
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Sum of every sample named `name` whose labels include `want`.
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

/// The `q` quantile of a histogram summed over all its label sets with
/// `want`, as the upper bound of the bucket it falls in (Prometheus'
/// `histogram_quantile` without interpolation). None without observations.
pub fn quantile(samples: &[Sample], histogram: &str, want: &[(&str, &str)], q: f64) -> Option<f64> {
    let bucket = format!("{histogram}_bucket");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.name == bucket && want.iter().all(|(k, v)| s.label(k) == Some(v)))
    {
        let le = match s.label("le") {
            Some("+Inf") => f64::INFINITY,
            Some(v) => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
            None => continue,
        };
        // f64 bit patterns of non-negative numbers sort like the numbers.
        let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
        e.1 += s.value;
    }
    let total = by_le.values().last()?.1;
    if total <= 0.0 {
        return None;
    }
    by_le.values().find(|(_, count)| *count >= q * total).map(|(le, _)| *le)
}

/// Seconds as a short latency (`850µs`, `12.5ms`, `1.2s`, `>30s`).
fn latency_text(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.is_infinite() => "slowest bucket".into(),
        Some(s) if s < 0.001 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{s:.1}s"),
    }
}

/// One row of the metrics table from a node's scrape.
pub fn row(samples: &[Sample]) -> Vec<String> {
    let meta = [("service", "meta")];
    let requests = sum(samples, "jfs_rpc_requests_total", &meta);
    let ok = sum(
        samples,
        "jfs_rpc_requests_total",
        &[("service", "meta"), ("code", "ok")],
    );
    let count = sum(samples, "jfs_rpc_request_duration_seconds_count", &meta);
    let total_s = sum(samples, "jfs_rpc_request_duration_seconds_sum", &meta);
    let mean = (count > 0.0).then(|| total_s / count);
    vec![
        format!("{requests:.0}"),
        format!("{:.0}", requests - ok),
        latency_text(mean),
        latency_text(quantile(samples, "jfs_rpc_request_duration_seconds", &meta, 0.99)),
        bytes(sum(samples, "jfs_raft_log_bytes", &[]) as u64),
        bytes(sum(samples, "jfs_raft_snapshot_bytes", &[]) as u64),
        bytes(sum(samples, "jfs_metad_namespace_bytes", &[]) as u64),
    ]
}

/// Scrapes every node that answered Status and renders the table, plus one
/// note per node whose endpoint could not be read.
pub async fn report(reports: &[NodeReport], timeout: Duration) -> (String, Vec<String>) {
    let headers = [
        "NODE",
        "METRICS ADDRESS",
        "META REQUESTS",
        "FAILED",
        "MEAN LATENCY",
        "P99 LATENCY",
        "RAFT LOG",
        "SNAPSHOT",
        "NAMESPACE DB",
    ];
    let scrapes = futures::future::join_all(reports.iter().map(|r| async move {
        match &r.status {
            Err(_) => Err("unreachable (see above)".to_string()),
            Ok(s) if s.metrics_address.is_empty() => {
                Err("serves no metrics (metad.metrics-address is \"\" or the port was taken; see its log)".to_string())
            }
            Ok(s) => {
                let text = fetch(&s.metrics_address, timeout).await?;
                parse(&text).map_err(|e| format!("http://{}/metrics is not Prometheus text: {e}", s.metrics_address))
            }
        }
    }))
    .await;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (r, scrape) in reports.iter().zip(scrapes) {
        let id = r.id().map_or("?".to_string(), |i| i.to_string());
        let addr = match &r.status {
            Ok(s) if !s.metrics_address.is_empty() => s.metrics_address.clone(),
            _ => "-".to_string(),
        };
        let mut cells = vec![id.clone(), addr];
        match scrape {
            Ok(samples) => cells.extend(row(&samples)),
            Err(e) => {
                cells.extend(std::iter::repeat_n("-".to_string(), headers.len() - 2));
                notes.push(format!("node {id}: metrics: {e}"));
            }
        }
        rows.push(cells);
    }
    (format_table(&headers, &rows), notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP jfs_rpc_requests_total gRPC requests\n\
        # TYPE jfs_rpc_requests_total counter\n\
        jfs_rpc_requests_total{daemon=\"metad\",service=\"meta\",method=\"Mknod\",code=\"ok\"} 90\n\
        jfs_rpc_requests_total{daemon=\"metad\",service=\"meta\",method=\"Lookup\",code=\"not_found\"} 10\n\
        jfs_rpc_requests_total{daemon=\"metad\",service=\"raft\",method=\"Append\",code=\"ok\"} 500\n\
        jfs_rpc_request_duration_seconds_bucket{service=\"meta\",method=\"Mknod\",le=\"0.001\"} 50\n\
        jfs_rpc_request_duration_seconds_bucket{service=\"meta\",method=\"Mknod\",le=\"0.01\"} 89\n\
        jfs_rpc_request_duration_seconds_bucket{service=\"meta\",method=\"Mknod\",le=\"+Inf\"} 90\n\
        jfs_rpc_request_duration_seconds_bucket{service=\"meta\",method=\"Lookup\",le=\"0.001\"} 10\n\
        jfs_rpc_request_duration_seconds_bucket{service=\"meta\",method=\"Lookup\",le=\"0.01\"} 10\n\
        jfs_rpc_request_duration_seconds_bucket{service=\"meta\",method=\"Lookup\",le=\"+Inf\"} 10\n\
        jfs_rpc_request_duration_seconds_sum{service=\"meta\",method=\"Mknod\"} 0.4\n\
        jfs_rpc_request_duration_seconds_count{service=\"meta\",method=\"Mknod\"} 90\n\
        jfs_rpc_request_duration_seconds_sum{service=\"meta\",method=\"Lookup\"} 0.1\n\
        jfs_rpc_request_duration_seconds_count{service=\"meta\",method=\"Lookup\"} 10\n\
        jfs_raft_log_bytes{daemon=\"metad\"} 1572864\n\
        jfs_raft_snapshot_bytes 0\n\
        jfs_metad_namespace_bytes 2048 1700000000000\n";

    #[test]
    fn parses_the_exporters_text() {
        let s = parse(TEXT).unwrap();
        assert_eq!(s.len(), 16);
        assert_eq!(s[0].name, "jfs_rpc_requests_total");
        assert_eq!(s[0].labels["method"], "Mknod");
        assert_eq!(s[0].value, 90.0);
        assert_eq!(sum(&s, "jfs_rpc_requests_total", &[("service", "meta")]), 100.0);
        assert_eq!(sum(&s, "jfs_metad_namespace_bytes", &[]), 2048.0);
    }

    #[test]
    fn escaped_label_values() {
        let s = parse("x{a=\"q\\\"uote\",b=\"back\\\\slash\",c=\"new\\nline\"} 1\n").unwrap();
        assert_eq!(s[0].labels["a"], "q\"uote");
        assert_eq!(s[0].labels["b"], "back\\slash");
        assert_eq!(s[0].labels["c"], "new\nline");
    }

    #[test]
    fn malformed_lines_are_refused() {
        for bad in [
            "novalue",
            "9bad 1",
            "x{a=1} 1",
            "x{a=\"open} 1",
            "x one",
            "x 1 notatime",
            "x 1 2 3",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse("x +Inf\ny NaN\n").is_ok());
    }

    #[test]
    fn quantiles_sum_buckets_across_methods() {
        let s = parse(TEXT).unwrap();
        let meta = [("service", "meta")];
        let h = "jfs_rpc_request_duration_seconds";
        assert_eq!(quantile(&s, h, &meta, 0.5), Some(0.001));
        assert_eq!(quantile(&s, h, &meta, 0.99), Some(0.01));
        assert_eq!(quantile(&s, h, &meta, 1.0), Some(f64::INFINITY));
        assert_eq!(quantile(&s, h, &[("service", "raft")], 0.99), None);
    }

    #[test]
    fn row_condenses_a_scrape() {
        let s = parse(TEXT).unwrap();
        assert_eq!(row(&s), ["100", "10", "5.0ms", "10.0ms", "1.5 MiB", "0 B", "2.0 KiB"]);
    }

    #[test]
    fn http_replies() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\nx 1\nextra";
        assert_eq!(http_body(ok).unwrap(), "x 1\n");
        assert!(http_body(b"HTTP/1.1 404 Not Found\r\n\r\n")
            .unwrap_err()
            .contains("404"));
        assert!(http_body(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nx").is_err());
        assert!(http_body(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nx 1\n").is_err());
    }
}
