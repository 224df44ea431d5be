//! End-to-end tests of `distoptim train`: real processes on the shm backend, the
//! embedded digits data, candle forward/backward.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn train(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_distoptim")).arg("train").args(args).output().expect("the distoptim binary runs");
    assert!(
        out.status.success(),
        "train {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `train` expecting it to fail; returns its stderr.
fn train_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_distoptim")).arg("train").args(args).output().expect("the distoptim binary runs");
    assert!(!out.status.success(), "train {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("distoptim-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// (step, loss, test accuracy) per row of a run's metrics.csv.
fn curve(out: &Path) -> Vec<(u64, f64, Option<f64>)> {
    let text = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics.csv was written");
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[2].parse().unwrap(), f[7].parse().ok())
        })
        .collect()
}

fn assert_same_curve(a: &[(u64, f64, Option<f64>)], b: &[(u64, f64, Option<f64>)]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0);
        assert!((x.1 - y.1).abs() <= 1e-4 * x.1.abs().max(1.0), "step {}: loss {} vs {}", x.0, x.1, y.1);
    }
}

#[test]
fn two_ranks_learn_and_follow_the_one_rank_curve() {
    let (two, one) = (scratch("two"), scratch("one"));
    let common = ["--steps", "60", "--eval-every", "20", "--verify-every", "10"];
    let out = train(&[&["--nproc", "2", "--strategy", "zero2", "--out", two.to_str().unwrap()][..], &common].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("the replicas are identical"), "{stdout}");
    train(&[&["--nproc", "1", "--strategy", "ddp", "--out", one.to_str().unwrap()][..], &common].concat());

    let curve2 = curve(&two);
    assert_eq!(curve2.len(), 60);
    let accuracy: Vec<f64> = curve2.iter().filter_map(|r| r.2).collect();
    assert_eq!(accuracy.len(), 3, "evaluated at steps 20, 40, 60");
    assert!(accuracy[2] > 0.85 && accuracy[2] >= accuracy[0], "test accuracy {accuracy:?}");
    assert!(curve2[59].1 < curve2[0].1 / 4.0, "loss {} → {}", curve2[0].1, curve2[59].1);
    // Batch-weighted reduction: 2 ranks with ZeRO-2 take the steps 1 rank with DDP takes.
    assert_same_curve(&curve2, &curve(&one));
    assert!(two.join("plot.svg").exists() && two.join("metrics.json").exists());
    let _ = (std::fs::remove_dir_all(&two), std::fs::remove_dir_all(&one));
}

#[test]
fn resume_at_another_nproc_and_strategy_continues_the_same_curve() {
    let (whole, split, ckpt) = (scratch("whole"), scratch("split"), scratch("ckpt"));
    let common = ["--steps", "40", "--eval-every", "20"];
    train(&[&["--nproc", "2", "--out", whole.to_str().unwrap()][..], &common].concat());
    let first = [
        "--nproc",
        "2",
        "--strategy",
        "zero2",
        "--stop-at",
        "20",
        "--checkpoint-dir",
        ckpt.to_str().unwrap(),
        "--out",
        split.to_str().unwrap(),
    ];
    train(&[&first[..], &common].concat());
    assert_eq!(curve(&split).len(), 20);
    let second = ["--nproc", "3", "--strategy", "zero3", "--resume", ckpt.to_str().unwrap(), "--out", split.to_str().unwrap()];
    let out = train(&[&second[..], &common].concat());
    assert!(String::from_utf8_lossy(&out.stdout).contains("resumed from"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_same_curve(&curve(&split), &curve(&whole));

    // A resume whose data order would differ is refused, naming the setting.
    let stderr = train_fails(&[
        "--nproc",
        "1",
        "--steps",
        "40",
        "--seed",
        "5",
        "--resume",
        ckpt.to_str().unwrap(),
        "--out",
        split.to_str().unwrap(),
    ]);
    assert!(stderr.contains("seed 0, this run has 5"), "{stderr}");

    // The checkpoint consolidates into files Python's safetensors reads.
    let merged = scratch("merged");
    let out = Command::new(env!("CARGO_BIN_EXE_distoptim"))
        .args(["checkpoint", "consolidate", ckpt.to_str().unwrap(), merged.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("18 tensors; largest 16384 elements"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(merged.join("model.safetensors").exists() && merged.join("optimizer.safetensors").exists());
    for d in [whole, split, ckpt, merged] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn periodic_averaging_runs_resume_mid_period_on_the_same_curve() {
    for (strategy, extra) in [
        ("post_local_sgd", ["--local-sgd-warmup", "10", "--local-sgd-period", "4"]),
        ("diloco", ["--diloco-inner-steps", "5", "--outer-lr", "0.7"]),
    ] {
        let (whole, split, ckpt) =
            (scratch(&format!("{strategy}-whole")), scratch(&format!("{strategy}-split")), scratch(&format!("{strategy}-ckpt")));
        let common = [&["--strategy", strategy, "--steps", "40", "--eval-every", "20"][..], &extra].concat();
        train(&[&common[..], &["--nproc", "2", "--out", whole.to_str().unwrap()]].concat());
        // Step 22 is inside an averaging period: the ranks' models differ there.
        train(
            &[
                &common[..],
                &["--nproc", "2", "--stop-at", "22", "--checkpoint-dir", ckpt.to_str().unwrap(), "--out", split.to_str().unwrap()],
            ]
            .concat(),
        );
        train(&[&common[..], &["--nproc", "2", "--resume", ckpt.to_str().unwrap(), "--out", split.to_str().unwrap()]].concat());
        assert_same_curve(&curve(&split), &curve(&whole));

        // Each rank's model is its own: another world size is refused, naming the reason.
        let other = [&common[..], &["--nproc", "3", "--resume", ckpt.to_str().unwrap(), "--out", split.to_str().unwrap()]].concat();
        let bad = Command::new(env!("CARGO_BIN_EXE_distoptim")).arg("train").args(&other).output().unwrap();
        assert!(!bad.status.success());
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("resume with the same number of ranks"),
            "{}",
            String::from_utf8_lossy(&bad.stderr)
        );
        for d in [whole, split, ckpt] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The pid of the launcher's child with `RANK=rank` in its environment.
fn rank_pid(launcher: u32, rank: usize) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let is_rank = environ.split(|&b| b == 0).any(|kv| kv == format!("RANK={rank}").as_bytes());
        (ppid == launcher && is_rank).then_some(pid)
    })
}

#[test]
fn a_killed_worker_fails_the_run_fast_naming_its_rank() {
    let out = scratch("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_distoptim"))
        .args(["train", "--nproc", "2", "--steps", "10000000", "--log-every", "1", "--verify-every", "0", "--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training runs, then SIGKILL rank 1.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.starts_with("step 5 "))), "training did not start");
    let pid = rank_pid(child.id(), 1).expect("rank 1 is a child of the launcher");
    // SAFETY: kill(2) on the pid of a rank this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = Instant::now();
    std::thread::spawn(move || lines.for_each(drop));
    let status = child.wait().unwrap();
    assert!(killed.elapsed() < Duration::from_secs(10), "took {:?} to stop", killed.elapsed());
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains(&format!("rank 1 (pid {pid}) was killed by signal 9")), "{stderr}");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn bad_options_are_refused_once_before_any_rank_starts() {
    for (args, says) in [
        (&["--strategy", "zero4"][..], "possible values: ddp, zero1, zero2, zero3, post_local_sgd, diloco"),
        (&["--resume", "/nonexistent"][..], "--resume /nonexistent: checkpoint: /nonexistent: no such checkpoint directory"),
        (&["--batch-size", "0"][..], "'--batch-size <BATCH_SIZE>'"),
        (&["--lr=-1"][..], "must be a positive number, got -1"),
        (&["--lr", "-1"][..], "must be a positive number, got -1"),
        (&["--clip=-1"][..], "must be a number >= 0, got -1"),
        (&["--momentum", "1.5"][..], "must be in [0, 1), got 1.5"),
    ] {
        let t = Instant::now();
        let stderr = train_fails(args);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("rank 0") && stderr.matches(says).count() == 1, "{args:?} reported by the ranks: {stderr}");
        assert!(t.elapsed() < Duration::from_secs(5), "{args:?} took {:?}", t.elapsed());
    }
}

/// bf16 and f16 (with loss scaling) train the digits model to >= 90%, close to the f32
/// curve; a bf16 run checkpointed on 3 ranks with ZeRO-3 resumes on 2 with ZeRO-1 on the
/// curve of an uninterrupted run, and DiLoCo refuses a 16-bit model by name.
#[test]
fn mixed_precision_learns_follows_f32_and_resumes_elsewhere() {
    let dirs: Vec<PathBuf> = ["f32", "bf16", "f16", "whole", "split", "ckpt"].iter().map(|n| scratch(&format!("mp-{n}"))).collect();
    let [f32_out, bf16_out, f16_out, whole, split, ckpt] = &dirs[..] else { unreachable!() };
    let accuracy = |out: &Output| -> f64 {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find(|l| l.starts_with("test accuracy")).unwrap_or_else(|| panic!("{stdout}"));
        line.split_whitespace().nth(2).unwrap().trim_end_matches('%').parse().unwrap()
    };
    train(&["--out", f32_out.to_str().unwrap()]);
    let bf16 = train(&["--precision", "bf16", "--out", bf16_out.to_str().unwrap()]);
    let f16 = train(&["--precision", "f16", "--strategy", "zero3", "--nproc", "3", "--out", f16_out.to_str().unwrap()]);
    assert!(accuracy(&bf16) >= 90.0 && accuracy(&f16) >= 90.0, "bf16 {} f16 {}", accuracy(&bf16), accuracy(&f16));
    assert!(String::from_utf8_lossy(&bf16.stdout).contains("f32 master"), "the ledger is printed");
    let (a, b) = (curve(f32_out), curve(bf16_out));
    let gap = a.iter().zip(&b).map(|(x, y)| (x.1 - y.1).abs()).sum::<f64>() / a.len() as f64;
    assert!(gap < 0.01, "bf16 loss is {gap} from f32's on average");

    let common = ["--steps", "40", "--eval-every", "20", "--precision", "bf16"];
    train(&[&["--nproc", "2", "--out", whole.to_str().unwrap()][..], &common].concat());
    let c = ckpt.to_str().unwrap();
    let s = split.to_str().unwrap();
    train(&[&["--nproc", "3", "--strategy", "zero3", "--stop-at", "20", "--checkpoint-dir", c, "--out", s][..], &common].concat());
    train(&[&["--nproc", "2", "--strategy", "zero1", "--resume", c, "--out", s][..], &common].concat());
    // Each rank's forward and backward run in bf16 on its share of the batch, so another
    // world size rounds differently: the curves agree to bf16's precision, not to f32's.
    let (w, p) = (curve(whole), curve(split));
    assert_eq!(w.len(), p.len());
    for (x, y) in w.iter().zip(&p) {
        assert!((x.1 - y.1).abs() <= 0.02 * x.1, "step {}: loss {} vs {}", x.0, x.1, y.1);
    }

    let err = train_fails(&["--precision", "bf16", "--strategy", "diloco"]);
    assert!(err.contains("diloco keeps a model per rank in f32"), "{err}");
    dirs.iter().for_each(|d| {
        let _ = std::fs::remove_dir_all(d);
    });
}

/// Muon (AdamW for the biases), Adafactor, Lion, Schedule-Free AdamW (evaluated at its
/// averaged iterate) and 8-bit AdamW train the digits model to >= 90%, with ZeRO ranges
/// snapped to whole matrices (8-bit: to quantization blocks) on 3 ranks; Schedule-Free
/// also in bf16 under ZeRO-3 (its iterate from the f32 master).
#[test]
fn the_new_optimizers_learn_the_digits() {
    let zero2 = ["--strategy", "zero2"];
    let runs = [
        ("muon", &zero2[..]),
        ("adafactor", &zero2),
        ("lion", &zero2),
        ("schedule_free_adamw", &zero2),
        ("schedule_free_adamw", &["--strategy", "zero3", "--precision", "bf16"]),
        ("adamw8bit", &zero2),
    ];
    for (optimizer, extra) in runs {
        let out_dir = scratch(&format!("opt-{optimizer}-{}", extra.join("-")));
        let args = [&["--optimizer", optimizer, "--nproc", "3", "--out", out_dir.to_str().unwrap()][..], extra].concat();
        let out = train(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find(|l| l.starts_with("test accuracy")).unwrap_or_else(|| panic!("{stdout}"));
        let accuracy: f64 = line.split_whitespace().nth(2).unwrap().trim_end_matches('%').parse().unwrap();
        assert!(accuracy >= 90.0, "{optimizer} {extra:?}: {line}");
        let _ = std::fs::remove_dir_all(&out_dir);
    }
}

/// Resuming another model names the first parameter that differs, before any rank starts
/// training; `checkpoint consolidate --help` explains its two arguments.
#[test]
fn a_resume_of_another_model_names_the_parameter_and_consolidate_explains_its_arguments() {
    let (ckpt, out) = (scratch("other-model"), scratch("other-model-out"));
    let (c, o) = (ckpt.to_str().unwrap(), out.to_str().unwrap());
    train(&["--steps", "4", "--eval-every", "4", "--checkpoint-dir", c, "--out", o]);
    let err = train_fails(&["--steps", "8", "--hidden", "64,64", "--resume", c, "--out", o]);
    assert!(err.contains("was saved for another model") && err.contains("parameter 0 is 'fc0.bias' [128]"), "{err}");
    assert!(err.contains("and 'fc0.bias' [64]"), "{err}");
    let help = Command::new(env!("CARGO_BIN_EXE_distoptim")).args(["checkpoint", "consolidate", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("<DIR>  A checkpoint directory") && help.contains("<OUT>  Where to write"), "{help}");
    let _ = (std::fs::remove_dir_all(ckpt), std::fs::remove_dir_all(out));
}
