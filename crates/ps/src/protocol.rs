//! The wire protocol: one request frame, one reply frame, over a TCP connection.
//!
//! A frame is a 16-byte prefix, a JSON header and raw little-endian f32 data:
//!
//! ```text
//! b"DOPS" | version u16 | kind u16 (0 request, 1 reply) | header_len u32 | data_len u32
//! header (JSON: Request or Reply) | data (data_len bytes, a multiple of 4)
//! ```
//!
//! The header is small and self-describing; the tensors travel as raw bytes, read
//! straight into the `Vec<f32>` that keeps them (no parsing, one copy from the socket).
//! Every request names the job token. A reader checks the magic, the version and both
//! lengths against its limits *before* allocating, so a malformed or oversized frame costs
//! the worker nothing but an error reply.

use distoptim_optim::{OptimizerConfig, Schedule};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"DOPS";
/// The protocol version; a frame of another version is refused.
pub const VERSION: u16 = 1;
const PREFIX: usize = 16;
/// Headers are names and shapes: 1 MiB is far more than any real one.
pub const MAX_HEADER: usize = 1 << 20;
/// The header limit before a connection has shown the job token: a stranger's frame
/// costs the worker at most this much memory.
pub const MAX_UNAUTHENTICATED_HEADER: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Whether a frame asks or answers.
pub enum Kind {
    /// A client's request.
    Request = 0,
    /// A worker's reply.
    Reply = 1,
}

/// A parameter's name and shape (its values travel in the frame's data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamMeta {
    /// The parameter's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl ParamMeta {
    /// Elements of the parameter; `None` when the shape's product overflows `usize`.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// A param group of a worker's local optimizer: parameter names and hyperparameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// Names of the group's parameters.
    pub params: Vec<String>,
    /// Its rule and hyperparameters.
    pub config: OptimizerConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// A request frame's header.
pub struct Request {
    /// The job token, checked before anything else is read.
    pub token: String,
    #[serde(flatten)]
    /// What is asked.
    pub op: Op,
}

/// What a client asks a worker. Data: the values for `CreateParams` (concatenated in
/// order) and the gradient for `SendGrads`; none otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Creates parameters; with `if_absent`, an existing one of the same shape is kept
    /// as it is (several clients can initialise the same model).
    CreateParams {
        /// The parameters to create (values in the frame's data).
        params: Vec<ParamMeta>,
        /// Keep an existing parameter of the same shape instead of refusing.
        if_absent: bool,
    },
    /// Names and shapes of these parameters (every parameter when empty).
    Describe {
        /// The parameters (all when empty).
        names: Vec<String>,
    },
    /// Current values, concatenated in order.
    Fetch {
        /// The parameters.
        names: Vec<String>,
    },
    /// Adds `grad` to the gradient of `name` recorded under `context`.
    SendGrads {
        /// The backward pass's context.
        context: u64,
        /// The parameter the gradient is for.
        name: String,
    },
    /// Creates the local optimizer `name`, or attaches to it if it exists with the same
    /// groups and schedule.
    CreateOptimizer {
        /// The optimizer's name.
        name: String,
        /// Its param groups.
        groups: Vec<GroupSpec>,
        /// Its lr schedule.
        schedule: Option<Schedule>,
    },
    /// Applies `context`'s gradients with optimizer `optimizer`, then releases the context.
    Step {
        /// The context whose gradients to apply.
        context: u64,
        /// The optimizer that applies them.
        optimizer: String,
    },
    /// Drops a context's gradients without applying them.
    Release {
        /// The context to drop.
        context: u64,
    },
    /// Writes the worker's checkpoint now.
    Checkpoint,
    /// The worker's counters.
    Stats,
}

/// What a worker answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Set when the request failed; nothing was changed then.
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// Describe/CreateParams: the parameters' names and shapes.
    pub params: Vec<ParamMeta>,
    /// Step: false when this context was already applied by this optimizer (a retry).
    #[serde(default)]
    pub applied: bool,
    /// Step: the optimizer's lr per group for the step just taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lrs: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Stats: the worker's counters.
    pub stats: Option<Stats>,
}

impl Reply {
    /// A refusal with `message`.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply { error: Some(message.into()), ..Reply::default() }
    }
}

/// A worker's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Parameters held.
    pub params: usize,
    /// Their elements in all.
    pub elements: usize,
    /// Local optimizers created.
    pub optimizers: usize,
    /// Contexts holding gradients not yet applied.
    pub open_contexts: usize,
    /// Contexts applied by a step.
    pub steps_applied: u64,
    /// Contexts dropped because their client went quiet for the context timeout.
    pub contexts_expired: u64,
    /// Requests answered with an error.
    pub requests_refused: u64,
    /// Connections closed at once because every slot was taken by authenticated clients.
    #[serde(default)]
    pub connections_refused: u64,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    /// The peer closed the connection between frames.
    Closed,
    #[error(transparent)]
    /// The socket failed.
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    /// The frame is not a valid one (magic, version, header).
    Malformed(String),
    #[error("frame of {got} bytes is over the limit of {max}")]
    /// The frame is over the size limit (nothing of it was allocated).
    TooLarge {
        /// Its announced size.
        got: usize,
        /// The limit.
        max: usize,
    },
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: Kind, header: &impl Serialize, data: &[f32]) -> std::io::Result<()> {
    let header = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    let data_bytes = f32_bytes(data);
    let too_big = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what} does not fit a frame"));
    let mut prefix = [0u8; PREFIX];
    prefix[..4].copy_from_slice(&MAGIC);
    prefix[4..6].copy_from_slice(&VERSION.to_le_bytes());
    prefix[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    prefix[8..12].copy_from_slice(&u32::try_from(header.len()).map_err(|_| too_big("header"))?.to_le_bytes());
    prefix[12..16].copy_from_slice(&u32::try_from(data_bytes.len()).map_err(|_| too_big("data"))?.to_le_bytes());
    w.write_all(&prefix)?;
    w.write_all(&header)?;
    w.write_all(data_bytes)?;
    w.flush()
}

/// Reads one frame of `kind` whose data is at most `max_data` bytes; returns the parsed
/// header and the data.
pub fn read_frame<R: Read, H: for<'de> Deserialize<'de>>(r: &mut R, kind: Kind, max_data: usize) -> Result<(H, Vec<f32>), FrameError> {
    read_frame_into(r, kind, max_data, |n| vec![0.0; n])
}

/// [`read_frame`] with the data read into `buffer(n)`, a buffer of `n` elements whose
/// contents are overwritten.
pub fn read_frame_into<R: Read, H: for<'de> Deserialize<'de>>(
    r: &mut R,
    kind: Kind,
    max_data: usize,
    buffer: impl FnOnce(usize) -> Vec<f32>,
) -> Result<(H, Vec<f32>), FrameError> {
    let (header, n) = read_head(r, kind, MAX_HEADER, max_data)?;
    Ok((header, read_data(r, n, buffer)?))
}

/// Reads a frame's prefix and header, nothing of its data: the caller decides (after
/// checking the token) whether the data is worth reading. Both lengths are checked
/// against `max_header` and `max_data` before anything is allocated. Returns the header
/// and the number of f32 data elements that follow.
pub fn read_head<R: Read, H: for<'de> Deserialize<'de>>(
    r: &mut R,
    kind: Kind,
    max_header: usize,
    max_data: usize,
) -> Result<(H, usize), FrameError> {
    let mut prefix = [0u8; PREFIX];
    match r.read(&mut prefix[..1]) {
        Ok(0) => return Err(FrameError::Closed),
        Ok(_) => r.read_exact(&mut prefix[1..])?,
        Err(e) => return Err(e.into()),
    }
    if prefix[..4] != MAGIC {
        return Err(FrameError::Malformed(format!("bad magic {:?} (not a distoptim ps frame)", &prefix[..4])));
    }
    let version = u16::from_le_bytes([prefix[4], prefix[5]]);
    if version != VERSION {
        return Err(FrameError::Malformed(format!("protocol version {version}, this side speaks {VERSION}")));
    }
    let got_kind = u16::from_le_bytes([prefix[6], prefix[7]]);
    if got_kind != kind as u16 {
        return Err(FrameError::Malformed(format!("frame kind {got_kind}, expected {}", kind as u16)));
    }
    let header_len = u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]) as usize;
    let data_len = u32::from_le_bytes([prefix[12], prefix[13], prefix[14], prefix[15]]) as usize;
    if header_len > max_header {
        return Err(FrameError::TooLarge { got: header_len, max: max_header });
    }
    if data_len > max_data {
        return Err(FrameError::TooLarge { got: data_len, max: max_data });
    }
    if !data_len.is_multiple_of(4) {
        return Err(FrameError::Malformed(format!("data of {data_len} bytes is not whole f32s")));
    }
    let mut header = vec![0u8; header_len];
    r.read_exact(&mut header)?;
    let header = serde_json::from_slice(&header).map_err(|e| FrameError::Malformed(format!("header: {e}")))?;
    Ok((header, data_len / 4))
}

/// Reads the `n` data elements that [`read_head`] announced into `buffer(n)`.
pub fn read_data<R: Read>(r: &mut R, n: usize, buffer: impl FnOnce(usize) -> Vec<f32>) -> Result<Vec<f32>, FrameError> {
    let mut data = buffer(n);
    if data.len() != n {
        return Err(FrameError::Malformed("the data buffer has the wrong size".into()));
    }
    r.read_exact(f32_bytes_mut(&mut data))?;
    Ok(data)
}

// The wire is little-endian and the data is sent as it lies in memory.
#[cfg(not(target_endian = "little"))]
compile_error!("the ps protocol sends f32 as they lie in memory, which must be little-endian");

/// The bytes of f32 values as they go on the wire (little-endian).
fn f32_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte may be read; the length covers the slice.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

fn f32_bytes_mut(data: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, std::mem::size_of_val(data)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_named() {
        let req = Request { token: "t".into(), op: Op::SendGrads { context: 7, name: "w".into() } };
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Request, &req, &[1.5, -2.0]).unwrap();
        let (got, data): (Request, _) = read_frame(&mut wire.as_slice(), Kind::Request, 1024).unwrap();
        assert_eq!((got, data), (req.clone(), vec![1.5, -2.0]));

        let err = |bytes: &[u8], max: usize| read_frame::<_, Request>(&mut &bytes[..], Kind::Request, max).unwrap_err().to_string();
        assert!(err(&wire, 4).contains("over the limit"), "{}", err(&wire, 4));
        assert!(err(b"GET / HTTP/1.1\r\n\r\n", 1024).contains("bad magic"));
        let mut v2 = wire.clone();
        v2[4] = 9;
        assert!(err(&v2, 1024).contains("protocol version 9"));
        assert!(err(&wire[..20], 1024).contains("failed to fill whole buffer"));
        let mut garbage = wire.clone();
        garbage[PREFIX] = b'{' + 1;
        assert!(err(&garbage, 1024).contains("header:"));
        let mut reply_kind = wire;
        reply_kind[6] = 1;
        assert!(err(&reply_kind, 1024).contains("frame kind 1"));
    }
}
