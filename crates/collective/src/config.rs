use std::time::Duration;

/// Settings of a communicator; `Default` is what `from_env` uses unless
/// `DISTOPTIM_TIMEOUT_S` / `DISTOPTIM_SLOT_MB` say otherwise.
#[derive(Clone, Debug)]
pub struct CommConfig {
    /// How long a rank waits for its peers in one collective before failing with the
    /// ranks that did not arrive.
    pub timeout: Duration,
    /// Bytes per data slot of the shared-memory backends (each rank has two); larger
    /// messages go in several rounds. Ignored by MPI and NCCL.
    pub slot_bytes: usize,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig { timeout: Duration::from_secs(600), slot_bytes: 4 << 20 }
    }
}

impl CommConfig {
    /// With this timeout for every collective (a rank that does not arrive in time is named).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// With shared-memory slots of `bytes` (rounded up to 4 KiB pages).
    pub fn with_slot_bytes(mut self, bytes: usize) -> Self {
        self.slot_bytes = bytes.max(1).div_ceil(4096) * 4096;
        self
    }

    /// The defaults, overridden by `DISTOPTIM_TIMEOUT_S` and `DISTOPTIM_SLOT_MB`.
    pub fn from_env() -> Result<CommConfig, crate::CommError> {
        let mut config = CommConfig::default();
        if let Some(secs) = env_number("DISTOPTIM_TIMEOUT_S")? {
            config.timeout = Duration::from_secs_f64(secs);
        }
        if let Some(mb) = env_number("DISTOPTIM_SLOT_MB")? {
            config = config.with_slot_bytes((mb * 1048576.0) as usize);
        }
        Ok(config)
    }
}

fn env_number(name: &str) -> Result<Option<f64>, crate::CommError> {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(crate::CommError::Env(format!("{name}={v:?} is not a positive number"))),
        },
        Err(_) => Ok(None),
    }
}
