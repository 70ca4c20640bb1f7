//! The agent's one error enum, mapped once to gRPC status codes.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tonic::{Code, Status};

use crate::mounts::MountError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("{mount} is not an allowed volume of this agent (allowed: {allowed})")]
    NotAllowed { mount: PathBuf, allowed: String },
    #[error("request over a limit: {got} {what}, at most {max} ({limit})")]
    OverLimit {
        what: &'static str,
        got: usize,
        max: usize,
        limit: &'static str,
    },
    #[error("{mount} is not a mount point right now")]
    NotMounted { mount: PathBuf },
    #[error("{mount} is refused: its path is not safe")]
    UnsafePath {
        mount: PathBuf,
        #[source]
        source: crate::safepath::PathError,
    },
    #[error(
        "cannot tell which filesystem holds the agent's {what} ({path}): {why}; refusing every freeze until it can"
    )]
    AgentFileUnknown {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error(
        "{mount} is the root filesystem, which is never frozen (a freeze of any mount on the superblock of /, such as a btrfs subvolume, a bind mount or a directory of /, freezes / with it): put the data on a filesystem of its own, on its own disk, partition or logical volume, and list that mount"
    )]
    RootFilesystem { mount: PathBuf },
    #[error(
        "{mount} holds the agent's {what} ({path}); freezing it would hang the agent on its own filesystem"
    )]
    HoldsAgentFile {
        mount: PathBuf,
        what: &'static str,
        path: PathBuf,
    },
    #[error("{mount} is {fs_type}, which cannot be frozen (supported: {supported})")]
    UnsupportedFs {
        mount: PathBuf,
        fs_type: String,
        supported: String,
    },
    #[error("{mount} is busy: set {holder} holds it frozen")]
    Busy { mount: PathBuf, holder: String },
    #[error("{mount} is already frozen by someone other than this agent; refusing to touch it")]
    FrozenByOther { mount: PathBuf },
    #[error(
        "FIFREEZE on {mount} did not return within {timeout:?}; it is thawed as soon as it does"
    )]
    FreezeTimedOut { mount: PathBuf, timeout: Duration },
    #[error("FIFREEZE on {mount} failed")]
    Freeze {
        mount: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("syncfs on {mount} failed")]
    Sync {
        mount: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {mount}")]
    Open {
        mount: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("set {set_id} is not frozen on this host ({state})")]
    NotFrozen { set_id: String, state: String },
    #[error("set {set_id} is already frozen here with other volumes")]
    SetConflict { set_id: String },
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Mounts(#[from] MountError),
    #[error("cannot write the freeze record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the watchdog process is gone; refusing to freeze without it")]
    GuardianGone,
    #[error(transparent)]
    Reflink(#[from] crate::reflink::ReflinkError),
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    #[error(transparent)]
    Restore(#[from] crate::restore::RestoreError),
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::OverLimit { .. } => Code::InvalidArgument,
            Error::UnsafePath { .. } => Code::PermissionDenied,
            Error::AgentFileUnknown { .. } => Code::FailedPrecondition,
            Error::NotAllowed { .. } => Code::PermissionDenied,
            Error::RootFilesystem { .. } => Code::PermissionDenied,
            Error::HoldsAgentFile { .. } => Code::PermissionDenied,
            Error::NotMounted { .. } => Code::FailedPrecondition,
            Error::UnsupportedFs { .. } => Code::FailedPrecondition,
            Error::Busy { .. } => Code::Aborted,
            Error::FrozenByOther { .. } => Code::Aborted,
            Error::FreezeTimedOut { .. } => Code::DeadlineExceeded,
            Error::Freeze { .. } => Code::Internal,
            Error::Sync { .. } => Code::Internal,
            Error::Open { .. } => Code::Internal,
            Error::NotFrozen { .. } => Code::FailedPrecondition,
            Error::SetConflict { .. } => Code::AlreadyExists,
            Error::ShuttingDown => Code::Unavailable,
            Error::Mounts(_) => Code::Internal,
            Error::Record { .. } => Code::Internal,
            Error::GuardianGone => Code::Unavailable,
            Error::Reflink(e) => e.code(),
            Error::Hook(e) => e.code(),
            Error::Restore(e) => e.code(),
        };
        Status::new(code, error_chain(&err))
    }
}

/// Longest piece of a request an error message echoes back.
pub const ECHO_MAX_BYTES: usize = 256;

/// `text` cut to [`ECHO_MAX_BYTES`] (on a character boundary), marked when cut.
pub fn capped(text: &str) -> String {
    if text.len() <= ECHO_MAX_BYTES {
        return text.to_owned();
    }
    let mut end = ECHO_MAX_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// A requested path, capped for an error message.
pub fn capped_path(path: &std::path::Path) -> PathBuf {
    PathBuf::from(capped(&path.to_string_lossy()))
}

/// The error and all its sources on one line, for the edge (gRPC status, CLI, logs).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
