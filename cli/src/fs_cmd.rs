//! `jfs fs ...`: files of a namespace without a mount, through jfs-client.
//!
//! Paths are URIs, `jfs://NAME/path`: NAME picks the namespace, the path is
//! resolved from its root. `count` walks a tree with a few directory reads in
//! flight; `put` and `get` copy through a temporary name and rename into
//! place, so nobody ever sees half a file under the final name.

use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::stream::{FuturesUnordered, StreamExt};
use jfs_client::{Attr, Client, FileHandle, SetAttrArgs, RENAME_NOREPLACE};
use jfs_common::config::Config;
use jfs_common::rpc::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use jfs_common::FsError;

use crate::{CliError, CliResult, FsCommand};

/// Directory reads in flight during `count` and `rm -r`: enough to hide
/// round trips, few enough not to load metad on a shared machine.
const PARALLEL: usize = 8;
/// Largest single read or write request; a block is the natural unit.
const MAX_IO: u64 = 8 << 20;

const URI_EXAMPLE: &str = "jfs://default/logs/app.log";

/// A parsed `jfs://NAME/path`. `path` is normalised: absolute, no `.`, `..`
/// or empty components, no trailing slash (the root is `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JfsUri {
    pub namespace: String,
    pub path: String,
}

impl std::fmt::Display for JfsUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "jfs://{}{}", self.namespace, self.path)
    }
}

impl JfsUri {
    pub fn parse(s: &str) -> CliResult<JfsUri> {
        let bad = |why: &str| {
            CliError::Usage(format!(
                "{s:?} is not a jfs URI: {why}; write jfs://NAMESPACE/PATH, e.g. {URI_EXAMPLE}"
            ))
        };
        let rest = s
            .strip_prefix("jfs://")
            .ok_or_else(|| bad("it must start with jfs://"))?;
        let (namespace, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if namespace.is_empty() {
            return Err(bad("the namespace name is missing"));
        }
        crate::admin::check_namespace_name(namespace).map_err(|_| bad("the namespace name has invalid characters"))?;
        let mut comps: Vec<&str> = Vec::new();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if comps.pop().is_none() {
                        return Err(bad("`..` goes above the namespace root"));
                    }
                }
                c if c.len() > jfs_client::NAME_MAX => return Err(bad("a path component is longer than 255 bytes")),
                c => comps.push(c),
            }
        }
        Ok(JfsUri {
            namespace: namespace.to_string(),
            path: format!("/{}", comps.join("/")),
        })
    }

    pub fn is_root(&self) -> bool {
        self.path == "/"
    }

    /// The last path component, None for the root.
    pub fn file_name(&self) -> Option<&str> {
        if self.is_root() {
            None
        } else {
            self.path.rsplit('/').next()
        }
    }

    pub fn join(&self, name: &str) -> JfsUri {
        let path = if self.is_root() {
            format!("/{name}")
        } else {
            format!("{}/{name}", self.path)
        };
        JfsUri {
            namespace: self.namespace.clone(),
            path,
        }
    }
}

/// One `jfs fs` command with its URIs parsed.
#[derive(Debug)]
pub enum FsOp {
    Count(JfsUri),
    Chunks(JfsUri),
    Ls { long: bool, uri: JfsUri },
    Cat(JfsUri),
    Put { force: bool, local: PathBuf, uri: JfsUri },
    Get { force: bool, uri: JfsUri, local: PathBuf },
    Mkdir { parents: bool, uri: JfsUri },
    Rm { recursive: bool, uri: JfsUri },
}

impl FsOp {
    pub fn from_cli(cmd: FsCommand) -> CliResult<FsOp> {
        Ok(match cmd {
            FsCommand::Count { uri } => FsOp::Count(JfsUri::parse(&uri)?),
            FsCommand::Chunks { uri } => FsOp::Chunks(JfsUri::parse(&uri)?),
            FsCommand::Ls { long, uri } => FsOp::Ls {
                long,
                uri: JfsUri::parse(&uri)?,
            },
            FsCommand::Cat { uri } => FsOp::Cat(JfsUri::parse(&uri)?),
            FsCommand::Put { force, local, uri } => FsOp::Put {
                force,
                local,
                uri: JfsUri::parse(&uri)?,
            },
            FsCommand::Get { force, uri, local } => FsOp::Get {
                force,
                uri: JfsUri::parse(&uri)?,
                local,
            },
            FsCommand::Mkdir { parents, uri } => FsOp::Mkdir {
                parents,
                uri: JfsUri::parse(&uri)?,
            },
            FsCommand::Rm { recursive, uri } => FsOp::Rm {
                recursive,
                uri: JfsUri::parse(&uri)?,
            },
        })
    }

    fn uri(&self) -> &JfsUri {
        match self {
            FsOp::Count(u) | FsOp::Cat(u) | FsOp::Chunks(u) => u,
            FsOp::Ls { uri, .. }
            | FsOp::Put { uri, .. }
            | FsOp::Get { uri, .. }
            | FsOp::Mkdir { uri, .. }
            | FsOp::Rm { uri, .. } => uri,
        }
    }
}

/// Adds the URI to a jfs error, so the operator sees which path failed.
fn at(uri: &JfsUri) -> impl Fn(FsError) -> CliError + '_ {
    move |e| CliError::FsAt(e, uri.to_string())
}

pub async fn run(cfg: &Config, op: FsOp) -> CliResult<()> {
    let client = Client::connect(cfg, &op.uri().namespace).await?;
    let result = match op {
        FsOp::Count(uri) => count(&client, &uri).await,
        FsOp::Chunks(uri) => chunks(&client, &uri).await,
        FsOp::Ls { long, uri } => ls(&client, &uri, long).await,
        FsOp::Cat(uri) => cat(&client, &uri).await,
        FsOp::Put { force, local, uri } => put(&client, &local, &uri, force).await,
        FsOp::Get { force, uri, local } => get(&client, &uri, &local, force).await,
        FsOp::Mkdir { parents, uri } => mkdir(&client, &uri, parents).await,
        FsOp::Rm { recursive, uri } => rm(&client, &uri, recursive).await,
    };
    // A short run ends its metad session now rather than leaving it (and
    // its saved replies) to expire.
    client.meta().close().await;
    result
}

fn is_dir(a: &Attr) -> bool {
    a.mode & S_IFMT == S_IFDIR
}

// ---------------------------------------------------------------- chunks

async fn chunks(client: &Client, uri: &JfsUri) -> CliResult<()> {
    let attr = client.resolve(&uri.path).await.map_err(at(uri))?;
    if is_dir(&attr) {
        return Err(CliError::FsAt(FsError::IsDirectory, uri.to_string()));
    }
    let stats = client.chunk_stats(attr.ino).await.map_err(at(uri))?;
    let mut out = String::from("CHUNK SLICES\n");
    for (index, slices) in stats {
        out.push_str(&format!("{index} {slices}\n"));
    }
    print!("{out}");
    Ok(())
}

// ---------------------------------------------------------------- count

/// What `count` adds up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub dirs: u64,
    pub files: u64,
    pub bytes: u64,
}

/// `hadoop fs -count` columns: DIR_COUNT FILE_COUNT CONTENT_SIZE PATHNAME.
pub fn format_count(c: &Counts, path: &str) -> String {
    format!("{:>12} {:>12} {:>18} {}", c.dirs, c.files, c.bytes, path)
}

async fn count(client: &Client, uri: &JfsUri) -> CliResult<()> {
    let root = client.resolve(&uri.path).await.map_err(at(uri))?;
    let mut c = Counts::default();
    if !is_dir(&root) {
        c.files = 1;
        c.bytes = if root.mode & S_IFMT == S_IFREG { root.size } else { 0 };
    } else {
        c.dirs = 1;
        let mut queue = vec![root.ino];
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < PARALLEL {
                let Some(ino) = queue.pop() else { break };
                let client = client.clone();
                in_flight.push(async move { (ino, client.readdir_all(ino, true).await) });
            }
            let Some((ino, res)) = in_flight.next().await else {
                break;
            };
            let entries = match res {
                Ok(e) => e,
                // Removed while we walked: it no longer counts.
                Err(FsError::NotFound) if ino != root.ino => continue,
                Err(e) => return Err(at(uri)(e)),
            };
            for e in entries {
                if e.kind & S_IFMT == S_IFDIR {
                    c.dirs += 1;
                    queue.push(e.ino);
                } else {
                    c.files += 1;
                    if e.kind & S_IFMT == S_IFREG {
                        c.bytes += e.attr.as_ref().map_or(0, |a| a.size);
                    }
                }
            }
        }
    }
    crate::say!("{}", format_count(&c, &uri.to_string()));
    Ok(())
}

// ---------------------------------------------------------------- ls

/// `drwxr-xr-x` from st_mode.
pub fn mode_string(mode: u32) -> String {
    let kind = match mode & S_IFMT {
        m if m == S_IFDIR => 'd',
        m if m == S_IFLNK => 'l',
        m if m == S_IFREG => '-',
        m if m == libc::S_IFIFO => 'p',
        m if m == libc::S_IFCHR => 'c',
        m if m == libc::S_IFBLK => 'b',
        m if m == libc::S_IFSOCK => 's',
        _ => '?',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    let bit = |b: u32, c: char| if mode & b != 0 { c } else { '-' };
    // The execute position also shows setuid/setgid/sticky, as ls does.
    let exec = |x: u32, special: u32, set_x: char, set_nox: char| match (mode & x != 0, mode & special != 0) {
        (true, true) => set_x,
        (false, true) => set_nox,
        (true, false) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(exec(0o100, 0o4000, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(exec(0o010, 0o2000, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(exec(0o001, 0o1000, 't', 'T'));
    s
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM[:SS]` in UTC (no time zone database needed).
pub fn format_utc(secs: i64, with_seconds: bool) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from a day count (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if with_seconds {
        format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}")
    } else {
        format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}")
    }
}

/// `ls -l` lines: numbers right-aligned to the widest in the listing.
pub fn format_long(entries: &[(String, Attr, Option<String>)]) -> String {
    let w = |f: &dyn Fn(&Attr) -> String| entries.iter().map(|(_, a, _)| f(a).len()).max().unwrap_or(0);
    let (wl, wu, wg, ws) = (
        w(&|a| a.nlink.to_string()),
        w(&|a| a.uid.to_string()),
        w(&|a| a.gid.to_string()),
        w(&|a| a.size.to_string()),
    );
    let mut out = String::new();
    for (name, a, target) in entries {
        let mtime = a.mtime.as_ref().map_or(0, |t| t.sec);
        out.push_str(&format!(
            "{} {:>wl$} {:>wu$} {:>wg$} {:>ws$} {} {}",
            mode_string(a.mode),
            a.nlink,
            a.uid,
            a.gid,
            a.size,
            format_utc(mtime, false),
            name
        ));
        if let Some(t) = target {
            out.push_str(" -> ");
            out.push_str(t);
        }
        out.push('\n');
    }
    out
}

async fn ls(client: &Client, uri: &JfsUri, long: bool) -> CliResult<()> {
    let attr = client.resolve(&uri.path).await.map_err(at(uri))?;
    let mut listing: Vec<(String, Attr, Option<String>)> = Vec::new();
    if is_dir(&attr) {
        for e in client.readdir_all(attr.ino, long).await.map_err(at(uri))? {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let a = e.attr.unwrap_or(Attr {
                ino: e.ino,
                mode: e.kind,
                ..Default::default()
            });
            listing.push((name, a, None));
        }
        listing.sort_by(|a, b| a.0.cmp(&b.0));
    } else {
        listing.push((uri.to_string(), attr, None));
    }
    if !long {
        let mut out = String::new();
        for (name, _, _) in &listing {
            out.push_str(name);
            out.push('\n');
        }
        return write_stdout(out.as_bytes());
    }
    for (_, a, target) in listing.iter_mut() {
        if a.mode & S_IFMT == S_IFLNK {
            // A link removed meanwhile just shows without its target.
            if let Ok(t) = client.readlink(a.ino).await {
                *target = Some(String::from_utf8_lossy(&t).into_owned());
            }
        }
    }
    write_stdout(format_long(&listing).as_bytes())
}

/// Writes to stdout; a closed pipe (`jfs fs cat ... | head`) is not an error.
fn write_stdout(data: &[u8]) -> CliResult<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(data).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Failed(format!("cannot write to standard output: {e}"))),
    }
}

// ---------------------------------------------------------------- cat / get

/// Where the bytes of a jfs file go.
trait Sink {
    /// False when the reader went away and copying should stop quietly.
    fn put(&mut self, data: &[u8]) -> CliResult<bool>;
}

struct Stdout;
impl Sink for Stdout {
    fn put(&mut self, data: &[u8]) -> CliResult<bool> {
        let mut out = std::io::stdout().lock();
        match out.write_all(data).and_then(|_| out.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(CliError::Failed(format!("cannot write to standard output: {e}"))),
        }
    }
}

struct LocalFile<'a> {
    file: std::fs::File,
    path: &'a Path,
}
impl Sink for LocalFile<'_> {
    fn put(&mut self, data: &[u8]) -> CliResult<bool> {
        self.file
            .write_all(data)
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", self.path.display())))?;
        Ok(true)
    }
}

fn io_size(client: &Client) -> u64 {
    client.block_size().clamp(64 << 10, MAX_IO)
}

/// Copies a whole jfs file into `sink`, then releases the handle whatever happened.
async fn read_file(client: &Client, uri: &JfsUri, sink: &mut dyn Sink) -> CliResult<u64> {
    let attr = client.resolve(&uri.path).await.map_err(at(uri))?;
    if is_dir(&attr) {
        return Err(at(uri)(FsError::IsDirectory));
    }
    if attr.mode & S_IFMT != S_IFREG {
        return Err(CliError::Failed(format!(
            "{uri} is not a regular file (mode {})",
            mode_string(attr.mode)
        )));
    }
    let h = client.open_file(attr.ino).await.map_err(at(uri))?;
    let chunk = io_size(client) as usize;
    let copied = async {
        let mut off = 0u64;
        loop {
            let data = h.read_at(off, chunk).await.map_err(at(uri))?;
            if data.is_empty() || !sink.put(&data)? {
                return Ok::<u64, CliError>(off);
            }
            off += data.len() as u64;
        }
    }
    .await;
    let released = h.release().await.map_err(at(uri));
    let n = copied?;
    released?;
    Ok(n)
}

async fn cat(client: &Client, uri: &JfsUri) -> CliResult<()> {
    read_file(client, uri, &mut Stdout).await.map(|_| ())
}

async fn get(client: &Client, uri: &JfsUri, local: &Path, force: bool) -> CliResult<()> {
    let dest = if local.is_dir() {
        let name = uri
            .file_name()
            .ok_or_else(|| CliError::Usage(format!("{uri} is the namespace root, not a file; name one file to get")))?;
        local.join(name)
    } else {
        local.to_path_buf()
    };
    if dest.exists() && !force {
        return Err(CliError::Failed(format!(
            "{} exists; use -f to overwrite it",
            dest.display()
        )));
    }
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{base}.jfs-get-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", tmp.display())))?;
    let mut sink = LocalFile { file, path: &tmp };
    let res = async {
        read_file(client, uri, &mut sink).await?;
        sink.file
            .sync_all()
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &dest)
            .map_err(|e| CliError::Failed(format!("cannot rename {} to {}: {e}", tmp.display(), dest.display())))
    }
    .await;
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

// ---------------------------------------------------------------- put

fn euid_egid() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn write_all(client: &Client, h: &FileHandle, input: &mut dyn Read, what: &str, uri: &JfsUri) -> CliResult<u64> {
    let mut buf = vec![0u8; io_size(client) as usize];
    let mut off = 0u64;
    loop {
        let n = read_full(input, &mut buf).map_err(|e| CliError::Failed(format!("cannot read {what}: {e}")))?;
        if n == 0 {
            return Ok(off);
        }
        let mut done = 0;
        while done < n {
            let w = h.write_at(off + done as u64, &buf[done..n]).await.map_err(at(uri))?;
            if w == 0 {
                return Err(at(uri)(FsError::Io("the client accepted no bytes".into())));
            }
            done += w;
        }
        off += n as u64;
    }
}

async fn put(client: &Client, local: &Path, uri: &JfsUri, force: bool) -> CliResult<()> {
    let stdin = local.as_os_str() == "-";
    let (mut input, mode, what): (Box<dyn Read>, u32, String) = if stdin {
        (Box::new(std::io::stdin()), 0o644, "standard input".to_string())
    } else {
        let f = std::fs::File::open(local)
            .map_err(|e| CliError::Failed(format!("cannot open {}: {e}", local.display())))?;
        let md = f
            .metadata()
            .map_err(|e| CliError::Failed(format!("cannot stat {}: {e}", local.display())))?;
        if md.is_dir() {
            return Err(CliError::Usage(format!(
                "{} is a directory; `jfs fs put` copies one file",
                local.display()
            )));
        }
        use std::os::unix::fs::PermissionsExt;
        (
            Box::new(f),
            md.permissions().mode() & 0o7777,
            local.display().to_string(),
        )
    };

    // A directory destination receives the file under its own name.
    let dest = match client.resolve(&uri.path).await {
        Ok(a) if is_dir(&a) => {
            let name = match local.file_name() {
                Some(n) if !stdin => n.to_string_lossy().into_owned(),
                _ => {
                    return Err(CliError::Usage(format!(
                        "{uri} is a directory; name the file to create, e.g. {}",
                        uri.join("data.bin")
                    )))
                }
            };
            uri.join(&name)
        }
        Ok(_) | Err(FsError::NotFound) => uri.clone(),
        Err(e) => return Err(at(uri)(e)),
    };
    let Some(dest_name) = dest.file_name() else {
        return Err(CliError::Usage(format!(
            "cannot put a file at the namespace root itself; name a file, e.g. {URI_EXAMPLE}"
        )));
    };
    if !force {
        match client.resolve(&dest.path).await {
            Ok(_) => {
                return Err(CliError::Failed(format!("{dest} exists; use -f to overwrite it")));
            }
            Err(FsError::NotFound) => {}
            Err(e) => return Err(at(&dest)(e)),
        }
    }

    let (parent, _) = client.resolve_parent(&dest.path).await.map_err(at(&dest))?;
    // Write under a temporary name, then rename: readers see the old file or the whole new one.
    let tmp_name = format!(".{dest_name}._COPYING_.{}", std::process::id());
    let tmp_name = if tmp_name.len() > jfs_client::NAME_MAX {
        format!("._COPYING_.{}", std::process::id())
    } else {
        tmp_name
    };
    let tmp = dest.join_sibling(&tmp_name);
    let (uid, gid) = euid_egid();
    let f = client
        .create(parent.ino, tmp_name.as_bytes(), mode, uid, gid, false)
        .await
        .map_err(at(&tmp))?;
    let res = async {
        if f.size != 0 {
            // Left over from an earlier failed put by a process with our pid.
            client
                .setattr(
                    f.ino,
                    SetAttrArgs {
                        size: Some(0),
                        ..Default::default()
                    },
                )
                .await
                .map_err(at(&tmp))?;
        }
        let h = client.open_file(f.ino).await.map_err(at(&tmp))?;
        let written = write_all(client, &h, &mut *input, &what, &tmp).await;
        let released = h.release().await.map_err(at(&tmp));
        written?;
        released?;
        let flags = if force { 0 } else { RENAME_NOREPLACE };
        client
            .rename(parent.ino, tmp_name.as_bytes(), parent.ino, dest_name.as_bytes(), flags)
            .await
            .map_err(at(&dest))?;
        Ok::<(), CliError>(())
    }
    .await;
    if res.is_err() {
        let _ = client.unlink(parent.ino, tmp_name.as_bytes()).await;
    }
    res
}

impl JfsUri {
    /// The URI of `name` in the same directory.
    fn join_sibling(&self, name: &str) -> JfsUri {
        let dir = match self.path.rfind('/') {
            Some(0) | None => "/".to_string(),
            Some(i) => self.path[..i].to_string(),
        };
        JfsUri {
            namespace: self.namespace.clone(),
            path: dir,
        }
        .join(name)
    }
}

// ---------------------------------------------------------------- mkdir / rm

async fn mkdir(client: &Client, uri: &JfsUri, parents: bool) -> CliResult<()> {
    let (uid, gid) = euid_egid();
    if !parents {
        if uri.is_root() {
            return Err(at(uri)(FsError::AlreadyExists));
        }
        let (parent, name) = client.resolve_parent(&uri.path).await.map_err(at(uri))?;
        client
            .mkdir(parent.ino, &name, 0o755, uid, gid)
            .await
            .map_err(at(uri))?;
        return Ok(());
    }
    let mut cur = client.resolve("/").await.map_err(at(uri))?;
    let mut so_far = JfsUri {
        namespace: uri.namespace.clone(),
        path: "/".into(),
    };
    for comp in uri.path.split('/').filter(|c| !c.is_empty()) {
        so_far = so_far.join(comp);
        let next = match client.lookup(cur.ino, comp.as_bytes()).await {
            Ok(a) => a,
            Err(FsError::NotFound) => match client.mkdir(cur.ino, comp.as_bytes(), 0o755, uid, gid).await {
                Ok(a) => a,
                // Someone else made it between our lookup and mkdir: fine.
                Err(FsError::AlreadyExists) => client.lookup(cur.ino, comp.as_bytes()).await.map_err(at(&so_far))?,
                Err(e) => return Err(at(&so_far)(e)),
            },
            Err(e) => return Err(at(&so_far)(e)),
        };
        if !is_dir(&next) {
            return Err(at(&so_far)(FsError::NotDirectory));
        }
        cur = next;
    }
    Ok(())
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Removes everything inside directory `ino`, a few entries at a time.
fn empty_dir<'a>(client: &'a Client, ino: u64, uri: JfsUri) -> BoxFut<'a, CliResult<()>> {
    Box::pin(async move {
        let entries = client.readdir_all(ino, false).await.map_err(at(&uri))?;
        let mut results = futures::stream::iter(entries.into_iter().map(|e| {
            let child = uri.join(&String::from_utf8_lossy(&e.name));
            async move {
                if e.kind & S_IFMT == S_IFDIR {
                    empty_dir(client, e.ino, child.clone()).await?;
                    match client.rmdir(ino, &e.name).await {
                        Ok(()) | Err(FsError::NotFound) => Ok(()),
                        Err(err) => Err(at(&child)(err)),
                    }
                } else {
                    match client.unlink(ino, &e.name).await {
                        Ok(_) | Err(FsError::NotFound) => Ok(()),
                        Err(err) => Err(at(&child)(err)),
                    }
                }
            }
        }))
        .buffer_unordered(PARALLEL);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    })
}

async fn rm(client: &Client, uri: &JfsUri, recursive: bool) -> CliResult<()> {
    if uri.is_root() {
        return Err(CliError::Usage(format!(
            "refusing to remove the root of namespace {:?}; remove the entries under it instead",
            uri.namespace
        )));
    }
    let (parent, name) = client.resolve_parent(&uri.path).await.map_err(at(uri))?;
    let attr = client.lookup(parent.ino, &name).await.map_err(at(uri))?;
    if is_dir(&attr) {
        if !recursive {
            return Err(CliError::Failed(format!(
                "{uri} is a directory; use `jfs fs rm -r {uri}` to remove it and everything under it"
            )));
        }
        empty_dir(client, attr.ino, uri.clone()).await?;
        client.rmdir(parent.ino, &name).await.map_err(at(uri))?;
    } else {
        client.unlink(parent.ino, &name).await.map_err(at(uri))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> JfsUri {
        JfsUri::parse(s).unwrap()
    }

    #[test]
    fn good_uris() {
        assert_eq!(
            uri("jfs://default/a/b"),
            JfsUri {
                namespace: "default".into(),
                path: "/a/b".into()
            }
        );
        assert_eq!(uri("jfs://default").path, "/");
        assert_eq!(uri("jfs://default/").path, "/");
        assert_eq!(uri("jfs://ns-1//a/./b/").path, "/a/b");
        assert_eq!(uri("jfs://ns/a/../b").path, "/b");
        assert_eq!(uri("jfs://default/a b/c").to_string(), "jfs://default/a b/c");
    }

    #[test]
    fn bad_uris_are_usage_errors_with_an_example() {
        for s in [
            "/default/a",
            "jfs:/default/a",
            "hdfs://default/a",
            "jfs:///a",
            "jfs://bad ns/a",
            "jfs://d/../x",
            "",
        ] {
            match JfsUri::parse(s) {
                Err(CliError::Usage(msg)) => assert!(msg.contains(URI_EXAMPLE), "{msg}"),
                other => panic!("{s:?} gave {other:?}"),
            }
        }
        let long = format!("jfs://default/{}", "x".repeat(256));
        assert!(JfsUri::parse(&long).is_err());
    }

    #[test]
    fn uri_helpers() {
        assert!(uri("jfs://d/").is_root());
        assert_eq!(uri("jfs://d/").file_name(), None);
        assert_eq!(uri("jfs://d/a/b").file_name(), Some("b"));
        assert_eq!(uri("jfs://d/").join("x").path, "/x");
        assert_eq!(uri("jfs://d/a").join("x").path, "/a/x");
        assert_eq!(uri("jfs://d/a/b").join_sibling(".t").path, "/a/.t");
        assert_eq!(uri("jfs://d/b").join_sibling(".t").path, "/.t");
    }

    #[test]
    fn count_line_matches_hadoop() {
        let c = Counts {
            dirs: 3,
            files: 10,
            bytes: 12345,
        };
        assert_eq!(
            format_count(&c, "jfs://default/x"),
            "           3           10              12345 jfs://default/x"
        );
    }

    #[test]
    fn modes() {
        assert_eq!(mode_string(S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(mode_string(S_IFLNK | 0o777), "lrwxrwxrwx");
        assert_eq!(mode_string(S_IFREG | 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(S_IFDIR | 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(S_IFREG | 0o2644), "-rw-r-Sr--");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0, true), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400, false), "2000-02-29 00:00");
        assert_eq!(format_utc(1_700_000_000, true), "2023-11-14 22:13:20");
        assert_eq!(format_utc(-1, true), "1969-12-31 23:59:59");
    }

    #[test]
    fn long_listing_aligns_numbers() {
        let a = |size: u64, nlink: u32| Attr {
            mode: S_IFREG | 0o644,
            size,
            nlink,
            uid: 0,
            gid: 0,
            mtime: Some(jfs_common::rpc::Timespec { sec: 0, nsec: 0 }),
            ..Default::default()
        };
        let text = format_long(&[
            ("a".into(), a(5, 1), None),
            ("bb".into(), a(12345, 12), Some("t".into())),
        ]);
        assert_eq!(
            text,
            "-rw-r--r--  1 0 0     5 1970-01-01 00:00 a\n-rw-r--r-- 12 0 0 12345 1970-01-01 00:00 bb -> t\n"
        );
    }
}
