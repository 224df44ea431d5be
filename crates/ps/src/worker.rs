//! The worker: a TCP server that owns parameters and applies clients' gradients.
//!
//! One thread per connection (clients keep one connection per worker and send one request
//! at a time on it), one reaper thread that drops contexts whose client went quiet. A
//! request that fails (unknown parameter, shape mismatch) gets an error reply and changes
//! nothing; a frame that cannot be parsed (bad magic, version, oversized, truncated) gets
//! an error reply and the connection is closed, since the stream can no longer be trusted
//! to be at a frame boundary. Neither affects other connections.
//!
//! Strangers cost little. Until a connection has sent one frame with the job token, its
//! headers are limited to [`MAX_UNAUTHENTICATED_HEADER`], the token is checked before
//! any of a frame's data is read (a wrong token closes the connection, the data unread),
//! and it is closed after [`WorkerConfig::auth_timeout`] of silence. At most
//! [`WorkerConfig::max_unauthenticated`] such connections are held: a new one evicts the
//! oldest, so a flood of idle sockets cannot lock a real client out. Authenticated
//! connections are capped by [`WorkerConfig::max_connections`]. A panic while serving
//! a request becomes an error reply; the connection and its descriptor are released
//! either way.

use crate::error::{PsError, Result};
use crate::persist;
use crate::protocol::{read_data, read_head, write_frame, FrameError, Kind, Op, Reply, Request, MAX_HEADER, MAX_UNAUTHENTICATED_HEADER};
use crate::state::{lock, WorkerState};
use std::io::BufWriter;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
/// How a worker serves: `WorkerConfig::new(token)` with the defaults below.
pub struct WorkerConfig {
    /// The job token every request must carry.
    pub token: String,
    /// Largest frame data accepted, in bytes.
    pub max_frame_bytes: usize,
    /// A context nobody has sent gradients to for this long is dropped.
    pub context_timeout: Duration,
    /// A connection silent for this long (mid-frame or between requests) is closed.
    pub idle_timeout: Duration,
    /// A connection that has not sent a frame with the token after this long is closed.
    pub auth_timeout: Duration,
    /// Connections held before authentication; a new one evicts the oldest.
    pub max_unauthenticated: usize,
    /// Connections held in all; past it a new one is closed at once.
    pub max_connections: usize,
    /// Where `Checkpoint` writes, and where the worker restarts from if a checkpoint is
    /// there.
    pub checkpoint_dir: Option<PathBuf>,
}

impl WorkerConfig {
    /// The token with 1 GiB frames, 60 s contexts, 600 s idle connections and the connection limits below.
    pub fn new(token: impl Into<String>) -> WorkerConfig {
        WorkerConfig {
            token: token.into(),
            max_frame_bytes: 1 << 30,
            context_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(600),
            auth_timeout: Duration::from_secs(5),
            max_unauthenticated: 64,
            max_connections: 1024,
            checkpoint_dir: None,
        }
    }
}

/// A bound worker, not yet serving.
pub struct Worker {
    listener: TcpListener,
    state: Arc<WorkerState>,
    config: Arc<WorkerConfig>,
}

/// A worker serving on background threads (see [`Worker::spawn`]).
pub struct RunningWorker {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Open connections (a clone of each stream, to close them on stop), by id.
    conns: Connections,
    threads: Vec<JoinHandle<()>>,
}

/// An open connection as the acceptor tracks it.
struct Conn {
    /// A clone of the stream, to close it (eviction, stop).
    stream: TcpStream,
    /// Set once a frame carried the job token.
    authenticated: Arc<AtomicBool>,
    accepted: Instant,
}

type Connections = Arc<Mutex<std::collections::HashMap<u64, Conn>>>;

/// Makes room for a new connection: evicts the oldest unauthenticated one when those are
/// at their cap, and refuses the new one when every slot is taken by authenticated ones.
fn admit(conns: &mut std::collections::HashMap<u64, Conn>, config: &WorkerConfig) -> bool {
    let pending = conns.values().filter(|c| !c.authenticated.load(Ordering::Relaxed)).count();
    if pending >= config.max_unauthenticated.max(1) || conns.len() >= config.max_connections.max(1) {
        let oldest =
            conns.iter().filter(|(_, c)| !c.authenticated.load(Ordering::Relaxed)).min_by_key(|(_, c)| c.accepted).map(|(&id, _)| id);
        match oldest {
            Some(id) => {
                if let Some(c) = conns.remove(&id) {
                    let _ = c.stream.shutdown(std::net::Shutdown::Both);
                }
            }
            None => return false,
        }
    }
    true
}

impl Worker {
    /// Binds `addr`. With a checkpoint dir holding a checkpoint, the worker restarts from
    /// it; `init` (a safetensors file) seeds parameters otherwise.
    pub fn bind(addr: &str, config: WorkerConfig, init: Option<&std::path::Path>) -> Result<Worker> {
        if config.token.is_empty() {
            return Err(PsError::Invalid("a worker needs a non-empty job token".into()));
        }
        let restart = config.checkpoint_dir.as_ref().map(|d| d.join(persist::FILE)).filter(|p| p.exists());
        let state = match restart.as_deref().or(init) {
            Some(path) => persist::load(path)?,
            None => WorkerState::default(),
        };
        let listener = TcpListener::bind(addr).map_err(|source| PsError::Io { what: format!("binding {addr}"), source })?;
        Ok(Worker { listener, state: Arc::new(state), config: Arc::new(config) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|source| PsError::Io { what: "local address".into(), source })
    }

    /// Serves until the process ends.
    pub fn serve(self) -> Result<()> {
        let running = self.spawn()?;
        for t in running.threads {
            let _ = t.join();
        }
        Ok(())
    }

    /// Serves on background threads; [`RunningWorker::stop`] ends it.
    pub fn spawn(self) -> Result<RunningWorker> {
        let addr = self.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Connections = Arc::default();
        let reaper = {
            let (state, stop, timeout) = (self.state.clone(), stop.clone(), self.config.context_timeout);
            std::thread::Builder::new()
                .name("ps-reaper".into())
                .spawn(move || {
                    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        state.expire(timeout);
                    }
                })
                .map_err(|source| PsError::Io { what: "spawning the reaper".into(), source })?
        };
        let acceptor = {
            let (stop, conns) = (stop.clone(), conns.clone());
            let Worker { listener, state, config } = self;
            std::thread::Builder::new()
                .name("ps-accept".into())
                .spawn(move || {
                    for (id, stream) in (0u64..).zip(listener.incoming()) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let Ok(clone) = stream.try_clone() else { continue };
                        let authenticated = Arc::new(AtomicBool::new(false));
                        {
                            let mut open = lock(&conns);
                            if !admit(&mut open, &config) {
                                state.connections_refused.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            open.insert(id, Conn { stream: clone, authenticated: authenticated.clone(), accepted: Instant::now() });
                        }
                        let (state, config, open) = (state.clone(), config.clone(), conns.clone());
                        let spawned = std::thread::Builder::new().name("ps-conn".into()).spawn(move || {
                            // Whatever happens inside, the slot and its descriptor are released.
                            let _ = catch_unwind(AssertUnwindSafe(|| serve_connection(stream, &state, &config, &authenticated)));
                            lock(&open).remove(&id);
                        });
                        if spawned.is_err() {
                            lock(&conns).remove(&id);
                        }
                    }
                })
                .map_err(|source| PsError::Io { what: "spawning the acceptor".into(), source })?
        };
        Ok(RunningWorker { addr, stop, conns, threads: vec![acceptor, reaper] })
    }
}

impl RunningWorker {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection and waits for the server threads: to a
    /// client, the same as the worker dying.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for (_, c) in lock(&self.conns).drain() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn token_matches(got: &str, want: &str) -> bool {
    got.len() == want.len() && got.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn serve_connection(stream: TcpStream, state: &WorkerState, config: &WorkerConfig, authenticated: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(config.auth_timeout.min(config.idle_timeout)));
    let Ok(mut reader) = stream.try_clone() else { return };
    let mut writer = BufWriter::with_capacity(1 << 16, stream);
    let refuse = |writer: &mut BufWriter<TcpStream>, message: String| {
        state.requests_refused.fetch_add(1, Ordering::Relaxed);
        let _ = write_frame(writer, Kind::Reply, &Reply::error(message), &[]);
    };
    loop {
        let trusted = authenticated.load(Ordering::Relaxed);
        let max_header = if trusted { MAX_HEADER } else { MAX_UNAUTHENTICATED_HEADER };
        let (request, n) = match read_head::<_, Request>(&mut reader, Kind::Request, max_header, config.max_frame_bytes) {
            Ok(head) => head,
            Err(FrameError::Closed | FrameError::Io(_)) => return,
            Err(e @ (FrameError::Malformed(_) | FrameError::TooLarge { .. })) => return refuse(&mut writer, e.to_string()),
        };
        // The token decides whether the data is read at all.
        if !token_matches(&request.token, &config.token) {
            return refuse(&mut writer, "wrong job token".into());
        }
        if !trusted {
            authenticated.store(true, Ordering::Relaxed);
            let _ = writer.get_ref().set_read_timeout(Some(config.idle_timeout));
        }
        let data = match read_data(&mut reader, n, |n| state.pool.take(n)) {
            Ok(data) => data,
            Err(FrameError::Closed | FrameError::Io(_)) => return,
            Err(e) => return refuse(&mut writer, e.to_string()),
        };
        let (reply, out) = catch_unwind(AssertUnwindSafe(|| handle(state, config, request.op, data)))
            .unwrap_or_else(|panic| (Reply::error(format!("internal error while serving the request: {}", panic_message(&panic))), vec![]));
        if reply.error.is_some() {
            state.requests_refused.fetch_add(1, Ordering::Relaxed);
        }
        if write_frame(&mut writer, Kind::Reply, &reply, &out).is_err() {
            return;
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("panic")
}

fn handle(state: &WorkerState, config: &WorkerConfig, op: Op, data: Vec<f32>) -> (Reply, Vec<f32>) {
    let result = match op {
        Op::CreateParams { params, if_absent } => {
            state.create_params(&params, data, if_absent).map(|params| (Reply { params, ..Reply::default() }, vec![]))
        }
        Op::Describe { names } => state.describe(&names).map(|params| (Reply { params, ..Reply::default() }, vec![])),
        Op::Fetch { names } => state.fetch(&names).map(|(params, values)| (Reply { params, ..Reply::default() }, values)),
        Op::SendGrads { context, name } => state.send_grads(context, &name, data).map(|()| (Reply::default(), vec![])),
        Op::CreateOptimizer { name, groups, schedule } => {
            state.create_optimizer(&name, groups, schedule).map(|()| (Reply::default(), vec![]))
        }
        Op::Step { context, optimizer } => {
            state.step(context, &optimizer).map(|(applied, lrs)| (Reply { applied, lrs, ..Reply::default() }, vec![]))
        }
        Op::Release { context } => {
            state.release(context);
            Ok((Reply::default(), vec![]))
        }
        Op::Checkpoint => match &config.checkpoint_dir {
            None => Err("this worker was started without a checkpoint directory".to_string()),
            Some(dir) => persist::save(state, dir).map(|_| (Reply::default(), vec![])).map_err(|e| e.to_string()),
        },
        Op::Stats => Ok((Reply { stats: Some(state.stats()), ..Reply::default() }, vec![])),
    };
    result.unwrap_or_else(|message| (Reply::error(message), vec![]))
}
