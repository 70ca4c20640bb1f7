//! The coordinator's one error enum, mapped once to gRPC status codes.

use quiesce_proto::echo::{Capped, status_message};
use tonic::{Code, Status};

use crate::catalog::CatalogError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("unknown group {} (configured: {known})", Capped(group))]
    UnknownGroup { group: String, known: String },
    #[error("unknown set {}", Capped(id))]
    UnknownSet { id: String },
    #[error("group {group} already has a running set ({running}); wait for it to finish")]
    GroupBusy { group: String, running: String },
    #[error("set {id} is still running")]
    SetRunning { id: String },
    #[error("set {id} is {state}; only a consistent set can be restored")]
    NotRestorable {
        id: String,
        state: quiesce_proto::coordinator::v1::SetState,
    },
    #[error("agent {agent} is not configured")]
    UnknownAgent { agent: String },
    #[error("agent {agent}: {message}")]
    Agent { agent: String, message: String },
    /// The agent answered, with an error of its own (not: it could not be reached). `code`
    /// is the agent's, kept where it means the same to an operator.
    #[error("agent {agent}: {message}")]
    AgentRefused {
        agent: String,
        code: Code,
        message: String,
    },
    #[error("snapshot provider: {message}")]
    Provider { message: String },
    #[error("{identity} may not {action} on group {group}")]
    PermissionDenied {
        identity: String,
        action: &'static str,
        group: String,
    },
    #[error(
        "set {id} is locked until {until} (lock-for of group {group}); an early delete needs two different admins to run `quiescectl sets delete {id} --approve` within {window}"
    )]
    Locked {
        id: String,
        group: String,
        until: String,
        window: String,
    },
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Catalog(CatalogError),
}

impl From<CatalogError> for Error {
    fn from(err: CatalogError) -> Error {
        match err {
            CatalogError::GroupBusy { group, running } => Error::GroupBusy { group, running },
            other => Error::Catalog(other),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::UnknownGroup { .. } => Code::NotFound,
            Error::UnknownSet { .. } => Code::NotFound,
            Error::GroupBusy { .. } => Code::AlreadyExists,
            Error::SetRunning { .. } => Code::FailedPrecondition,
            Error::NotRestorable { .. } => Code::FailedPrecondition,
            Error::UnknownAgent { .. } => Code::NotFound,
            Error::Agent { .. } => Code::Unavailable,
            Error::AgentRefused { code, .. } => agent_answer_code(*code),
            Error::Provider { .. } => Code::Unavailable,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::Locked { .. } => Code::FailedPrecondition,
            Error::ShuttingDown => Code::Unavailable,
            Error::Catalog(_) => Code::Internal,
        };
        Status::new(code, status_message(error_chain(&err)))
    }
}

/// The code the coordinator answers with when an agent refused a request. The agent's own code
/// where it says the same thing about the operator's request; never a code that `quiescectl`
/// reads as "this client is refused" or "the coordinator is unreachable".
fn agent_answer_code(code: Code) -> Code {
    match code {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Internal => code,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::PermissionDenied
        | Code::Unimplemented
        | Code::Unavailable
        | Code::DataLoss
        | Code::Unauthenticated => Code::FailedPrecondition,
    }
}

/// What became of a call to an agent: it answered with an error (`AgentRefused`, the agent's
/// message once), or it could not be reached (`Agent`).
pub fn from_agent(agent: &str, status: &Status) -> Error {
    let answered = std::error::Error::source(status).is_none()
        && !matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        );
    if answered {
        Error::AgentRefused {
            agent: agent.to_owned(),
            code: status.code(),
            message: status_line(status),
        }
    } else {
        Error::Agent {
            agent: agent.to_owned(),
            message: status_line(status),
        }
    }
}

/// The error and all its sources on one line, for the edge.
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

/// An agent's gRPC status, as one line naming the agent.
pub fn agent_error(agent: &str, status: &Status) -> String {
    format!("{agent}: {}", status_line(status))
}

/// A gRPC status as one line: its message (or its code when it has none), then — for failures
/// below gRPC, such as a refused connection or a TLS handshake that refused the peer's
/// certificate — the chain of causes, which the message alone ("transport error") does not say.
pub fn status_line(status: &Status) -> String {
    let mut line = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_owned()
    };
    if let Some(source) = std::error::Error::source(status) {
        line.push_str(": ");
        line.push_str(&error_chain(source));
    }
    line
}
