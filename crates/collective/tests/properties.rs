//! Every op × dtype × world size 1–8 × awkward lengths, on the threads and shm backends,
//! through the slot path (small and multi-round) and the registered zero-copy path,
//! compared with the sequential reference.

use distoptim_collective::{bf16, f16, reference_reduce, shard_range, CommConfig, Communicator, Element, ReduceOp};
use std::time::Duration;

/// Deterministic test values per (rank, index), in a range where every type is exact.
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

fn input<T: Sample>(rank: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::sample(rank, i)).collect()
}

/// Compares exactly: the backends reduce in rank order like the reference, so even
/// float sums agree to the bit (NaN-free inputs).
fn check<T: Element>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: element {i}: got {:?}, want {:?}", got[i], want[i]);
    }
}

/// A buffer owned by the caller or allocated from the communicator.
enum Buf<T: Element> {
    Owned(Vec<T>),
    Shared(distoptim_collective::SharedBuf<T>),
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

/// Runs every collective on `comm` for lengths that stress the partition and the slots,
/// with caller-owned buffers and (when `registered`) buffers from `comm.alloc`.
fn exercise<T: Sample>(comm: &Communicator, registered: bool) {
    let (me, n) = (comm.rank(), comm.size());
    let float = T::DTYPE.is_float();
    for len in [0, 1, n.saturating_sub(1), n + 1, 1001, 5003] {
        let inputs: Vec<Vec<T>> = (0..n).map(|r| input::<T>(r, len)).collect();
        let refs: Vec<&[T]> = inputs.iter().map(|v| v.as_slice()).collect();
        let mut storage = if registered { Buf::Shared(comm.alloc::<T>(len).unwrap()) } else { Buf::Owned(Vec::new()) };

        let tag = |op: &str| format!("{op} {} n={n} len={len} rank={me} registered={registered}", T::DTYPE);
        for op in ReduceOp::ALL {
            if op == ReduceOp::Avg && !float {
                let err = comm.all_reduce(storage.fill(&inputs[me]), op).unwrap_err();
                assert!(err.to_string().contains("AVG is only defined for floating-point"), "{err}");
                continue;
            }
            let want = reference_reduce(&refs, op);
            let b = storage.fill(&inputs[me]);
            comm.all_reduce(b, op).unwrap();
            check(&tag(&format!("all_reduce {op}")), b, &want);

            let b = storage.fill(&inputs[me]);
            comm.reduce_scatter(b, op).unwrap();
            let mine = shard_range(len, n, me);
            check(&tag(&format!("reduce_scatter {op}")), &b[mine.clone()], &want[mine]);

            let root = n / 2;
            let b = storage.fill(&inputs[me]);
            comm.reduce(b, op, root).unwrap();
            if me == root {
                check(&tag(&format!("reduce {op}")), b, &want);
            } else {
                check(&tag(&format!("reduce {op} (non-root unchanged)")), b, &inputs[me]);
            }
        }
        // all_gather: rank r's shard comes from rank r's input.
        let want: Vec<T> = (0..len).map(|i| inputs[(0..n).find(|&r| shard_range(len, n, r).contains(&i)).unwrap()][i]).collect();
        let b = storage.fill(&inputs[me]);
        comm.all_gather(b).unwrap();
        check(&tag("all_gather"), b, &want);

        let root = n - 1;
        let b = storage.fill(&inputs[me]);
        comm.broadcast(b, root).unwrap();
        check(&tag("broadcast"), b, &inputs[root]);
        comm.barrier().unwrap();
    }
}

fn exercise_all_types(comm: &Communicator) {
    for registered in [false, true] {
        exercise::<f32>(comm, registered);
        exercise::<f64>(comm, registered);
        exercise::<bf16>(comm, registered);
        exercise::<f16>(comm, registered);
        exercise::<i32>(comm, registered);
        exercise::<i64>(comm, registered);
        exercise::<u8>(comm, registered);
    }
}

/// Small slots so that 5003 elements take several rounds.
fn config() -> CommConfig {
    CommConfig::default().with_timeout(Duration::from_secs(60)).with_slot_bytes(4096)
}

#[test]
fn threads_backend_matches_reference_for_every_op_type_and_size() {
    for n in 1..=8 {
        Communicator::run_threads(n, &config(), |comm| exercise_all_types(&comm)).unwrap();
    }
}

/// Several shm ranks in one process (one thread each) join through /dev/shm files, so
/// the file-backed memory, the join protocol and the token check are exercised too.
pub fn run_shm<R: Send>(n: usize, config: &CommConfig, f: impl Fn(Communicator) -> R + Sync) -> Vec<R> {
    let job = format!("test-{}-{}", std::process::id(), rand_suffix());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let (job, f) = (&job, &f);
                s.spawn(move || f(Communicator::shm(job, "secret", r, n, config).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    h.finish()
}

#[test]
fn shm_backend_matches_reference_for_every_op_type_and_size() {
    for n in [1, 2, 3, 5, 8] {
        run_shm(n, &config(), |comm| exercise_all_types(&comm));
    }
}

#[test]
fn subgroups_from_split_and_mesh_match_reference() {
    Communicator::run_threads(8, &config(), |world| {
        // Odd and even ranks, ordered by descending rank.
        let me = world.rank();
        let half = world.split(Some((me % 2) as u32), -(me as i64)).unwrap().unwrap();
        assert_eq!(half.size(), 4);
        assert_eq!(half.rank(), (7 - me) / 2);
        exercise::<f32>(&half, false);
        exercise::<i64>(&half, true);
        // A rank that joins no group gets none, and the others still form theirs.
        let some = world.split((me != 3).then_some(0), 0).unwrap();
        assert_eq!(some.as_ref().map(|c| c.size()), (me != 3).then_some(7));

        let mesh = distoptim_collective::DeviceMesh::new(world.clone(), &[("dp", 2), ("tp", 2), ("cp", 2)]).unwrap();
        let (dp, tp, cp) = (mesh.coordinate("dp").unwrap(), mesh.coordinate("tp").unwrap(), mesh.coordinate("cp").unwrap());
        assert_eq!(me, dp * 4 + tp * 2 + cp);
        let tp_group = mesh.group("tp").unwrap();
        let mut x = vec![me as i64];
        tp_group.all_gather(&mut x[..]).unwrap_or(());
        let mut members = vec![0i64; 2];
        members[tp] = me as i64;
        tp_group.all_gather(&mut members).unwrap();
        assert_eq!(members, vec![(dp * 4 + cp) as i64, (dp * 4 + 2 + cp) as i64]);
        let dpcp = mesh.group(["dp", "cp"]).unwrap();
        assert_eq!((dpcp.size(), dpcp.rank()), (4, dp * 2 + cp));
        let mut ranks = vec![0i64; 4];
        ranks[dpcp.rank()] = me as i64;
        dpcp.all_reduce(&mut ranks, ReduceOp::Sum).unwrap();
        assert_eq!(ranks, vec![tp as i64 * 2, tp as i64 * 2 + 1, tp as i64 * 2 + 4, tp as i64 * 2 + 5]);
        exercise::<f32>(&dpcp, false);
        assert!(mesh.group("pp").unwrap_err().to_string().contains("no dimension \"pp\""));
    })
    .unwrap();
}

#[test]
fn non_blocking_work_keeps_program_order() {
    Communicator::run_threads(4, &config(), |comm| {
        let me = comm.rank();
        // Buckets in flight while the next is produced, mixed with a blocking call.
        let works: Vec<_> = (0..6).map(|b| comm.all_reduce_async(vec![(me * 10 + b) as f64; 3000 + b], ReduceOp::Sum)).collect();
        let mut x = [1i32; 5];
        comm.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x, [4; 5]);
        for (b, w) in works.into_iter().enumerate() {
            let got = w.wait().unwrap();
            assert!(got.iter().all(|&v| v == (60 + 4 * b) as f64), "bucket {b}");
        }
        let shared = comm.alloc::<f32>(10_000).unwrap();
        let shared = comm.all_gather_async(shared).wait().unwrap();
        assert_eq!(shared.len(), 10_000);
    })
    .unwrap();
}
