//! No silent hangs, no silent corruption: mismatched calls, missing ranks, ranks that
//! leave or die, and intruders all end in an error that names the rank.

use distoptim_collective::{CommConfig, CommError, Communicator, ReduceOp};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn quick() -> CommConfig {
    CommConfig::default().with_timeout(Duration::from_secs(2))
}

#[test]
fn mismatched_calls_fail_on_every_rank_naming_both_sides() {
    let errors = Communicator::run_threads(4, &quick(), |comm| {
        let mut x = vec![0f32; 4096];
        comm.barrier().unwrap();
        if comm.rank() == 3 {
            comm.all_gather(&mut x[..1024]).unwrap_err()
        } else {
            comm.all_reduce(&mut x, ReduceOp::Sum).unwrap_err()
        }
    })
    .unwrap();
    assert_eq!(
        errors[3].to_string(),
        "collective mismatch: rank 3 called all_gather(f32, 1024) as call #2 while rank 0 called all_reduce(f32, 4096, sum) as call #2"
    );
    assert_eq!(
        errors[0].to_string(),
        "collective mismatch: rank 0 called all_reduce(f32, 4096, sum) as call #2 while rank 3 called all_gather(f32, 1024) as call #2"
    );
    assert!(matches!(errors[1], CommError::Mismatch { peer: 3, .. }));
}

#[test]
fn a_rank_that_never_arrives_is_named_after_the_timeout_and_the_group_stays_failed() {
    let results = Communicator::run_threads(3, &quick().with_timeout(Duration::from_millis(300)), |comm| {
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_millis(1200));
            return None;
        }
        let start = Instant::now();
        let err = comm.broadcast(&mut [1u8; 8], 0).unwrap_err();
        let waited = start.elapsed();
        let again = comm.barrier().unwrap_err();
        Some((err, waited, again))
    })
    .unwrap();
    for (err, waited, again) in results.into_iter().flatten() {
        assert!(matches!(&err, CommError::Timeout { missing, .. } if missing == &vec![1]), "{err}");
        assert!(err.to_string().contains("rank(s) [1] did not arrive"), "{err}");
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(1), "{waited:?}");
        assert!(matches!(again, CommError::Poisoned(_)), "{again}");
    }
}

#[test]
fn a_rank_that_drops_its_communicator_is_reported_at_once() {
    let results = Communicator::run_threads(2, &CommConfig::default(), |comm| {
        if comm.rank() == 1 {
            drop(comm);
            return None;
        }
        let start = Instant::now();
        let err = comm.all_reduce(&mut vec![1f64; 100_000], ReduceOp::Max).unwrap_err();
        Some((err, start.elapsed()))
    })
    .unwrap();
    let (err, waited) = results[0].as_ref().unwrap();
    assert!(matches!(err, CommError::PeerLeft { rank: 1, .. }), "{err}");
    assert!(*waited < Duration::from_secs(2), "{waited:?}");
}

#[test]
fn bad_arguments_are_refused_without_breaking_the_group() {
    Communicator::run_threads(2, &quick(), |comm| {
        let err = comm.broadcast(&mut [0i64; 3], 2).unwrap_err();
        assert_eq!(err.to_string(), "invalid argument to broadcast: root 2 is outside a group of 2");
        let err = comm.reduce_scatter(&mut [0u8; 3], ReduceOp::Avg).unwrap_err();
        assert!(err.to_string().contains("AVG is only defined for floating-point types, not u8"), "{err}");
        let mut x = [comm.rank() as i32; 2];
        comm.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x, [1, 1]);
    })
    .unwrap();
}

fn job() -> String {
    format!("failtest-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

#[test]
fn shm_refuses_a_process_without_the_job_token() {
    let job = job();
    let config = quick();
    std::thread::scope(|s| {
        let owner = s.spawn(|| Communicator::shm(&job, "right", 0, 2, &config).map(|_| ()));
        std::thread::sleep(Duration::from_millis(100));
        let intruder = Communicator::shm(&job, "wrong", 1, 2, &config).unwrap_err();
        assert!(intruder.to_string().contains("the job token does not match"), "{intruder}");
        // The owner never gets its peer and gives up, naming it.
        let err = owner.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("rank(s) [1] did not arrive"), "{err}");
    });
    assert!(!std::path::Path::new(&format!("/dev/shm/distoptim-{job}")).exists(), "segment left behind");
}

#[test]
fn shm_rejects_bad_names_and_sizes() {
    let err = Communicator::shm("a/b", "", 0, 1, &quick()).unwrap_err();
    assert!(err.to_string().contains("job id"), "{err}");
    let err = Communicator::shm(&job(), "", 2, 2, &quick()).unwrap_err();
    assert!(err.to_string().contains("rank 2 is outside a group of 2"), "{err}");
}

/// The child half of the SIGKILL test: all-reduces forever, exits 3 with the error.
#[test]
fn child_rank_loop() {
    let Ok(job) = std::env::var("DISTOPTIM_TEST_CHILD_JOB") else { return };
    let rank: usize = std::env::var("DISTOPTIM_TEST_CHILD_RANK").unwrap().parse().unwrap();
    let comm = Communicator::shm(&job, "t", rank, 3, &CommConfig::default()).unwrap();
    let mut x = vec![1f32; 4 << 20];
    loop {
        if let Err(e) = comm.all_reduce(&mut x, ReduceOp::Max) {
            eprintln!("ERROR: {e}");
            std::process::exit(3);
        }
    }
}

#[test]
fn a_rank_killed_mid_all_reduce_is_named_by_the_others_within_seconds() {
    let job = job();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..3)
        .map(|r| {
            Command::new(&exe)
                .args(["--exact", "child_rank_loop", "--nocapture", "--test-threads=1"])
                .env("DISTOPTIM_TEST_CHILD_JOB", &job)
                .env("DISTOPTIM_TEST_CHILD_RANK", r.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // SIGKILL rank 1 and leave it unreaped (a zombie still "exists" in /proc).
    children[1].kill().unwrap();
    let killed = Instant::now();
    for r in [0, 2] {
        let child = &mut children[r];
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(killed.elapsed() < Duration::from_secs(10), "rank {r} still running 10 s after its peer died");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(3), "rank {r}: {err}");
        assert!(err.contains("rank 1 (pid") && err.contains("died during all_reduce(f32, 4194304, max)"), "rank {r}: {err}");
    }
    assert!(killed.elapsed() < Duration::from_secs(3), "took {:?}", killed.elapsed());
    let _ = children[1].wait();
}

/// One contender for rank 1 of the duplicate-rank test: joins, then all-reduces with
/// pauses (so rank 0 checks rank 1's liveness while it waits). Exits 7 when refused.
fn rank1_contender(job: &str) -> Result<(), String> {
    let comm =
        Communicator::shm(job, "t", 1, 3, &CommConfig::default().with_timeout(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(250));
        comm.all_reduce(&mut [1f32; 16], ReduceOp::Sum).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The child half of the duplicate-rank test.
#[test]
fn child_duplicate_rank() {
    let Ok(job) = std::env::var("DISTOPTIM_TEST_DUP_JOB") else { return };
    match rank1_contender(&job) {
        Ok(()) => std::process::exit(0),
        Err(e) if e.contains("already joined") => std::process::exit(7),
        Err(e) => {
            eprintln!("ERROR: {e}");
            std::process::exit(3)
        }
    }
}

#[test]
fn a_second_process_with_the_same_rank_is_refused_and_harms_nobody() {
    let job = job();
    let exe = std::env::current_exe().unwrap();
    std::thread::scope(|s| {
        let mine = s.spawn(|| rank1_contender(&job));
        std::thread::sleep(Duration::from_millis(50));
        let child = Command::new(&exe)
            .args(["--exact", "child_duplicate_rank", "--nocapture", "--test-threads=1"])
            .env("DISTOPTIM_TEST_DUP_JOB", &job)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Rank 2 joins late, so both contenders reach the segment while the group forms.
        let config = CommConfig::default().with_timeout(Duration::from_secs(10));
        let (job2, config2) = (job.clone(), config.clone());
        let late = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            let rank2 = Communicator::shm(&job2, "t", 2, 3, &config2).unwrap();
            for _ in 0..3 {
                rank2.all_reduce(&mut [1f32; 16], ReduceOp::Sum).unwrap();
            }
        });
        // Rank 0 waits for whichever contender won; the loser has exited by then, and
        // must not have left its pid in the slot (rank 0 would call rank 1 dead).
        let rank0 = Communicator::shm(&job, "t", 0, 3, &config).unwrap();
        for _ in 0..3 {
            rank0.all_reduce(&mut [1f32; 16], ReduceOp::Sum).unwrap();
        }
        late.join().unwrap();
        let out = child.wait_with_output().unwrap();
        let mine = mine.join().unwrap();
        let codes = (mine.as_ref().map_err(|e| e.contains("already joined")), out.status.code());
        assert!(
            matches!(codes, (Ok(()), Some(7)) | (Err(true), Some(0))),
            "exactly one contender must be refused: {mine:?}, child {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    });
}
