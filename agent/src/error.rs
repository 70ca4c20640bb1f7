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
    #[error("{mount} is not a mount point right now")]
    NotMounted { mount: PathBuf },
    #[error("{mount} is the root filesystem, which is never frozen")]
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
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument(_) => Code::InvalidArgument,
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
        };
        Status::new(code, error_chain(&err))
    }
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
