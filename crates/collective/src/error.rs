use crate::fingerprint::Fingerprint;
use std::time::Duration;

/// Everything a collective can fail with. Errors that involve another rank name it.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The ranks disagree on which collective comes next.
    #[error("collective mismatch: rank {rank} called {mine} while rank {peer} called {theirs}")]
    Mismatch {
        /// This rank.
        rank: usize,
        /// The call it made.
        mine: Fingerprint,
        /// The rank that disagrees.
        peer: usize,
        /// The call that rank made.
        theirs: Fingerprint,
    },
    #[error("timed out after {waited:?} in {op}: rank(s) {missing:?} did not arrive")]
    /// A rank did not arrive within the timeout.
    Timeout {
        /// The call that waited.
        op: Fingerprint,
        /// The ranks that never arrived.
        missing: Vec<usize>,
        /// How long it waited.
        waited: Duration,
    },
    #[error("rank {rank} (pid {pid}) died during {op}")]
    /// A peer process exited during a call.
    PeerDied {
        /// The dead rank.
        rank: usize,
        /// Its process id.
        pid: u64,
        /// The call it died in.
        op: Fingerprint,
    },
    #[error("rank {rank} left the group (its communicator was dropped) during {op}")]
    /// A peer dropped its communicator before arriving at a call.
    PeerLeft {
        /// The rank that left.
        rank: usize,
        /// The call it did not join.
        op: Fingerprint,
    },
    #[error("the communicator is unusable after an earlier failure: {0}")]
    /// An earlier failure left the group out of step; every later call fails.
    Poisoned(String),
    #[error("invalid argument to {op}: {reason}")]
    /// A call's arguments are wrong (nothing was exchanged).
    InvalidArgument {
        /// The call.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    #[error("all_to_all counts disagree: rank {sender} sends {sends} elements to rank {receiver}, which expects {expects}")]
    /// The ranks' `all_to_all` counts do not pair up (every rank reports the same pair;
    /// nothing was exchanged and the group stays usable).
    CountMismatch {
        /// The sending rank.
        sender: usize,
        /// The receiving rank.
        receiver: usize,
        /// Elements the sender sends it.
        sends: usize,
        /// Elements the receiver expects from the sender.
        expects: usize,
    },
    #[error("cannot join the group: {0}")]
    /// Joining the group failed (another job, a stale segment, a rank claimed twice).
    Join(String),
    #[error("environment: {0}")]
    /// The launcher environment is missing or malformed.
    Env(String),
    #[error("{path}: {source}")]
    /// A file operation failed.
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    #[error("{backend} backend: {message}")]
    /// An external engine (MPI, NCCL) failed.
    Backend {
        /// Which one.
        backend: &'static str,
        /// Its message.
        message: String,
    },
}

impl CommError {
    /// The first pair of ranks whose counts disagree in a group's `all_to_all`: `sends[r]`
    /// and `recvs[r]` are rank `r`'s send and receive counts (the same matrix on every rank,
    /// so every rank names the same pair).
    pub(crate) fn check_counts(sends: &[Vec<usize>], recvs: &[Vec<usize>]) -> Result<()> {
        for (sender, counts) in sends.iter().enumerate() {
            for (receiver, &n) in counts.iter().enumerate() {
                let expects = recvs[receiver][sender];
                if n != expects {
                    return Err(CommError::CountMismatch { sender, receiver, sends: n, expects });
                }
            }
        }
        Ok(())
    }

    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        CommError::InvalidArgument { op, reason: reason.into() }
    }

    pub(crate) fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        CommError::Io { path: path.into(), source }
    }

    /// Whether the group can no longer be trusted to be in step (so later calls must fail).
    pub(crate) fn poisons(&self) -> bool {
        !matches!(self, CommError::InvalidArgument { .. } | CommError::CountMismatch { .. })
    }
}

/// A collective's result.
pub type Result<T, E = CommError> = std::result::Result<T, E>;
