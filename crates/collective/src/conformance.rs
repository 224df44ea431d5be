//! The conformance suite of the collective layer, runnable on any communicator: every op
//! × element type × awkward length (0, 1, n−1, n+1, odd, several slot rounds), with
//! caller-owned and communicator-allocated buffers, compared with the sequential
//! reference ([`reference_reduce`]). The tests run it on the threads and shm backends;
//! `distoptim selftest` runs it under `mpirun` for the MPI backend.

use crate::comm::Communicator;
use crate::element::{reference_reduce, Element, ReduceOp};
use crate::partition::shard_range;
use crate::shared::buffer::SharedBuf;
use half::{bf16, f16};

/// Deterministic values per (rank, index), in a range where every type is exact.
trait Sample: Element {
    fn sample(rank: usize, i: usize) -> Self;
}

macro_rules! float_sample {
    ($($t:ty => $conv:expr),*) => {$(
        impl Sample for $t {
            fn sample(rank: usize, i: usize) -> Self {
                let x = ((rank * 7919 + i * 104729) % 2001) as f32 / 64.0 - 15.0;
                $conv(x)
            }
        }
    )*};
}
float_sample!(f32 => |x| x, f64 => |x: f32| f64::from(x) * 1.000001, bf16 => bf16::from_f32, f16 => f16::from_f32);

macro_rules! int_sample {
    ($($t:ty),*) => {$(
        impl Sample for $t {
            fn sample(rank: usize, i: usize) -> Self {
                ((rank * 31 + i * 17) % 9 + 1) as $t
            }
        }
    )*};
}
int_sample!(i32, i64, u8);

/// A buffer owned by the caller or allocated from the communicator.
enum Buf<T: Element> {
    Owned(Vec<T>),
    Shared(SharedBuf<T>),
}

impl<T: Element> Buf<T> {
    fn fill(&mut self, data: &[T]) -> &mut [T] {
        match self {
            Buf::Owned(v) => {
                v.clear();
                v.extend_from_slice(data);
                v
            }
            Buf::Shared(s) => {
                s.copy_from_slice(data);
                s
            }
        }
    }
}

type Outcome = Result<(), String>;

/// Exact comparison: every backend reduces in rank order like the reference (MPI's sum
/// order is its own, so float sums there are compared within a relative 1e-6).
fn check<T: Element>(what: &dyn Fn() -> String, got: &[T], want: &[T], exact: bool) -> Outcome {
    if got.len() != want.len() {
        return Err(format!("{}: length {} instead of {}", what(), got.len(), want.len()));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let close = || {
            let (g, w) = (format!("{g:?}"), format!("{w:?}"));
            match (g.parse::<f64>(), w.parse::<f64>()) {
                (Ok(g), Ok(w)) => (g - w).abs() <= 1e-6 * w.abs().max(1.0) + if T::DTYPE.size() == 2 { 0.02 * w.abs() } else { 0.0 },
                _ => false,
            }
        };
        if g != w && (exact || !close()) {
            return Err(format!("{}: element {i} is {g:?} instead of {w:?}", what()));
        }
    }
    Ok(())
}

fn exercise<T: Sample>(comm: &Communicator, registered: bool, exact: bool) -> Result<usize, String> {
    let (me, n) = (comm.rank(), comm.size());
    let float = T::DTYPE.is_float();
    let err = |e: crate::CommError| e.to_string();
    let mut checks = 0;
    // 64 and 256: where an MPI call's data stops riding in its check (256 bytes).
    for len in [0, 1, n.saturating_sub(1), n + 1, 64, 65, 256, 1001, 5003] {
        let inputs: Vec<Vec<T>> = (0..n).map(|r| (0..len).map(|i| T::sample(r, i)).collect()).collect();
        let refs: Vec<&[T]> = inputs.iter().map(|v| v.as_slice()).collect();
        let mut storage = if registered { Buf::Shared(comm.alloc::<T>(len).map_err(err)?) } else { Buf::Owned(Vec::new()) };
        let tag = |op: String| move || format!("{op} {} n={n} len={len} rank={me} registered={registered}", T::DTYPE);
        for op in ReduceOp::ALL {
            if op == ReduceOp::Avg && !float {
                match comm.all_reduce(storage.fill(&inputs[me]), op) {
                    Err(e) if e.to_string().contains("AVG is only defined for floating-point") => continue,
                    other => return Err(format!("AVG on {} gave {other:?} instead of a clear error", T::DTYPE)),
                }
            }
            let want = reference_reduce(&refs, op);
            let exact_op = exact || !float || matches!(op, ReduceOp::Max | ReduceOp::Min);
            let b = storage.fill(&inputs[me]);
            comm.all_reduce(b, op).map_err(err)?;
            check(&tag(format!("all_reduce {op}")), b, &want, exact_op)?;

            let b = storage.fill(&inputs[me]);
            comm.reduce_scatter(b, op).map_err(err)?;
            let mine = shard_range(len, n, me);
            check(&tag(format!("reduce_scatter {op}")), &b[mine.clone()], &want[mine], exact_op)?;

            let root = n / 2;
            let b = storage.fill(&inputs[me]);
            comm.reduce(b, op, root).map_err(err)?;
            if me == root {
                check(&tag(format!("reduce {op}")), b, &want, exact_op)?;
            } else {
                check(&tag(format!("reduce {op} (non-root unchanged)")), b, &inputs[me], true)?;
            }
            checks += 3;
        }
        // all_gather: rank r's shard comes from rank r's input.
        let want: Vec<T> = (0..len).map(|i| inputs[(0..n).find(|&r| shard_range(len, n, r).contains(&i)).unwrap_or(0)][i]).collect();
        let b = storage.fill(&inputs[me]);
        comm.all_gather(b).map_err(err)?;
        check(&tag("all_gather".into()), b, &want, true)?;

        let root = n - 1;
        let b = storage.fill(&inputs[me]);
        comm.broadcast(b, root).map_err(err)?;
        check(&tag("broadcast".into()), b, &inputs[root], true)?;

        // all_to_all: uneven pieces (some empty) from every rank to every rank.
        let count = |from: usize, to: usize| (len + 3 * from + 5 * to) % (len + 1);
        let piece = |from: usize, to: usize| -> Vec<T> { (0..count(from, to)).map(|i| T::sample(from, 7 * i + to)).collect() };
        let send: Vec<T> = (0..n).flat_map(|q| piece(me, q)).collect();
        let want: Vec<T> = (0..n).flat_map(|r| piece(r, me)).collect();
        let mut recv = vec![T::sample(me, 1); want.len()];
        let (sends, recvs): (Vec<usize>, Vec<usize>) = (0..n).map(|q| (count(me, q), count(q, me))).unzip();
        if registered {
            // Every rank's send buffer from one allocation: read in place where it can be.
            let mut shared = comm.alloc::<T>(n * (len + 1)).map_err(err)?;
            shared[..send.len()].copy_from_slice(&send);
            comm.all_to_all(&shared[..send.len()], &sends, &mut recv, &recvs).map_err(err)?;
        } else {
            comm.all_to_all(&send, &sends, &mut recv, &recvs).map_err(err)?;
        }
        check(&tag("all_to_all".into()), &recv, &want, true)?;
        comm.barrier().map_err(err)?;
        checks += 4;
    }
    Ok(checks)
}

/// Runs the whole suite on `comm` (collective: every rank calls it) and returns how
/// many results this rank checked. `exact` demands bit-equal float sums, which the
/// embedded backends give and MPI does not promise.
pub fn run_suite(comm: &Communicator, exact: bool) -> Result<usize, String> {
    let mut checks = 0;
    for registered in [false, true] {
        checks += exercise::<f32>(comm, registered, exact)?;
        checks += exercise::<f64>(comm, registered, exact)?;
        checks += exercise::<bf16>(comm, registered, exact)?;
        checks += exercise::<f16>(comm, registered, exact)?;
        checks += exercise::<i32>(comm, registered, exact)?;
        checks += exercise::<i64>(comm, registered, exact)?;
        checks += exercise::<u8>(comm, registered, exact)?;
    }
    Ok(checks)
}
