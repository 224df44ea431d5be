//! The client side: a connection to one worker, remote parameter handles (torch's RRef),
//! and gradient contexts.

use crate::error::{PsError, Result};
use crate::protocol::{read_frame, write_frame, FrameError, Kind, Op, ParamMeta, Reply, Request, Stats};
use crate::state::lock;
use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
/// How a client reaches workers: `ClientConfig::new(token)` with the defaults below.
pub struct ClientConfig {
    /// The job token every request carries.
    pub token: String,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// How long to wait for a reply (a step on a 16M-element parameter takes tens of ms).
    pub timeout: Duration,
    /// Largest reply data accepted, in bytes.
    pub max_frame_bytes: usize,
}

impl ClientConfig {
    /// The token with a 5 s connect timeout, a 60 s reply timeout and 1 GiB frames.
    pub fn new(token: impl Into<String>) -> ClientConfig {
        ClientConfig {
            token: token.into(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
            max_frame_bytes: 1 << 30,
        }
    }
}

/// An id for one backward pass's gradients (torch's `dist_autograd` context id): unique
/// across clients without coordination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextId(pub u64);

impl ContextId {
    #[allow(clippy::new_without_default)]
    /// A fresh id: time, process id and a counter, mixed.
    pub fn new() -> ContextId {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let seed =
            nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // SplitMix64's finaliser: nearby seeds give unrelated ids.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ContextId(z ^ (z >> 31))
    }
}

/// A connection to one worker. Cloning shares it; requests from several threads take
/// turns on it. After a failure the next request reconnects.
#[derive(Clone)]
pub struct WorkerClient {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    config: ClientConfig,
    conn: Mutex<Option<Conn>>,
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl std::fmt::Debug for WorkerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerClient({})", self.inner.addr)
    }
}

impl WorkerClient {
    /// Connects to the worker at `addr` (`host:port`), which is also its name in errors.
    pub fn connect(addr: &str, config: ClientConfig) -> Result<WorkerClient> {
        let client = WorkerClient { inner: Arc::new(Inner { addr: addr.to_string(), config, conn: Mutex::new(None) }) };
        *lock(&client.inner.conn) = Some(client.open()?);
        Ok(client)
    }

    /// The worker's address, as given.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    fn unreachable(&self, source: std::io::Error) -> PsError {
        PsError::Unreachable { worker: self.inner.addr.clone(), source }
    }

    fn open(&self) -> Result<Conn> {
        let c = &self.inner.config;
        let addrs: Vec<SocketAddr> = self.inner.addr.to_socket_addrs().map_err(|e| self.unreachable(e))?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the address resolves to nothing");
        for a in addrs {
            match TcpStream::connect_timeout(&a, c.connect_timeout) {
                Ok(s) => {
                    s.set_nodelay(true)
                        .and_then(|_| s.set_read_timeout(Some(c.timeout)))
                        .and_then(|_| s.set_write_timeout(Some(c.timeout)))
                        .map_err(|e| self.unreachable(e))?;
                    let reader = BufReader::with_capacity(1 << 16, s.try_clone().map_err(|e| self.unreachable(e))?);
                    return Ok(Conn { reader, writer: BufWriter::with_capacity(1 << 16, s) });
                }
                Err(e) => last = e,
            }
        }
        Err(self.unreachable(last))
    }

    /// One request and its reply. An error reply becomes [`PsError::Refused`]; a broken
    /// connection is dropped (the next call reconnects).
    pub(crate) fn call(&self, op: Op, data: &[f32]) -> Result<(Reply, Vec<f32>)> {
        let mut guard = lock(&self.inner.conn);
        if guard.is_none() {
            *guard = Some(self.open()?);
        }
        let conn = guard.as_mut().expect("connected above");
        let request = Request { token: self.inner.config.token.clone(), op };
        let result = write_frame(&mut conn.writer, Kind::Request, &request, data)
            .map_err(FrameError::Io)
            .and_then(|()| read_frame::<_, Reply>(&mut conn.reader, Kind::Reply, self.inner.config.max_frame_bytes));
        let (reply, values) = match result {
            Ok(r) => r,
            Err(e) => {
                *guard = None;
                let worker = self.inner.addr.clone();
                return Err(match e {
                    FrameError::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        PsError::Timeout { worker, timeout: self.inner.config.timeout }
                    }
                    FrameError::Io(source) => PsError::Unreachable { worker, source },
                    FrameError::Closed => PsError::Unreachable { worker, source: std::io::ErrorKind::ConnectionReset.into() },
                    source => PsError::Protocol { worker, source },
                });
            }
        };
        match reply.error {
            Some(message) => Err(PsError::Refused { worker: self.inner.addr.clone(), message }),
            None => Ok((reply, values)),
        }
    }

    /// Creates parameters on this worker from `(name, shape, values)`. With `if_absent`,
    /// existing parameters of the same shape are kept as they are (several clients may
    /// initialise the same model). Returns their handles.
    pub fn create_params(&self, params: &[(&str, &[usize], &[f32])], if_absent: bool) -> Result<Vec<RemoteParam>> {
        let metas: Vec<ParamMeta> = params.iter().map(|(n, s, _)| ParamMeta { name: n.to_string(), shape: s.to_vec() }).collect();
        let data: Vec<f32> = params.iter().flat_map(|(_, _, v)| v.iter().copied()).collect();
        let (reply, _) = self.call(Op::CreateParams { params: metas, if_absent }, &data)?;
        Ok(self.handles(reply.params))
    }

    /// Handles for parameters that already live on this worker (all when `names` is empty).
    pub fn remote(&self, names: &[&str]) -> Result<Vec<RemoteParam>> {
        let (reply, _) = self.call(Op::Describe { names: names.iter().map(|n| n.to_string()).collect() }, &[])?;
        Ok(self.handles(reply.params))
    }

    fn handles(&self, metas: Vec<ParamMeta>) -> Vec<RemoteParam> {
        metas.into_iter().map(|meta| RemoteParam { worker: self.clone(), meta }).collect()
    }

    /// Drops a context's gradients on this worker without applying them.
    pub fn release(&self, context: ContextId) -> Result<()> {
        self.call(Op::Release { context: context.0 }, &[]).map(|_| ())
    }

    /// Asks the worker to write its checkpoint now.
    pub fn checkpoint(&self) -> Result<()> {
        self.call(Op::Checkpoint, &[]).map(|_| ())
    }

    /// The worker's counters.
    pub fn stats(&self) -> Result<Stats> {
        let (reply, _) = self.call(Op::Stats, &[])?;
        reply.stats.ok_or_else(|| PsError::Invalid(format!("worker {}: no stats in the reply", self.addr())))
    }
}

/// A parameter owned by a worker (torch's RRef to it).
#[derive(Clone, Debug)]
pub struct RemoteParam {
    worker: WorkerClient,
    meta: ParamMeta,
}

impl RemoteParam {
    /// The parameter's name on its worker.
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        &self.meta.shape
    }

    /// Its element count.
    pub fn numel(&self) -> usize {
        // A shape that overflows (only a broken worker sends one) matches no gradient.
        self.meta.numel().unwrap_or(usize::MAX)
    }

    /// The worker that owns it.
    pub fn worker(&self) -> &WorkerClient {
        &self.worker
    }

    /// Its current values.
    pub fn fetch(&self) -> Result<Vec<f32>> {
        let (_, values) = self.worker.call(Op::Fetch { names: vec![self.meta.name.clone()] }, &[])?;
        Ok(values)
    }
}

/// Adds `grad` to `param`'s gradient under `context` on its worker (torch: what the
/// distributed backward pass records). Sending twice under one context accumulates.
pub fn send_grads(context: ContextId, param: &RemoteParam, grad: &[f32]) -> Result<()> {
    if grad.len() != param.numel() {
        return Err(PsError::Invalid(format!(
            "gradient for '{}' has {} elements, the parameter has shape {:?}",
            param.name(),
            grad.len(),
            param.shape()
        )));
    }
    param.worker.call(Op::SendGrads { context: context.0, name: param.meta.name.clone() }, grad).map(|_| ())
}
