//! [`Communicator`]: the process group every strategy talks to, whatever the backend.
//!
//! Collectives are issued in program order: a non-blocking call goes to the group's
//! worker thread, and a blocking call first waits for the ones already issued, so every
//! rank runs the same sequence whatever mix of blocking and non-blocking calls it makes.

use crate::config::CommConfig;
use crate::element::{Element, ReduceOp};
use crate::error::{CommError, Result};
use crate::shard_range;
use crate::shared::buffer::SharedBuf;
use crate::shared::engine::{GroupSpec, SharedEngine};
use crate::shared::memory::{FileMemory, HeapMemory, Memory};
use crate::shared::segment::token_hash;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// Which engine moves the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Ranks are threads of one process.
    Threads,
    /// Ranks are processes on one host, sharing memory through /dev/shm.
    Shm,
    /// Open MPI / MPICH (feature `mpi`).
    Mpi,
    /// NCCL on CUDA devices (feature `nccl`).
    Nccl,
}

impl Backend {
    /// The name `DISTOPTIM_BACKEND` and `--backend` use.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Threads => "threads",
            Backend::Shm => "shm",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }
}

pub(crate) enum Engine {
    Shared(SharedEngine),
    #[cfg(feature = "mpi")]
    Mpi(crate::mpi::MpiEngine),
    #[cfg(feature = "nccl")]
    Nccl(crate::nccl::NcclEngine),
}

/// Calls the same method on whichever engine this is.
macro_rules! dispatch {
    ($engine:expr, $e:ident => $call:expr) => {
        match $engine {
            Engine::Shared($e) => $call,
            #[cfg(feature = "mpi")]
            Engine::Mpi($e) => $call,
            #[cfg(feature = "nccl")]
            Engine::Nccl($e) => $call,
        }
    };
}

type Job = Box<dyn FnOnce(&Inner) + Send>;

struct Inner {
    rank: usize,
    size: usize,
    backend: Backend,
    engine: Mutex<Engine>,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    pending: Mutex<usize>,
    drained: Condvar,
}

/// A process group: `rank()` of `size()` ranks and the collectives among them.
///
/// Every collective is called by all ranks of the group in the same order, with the same
/// element type, length, operator and root; a disagreement is reported on every rank as
/// [`CommError::Mismatch`]. Buffers are in place: `reduce_scatter` and `all_gather` use
/// [`shard_range`](crate::shard_range) to say which part of the buffer each rank owns.
/// Cloning gives another handle to the same group.
#[derive(Clone)]
pub struct Communicator {
    inner: Arc<Inner>,
}

/// A collective issued without blocking; `wait` returns the buffer once it is done.
#[must_use = "a collective's result is only valid after wait()"]
pub struct Work<B> {
    done: mpsc::Receiver<Result<B>>,
}

impl<B> Work<B> {
    /// Blocks until the collective completes; returns the buffer with the result.
    pub fn wait(self) -> Result<B> {
        self.done.recv().unwrap_or_else(|_| Err(CommError::Poisoned("the communicator was dropped before the work ran".into())))
    }
}

impl Communicator {
    pub(crate) fn from_engine(engine: Engine, backend: Backend) -> Communicator {
        let (rank, size) = dispatch!(&engine, e => (e.rank(), e.size()));
        Communicator {
            inner: Arc::new(Inner {
                rank,
                size,
                backend,
                engine: Mutex::new(engine),
                queue: Mutex::new(None),
                pending: Mutex::new(0),
                drained: Condvar::new(),
            }),
        }
    }

    /// `size` ranks as threads of this process: returns one communicator per rank, to
    /// be moved into its thread.
    pub fn threads(size: usize, config: &CommConfig) -> Result<Vec<Communicator>> {
        let memory: Arc<dyn Memory> = Arc::new(HeapMemory::default());
        let spec = |rank| GroupSpec {
            memory: memory.clone(),
            name: "threads".into(),
            rank,
            size,
            token_hash: 0,
            slot_bytes: config.slot_bytes,
            timeout: config.timeout,
        };
        // All ranks are created here, so nobody has to wait for the others to join.
        let engines = (0..size).map(|rank| SharedEngine::attach(spec(rank), rank == 0)).collect::<Result<Vec<_>>>();
        memory.unlink("threads");
        let engines = engines?;
        Ok(engines.into_iter().map(|e| Communicator::from_engine(Engine::Shared(e), Backend::Threads)).collect())
    }

    /// Runs `f` on `size` threads, one per rank, and returns their results in rank order.
    pub fn run_threads<R: Send>(size: usize, config: &CommConfig, f: impl Fn(Communicator) -> R + Sync) -> Result<Vec<R>> {
        let comms = Communicator::threads(size, config)?;
        let f = &f;
        Ok(std::thread::scope(|s| {
            let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        }))
    }

    /// Joins the job `job` as `rank` of `size` processes on this host. Rank 0 creates the
    /// segment `/dev/shm/distoptim-JOB`; the others wait (up to the timeout) for it to
    /// appear and present `token`, without which they cannot join.
    pub fn shm(job: &str, token: &str, rank: usize, size: usize, config: &CommConfig) -> Result<Communicator> {
        if job.is_empty() || !job.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(CommError::Join(format!("job id {job:?} must be non-empty and use only letters, digits, '-', '_' and '.'")));
        }
        let spec = GroupSpec {
            memory: Arc::new(FileMemory::new()),
            name: format!("distoptim-{job}"),
            rank,
            size,
            token_hash: token_hash(token),
            slot_bytes: config.slot_bytes,
            timeout: config.timeout,
        };
        Ok(Communicator::from_engine(Engine::Shared(SharedEngine::join(spec, rank == 0)?), Backend::Shm))
    }

    /// This process's rank in the group, from 0.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// How many ranks the group has.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// The engine this communicator runs on.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Sets how long later collectives wait for peers.
    pub fn set_timeout(&self, timeout: std::time::Duration) -> Result<()> {
        self.blocking(|engine| {
            dispatch!(engine, e => e.set_timeout(timeout));
            Ok(())
        })
    }

    /// Waits for everything issued before, then runs `f` on the engine.
    fn blocking<R>(&self, f: impl FnOnce(&mut Engine) -> Result<R>) -> Result<R> {
        let mut pending = self.inner.pending.lock().unwrap_or_else(PoisonError::into_inner);
        while *pending > 0 {
            pending = self.inner.drained.wait(pending).unwrap_or_else(PoisonError::into_inner);
        }
        drop(pending);
        let mut engine = self.inner.engine.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut engine)
    }

    /// Queues `f` on the group's worker thread (started on first use).
    fn submit<B: Send + 'static>(&self, f: impl FnOnce(&mut Engine) -> Result<B> + Send + 'static) -> Work<B> {
        let (tx, rx) = mpsc::sync_channel(1);
        *self.inner.pending.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        let job: Job = Box::new(move |inner: &Inner| {
            let result = f(&mut inner.engine.lock().unwrap_or_else(PoisonError::into_inner));
            let _ = tx.send(result);
            let mut pending = inner.pending.lock().unwrap_or_else(PoisonError::into_inner);
            *pending -= 1;
            inner.drained.notify_all();
        });
        let mut queue = self.inner.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = queue.get_or_insert_with(|| {
            let (sender, jobs) = mpsc::channel::<Job>();
            let weak = Arc::downgrade(&self.inner);
            std::thread::Builder::new()
                .name(format!("distoptim-comm-r{}", self.inner.rank))
                .spawn(move || {
                    while let Ok(job) = jobs.recv() {
                        let Some(inner) = weak.upgrade() else { break };
                        job(&inner);
                    }
                })
                .expect("spawning the communicator's worker thread");
            sender
        });
        if sender.send(job).is_err() {
            *self.inner.pending.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        }
        Work { done: rx }
    }

    /// Element-wise reduction of every rank's `buf`, result on every rank.
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        check_op::<T>("all_reduce", op)?;
        self.blocking(|engine| dispatch!(engine, e => e.all_reduce(buf, op)))
    }

    /// Reduces every rank's `buf`; afterwards this rank's part
    /// `buf[shard_range(len, size, rank)]` holds the result (the rest is unspecified).
    pub fn reduce_scatter<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        check_op::<T>("reduce_scatter", op)?;
        self.blocking(|engine| dispatch!(engine, e => e.reduce_scatter(buf, op)))
    }

    /// [`all_reduce`](Self::all_reduce) that hands this rank's part of the result,
    /// `buf[shard_range(len, size, rank)]`, to `observe`: in consecutive pieces, in order,
    /// each once its values are final. The shared-memory engine calls it on each block it
    /// has just reduced, while the block is in cache, so a caller can measure the result
    /// (a gradient norm) without another pass over memory; the other engines call it once
    /// after the collective. The pieces cover the same elements on every backend.
    pub fn all_reduce_observed<T: Element>(&self, buf: &mut [T], op: ReduceOp, observe: &mut dyn FnMut(&[T])) -> Result<()> {
        check_op::<T>("all_reduce", op)?;
        let mine = shard_range(buf.len(), self.size(), self.rank());
        self.blocking(|engine| match engine {
            Engine::Shared(e) => e.all_reduce_observed(buf, op, observe),
            #[allow(unreachable_patterns)]
            other => {
                dispatch!(other, e => e.all_reduce(buf, op))?;
                observe(&buf[mine]);
                Ok(())
            }
        })
    }

    /// [`reduce_scatter`](Self::reduce_scatter) that hands this rank's part of the result
    /// to `observe`, as [`all_reduce_observed`](Self::all_reduce_observed) does.
    pub fn reduce_scatter_observed<T: Element>(&self, buf: &mut [T], op: ReduceOp, observe: &mut dyn FnMut(&[T])) -> Result<()> {
        check_op::<T>("reduce_scatter", op)?;
        let mine = shard_range(buf.len(), self.size(), self.rank());
        self.blocking(|engine| match engine {
            Engine::Shared(e) => e.reduce_scatter_observed(buf, op, observe),
            #[allow(unreachable_patterns)]
            other => {
                dispatch!(other, e => e.reduce_scatter(buf, op))?;
                observe(&buf[mine]);
                Ok(())
            }
        })
    }

    /// Each rank contributes `buf[shard_range(len, size, rank)]`; afterwards every rank's
    /// `buf` holds all parts.
    pub fn all_gather<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        self.blocking(|engine| dispatch!(engine, e => e.all_gather(buf)))
    }

    /// Personalized exchange (MPI's `Alltoallv`): this rank's `send` holds one piece per
    /// rank in rank order, `send_counts[q]` elements for rank `q`; afterwards `recv` holds
    /// the pieces addressed to this rank in sender order, `recv_counts[r]` from rank `r`.
    /// Each rank moves only its own pieces, where an all-gather would hand every rank
    /// everything. Rank `r`'s `send_counts[q]` must equal rank `q`'s `recv_counts[r]`:
    /// every rank checks every pair before data moves, and a disagreement is
    /// [`CommError::CountMismatch`] on every rank (the group stays usable).
    ///
    /// ```
    /// use distoptim_collective::{CommConfig, Communicator};
    ///
    /// // Rank r sends r+1 copies of 10·r + q to each rank q.
    /// let got = Communicator::run_threads(3, &CommConfig::default(), |comm| {
    ///     let (r, n) = (comm.rank(), comm.size());
    ///     let send: Vec<i32> = (0..n).flat_map(|q| vec![10 * r as i32 + q as i32; r + 1]).collect();
    ///     let mut recv = vec![0i32; (1..=n).sum()];
    ///     comm.all_to_all(&send, &vec![r + 1; n], &mut recv, &(1..=n).collect::<Vec<_>>()).unwrap();
    ///     recv
    /// })
    /// .unwrap();
    /// assert_eq!(got[1], [1, 11, 11, 21, 21, 21]);
    /// ```
    pub fn all_to_all<T: Element>(&self, send: &[T], send_counts: &[usize], recv: &mut [T], recv_counts: &[usize]) -> Result<()> {
        let n = self.size();
        for (what, counts, len) in [("send", send_counts, send.len()), ("recv", recv_counts, recv.len())] {
            if counts.len() != n {
                return Err(CommError::invalid("all_to_all", format!("{} {what} counts for a group of {n}", counts.len())));
            }
            let total = counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
            if total != Some(len) {
                return Err(CommError::invalid(
                    "all_to_all",
                    format!("the {what} counts {counts:?} do not add up to the buffer's {len} elements"),
                ));
            }
        }
        if n == 1 && send_counts[0] != recv_counts[0] {
            return Err(CommError::CountMismatch { sender: 0, receiver: 0, sends: send_counts[0], expects: recv_counts[0] });
        }
        self.blocking(|engine| dispatch!(engine, e => e.all_to_all(send, send_counts, recv, recv_counts)))
    }

    /// Copies `root`'s `buf` to every rank.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.blocking(|engine| dispatch!(engine, e => e.broadcast(buf, root)))
    }

    /// Reduction whose result only `root` receives (other ranks' buffers are unchanged).
    pub fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        check_op::<T>("reduce", op)?;
        self.blocking(|engine| dispatch!(engine, e => e.reduce(buf, op, root)))
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.blocking(|engine| dispatch!(engine, e => e.barrier()))
    }

    /// [`all_reduce`](Self::all_reduce) without blocking.
    pub fn all_reduce_async<T: Element, B: AsMut<[T]> + Send + 'static>(&self, mut buf: B, op: ReduceOp) -> Work<B> {
        self.submit(move |engine| {
            check_op::<T>("all_reduce", op)?;
            dispatch!(engine, e => e.all_reduce(buf.as_mut(), op))?;
            Ok(buf)
        })
    }

    /// [`reduce_scatter`](Self::reduce_scatter) without blocking.
    pub fn reduce_scatter_async<T: Element, B: AsMut<[T]> + Send + 'static>(&self, mut buf: B, op: ReduceOp) -> Work<B> {
        self.submit(move |engine| {
            check_op::<T>("reduce_scatter", op)?;
            dispatch!(engine, e => e.reduce_scatter(buf.as_mut(), op))?;
            Ok(buf)
        })
    }

    /// [`all_gather`](Self::all_gather) without blocking.
    pub fn all_gather_async<T: Element, B: AsMut<[T]> + Send + 'static>(&self, mut buf: B) -> Work<B> {
        self.submit(move |engine| {
            dispatch!(engine, e => e.all_gather(buf.as_mut()))?;
            Ok(buf)
        })
    }

    /// [`broadcast`](Self::broadcast) without blocking.
    pub fn broadcast_async<T: Element, B: AsMut<[T]> + Send + 'static>(&self, mut buf: B, root: usize) -> Work<B> {
        self.submit(move |engine| {
            dispatch!(engine, e => e.broadcast(buf.as_mut(), root))?;
            Ok(buf)
        })
    }

    /// Allocates `len` zeroed elements from the group's shared memory (collective). On the
    /// shared-memory backends, collectives on slices of such buffers read peers' data in
    /// place instead of copying through the group's slots.
    pub fn alloc<T: Element>(&self, len: usize) -> Result<SharedBuf<T>> {
        self.blocking(|engine| dispatch!(engine, e => e.alloc(len)))
    }

    /// How the collectives travel, for logs: the backend, and under MPI whether the
    /// all-reduce is hierarchical (shm within a host, MPI across hosts) or flat.
    pub fn topology(&self) -> String {
        let engine = self.inner.engine.lock().unwrap_or_else(PoisonError::into_inner);
        match &*engine {
            Engine::Shared(_) => self.inner.backend.name().to_string(),
            #[cfg(feature = "mpi")]
            Engine::Mpi(e) => format!("mpi, {}", e.describe()),
            #[cfg(feature = "nccl")]
            Engine::Nccl(_) => "nccl".to_string(),
        }
    }

    /// MPI's `comm_split` (collective): ranks passing the same `color` form a new group,
    /// ranked by `key` and then by their rank here; `None` joins no group.
    pub fn split(&self, color: Option<u32>, key: i64) -> Result<Option<Communicator>> {
        let backend = self.inner.backend;
        let engine = self.blocking(|engine| match engine {
            Engine::Shared(e) => Ok(e.split(color, key)?.map(Engine::Shared)),
            #[cfg(feature = "mpi")]
            Engine::Mpi(e) => Ok(e.split(color, key)?.map(Engine::Mpi)),
            #[cfg(feature = "nccl")]
            Engine::Nccl(e) => Ok(e.split(color, key)?.map(Engine::Nccl)),
        })?;
        Ok(engine.map(|e| Communicator::from_engine(e, backend)))
    }
}

impl Communicator {
    /// The shared-memory engine of a communicator nobody else holds (NCCL keeps its
    /// rendezvous group this way).
    #[cfg(feature = "nccl")]
    pub(crate) fn into_shared_engine(self) -> Option<SharedEngine> {
        let inner = Arc::into_inner(self.inner)?;
        match inner.engine.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Engine::Shared(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Communicator({} rank {} of {})", self.inner.backend.name(), self.inner.rank, self.inner.size)
    }
}

/// AVG divides, so it is only defined for floating-point elements.
fn check_op<T: Element>(op: &'static str, reduce: ReduceOp) -> Result<()> {
    if reduce == ReduceOp::Avg && !T::DTYPE.is_float() {
        return Err(CommError::invalid(op, format!("AVG is only defined for floating-point types, not {}", T::DTYPE)));
    }
    Ok(())
}
