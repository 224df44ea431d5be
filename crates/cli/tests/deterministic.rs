//! Deterministic mode and elastic recovery, end to end: `distoptim train` on real
//! processes, compared by the parameter hash it prints at the end.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn train_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distoptim"));
    cmd.arg("train").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the distoptim binary runs")
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The parameter hash `train` printed (it must have succeeded).
fn hash(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", text(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("parameter hash ")).unwrap_or_else(|| panic!("{what}: no hash line:\n{stdout}"));
    let hex = line.split_whitespace().nth(2).unwrap().to_string();
    assert!(hex.len() >= 16 && hex.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    hex
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("distoptim-det-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

const STEPS: &str = "40";

fn run(nproc: usize, extra: &[&str], out: &Path, env: &[(&str, String)]) -> Output {
    let n = nproc.to_string();
    let args = [&["--deterministic", "--nproc", &n, "--steps", STEPS, "--out", out.to_str().unwrap()][..], extra].concat();
    train_env(&args, env)
}

#[test]
fn the_same_bits_at_every_world_size_strategy_and_across_a_resume() {
    let out = scratch("ws");
    let reference = hash(&run(1, &[], &out, &[]), "1 rank");
    for (nproc, strategy) in [(2, "zero2"), (3, "ddp"), (4, "zero3"), (5, "zero1")] {
        let got = hash(&run(nproc, &["--strategy", strategy], &out, &[]), &format!("{nproc} ranks {strategy}"));
        assert_eq!(got, reference, "{nproc} ranks with {strategy}");
    }
    // The thread count does not enter either.
    let got = hash(&run(1, &[], &out, &[("RAYON_NUM_THREADS", "3".into())]), "3 threads");
    assert_eq!(got, reference, "1 rank on 3 threads");
    // 2 ranks to step 20, then 3 ranks under another strategy to the end.
    let ckpt = scratch("ws-ckpt");
    let c = ckpt.to_str().unwrap();
    let first = run(2, &["--stop-at", "20", "--checkpoint-dir", c], &out, &[]);
    assert!(first.status.success(), "{}", text(&first));
    let resumed = hash(&run(3, &["--strategy", "zero3", "--resume", c], &out, &[]), "resumed on 3 ranks");
    assert_eq!(resumed, reference, "2 ranks to step 20, then 3");
    // Muon (Newton–Schulz on GEMM kernels, one rank per matrix) and Adafactor
    // (factored statistics), on wider layers, at other world and thread counts.
    for opt in ["muon", "adafactor"] {
        let args = ["--optimizer", opt, "--hidden", "384,256", "--steps", "15"];
        let n = |nproc: usize, extra: &[&str], threads: &str| {
            let n = nproc.to_string();
            let all = [&["--deterministic", "--nproc", &n, "--out", out.to_str().unwrap()][..], &args, extra].concat();
            hash(&train_env(&all, &[("RAYON_NUM_THREADS", threads.into())]), opt)
        };
        let one = n(1, &[], "1");
        assert_eq!(n(1, &[], "3"), one, "{opt}: 1 rank on 3 threads");
        assert_eq!(n(3, &["--strategy", "zero3"], "2"), one, "{opt}: 3 ranks, zero3");
    }
    // bf16 parameters too (a hash of its own, the same at 1 and 3 ranks).
    let b1 = hash(&run(1, &["--precision", "bf16"], &out, &[]), "bf16 1 rank");
    assert_eq!(hash(&run(3, &["--precision", "bf16", "--strategy", "zero3"], &out, &[]), "bf16 3 ranks"), b1);
    // The normal mode differs between world sizes (the reason for this mode), so the
    // comparison above can fail.
    let n = |nproc: &str| hash(&train_env(&["--nproc", nproc, "--steps", STEPS, "--out", out.to_str().unwrap()], &[]), "normal mode");
    assert_ne!(n("1"), n("3"), "normal mode at 1 and 3 ranks");
    let _ = std::fs::remove_dir_all(&ckpt);
}

#[test]
fn deterministic_mode_refuses_what_it_cannot_promise() {
    let out = scratch("refuse");
    for (extra, says) in [
        (&["--strategy", "diloco"][..], "diloco depends on the world size"),
        (&["--precision", "f16"][..], "f16"),
        (&["--micro-shards", "2"][..], "--micro-shards 2"),
    ] {
        let o = run(3, extra, &out, &[]);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(text(&o).contains(says), "{extra:?}: {}", text(&o));
    }
}

/// An elastic run's output: its hash, and what the launcher and rank 0 said.
fn elastic(nproc: usize, extra: &[&str], env: &[(&str, String)], name: &str) -> (Output, String) {
    let out = scratch(name);
    let o = run(nproc, &[&["--elastic"][..], extra].concat(), &out, env);
    let t = text(&o);
    (o, t)
}

#[test]
fn a_rank_killed_anywhere_even_mid_snapshot_leaves_the_uninterrupted_result() {
    let reference = hash(&run(4, &[], &scratch("ref"), &[]), "uninterrupted");
    // Fault points: four per snapshot (before the slot is marked WRITING, after the
    // metadata, after the data, after COMPLETE), at several steps and ranks.
    for (at, rank) in [(5usize, 2usize), (38, 1), (103, 3), (150, 0)] {
        let env = [("DISTOPTIM_FAULT_AT", at.to_string()), ("DISTOPTIM_FAULT_RANK", rank.to_string())];
        let (o, t) = elastic(4, &["--shrink"], &env, "kill");
        assert!(t.contains("fault injection: killing this process"), "point {at}: no kill happened:\n{t}");
        assert!(t.contains("restarting on 3 ranks"), "point {at}:\n{t}");
        assert!(t.contains("elastic: recovered in"), "point {at}:\n{t}");
        assert_eq!(hash(&o, "after a kill"), reference, "killed rank {rank} at point {at}");
    }
    // Without --shrink: the same number of ranks again (torchrun's --max-restarts).
    let env = [("DISTOPTIM_FAULT_AT", "60".to_string()), ("DISTOPTIM_FAULT_RANK", "1".to_string())];
    let (o, t) = elastic(4, &[], &env, "same");
    assert!(t.contains("restarting on 4 ranks"), "{t}");
    assert_eq!(hash(&o, "restart on 4"), reference);
}

#[test]
fn a_second_kill_during_recovery_is_survived_or_fails_by_name() {
    // For the clean failures below: the first start loses rank 2.
    let env = |restart: &str| {
        [
            ("DISTOPTIM_FAULT_AT", "50".to_string()),
            ("DISTOPTIM_FAULT_RANK", "2".to_string()),
            ("DISTOPTIM_FAULT_RESTART", restart.to_string()),
        ]
    };
    let both =
        [("DISTOPTIM_FAULT_AT", "2".to_string()), ("DISTOPTIM_FAULT_RANK", "0".to_string()), ("DISTOPTIM_FAULT_RESTART", "1".to_string())];
    let out = scratch("second");
    let shm = scratch("second-shm");
    std::fs::create_dir_all(&shm).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distoptim"));
    cmd.args(["train", "--deterministic", "--elastic", "--shrink", "--nproc", "4", "--steps", "400", "--out", out.to_str().unwrap()])
        .env("DISTOPTIM_SHM_DIR", &shm)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &both {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    // At a step that differs from run to run.
    let step = 20 + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 % 200;
    let victim = wait_for_snapshot_then_pick_rank(child.id(), &shm, step);
    // SAFETY: kill(2) of a process of this test's own launcher.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert!(t.contains("restarting on 3 ranks"), "killed at step {step}:\n{t}");
    assert!(t.contains("restarting on 2 ranks"), "the second death was not survived:\n{t}");
    let r = scratch("ref400");
    let long_reference =
        hash(&train_env(&["--deterministic", "--nproc", "2", "--steps", "400", "--out", r.to_str().unwrap()], &[]), "uninterrupted 400");
    assert_eq!(hash(&o, "two kills"), long_reference);
    let _ = std::fs::remove_dir_all(&shm);

    // Not enough ranks left, or no restart left: a clean failure that says which.
    let (o, t) = elastic(4, &["--shrink", "--min-nproc", "4"], &env("0"), "min");
    assert!(!o.status.success() && t.contains("below --min-nproc 4"), "{t}");
    let (o, t) = elastic(4, &["--max-restarts", "0"], &env("0"), "max");
    assert!(!o.status.success() && t.contains("no restart left (--max-restarts 0 used)") && t.contains("rank 2"), "{t}");
}

/// Waits until the elastic job under `launcher` has completed a snapshot at step `step`
/// or later (its snapshot directory is inside `shm`; rank 0's slot headers say which
/// steps it holds), then returns the pid of a rank of that job.
fn wait_for_snapshot_then_pick_rank(launcher: u32, shm: &Path, step: u64) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no snapshot at step {step} within a minute");
        let snap = std::fs::read_dir(shm)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("distoptim-snapshots-")));
        let newest = snap.and_then(|d| std::fs::read(d.join("gen-0000/rank-00000")).ok()).map(|bytes| {
            // Two 64-byte headers: magic, state (2 = complete), step, ...
            let word = |slot: usize, i: usize| {
                bytes.get(slot * 64 + 8 * i..slot * 64 + 8 * i + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
            };
            (0..2).filter(|&slot| word(slot, 1) == 2).map(|slot| word(slot, 2)).max().unwrap_or(0)
        });
        if newest.is_some_and(|s| s >= step) {
            let kids = children(launcher);
            if let Some(&pid) = kids.get(kids.len() / 2) {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The pids whose parent is `parent`.
fn children(parent: u32) -> Vec<i32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            kids.push(pid);
        }
    }
    kids.sort();
    kids
}

/// (step, loss) per row of a run's metrics.csv.
fn curve(out: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics.csv was written");
    text.lines().skip(1).map(|l| l.split(',').collect::<Vec<_>>()).map(|f| (f[0].parse().unwrap(), f[2].parse().unwrap())).collect()
}

#[test]
fn without_deterministic_mode_a_shrunk_run_follows_the_loss_curve() {
    let (a, b) = (scratch("curve-ref"), scratch("curve-kill"));
    let common = ["--nproc", "4", "--steps", "60", "--eval-every", "20"];
    let reference = train_env(&[&common[..], &["--out", a.to_str().unwrap()]].concat(), &[]);
    assert!(reference.status.success(), "{}", text(&reference));
    let env = [("DISTOPTIM_FAULT_AT", "90".to_string()), ("DISTOPTIM_FAULT_RANK", "3".to_string())];
    let killed = train_env(&[&common[..], &["--elastic", "--shrink", "--out", b.to_str().unwrap()]].concat(), &env);
    let t = text(&killed);
    assert!(killed.status.success() && t.contains("restarting on 3 ranks"), "{t}");
    let (x, y) = (curve(&a), curve(&b));
    assert_eq!(x.len(), 60);
    assert_eq!(x.iter().map(|r| r.0).collect::<Vec<_>>(), y.iter().map(|r| r.0).collect::<Vec<_>>(), "every step once");
    for ((step, l1), (_, l2)) in x.iter().zip(&y) {
        assert!((l1 - l2).abs() <= 1e-4 * l1.abs().max(1.0), "step {step}: loss {l1} vs {l2}");
    }
}

#[test]
fn a_killed_launchers_snapshots_are_removed_by_the_next_one() {
    let shm = scratch("orphans");
    std::fs::create_dir_all(&shm).unwrap();
    // A pid that has exited, and one that runs (this test's own).
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let orphan = shm.join(format!("distoptim-snapshots-{dead}-abc"));
    let alive = shm.join(format!("distoptim-snapshots-{}-abc", std::process::id()));
    for d in [&orphan, &alive] {
        std::fs::create_dir_all(d.join("gen-0000")).unwrap();
    }
    let out = scratch("orphans-out");
    let o = train_env(
        &["--elastic", "--nproc", "2", "--steps", "5", "--out", out.to_str().unwrap()],
        &[("DISTOPTIM_SHM_DIR", shm.display().to_string())],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!orphan.exists(), "the dead launcher's directory is left");
    assert!(alive.exists(), "a running launcher's directory was removed");
    let left: Vec<_> = std::fs::read_dir(&shm).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 1, "this launcher's own directory is removed at its end: {left:?}");
    let _ = std::fs::remove_dir_all(&shm);
}
