//! The NCCL backend (feature `nccl`): collectives on CUDA devices through cudarc, which
//! loads the CUDA driver and NCCL at run time, so the feature builds without CUDA and
//! fails with a typed error where no GPU driver or NCCL library is installed.
//!
//! Ranks rendezvous over the shm backend (same environment as `distoptim launch`): rank
//! 0 creates the NCCL unique id and broadcasts it; the same group checks each call's
//! fingerprint before NCCL runs it, so mismatches fail with the usual error instead of
//! hanging inside NCCL. Each rank uses the GPU `LOCAL_RANK`. This first version takes
//! host slices like the other backends and stages them through device memory (one copy
//! each way); device-resident buffers are future work. `split` is not supported yet.

use crate::comm::{Backend, Communicator, Engine};
use crate::config::CommConfig;
use crate::element::{Dtype, Element, ReduceOp};
use crate::error::{CommError, Result};
use crate::fingerprint::OpKind;
use crate::partition::shard_range;
use crate::shared::buffer::{SharedAlloc, SharedBuf};
use crate::shared::engine::SharedEngine;
use crate::shared::memory::{HeapMemory, Memory};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::result::{NcclError, NcclStatus};
use cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp as NcclOp};
use std::sync::Arc;

pub(crate) struct NcclEngine {
    boot: SharedEngine,
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: the engine is used by one thread at a time (the communicator's lock); NCCL
// communicators may be used from any thread when calls are not concurrent.
unsafe impl Send for NcclEngine {}

fn err(message: impl Into<String>) -> CommError {
    CommError::Backend { backend: "nccl", message: message.into() }
}

/// Whether the CUDA driver and NCCL can be loaded (cudarc panics on first use otherwise).
pub fn available() -> bool {
    // SAFETY: these only try to dlopen the libraries.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// Joins the job from the launcher's environment on GPU `LOCAL_RANK`.
pub(crate) fn from_env(config: &CommConfig) -> Result<Communicator> {
    if !available() {
        return Err(err("no CUDA driver or NCCL library found on this machine"));
    }
    let boot_comm = crate::env::shm_from_env(config)?;
    let local: usize = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut id_bytes = [0u8; 128];
    let (rank, size) = (boot_comm.rank(), boot_comm.size());
    if rank == 0 {
        let id = Id::new().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
        for (b, c) in id_bytes.iter_mut().zip(id.internal()) {
            *b = *c as u8;
        }
    }
    boot_comm.broadcast(&mut id_bytes, 0)?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (c, b) in internal.iter_mut().zip(id_bytes) {
        *c = b as std::ffi::c_char;
    }
    let ctx = CudaContext::new(local).map_err(|e| err(format!("opening GPU {local} (LOCAL_RANK): {e:?}")))?;
    let stream = ctx.default_stream();
    let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal)).map_err(|e| err(format!("ncclCommInitRank: {e:?}")))?;
    let boot = boot_comm.into_shared_engine().ok_or_else(|| err("the rendezvous group is still in use"))?;
    Ok(Communicator::from_engine(Engine::Nccl(NcclEngine { boot, comm, stream }), Backend::Nccl))
}

/// What to run once the buffer is on the device.
#[derive(Clone, Copy)]
enum Call {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast(usize),
    Reduce(ReduceOp, usize),
}

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
        ReduceOp::Min => NcclOp::Min,
        ReduceOp::Prod => NcclOp::Prod,
    }
}

/// Reinterprets a slice of `T` as the same-sized cudarc type `U` of the same dtype.
fn cast<T: Element, U>(buf: &mut [T]) -> &mut [U] {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<U>());
    // SAFETY: same size and plain data (dispatch matches the dtype).
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut U, buf.len()) }
}

impl NcclEngine {
    pub(crate) fn rank(&self) -> usize {
        self.boot.rank()
    }

    pub(crate) fn size(&self) -> usize {
        self.boot.size()
    }

    pub(crate) fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.boot.set_timeout(timeout);
    }

    fn run<T: Element>(&mut self, kind: OpKind, buf: &mut [T], root: usize, call: Call) -> Result<()> {
        self.boot.agree(kind, Some(T::DTYPE), buf.len(), root)?;
        if buf.is_empty() {
            return Ok(());
        }
        match T::DTYPE {
            Dtype::F32 => self.typed::<f32>(cast(buf), call),
            Dtype::F64 => self.typed::<f64>(cast(buf), call),
            Dtype::Bf16 => self.typed::<half::bf16>(cast(buf), call),
            Dtype::F16 => self.typed::<half::f16>(cast(buf), call),
            Dtype::I32 => self.typed::<i32>(cast(buf), call),
            Dtype::I64 => self.typed::<i64>(cast(buf), call),
            Dtype::U8 => self.typed::<u8>(cast(buf), call),
        }
    }

    /// Stages `host` on the device, runs `call`, copies the result back. NCCL's
    /// reduce-scatter and all-gather need equal parts, so the balanced shards are padded
    /// to `ceil(len / n)` elements each on the device and unpacked on the way back.
    fn typed<U: NcclType + DeviceRepr + ValidAsZeroBits + Copy + Default>(&mut self, host: &mut [U], call: Call) -> Result<()> {
        let (n, me, len) = (self.size(), self.rank(), host.len());
        let fail = |what: &str, e: &dyn std::fmt::Debug| err(format!("{what}: {e:?}"));
        let part = len.div_ceil(n);
        let padded = |host: &[U]| {
            let mut v = vec![U::default(); part * n];
            for r in 0..n {
                let s = shard_range(len, n, r);
                v[r * part..r * part + s.len()].copy_from_slice(&host[s]);
            }
            v
        };
        match call {
            Call::AllReduce(op) => self.in_place(host, true, |c, d| c.all_reduce_in_place(d, &nccl_op(op)))?,
            Call::Reduce(op, root) => self.in_place(host, root == me, |c, d| c.reduce_in_place(d, &nccl_op(op), root as i32))?,
            Call::Broadcast(root) => self.in_place(host, true, |c, d| c.broadcast_in_place(d, root as i32))?,
            Call::ReduceScatter(op) => {
                let send = self.stream.clone_htod(&padded(host)).map_err(|e| fail("copy to device", &e))?;
                let mut recv = self.stream.alloc_zeros::<U>(part).map_err(|e| fail("device alloc", &e))?;
                self.comm.reduce_scatter(&send, &mut recv, &nccl_op(op)).map_err(|e| fail("ncclReduceScatter", &e))?;
                let mut out = vec![U::default(); part];
                self.stream.memcpy_dtoh(&recv, &mut out).map_err(|e| fail("copy to host", &e))?;
                let mine = shard_range(len, n, me);
                let k = mine.len();
                host[mine].copy_from_slice(&out[..k]);
            }
            Call::AllGather => {
                let mine = shard_range(len, n, me);
                let mut chunk = vec![U::default(); part];
                chunk[..mine.len()].copy_from_slice(&host[mine]);
                let send = self.stream.clone_htod(&chunk).map_err(|e| fail("copy to device", &e))?;
                let mut recv = self.stream.alloc_zeros::<U>(part * n).map_err(|e| fail("device alloc", &e))?;
                self.comm.all_gather(&send, &mut recv).map_err(|e| fail("ncclAllGather", &e))?;
                let mut all = vec![U::default(); part * n];
                self.stream.memcpy_dtoh(&recv, &mut all).map_err(|e| fail("copy to host", &e))?;
                for r in 0..n {
                    let s = shard_range(len, n, r);
                    let k = s.len();
                    host[s].copy_from_slice(&all[r * part..r * part + k]);
                }
            }
        }
        self.stream.synchronize().map_err(|e| fail("stream synchronize", &e))
    }

    /// Copies `host` to the device, runs `f` on it in place, copies it back if `copy_back`.
    fn in_place<U: NcclType + DeviceRepr>(
        &self,
        host: &mut [U],
        copy_back: bool,
        f: impl FnOnce(&Comm, &mut CudaSlice<U>) -> std::result::Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        let mut dev = self.stream.clone_htod(host).map_err(|e| err(format!("copy to device: {e:?}")))?;
        f(&self.comm, &mut dev).map_err(|e| err(format!("NCCL collective: {e:?}")))?;
        if copy_back {
            self.stream.memcpy_dtoh(&dev, host).map_err(|e| err(format!("copy to host: {e:?}")))?;
        }
        Ok(())
    }

    pub(crate) fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.run(OpKind::AllReduce(op), buf, 0, Call::AllReduce(op))
    }

    pub(crate) fn reduce_scatter<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.run(OpKind::ReduceScatter(op), buf, 0, Call::ReduceScatter(op))
    }

    pub(crate) fn all_gather<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        self.run(OpKind::AllGather, buf, 0, Call::AllGather)
    }

    /// The pieces are host slices and the ranks share a host (they rendezvous over shm),
    /// so they go straight through the rendezvous group's shared memory rather than to
    /// the device and back.
    pub(crate) fn all_to_all<T: Element>(
        &mut self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.boot.all_to_all(send, send_counts, recv, recv_counts)
    }

    pub(crate) fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        self.run(OpKind::Broadcast, buf, root, Call::Broadcast(root))
    }

    pub(crate) fn reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.check_root("reduce", root)?;
        self.run(OpKind::Reduce(op), buf, root, Call::Reduce(op, root))
    }

    pub(crate) fn barrier(&mut self) -> Result<()> {
        self.boot.barrier()
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(CommError::invalid(op, format!("root {root} is outside a group of {}", self.size())));
        }
        Ok(())
    }

    /// Host memory (device-resident buffers are not exposed yet).
    pub(crate) fn alloc<T: Element>(&mut self, len: usize) -> Result<SharedBuf<T>> {
        self.boot.agree(OpKind::Alloc, Some(T::DTYPE), len, 0)?;
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| CommError::invalid("alloc", "size overflows"))?;
        let region = HeapMemory::default().create("nccl", bytes, &|_| {})?;
        Ok(SharedBuf::new(Arc::new(SharedAlloc { id: 0, rank: 0, regions: vec![region] }), len))
    }

    pub(crate) fn split(&mut self, _color: Option<u32>, _key: i64) -> Result<Option<NcclEngine>> {
        Err(err("split is not supported on the nccl backend yet (use the shm or mpi backend for sub-groups)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_joining_is_a_typed_error_not_a_panic() {
        if available() {
            return; // a GPU machine: exercised by the device run instead
        }
        let e = from_env(&CommConfig::default()).unwrap_err();
        assert!(matches!(e, CommError::Backend { backend: "nccl", .. }), "{e}");
        assert!(e.to_string().contains("no CUDA driver or NCCL library"), "{e}");
    }
}
