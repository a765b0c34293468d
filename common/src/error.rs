//! The one table of jfs errors.
//!
//! Every error a jfs process can report to another process or to a user is a
//! [`FsError`]. Each variant has exactly one jfs error code, one errno (what
//! the mount returns) and one gRPC code (how it crosses the wire). Keep the
//! table in `FsError::code_errno_grpc` the only place these are decided.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Metadata key that carries the jfs error code on a gRPC status.
pub const CODE_KEY: &str = "jfs-code";
/// Metadata key that carries the leader's client address on a NotLeader status.
pub const LEADER_KEY: &str = "jfs-leader";

/// The error code users and scripts see for recovery mode (from JindoFS).
pub const RECOVERY_READ_ONLY_CODE: u32 = 25021;
pub const RECOVERY_READ_ONLY_MSG: &str = "Namespace is under recovery mode, and is read-only.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    AlreadyExists,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name longer than 255 bytes")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("permission denied")]
    PermissionDenied,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("no space left: {0}")]
    NoSpace(String),
    #[error("no such attribute")]
    NoAttribute,
    #[error("too many links")]
    TooManyLinks,
    #[error("file too large")]
    FileTooBig,
    #[error("operation not supported: {0}")]
    NotSupported(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("data checksum mismatch: {0}")]
    Corrupt(String),
    #[error("not the leader; leader is {}", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String> },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("request too old to be retried (its reply was already acknowledged)")]
    StaleRequest,
    #[error(
        "this client's metadata session expired (it was silent longer than its session timeout); calls it \
         had in flight may or may not have taken effect, and its locks and open-unlinked files were released"
    )]
    SessionExpired,
    #[error("a conflicting lock is held")]
    WouldBlock,
    #[error("namespace {0:?} does not exist; create it with `jfs admin create-namespace {0}`")]
    NamespaceNotFound(String),
    #[error("{}", RECOVERY_READ_ONLY_MSG)]
    RecoveryReadOnly,
    #[error("cluster id mismatch: {0}")]
    ClusterMismatch(String),
    #[error("read-only file system")]
    ReadOnly,
    /// The caller's certificate does not allow this call (wrong role, or a
    /// namespace it was not granted).
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// A change in a namespace the caller may only read
    /// (`jfs admin namespace grant --read-only`).
    #[error("read-only grant: {0}")]
    GrantReadOnly(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl FsError {
    /// The single mapping table: (jfs code, errno, gRPC code).
    fn code_errno_grpc(&self) -> (u32, i32, Code) {
        use FsError::*;
        match self {
            NotFound => (25001, libc::ENOENT, Code::NotFound),
            AlreadyExists => (25002, libc::EEXIST, Code::AlreadyExists),
            NotDirectory => (25003, libc::ENOTDIR, Code::FailedPrecondition),
            IsDirectory => (25004, libc::EISDIR, Code::FailedPrecondition),
            NotEmpty => (25005, libc::ENOTEMPTY, Code::FailedPrecondition),
            NameTooLong => (25006, libc::ENAMETOOLONG, Code::InvalidArgument),
            InvalidArgument(_) => (25007, libc::EINVAL, Code::InvalidArgument),
            PermissionDenied => (25008, libc::EACCES, Code::PermissionDenied),
            NotPermitted => (25009, libc::EPERM, Code::PermissionDenied),
            NoSpace(_) => (25010, libc::ENOSPC, Code::ResourceExhausted),
            NoAttribute => (25011, libc::ENODATA, Code::NotFound),
            TooManyLinks => (25012, libc::EMLINK, Code::FailedPrecondition),
            FileTooBig => (25013, libc::EFBIG, Code::InvalidArgument),
            NotSupported(_) => (25014, libc::EOPNOTSUPP, Code::Unimplemented),
            Io(_) => (25015, libc::EIO, Code::Internal),
            Corrupt(_) => (25016, libc::EIO, Code::DataLoss),
            NotLeader { .. } => (25017, libc::EAGAIN, Code::Unavailable),
            Unavailable(_) => (25018, libc::EIO, Code::Unavailable),
            StaleRequest => (25019, libc::EIO, Code::FailedPrecondition),
            SessionExpired => (25024, libc::EIO, Code::FailedPrecondition),
            WouldBlock => (25025, libc::EAGAIN, Code::FailedPrecondition),
            NamespaceNotFound(_) => (25020, libc::ENOENT, Code::NotFound),
            RecoveryReadOnly => (RECOVERY_READ_ONLY_CODE, libc::EROFS, Code::FailedPrecondition),
            ClusterMismatch(_) => (25022, libc::EIO, Code::FailedPrecondition),
            ReadOnly => (25023, libc::EROFS, Code::FailedPrecondition),
            AccessDenied(_) => (25026, libc::EACCES, Code::PermissionDenied),
            GrantReadOnly(_) => (25027, libc::EROFS, Code::PermissionDenied),
            Internal(_) => (25099, libc::EIO, Code::Internal),
        }
    }

    pub fn code(&self) -> u32 {
        self.code_errno_grpc().0
    }

    pub fn errno(&self) -> i32 {
        self.code_errno_grpc().1
    }

    /// True for errors where the same request may succeed against another
    /// node or a little later: the client library retries these.
    pub fn is_retryable(&self) -> bool {
        matches!(self, FsError::NotLeader { .. } | FsError::Unavailable(_))
    }

    /// The text the CLI prints, in the format operators of the seed systems know.
    pub fn cli_line(&self) -> String {
        format!("ErrorCode : {} , ErrorMsg: {}", self.code(), self)
    }

    fn from_code(code: u32, msg: &str, leader: Option<String>) -> Option<FsError> {
        use FsError::*;
        let m = msg.to_string();
        Some(match code {
            25001 => NotFound,
            25002 => AlreadyExists,
            25003 => NotDirectory,
            25004 => IsDirectory,
            25005 => NotEmpty,
            25006 => NameTooLong,
            25007 => InvalidArgument(m),
            25008 => PermissionDenied,
            25009 => NotPermitted,
            25010 => NoSpace(m),
            25011 => NoAttribute,
            25012 => TooManyLinks,
            25013 => FileTooBig,
            25014 => NotSupported(m),
            25015 => Io(m),
            25016 => Corrupt(m),
            25017 => NotLeader { leader },
            25018 => Unavailable(m),
            25019 => StaleRequest,
            25024 => SessionExpired,
            25025 => WouldBlock,
            25020 => NamespaceNotFound(m),
            RECOVERY_READ_ONLY_CODE => RecoveryReadOnly,
            25022 => ClusterMismatch(m),
            25023 => ReadOnly,
            25026 => AccessDenied(m),
            25027 => GrantReadOnly(m),
            25099 => Internal(m),
            _ => return None,
        })
    }

    /// The payload string a variant carries, sent as the status message so
    /// the receiving side can rebuild the same variant.
    fn payload(&self) -> String {
        use FsError::*;
        match self {
            InvalidArgument(m) | NoSpace(m) | NotSupported(m) | Io(m) | Corrupt(m) | Unavailable(m)
            | NamespaceNotFound(m) | ClusterMismatch(m) | AccessDenied(m) | GrantReadOnly(m) | Internal(m) => m.clone(),
            other => other.to_string(),
        }
    }
}

impl From<FsError> for Status {
    fn from(e: FsError) -> Status {
        let (code, _, grpc) = e.code_errno_grpc();
        let mut st = Status::new(grpc, e.payload());
        st.metadata_mut().insert(CODE_KEY, MetadataValue::from(code));
        if let FsError::NotLeader { leader: Some(addr) } = &e {
            if let Ok(v) = addr.parse() {
                st.metadata_mut().insert(LEADER_KEY, v);
            }
        }
        st
    }
}

impl From<Status> for FsError {
    fn from(st: Status) -> FsError {
        let code = st
            .metadata()
            .get(CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(code) = code {
            let leader = st
                .metadata()
                .get(LEADER_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if let Some(e) = FsError::from_code(code, st.message(), leader) {
                return e;
            }
        }
        // A status that did not come from a jfs handler: transport trouble,
        // a crashed peer, a timeout. Those are worth retrying elsewhere.
        match st.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::Unknown => {
                FsError::Unavailable(format!("{}: {}", st.code(), st.message()))
            }
            Code::ResourceExhausted => FsError::NoSpace(st.message().to_string()),
            Code::DataLoss => FsError::Corrupt(st.message().to_string()),
            _ => FsError::Io(format!("{}: {}", st.code(), st.message())),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<FsError> {
        use FsError::*;
        vec![
            NotFound,
            AlreadyExists,
            NotDirectory,
            IsDirectory,
            NotEmpty,
            NameTooLong,
            InvalidArgument("x".into()),
            PermissionDenied,
            NotPermitted,
            NoSpace("disk".into()),
            NoAttribute,
            TooManyLinks,
            FileTooBig,
            NotSupported("y".into()),
            Io("z".into()),
            Corrupt("block 7".into()),
            NotLeader {
                leader: Some("127.0.0.1:8101".into()),
            },
            NotLeader { leader: None },
            Unavailable("no quorum".into()),
            StaleRequest,
            SessionExpired,
            WouldBlock,
            NamespaceNotFound("default".into()),
            RecoveryReadOnly,
            ClusterMismatch("a != b".into()),
            ReadOnly,
            AccessDenied("a client certificate may not join Raft".into()),
            GrantReadOnly("client certificate \"bob\" has a read-only grant".into()),
            Internal("bug".into()),
        ]
    }

    #[test]
    fn every_error_round_trips_through_a_grpc_status() {
        for e in all() {
            let st: Status = e.clone().into();
            let back: FsError = st.into();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<u32> = all().iter().map(|e| e.code()).collect();
        codes.sort();
        let n = codes.len();
        codes.dedup();
        // NotLeader appears twice in all(); every other variant is distinct.
        assert_eq!(codes.len(), n - 1);
    }

    #[test]
    fn recovery_mode_is_25021_and_erofs() {
        let e = FsError::RecoveryReadOnly;
        assert_eq!(e.code(), 25021);
        assert_eq!(e.errno(), libc::EROFS);
        assert_eq!(
            e.cli_line(),
            "ErrorCode : 25021 , ErrorMsg: Namespace is under recovery mode, and is read-only."
        );
    }

    #[test]
    fn posix_errnos() {
        assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
        assert_eq!(FsError::NameTooLong.errno(), libc::ENAMETOOLONG);
        assert_eq!(FsError::NotEmpty.errno(), libc::ENOTEMPTY);
        assert_eq!(FsError::InvalidArgument(String::new()).errno(), libc::EINVAL);
        assert_eq!(FsError::NoSpace(String::new()).errno(), libc::ENOSPC);
    }

    #[test]
    fn foreign_statuses_become_retryable_or_io() {
        let e: FsError = Status::unavailable("connection refused").into();
        assert!(e.is_retryable());
        let e: FsError = Status::invalid_argument("bad").into();
        assert!(!e.is_retryable());
    }
}
