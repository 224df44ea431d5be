use crate::fingerprint::Fingerprint;
use std::time::Duration;

/// Everything a collective can fail with. Errors that involve another rank name it.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The ranks disagree on which collective comes next.
    #[error("collective mismatch: rank {rank} called {mine} while rank {peer} called {theirs}")]
    Mismatch { rank: usize, mine: Fingerprint, peer: usize, theirs: Fingerprint },
    #[error("timed out after {waited:?} in {op}: rank(s) {missing:?} did not arrive")]
    Timeout { op: Fingerprint, missing: Vec<usize>, waited: Duration },
    #[error("rank {rank} (pid {pid}) died during {op}")]
    PeerDied { rank: usize, pid: u64, op: Fingerprint },
    #[error("rank {rank} left the group (its communicator was dropped) during {op}")]
    PeerLeft { rank: usize, op: Fingerprint },
    #[error("the communicator is unusable after an earlier failure: {0}")]
    Poisoned(String),
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },
    #[error("cannot join the group: {0}")]
    Join(String),
    #[error("environment: {0}")]
    Env(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{backend} backend: {message}")]
    Backend { backend: &'static str, message: String },
}

impl CommError {
    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        CommError::InvalidArgument { op, reason: reason.into() }
    }

    pub(crate) fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        CommError::Io { path: path.into(), source }
    }

    /// Whether the group can no longer be trusted to be in step (so later calls must fail).
    pub(crate) fn poisons(&self) -> bool {
        !matches!(self, CommError::InvalidArgument { .. })
    }
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;
