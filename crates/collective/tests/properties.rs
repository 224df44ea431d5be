//! The conformance suite (every op × dtype × awkward lengths, slot path small and
//! multi-round, registered zero-copy path) on the threads and shm backends for world
//! sizes 1–8, on sub-groups and meshes, and the non-blocking calls.

use distoptim_collective::{conformance, CommConfig, Communicator, ReduceOp};
use std::time::Duration;

fn exercise_all_types(comm: &Communicator) {
    let checks = conformance::run_suite(comm, true).unwrap_or_else(|e| panic!("{e}"));
    assert!(checks > 500, "only {checks} checks");
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
    for n in 1..=8 {
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
        exercise_all_types(&half);
        // A rank that joins no group gets none, and the others still form theirs.
        let some = world.split((me != 3).then_some(0), 0).unwrap();
        assert_eq!(some.as_ref().map(|c| c.size()), (me != 3).then_some(7));

        let mesh = distoptim_collective::DeviceMesh::new(world.clone(), &[("dp", 2), ("tp", 2), ("cp", 2)]).unwrap();
        let (dp, tp, cp) = (mesh.coordinate("dp").unwrap(), mesh.coordinate("tp").unwrap(), mesh.coordinate("cp").unwrap());
        assert_eq!(me, dp * 4 + tp * 2 + cp);
        let tp_group = mesh.group("tp").unwrap();
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
        exercise_all_types(&dpcp);
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

#[test]
fn observed_collectives_hand_over_exactly_this_ranks_part_of_the_result_in_order() {
    for w in [1, 2, 3, 5] {
        Communicator::run_threads(w, &config(), |comm| {
            let r = comm.rank();
            // Lengths for the small path, several rounds through 4 KiB slots, odd splits.
            for len in [0usize, 7, 1000, 5003] {
                let mine = distoptim_collective::shard_range(len, w, r);
                let init = |i: usize| (i * 7 + r * 3) as f32 * 0.25;
                for registered in [false, true] {
                    for scatter in [false, true] {
                        let mut plain: Vec<f32> = (0..len).map(init).collect();
                        let mut shared = comm.alloc::<f32>(len).unwrap();
                        shared.iter_mut().enumerate().for_each(|(i, x)| *x = init(i));
                        let buf: &mut [f32] = if registered { &mut shared } else { &mut plain };
                        let mut seen = Vec::new();
                        let mut observe = |piece: &[f32]| seen.extend_from_slice(piece);
                        if scatter {
                            comm.reduce_scatter_observed(buf, ReduceOp::Avg, &mut observe).unwrap();
                        } else {
                            comm.all_reduce_observed(buf, ReduceOp::Avg, &mut observe).unwrap();
                        }
                        assert_eq!(seen, buf[mine.clone()], "w={w} len={len} registered={registered} scatter={scatter}");
                        let want: Vec<f32> =
                            mine.clone().map(|i| (0..w).map(|q| (i * 7 + q * 3) as f32 * 0.25).sum::<f32>() / w as f32).collect();
                        assert_eq!(seen, want, "w={w} len={len}");
                    }
                }
            }
        })
        .unwrap();
    }
}

/// `all_to_all` counts that do not pair up fail on every rank with the same pair named,
/// before any data moves, and the group goes on; wrong lengths fail on the caller alone.
#[test]
fn all_to_all_counts_that_do_not_pair_up_fail_everywhere_and_the_group_goes_on() {
    let results = run_shm(3, &config(), |comm| {
        let me = comm.rank();
        // Rank 2 expects 2 elements from rank 1, which sends it 1.
        let recvs = if me == 2 { vec![1, 2, 1] } else { vec![1, 1, 1] };
        let mut recv = vec![0f32; recvs.iter().sum()];
        let first = comm.all_to_all(&[me as f32; 3], &[1, 1, 1], &mut recv, &recvs).unwrap_err().to_string();
        let local = comm.all_to_all(&[0f32; 2], &[1, 1, 1], &mut [0f32; 3], &[1, 1, 1]).unwrap_err().to_string();
        let mut recv = vec![0f32; 3];
        comm.all_to_all(&[me as f32; 3], &[1, 1, 1], &mut recv, &[1, 1, 1]).unwrap();
        (first, local, recv)
    });
    for (first, local, recv) in results {
        assert_eq!(first, "all_to_all counts disagree: rank 1 sends 1 elements to rank 2, which expects 2");
        assert!(local.contains("do not add up to the buffer's 2 elements"), "{local}");
        assert_eq!(recv, [0.0, 1.0, 2.0]);
    }
}
