//! Fault injection, end to end: real `distoptim train` processes killed at every file
//! operation of a checkpoint save, checkpoint directories with awkward names, hostile
//! checkpoints, and a launcher killed under its ranks. Nothing here may lose or delete
//! data, hang, or pass an edited checkpoint as good.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use distoptim::checkpoint::{self, Manifest};

fn distoptim(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distoptim"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the distoptim binary runs")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} succeeded:\n{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("distoptim-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A short 2-rank run: checkpoints at step 4 and at the end (step 8).
fn train_args<'a>(ckpt: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["train", "--nproc", "2", "--steps", "8", "--checkpoint-every", "4", "--verify-every", "0", "--checkpoint-dir", ckpt, "--out", out]
}

#[test]
fn checkpoint_dirs_of_any_name_never_touch_what_the_job_did_not_create() {
    let base = scratch("names");
    let out = base.join("out");
    for sibling in ["ckpt.old", "run.old", "X.old.old", "ckpt.partial"] {
        std::fs::create_dir_all(base.join(sibling)).unwrap();
        std::fs::write(base.join(sibling).join("precious.txt"), "keep").unwrap();
    }
    for name in ["ckpt", "run.v1", "X.old", "ckpt.partial/inner"] {
        let dir = base.join(name);
        ok(&distoptim(&train_args(s(&dir), s(&out)), &[]), name);
        let m = checkpoint::read_manifest(&dir).unwrap();
        assert_eq!(m.step, 8, "{name}");
    }
    for sibling in ["ckpt.old", "run.old", "X.old.old", "ckpt.partial"] {
        assert_eq!(std::fs::read_to_string(base.join(sibling).join("precious.txt")).unwrap(), "keep", "{sibling} was touched");
    }

    // A trailing slash, resumed into the same directory, with retention.
    let dir = format!("{}/", s(&base.join("slash")));
    let mut first = train_args(&dir, s(&out));
    first.extend(["--stop-at", "4"]);
    ok(&distoptim(&first, &[]), "stop at 4");
    let mut second = train_args(&dir, s(&out));
    second.extend(["--resume", &dir, "--keep", "1"]);
    let stdout = ok(&distoptim(&second, &[]), "resume with a trailing slash");
    assert!(stdout.contains("at step 4"), "{stdout}");
    let steps: Vec<String> = std::fs::read_dir(base.join("slash"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(steps, ["step-0000000008"], "--keep 1 keeps only the newest");
    assert_eq!(std::fs::read_to_string(base.join("slash/latest")).unwrap(), "step-0000000008\n");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn concurrent_jobs_never_collide() {
    let base = scratch("concurrent");
    // Two jobs with their own directories, side by side, four times over.
    for round in 0..4 {
        let runs: Vec<_> = ["exp.a", "exp.b"]
            .into_iter()
            .map(|name| {
                let (dir, out) = (base.join(format!("{name}{round}")), base.join(format!("out-{name}{round}")));
                std::thread::spawn(move || distoptim(&train_args(s(&dir), s(&out)), &[]))
            })
            .collect();
        for r in runs {
            ok(&r.join().unwrap(), "a concurrent job");
        }
    }
    // Two jobs with the same directory: the second is refused while the first runs.
    let shared = base.join("shared");
    /// Kills the job when the test ends, also when an assertion fails first.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _long = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_distoptim"))
            .args(["train", "--nproc", "1", "--steps", "100000", "--checkpoint-every", "1", "--verify-every", "0", "--out"])
            .arg(base.join("out-long"))
            .arg("--checkpoint-dir")
            .arg(&shared)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while !shared.join("latest").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "the long job wrote no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = fails(&distoptim(&train_args(s(&shared), s(&base.join("out-second"))), &[]), "a second job in the same directory");
    assert!(err.contains("is in use by another job"), "{err}");
    let _ = std::fs::remove_dir_all(&base);
}

/// How many fault points a whole run passes on `rank`.
fn fault_points(rank: usize, base: &Path) -> usize {
    let (dir, out) = (base.join(format!("trace-{rank}")), base.join("out"));
    let args = [&train_args(s(&dir), s(&out))[..], &["--keep", "1"]].concat();
    let run = distoptim(&args, &[("DISTOPTIM_FAULT_TRACE", "1".into()), ("DISTOPTIM_FAULT_RANK", rank.to_string())]);
    ok(&run, "the traced run");
    String::from_utf8_lossy(&run.stderr).lines().filter(|l| l.contains("fault point")).count()
}

#[test]
fn a_crash_at_any_file_operation_leaves_a_checkpoint_that_resumes_and_consolidates() {
    let base = scratch("kill");
    let mut tested = 0;
    let mut outcomes = std::collections::BTreeMap::new();
    for rank in [0usize, 1] {
        let points = fault_points(rank, &base);
        assert!(points >= if rank == 0 { 20 } else { 6 }, "rank {rank}: only {points} fault points");
        for at in 1..=points {
            let (dir, out, merged) = (base.join(format!("r{rank}-{at}")), base.join("out"), base.join("merged"));
            let args = [&train_args(s(&dir), s(&out))[..], &["--keep", "1"]].concat();
            let crashed = distoptim(&args, &[("DISTOPTIM_FAULT_AT", at.to_string()), ("DISTOPTIM_FAULT_RANK", rank.to_string())]);
            let err = fails(&crashed, &format!("rank {rank} killed at point {at}"));
            assert!(err.contains("killed by signal 9"), "rank {rank} point {at}: {err}");
            let _ = std::fs::remove_dir_all(&merged);
            let consolidated = distoptim(&["checkpoint", "consolidate", s(&dir), s(&merged)], &[]);
            let step = if consolidated.status.success() {
                // Whatever the crash left resumes, at another world size too, and finishes.
                let mut resume =
                    vec!["train", "--nproc", "1", "--steps", "8", "--verify-every", "0", "--out", s(&out), "--resume", s(&dir)];
                resume.extend(["--checkpoint-dir", s(&dir), "--keep", "1"]);
                let stdout = ok(&distoptim(&resume, &[]), &format!("resume after rank {rank} died at point {at}"));
                let step = stdout.split("at step ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("?").to_string();
                assert!(step == "4" || step == "8", "rank {rank} point {at}: resumed at step {step}");
                step
            } else {
                // Only a crash inside the very first save may leave nothing, and it says so.
                let err = String::from_utf8_lossy(&consolidated.stderr);
                assert!(
                    err.contains("no complete checkpoint") || err.contains("no such checkpoint directory"),
                    "rank {rank} point {at}: {err}"
                );
                "none yet".to_string()
            };
            *outcomes.entry(format!("rank {rank}: {step}")).or_insert(0) += 1;
            tested += 1;
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    eprintln!("fault injection: {tested} kill points tested; outcomes {outcomes:?}");
    assert!(outcomes.keys().any(|k| k.ends_with(": 8")) && outcomes.keys().any(|k| k.ends_with(": 4")));
    let _ = std::fs::remove_dir_all(&base);
}

/// Rewrites a checkpoint's manifest through `edit`, sealing it with a valid checksum
/// when `reseal` (an attacker who knows the format), or leaving the old one.
fn edit_manifest(dir: &Path, reseal: bool, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    let bytes = if reseal {
        let m: Manifest = serde_json::from_value(v).unwrap();
        m.to_bytes().unwrap()
    } else {
        serde_json::to_vec_pretty(&v).unwrap()
    };
    std::fs::write(&path, bytes).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn hostile_checkpoints_are_refused_by_name_without_hanging_or_allocating() {
    let base = scratch("hostile");
    let (root, out) = (base.join("ckpt"), base.join("out"));
    ok(&distoptim(&train_args(s(&root), s(&out)), &[]), "the run that writes the checkpoint");
    let (good, _, _) = checkpoint::resolve(&root).unwrap();
    let case = |name: &str| {
        let dir = base.join(name);
        copy_dir(&good, &dir);
        dir
    };
    let consolidate_err = |dir: &Path| {
        let start = Instant::now();
        let err = fails(&distoptim(&["checkpoint", "consolidate", s(dir), s(&base.join("merged"))], &[]), "consolidate");
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
        err
    };
    let resume_err = |dir: &Path| {
        let args = ["train", "--nproc", "2", "--steps", "8", "--verify-every", "0", "--out", s(&out), "--resume", s(dir)];
        fails(&distoptim(&args, &[]), "resume")
    };

    // Edited fields without a matching checksum.
    for (name, field, value) in [
        ("world", "world_size", serde_json::json!(3)),
        ("strategy", "strategy", serde_json::json!("ddp")),
        ("step", "step", serde_json::json!(1_000_000_000_000_000_000u64)),
        ("schedule", "schedule_step", serde_json::json!(u64::MAX)),
    ] {
        let dir = case(name);
        edit_manifest(&dir, false, |v| v[field] = value);
        for err in [consolidate_err(&dir), resume_err(&dir)] {
            assert!(err.contains("checksum does not match"), "{name}: {err}");
        }
    }
    // Resealed, but not backed by the files: a 2^40-element parameter, a huge counter.
    let dir = case("huge-shape");
    edit_manifest(&dir, true, |v| {
        let params = v["layout"]["params"].as_array_mut().unwrap();
        let last = params.len() - 1;
        params[last]["shape"] = serde_json::json!([1u64 << 40]);
        let before: u64 =
            params[..last].iter().map(|p| p["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product::<u64>()).sum();
        v["layout"]["numel"] = serde_json::json!(before + (1u64 << 40));
    });
    let err = consolidate_err(&dir);
    assert!(["offsets or element count", "too few for", "is not rank 0's"].iter().any(|m| err.contains(m)), "{err}");
    let dir = case("huge-counter");
    edit_manifest(&dir, true, |v| v["counters"]["train_step"] = serde_json::json!(1u64 << 60));
    assert!(resume_err(&dir).contains("is over"), "huge counter");

    // A rank file without its step counts (checksums updated): refused, not a silent reset.
    let dir = case("no-steps");
    let file = dir.join("rank-00001.safetensors");
    let decoded = distoptim::safetensors::decode(&std::fs::read(&file).unwrap()).unwrap();
    let mut metadata = decoded.metadata.clone();
    metadata.remove("steps");
    let tensors: Vec<(String, &[f32])> = decoded.tensors.iter().map(|(k, v)| (k.clone(), v.as_slice())).collect();
    let bytes = distoptim::safetensors::encode(&tensors, &metadata);
    std::fs::write(&file, &bytes).unwrap();
    edit_manifest(&dir, true, |v| {
        v["files"][1]["bytes"] = serde_json::json!(bytes.len());
        v["files"][1]["crc32"] = serde_json::json!(format!("{:08x}", crc32(&bytes)));
    });
    assert!(resume_err(&dir).contains("no valid 'steps' metadata"), "steps removed");

    // A FIFO and a link to /dev/zero instead of a rank file: refused at once.
    let dir = case("fifo");
    let file = dir.join("rank-00000.safetensors");
    std::fs::remove_file(&file).unwrap();
    let c = std::ffi::CString::new(s(&file)).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(consolidate_err(&dir).contains("not a regular file") || resume_err(&dir).contains("not a regular file"));
    assert!(resume_err(&dir).contains("rank-00000.safetensors"));
    let dir = case("zero");
    let file = dir.join("rank-00001.safetensors");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &file).unwrap();
    assert!(consolidate_err(&dir).contains("not a regular file"));

    // A damaged `latest` pointer: resume falls back to the newest complete checkpoint.
    std::fs::write(root.join("latest"), "../../etc\n").unwrap();
    let stdout = ok(
        &distoptim(&["train", "--nproc", "1", "--steps", "8", "--verify-every", "0", "--out", s(&out), "--resume", s(&root)], &[]),
        "resume past a damaged pointer",
    );
    assert!(stdout.contains("at step 8"), "{stdout}");
    let _ = std::fs::remove_dir_all(&base);
}

fn crc32(bytes: &[u8]) -> u32 {
    // The same CRC-32 (zlib's) the manifest uses, bit by bit: an independent check.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Children of `parent` (their pids).
fn children(parent: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z")))
        .unwrap_or(false)
}

#[test]
fn ranks_die_with_a_killed_launcher() {
    let out = scratch("orphans");
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_distoptim"))
        .args(["train", "--nproc", "2", "--steps", "10000000", "--verify-every", "0", "--out", s(&out)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let ranks = loop {
        let ranks = children(launcher.id());
        if ranks.len() == 2 {
            break ranks;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the ranks did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let killed = Instant::now();
    while ranks.iter().any(|&p| running(p)) {
        assert!(killed.elapsed() < Duration::from_secs(5), "ranks {ranks:?} outlived their launcher");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(out);
}
