//! Exactly-once metadata calls: a mutating request that metad committed and
//! applied, but whose reply never reached the client (the connection was cut
//! after the commit), is sent again with the same sequence number and
//! returns the original result — `jfs fs mkdir` succeeds instead of failing
//! with "file exists", `jfs fs rm` succeeds instead of "no such file".
//!
//! The reply is lost by a small TCP proxy in this file that sits between the
//! CLI and the metad leader and understands just enough HTTP/2: after the
//! client's 24-byte preface, frames are a 9-byte header (24-bit length, type,
//! flags, 31-bit stream id) and a payload. It forwards everything, logs every
//! request stream (a HEADERS frame on a new odd stream id) with what its
//! protobuf request names, and, once armed, HOLDS every server→client frame
//! of the streams whose request is a mutating call (field 1 is a `ReqHeader`
//! with a client id and sequence number) naming the test's entry. Selecting
//! by the request's content, not by stream number, keeps the test
//! independent of which calls (Status, GetNamespace, GetAttr, Lookup) the CLI
//! makes first. The decision is taken before the request is forwarded, so
//! no byte of the reply can slip through.

use jfs_tests::*;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ HTTP/2

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_PADDED: u8 = 0x8;

/// One frame: its 9-byte header and its payload.
struct Frame {
    head: [u8; 9],
    payload: Vec<u8>,
}

impl Frame {
    fn kind(&self) -> u8 {
        self.head[3]
    }
    fn flags(&self) -> u8 {
        self.head[4]
    }
    fn stream(&self) -> u32 {
        u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]) & 0x7fff_ffff
    }
    /// The payload of a DATA frame without its padding.
    fn data(&self) -> &[u8] {
        if self.flags() & FLAG_PADDED == 0 {
            return &self.payload;
        }
        let pad = self.payload.first().copied().unwrap_or(0) as usize;
        let end = self.payload.len().saturating_sub(pad);
        self.payload.get(1..end).unwrap_or(&[])
    }
}

fn read_frame(r: &mut TcpStream) -> io::Result<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Frame { head, payload })
}

fn write_frame(w: &mut TcpStream, f: &Frame) -> io::Result<()> {
    w.write_all(&f.head)?;
    w.write_all(&f.payload)
}

// ------------------------------------------------------------------ protobuf

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

/// The top-level fields of a protobuf message; None if it does not parse.
fn fields(b: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((num, Value::Int(varint(b, &mut i)?))),
            1 | 5 => {
                i += if wire == 1 { 8 } else { 4 };
                if i > b.len() {
                    return None;
                }
            }
            2 => {
                let n = varint(b, &mut i)? as usize;
                let end = i.checked_add(n)?;
                out.push((num, Value::Bytes(b.get(i..end)?)));
                i = end;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// What the proxy understood of one request message.
#[derive(Debug, Clone, Default)]
struct Call {
    /// (client_id, seq) of the `ReqHeader hdr = 1` every mutating request
    /// carries; None for reads (their field 1 is a number or a string).
    hdr: Option<(u64, u64)>,
    /// Every top-level length-delimited field but the header (names, paths).
    strings: Vec<Vec<u8>>,
}

impl Call {
    fn parse(msg: &[u8]) -> Call {
        let mut call = Call::default();
        for (num, v) in fields(msg).unwrap_or_default() {
            let Value::Bytes(s) = v else { continue };
            if num == 1 && call.hdr.is_none() {
                let h = fields(s).unwrap_or_default();
                let int = |n: u64| {
                    h.iter().find_map(|(k, v)| match v {
                        Value::Int(x) if *k == n => Some(*x),
                        _ => None,
                    })
                };
                if let (Some(client), Some(seq)) = (int(1), int(2)) {
                    if client != 0 && seq != 0 {
                        call.hdr = Some((client, seq));
                        continue;
                    }
                }
            }
            call.strings.push(s.to_vec());
        }
        call
    }

    fn names(&self, target: &[u8]) -> bool {
        self.strings.iter().any(|s| s == target)
    }

    fn describe(&self) -> String {
        let strings: Vec<String> = self
            .strings
            .iter()
            .map(|s| format!("{:?}", String::from_utf8_lossy(&s[..s.len().min(40)])))
            .collect();
        match self.hdr {
            Some((client, seq)) => format!("mutating (client {client:#x}, seq {seq}) {}", strings.join(" ")),
            None => format!("read {}", strings.join(" ")),
        }
    }
}

// ------------------------------------------------------------------ the proxy

/// A mutating call naming the target, as the proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    conn: u64,
    stream: u32,
    client_id: u64,
    seq: u64,
}

#[derive(Default)]
struct State {
    /// The entry whose mutating calls are watched.
    target: Vec<u8>,
    /// While armed, replies to mutating calls naming `target` are held.
    armed: bool,
    held: Vec<Seen>,
    held_streams: HashSet<(u64, u32)>,
    /// (conn, stream, frame type, flags, length) of every frame not forwarded.
    held_frames: Vec<(u64, u32, u8, u8, usize)>,
    /// Mutating calls naming `target` forwarded (with their reply) after a cut.
    after_cut: Vec<Seen>,
    /// Every request stream, in order, for the log.
    log: Vec<String>,
    requests: usize,
    /// Both sockets of every live connection, to cut them.
    conns: HashMap<u64, (TcpStream, TcpStream)>,
    next_conn: u64,
    cut_conns: usize,
    errors: Vec<String>,
}

struct Shared {
    upstream: String,
    started: Instant,
    stop: AtomicBool,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, st: &mut State, line: String) {
        let line = format!("[{:>6} ms] {line}", self.started.elapsed().as_millis());
        eprintln!("proxy: {line}");
        st.log.push(line);
    }
}

struct H2Proxy {
    addr: String,
    shared: Arc<Shared>,
}

impl H2Proxy {
    /// Listens on `ip`:<free port> and forwards each connection to `upstream`.
    fn start(ip: &str, upstream: &str) -> H2Proxy {
        let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("proxy: bind {ip}:0: {e}"));
        let addr = listener.local_addr().expect("proxy: local address").to_string();
        listener.set_nonblocking(true).expect("proxy: non-blocking listener");
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            started: Instant::now(),
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        });
        let sh = shared.clone();
        thread::spawn(move || {
            while !sh.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => accept(&sh, client),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
                    Err(e) => {
                        sh.lock().errors.push(format!("accept: {e}"));
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
        H2Proxy { addr, shared }
    }

    /// Holds, from now on, the replies to mutating calls naming `name`.
    fn arm(&self, name: &[u8]) {
        let mut st = self.shared.lock();
        st.target = name.to_vec();
        st.armed = true;
        let line = format!(
            "armed: holding replies to mutating calls naming {:?}",
            String::from_utf8_lossy(name)
        );
        self.shared.note(&mut st, line);
    }

    /// Stops holding and cuts every connection that carries a held reply
    /// (shutdown of both sockets: what was held is never delivered).
    /// Returns how many connections were cut.
    fn cut(&self) -> usize {
        let mut st = self.shared.lock();
        st.armed = false;
        let victims: HashSet<u64> = st.held.iter().map(|s| s.conn).collect();
        let mut n = 0;
        for conn in victims {
            if let Some((a, b)) = st.conns.remove(&conn) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
                n += 1;
            }
        }
        st.cut_conns += n;
        let line = format!(
            "CUT {n} connection(s); {} frame(s) of held replies dropped",
            st.held_frames.len()
        );
        self.shared.note(&mut st, line);
        n
    }

    fn held(&self) -> Vec<Seen> {
        self.shared.lock().held.clone()
    }

    /// True once a held stream's last frame (END_STREAM: the gRPC trailers)
    /// reached the proxy, i.e. metad sent its whole reply and it was held.
    fn whole_reply_held(&self) -> bool {
        self.shared.lock().held_frames.iter().any(|&(_, _, kind, flags, _)| {
            (kind == FRAME_HEADERS || kind == FRAME_DATA) && flags & FLAG_END_STREAM != 0
        })
    }

    fn report(&self) -> String {
        let st = self.shared.lock();
        format!(
            "proxy {} -> {}: {} request streams, held {:?}, held frames {:?}, after the cut {:?}, cut {} \
             connection(s), errors {:?}\n{}",
            self.addr,
            self.shared.upstream,
            st.requests,
            st.held,
            st.held_frames,
            st.after_cut,
            st.cut_conns,
            st.errors,
            st.log.join("\n")
        )
    }
}

impl Drop for H2Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for (_, (a, b)) in self.shared.lock().conns.drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

fn accept(sh: &Arc<Shared>, client: TcpStream) {
    let _ = client.set_nonblocking(false);
    let upstream = match TcpStream::connect(&sh.upstream) {
        Ok(s) => s,
        Err(e) => {
            sh.lock().errors.push(format!("connect {}: {e}", sh.upstream));
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let clones = (|| Some((client.try_clone().ok()?, upstream.try_clone().ok()?)))();
    let Some((c2, u2)) = clones else {
        sh.lock().errors.push("cannot clone sockets".into());
        return;
    };
    let conn = {
        let mut st = sh.lock();
        let conn = st.next_conn;
        st.next_conn += 1;
        if let (Ok(a), Ok(b)) = (client.try_clone(), upstream.try_clone()) {
            st.conns.insert(conn, (a, b));
        }
        let line = format!("connection {conn} accepted");
        sh.note(&mut st, line);
        conn
    };
    let sh1 = sh.clone();
    thread::spawn(move || client_to_server(&sh1, conn, client, upstream));
    let sh2 = sh.clone();
    thread::spawn(move || server_to_client(&sh2, conn, u2, c2));
}

fn client_to_server(sh: &Shared, conn: u64, mut from: TcpStream, mut to: TcpStream) {
    let r = (|| -> io::Result<()> {
        let mut preface = [0u8; 24];
        from.read_exact(&mut preface)?;
        if &preface != PREFACE {
            return Err(io::Error::other(format!(
                "not an HTTP/2 prior-knowledge connection: {:?}",
                String::from_utf8_lossy(&preface)
            )));
        }
        to.write_all(&preface)?;
        let mut last_stream = 0u32;
        let mut bodies: HashMap<u32, Vec<u8>> = HashMap::new();
        loop {
            let f = read_frame(&mut from)?;
            let id = f.stream();
            if f.kind() == FRAME_HEADERS && id % 2 == 1 && id > last_stream {
                last_stream = id;
                let mut st = sh.lock();
                st.requests += 1;
                let line = format!("conn {conn} stream {id}: request #{} opened", st.requests);
                sh.note(&mut st, line);
            }
            if f.kind() == FRAME_DATA && id != 0 {
                let body = bodies.entry(id).or_default();
                body.extend_from_slice(f.data());
                // A gRPC message: compressed flag, 4-byte length, protobuf.
                if body.len() >= 5 {
                    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                    if body.len() >= 5 + len {
                        let call = if body[0] == 0 {
                            Call::parse(&body[5..5 + len])
                        } else {
                            Call::default()
                        };
                        bodies.remove(&id);
                        // Decided before the request goes on: its reply cannot
                        // overtake the decision.
                        on_request(sh, conn, id, &call);
                    }
                }
            }
            write_frame(&mut to, &f)?;
        }
    })();
    if let Err(e) = r {
        let mut st = sh.lock();
        let line = format!("conn {conn} client->server ends: {e}");
        sh.note(&mut st, line);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn on_request(sh: &Shared, conn: u64, stream: u32, call: &Call) {
    let mut st = sh.lock();
    let mut line = format!("conn {conn} stream {stream}: {}", call.describe());
    if let Some((client_id, seq)) = call.hdr {
        if !st.target.is_empty() && call.names(&st.target) {
            let seen = Seen {
                conn,
                stream,
                client_id,
                seq,
            };
            if st.armed {
                st.held.push(seen);
                st.held_streams.insert((conn, stream));
                line.push_str("  => its reply is HELD");
            } else if st.cut_conns > 0 {
                st.after_cut.push(seen);
                line.push_str("  => retry after the cut, forwarded");
            }
        }
    }
    sh.note(&mut st, line);
}

fn server_to_client(sh: &Shared, conn: u64, mut from: TcpStream, mut to: TcpStream) {
    let r = (|| -> io::Result<()> {
        loop {
            let f = read_frame(&mut from)?;
            let id = f.stream();
            if id != 0 {
                let mut st = sh.lock();
                if st.held_streams.contains(&(conn, id)) {
                    st.held_frames.push((conn, id, f.kind(), f.flags(), f.payload.len()));
                    let line = format!(
                        "conn {conn} stream {id}: held a reply frame (type {}, flags {:#x}, {} bytes)",
                        f.kind(),
                        f.flags(),
                        f.payload.len()
                    );
                    sh.note(&mut st, line);
                    continue;
                }
            }
            write_frame(&mut to, &f)?;
        }
    })();
    if let Err(e) = r {
        let mut st = sh.lock();
        let line = format!("conn {conn} server->client ends: {e}");
        sh.note(&mut st, line);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

// ------------------------------------------------------------------ helpers

/// A copy of the cluster's jfs.toml whose client addresses all point at the
/// proxy. The config must list one client address per `initial-conf` node,
/// so the proxy is listed once per node; `initial-conf` is unchanged.
fn proxied_conf(c: &Cluster, proxy: &str) -> PathBuf {
    let text = fs::read_to_string(c.conf()).unwrap_or_else(|e| panic!("read {}: {e}", c.conf().display()));
    let key = "jfs.namespace.server.rpc-address";
    let mut replaced = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if k.trim() == key => {
                replaced += 1;
                let nodes = v.split(',').count();
                format!("{key} = \"{}\"", vec![proxy; nodes].join(","))
            }
            _ => l.to_string(),
        })
        .collect();
    assert_eq!(
        replaced,
        1,
        "expected one `{key}` line in {}:\n{text}",
        c.conf().display()
    );
    let path = c.root.join("jfs-via-proxy.toml");
    fs::write(&path, lines.join("\n") + "\n").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// A jfs CLI process running in the background; killed if dropped early.
struct Background {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
    what: String,
}

impl Background {
    fn spawn(c: &Cluster, args: &[&str], tag: &str) -> Background {
        let (out, err) = (
            c.root.join(format!("{tag}.stdout")),
            c.root.join(format!("{tag}.stderr")),
        );
        let file = |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let mut cmd = Command::new(bin("jfs"));
        cmd.args(args)
            .current_dir(&c.root)
            .env("RUST_BACKTRACE", "1")
            // The client's retry decisions, for the failure message.
            .env("RUST_LOG", "warn,jfs_client=debug")
            .stdin(Stdio::null())
            .stdout(file(&out))
            .stderr(file(&err))
            .process_group(0);
        let what = format!("jfs {}", args.join(" "));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Background {
            child: Some(child),
            out,
            err,
            what,
        }
    }

    fn output(&self, status: std::process::ExitStatus) -> CmdOut {
        CmdOut {
            status,
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }

    /// Panics (with its output) if the process has already exited: it was
    /// supposed to be stuck waiting for the held reply.
    fn assert_running(&mut self, context: &str) {
        let child = self.child.as_mut().expect("background process");
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "`{}` exited before {context}:\n{}",
                self.what,
                self.output(st).describe()
            );
        }
    }

    fn wait(mut self, timeout: Duration) -> CmdOut {
        let mut child = self.child.take().expect("background process");
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return self.output(st),
                Ok(None) if start.elapsed() < timeout => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    // SAFETY: the group id is the child's pid (process_group(0)).
                    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                    let st = child.wait().expect("wait for the killed CLI");
                    panic!(
                        "`{}` did not finish within {timeout:?} after the cut:\n{}",
                        self.what,
                        self.output(st).describe()
                    );
                }
                Err(e) => panic!("cannot wait for `{}`: {e}", self.what),
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: the group id is the child's pid (process_group(0)).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// Runs `jfs --conf <via the proxy> fs <fs_args>` while the proxy holds the
/// reply to its mutating call on `name`; waits until `applied` says the change
/// is visible through the cluster's own mount and the whole reply reached the
/// proxy, then cuts the connection. Returns the CLI's result; asserts that a
/// reply really was held and a connection really cut, and that every retry
/// the proxy saw carried the held call's client id and sequence number.
fn lose_the_reply(c: &Cluster, fs_args: &[&str], name: &str, applied: &dyn Fn() -> bool, change: &str) -> CmdOut {
    let leader = wait_until("a metad leader", Duration::from_secs(30), || {
        c.leader_index()
            .ok_or_else(|| "`jfs metastatus` shows no leader".to_string())
    });
    let upstream = format!("{}:{}", c.ip, 8101 + 10 * (leader - 1));
    let proxy = H2Proxy::start(&c.ip, &upstream);
    let conf = proxied_conf(c, &proxy.addr);
    eprintln!("metad{leader} leads; proxy {} -> {upstream}", proxy.addr);

    proxy.arm(name.as_bytes());
    let conf_s = conf.to_string_lossy().into_owned();
    let mut args = vec!["--conf", conf_s.as_str(), "fs"];
    args.extend_from_slice(fs_args);
    let mut cli = Background::spawn(c, &args, &format!("cli-{name}"));

    wait_until(
        &format!("{change} to be visible through the mount {}", c.mnt.display()),
        Duration::from_secs(30),
        || {
            cli.assert_running(&format!("{change} was visible (its reply should be held)"));
            if applied() {
                Ok(())
            } else {
                Err(format!("not yet; {}", proxy.report()))
            }
        },
    );
    wait_until(
        "the proxy to hold metad's whole reply (up to its END_STREAM frame)",
        Duration::from_secs(30),
        || {
            cli.assert_running("the reply was held");
            if proxy.whole_reply_held() {
                Ok(())
            } else {
                Err(proxy.report())
            }
        },
    );
    cli.assert_running("the cut");
    let cut = proxy.cut();

    let out = cli.wait(Duration::from_secs(120));
    let report = proxy.report();
    eprintln!("{report}\n`jfs {}` after the cut:\n{}", args.join(" "), out.describe());

    let held = proxy.held();
    assert!(
        !held.is_empty(),
        "the proxy held no reply, so nothing was tested\n{report}"
    );
    assert!(cut >= 1, "the proxy cut no connection, so nothing was tested\n{report}");
    let first = held[0];
    assert!(
        held.iter()
            .all(|h| (h.client_id, h.seq) == (first.client_id, first.seq)),
        "the held attempts of one call carry different (client id, seq): {held:?}\n{report}"
    );
    let after_cut = proxy.shared.lock().after_cut.clone();
    assert!(
        after_cut
            .iter()
            .all(|h| (h.client_id, h.seq) == (first.client_id, first.seq)),
        "the call was retried after the cut with another (client id, seq) than the held attempt \
         (client {:#x}, seq {}): {after_cut:?} — a retry with a new sequence number is a new request\n{report}",
        first.client_id,
        first.seq
    );
    if after_cut.is_empty() {
        eprintln!(
            "the retry after the cut did not go through the proxy (the client learned the members' direct addresses)"
        );
    }
    out
}

/// How many entries of the mount's root are called `name`.
fn entries_named(c: &Cluster, name: &str) -> usize {
    fs::read_dir(&c.mnt)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", c.mnt.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("readdir {}: {e}", c.mnt.display())))
        .filter(|e| e.file_name() == name)
        .count()
}

// ------------------------------------------------------------------ tests

#[test]
fn mkdir_whose_reply_is_lost_is_retried_and_succeeds_once() {
    // The proxy reads the HTTP/2 frames between client and metad.
    let c = Cluster::start_plaintext();
    let name = "made-once";
    let uri = format!("jfs://default/{name}");
    let target = c.path(name);
    let out = lose_the_reply(
        &c,
        &["mkdir", &uri],
        name,
        &|| fs::metadata(&target).is_ok_and(|m| m.is_dir()),
        "the new directory",
    );
    assert!(
        out.success(),
        "`jfs fs mkdir {uri}` failed after its applied call lost its reply: the retry was not \
         recognised as the same request (exactly-once broken):\n{}{}",
        out.describe(),
        c.log_tails()
    );
    assert!(
        fs::metadata(&target).is_ok_and(|m| m.is_dir()),
        "{} is not a directory after the mkdir succeeded",
        target.display()
    );
    assert_eq!(entries_named(&c, name), 1, "the root should list {name:?} exactly once");
    let listing = c.jfs_ok(&["--conf", &c.conf().to_string_lossy(), "fs", "ls", "jfs://default/"]);
    assert_eq!(
        listing.lines().filter(|l| l.trim() == name).count(),
        1,
        "`jfs fs ls jfs://default/` should list {name:?} exactly once:\n{listing}"
    );
    // Control: the command is not idempotent by itself — a second mkdir (a
    // new request) of the same name fails.
    let again = c.jfs(&["--conf", &c.conf().to_string_lossy(), "fs", "mkdir", &uri]);
    assert!(
        !again.success() && format!("{}{}", again.stdout, again.stderr).contains("exists"),
        "a second, new `jfs fs mkdir {uri}` should fail with \"file exists\":\n{}",
        again.describe()
    );
}

#[test]
fn rm_whose_reply_is_lost_is_retried_and_succeeds_once() {
    // The proxy reads the HTTP/2 frames between client and metad.
    let c = Cluster::start_plaintext();
    let name = "removed-once";
    let uri = format!("jfs://default/{name}");
    let target = c.path(name);
    write_file(&target, b"to be removed exactly once\n");
    write_file(&c.path("bystander"), b"stays\n");
    let out = lose_the_reply(
        &c,
        &["rm", &uri],
        name,
        &|| matches!(fs::symlink_metadata(&target), Err(e) if e.kind() == io::ErrorKind::NotFound),
        "the removal",
    );
    assert!(
        out.success(),
        "`jfs fs rm {uri}` failed after its applied unlink lost its reply: the retry was not \
         recognised as the same request (exactly-once broken):\n{}{}",
        out.describe(),
        c.log_tails()
    );
    assert_errno(fs::symlink_metadata(&target), libc::ENOENT, "stat of the removed file");
    assert_eq!(entries_named(&c, name), 0, "the root still lists {name:?}");
    assert_eq!(
        fs::read(c.path("bystander")).expect("read bystander"),
        b"stays\n",
        "another file of the directory changed"
    );
    // Control: a second, new rm of the same name fails.
    let again = c.jfs(&["--conf", &c.conf().to_string_lossy(), "fs", "rm", &uri]);
    assert!(
        !again.success() && format!("{}{}", again.stdout, again.stderr).contains("no such file"),
        "a second, new `jfs fs rm {uri}` should fail with \"no such file\":\n{}",
        again.describe()
    );
}
