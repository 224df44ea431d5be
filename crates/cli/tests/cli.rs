//! End-to-end: the `distoptim` binary as users and the checker call it.

use std::path::PathBuf;
use std::process::{Command, Output};

fn distoptim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distoptim")).args(args).output().expect("the distoptim binary runs")
}

fn case(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/cases").join(name);
    p.to_string_lossy().into_owned()
}

#[test]
fn replay_prints_one_json_object() {
    let out = distoptim(&["replay", &case("adam_single.json")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert!(v["params"].is_object() && v["per_step"].is_array());
}

#[test]
fn replay_errors_go_to_stderr_with_their_class() {
    for (file, class) in [
        ("err_nonfinite_nan.json", "nonfinite"),
        ("err_shape_mismatch.json", "shape_mismatch"),
        ("err_world_size_zero.json", "invalid_world_size"),
    ] {
        let out = distoptim(&["replay", &case(file)]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        assert!(out.stdout.is_empty(), "{file}: stdout must stay empty");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with(&format!("replay: {class}: ")), "{file}: {err}");
    }
    let out = distoptim(&["replay", "/nonexistent/case.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/case.json"));
}

#[test]
fn bench_optim_prints_steps_next_to_copy() {
    let out = distoptim(&[
        "bench",
        "optim",
        "--sizes",
        "100000",
        "--tensors",
        "3",
        "--threads",
        "1,2",
        "--iters",
        "2",
        "--adafactor-shapes",
        "32x48",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("% of copy"), "{text}");
    // 2 workloads x 6 optimizers x 2 thread counts, then Adafactor on the matrix at both
    // thread counts, each with a positive copy figure.
    let names = ["sgd_momentum", "adamw", "lion", "schedule_free", "adafactor", "adamw8bit"];
    let rows: Vec<&str> = text.lines().filter(|l| l.split_whitespace().next().is_some_and(|w| names.contains(&w))).collect();
    assert_eq!(rows.len(), 26, "{text}");
    assert_eq!(rows.iter().filter(|r| r.contains(" 32x48 ")).count(), 2, "{text}");
    for r in rows {
        let copy: f64 = r.split_whitespace().nth(6).unwrap().parse().unwrap();
        assert!(copy > 0.0, "{r}");
    }
}

#[test]
fn launch_sets_the_torchrun_environment_and_prefixes_output() {
    let out = distoptim(&[
        "launch",
        "--nproc",
        "2",
        "--",
        "sh",
        "-c",
        "echo rank $RANK of $WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE job ${DISTOPTIM_JOB_ID:+set}",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for r in 0..2 {
        assert!(stdout.contains(&format!("[rank {r}] rank {r} of 2 local {r}/2 job set")), "{stdout}");
    }
}

#[test]
fn launch_stops_everyone_and_names_the_rank_that_failed() {
    for (script, expect) in [
        ("if [ $RANK = 1 ]; then exit 7; fi; exec sleep 30", "rank 1 (pid"),
        ("if [ $RANK = 2 ]; then kill -9 $$; fi; exec sleep 30", "was killed by signal 9 (SIGKILL)"),
    ] {
        let start = std::time::Instant::now();
        let out = distoptim(&["launch", "--nproc", "3", "--grace", "1", "--", "sh", "-c", script]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(expect) && err.contains("stopped the other ranks"), "{err}");
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "took {:?}", start.elapsed());
    }
    let out = distoptim(&["launch", "--nproc", "2", "--", "sh", "-c", "exit 7"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited with code 7"));
}

#[test]
fn ctrl_c_on_the_launcher_stops_every_rank() {
    let child = Command::new(env!("CARGO_BIN_EXE_distoptim"))
        .args(["launch", "--nproc", "2", "--", "sh", "-c", "echo pid $$; exec sleep 30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted by signal 2"), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<&str> = stdout.lines().filter_map(|l| l.split("pid ").nth(1)).collect();
    assert_eq!(pids.len(), 2, "{stdout}");
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "rank process {pid} survived");
    }
}

#[test]
fn selftest_passes_on_shm_processes_and_threads() {
    let out = distoptim(&["selftest", "--nproc", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("collective results match the sequential reference").count(), 3, "{stdout}");
    let out = distoptim(&["selftest", "--backend", "threads", "--nproc", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bench_collectives_prints_checked_rows_with_the_memcpy_reference() {
    let out =
        distoptim(&["bench", "collectives", "--nproc", "2", "--min-bytes", "4K", "--max-bytes", "1M", "--iters", "3", "--warmup", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#') && !l.contains("algbw")).collect();
    // Six ops (all-to-all included) at five sizes.
    assert_eq!(rows.len(), 6 * 5, "{stdout}");
    assert!(rows.iter().all(|r| r.ends_with(" ok")), "{stdout}");
    assert_eq!(rows.iter().filter(|r| r.contains(" all_to_all ")).count(), 5, "{stdout}");
    let out = distoptim(&["bench", "collectives", "--ops", "alltoall"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown op \"alltoall\""));
}

#[test]
fn bench_step_prints_every_strategy_next_to_its_parts() {
    let out = distoptim(&["bench", "step", "--nproc", "2", "--params", "200000", "--iters", "2", "--precision", "bf16"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for s in ["ddp", "zero1", "zero2", "zero3"] {
        // The f32 row (with the estimate's prediction and error) and the bf16 row.
        assert!(stdout.lines().any(|l| l.starts_with(s) && l.split_whitespace().count() == 12), "{s}: {stdout}");
        assert!(stdout.lines().any(|l| l.starts_with(s) && l.contains(" bf16 ") && l.split_whitespace().count() == 9), "{s}: {stdout}");
    }
    assert!(stdout.contains("MB moved") && stdout.contains("median of 2") && stdout.contains("predicted"), "{stdout}");
}

#[test]
fn bench_step_and_optim_time_muon_with_its_balance_and_gemm_reference() {
    let shapes = "128x128,128x128,64x256,256x64";
    // Three ranks over 1000 parameters: shards of 334, 333 and 333 (the ledger check is
    // against rank 0's estimate).
    let out = distoptim(&[
        "bench",
        "step",
        "--nproc",
        "3",
        "--params",
        "1000",
        "--iters",
        "1",
        "--strategies",
        "ddp,zero2",
        "--muon-shapes",
        shapes,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<f64>> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("# muon"))
        .filter(|l| l.starts_with("ddp") || l.starts_with("zero2"))
        .map(|l| l.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    let bound: f64 = stdout
        .lines()
        .find(|l| l.starts_with("# reference: no assignment of whole matrices"))
        .and_then(|l| l.split("balance ").nth(1))
        .and_then(|x| x.split_whitespace().next())
        .unwrap_or_else(|| panic!("{stdout}"))
        .parse()
        .unwrap();
    // DDP: every rank runs every matrix; ZeRO-2: each matrix on one rank, packed by LPT,
    // which reaches the bound here (the two 128x128 apart, the two small ones together).
    assert_eq!(rows[0][3], 1.0, "{stdout}");
    assert!(rows[1][1] < rows[0][1] && rows[1][3] == bound && bound > 1.0, "{stdout}");
    let out =
        distoptim(&["bench", "optim", "--sizes", "1000", "--tensors", "0", "--threads", "1", "--iters", "1", "--muon-shapes", "64x96"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let muon = stdout.lines().find(|l| l.starts_with("muon")).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(muon.split_whitespace().count(), 9, "{muon}");
    assert!(stdout.lines().any(|l| l.starts_with("adafactor")), "{stdout}");
}

#[test]
fn estimate_prints_the_ledger_and_takes_a_network() {
    let out = distoptim(&[
        "estimate",
        "--params",
        "25M",
        "--nproc",
        "2,4",
        "--strategy",
        "zero3",
        "--precision",
        "bf16",
        "--latency-us",
        "5",
        "--bandwidth-gbs",
        "10",
        "--memory-gbs",
        "20",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("calibrating"), "every figure was given: {stdout}");
    let row =
        stdout.lines().find(|l| l.starts_with("zero3") && l.split_whitespace().nth(1) == Some("4")).unwrap_or_else(|| panic!("{stdout}"));
    // 25M bf16 parameters on 4 ranks: a 6.25M shard, 2 bytes each, is 11.9 MiB.
    assert_eq!(row.split_whitespace().nth(4), Some("11.9"), "{row}");
    let err = String::from_utf8_lossy(&distoptim(&["estimate", "--params", "lots"]).stderr).into_owned();
    assert!(err.contains("\"lots\" is not a count"), "{err}");
}

#[test]
fn bench_candle_prints_both_copy_paths_next_to_memcpy() {
    let out = distoptim(&["bench", "candle", "--dims", "64,32,10", "--iters", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("copy 2410 f32 gradients"), "{text}");
    for row in ["distoptim-candle (read_grads+write_params)", "to_vec1 + from_slice + Var::set", "memcpy of the same bytes"] {
        let line = text.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row} row in {text}"));
        let ms: f64 = line[row.len()..].split_whitespace().next().unwrap().parse().unwrap();
        assert!(ms.is_finite() && ms >= 0.0, "{line}");
    }
}

#[test]
fn bench_overlap_prints_each_part_and_both_orders() {
    let out = distoptim(&[
        "bench",
        "overlap",
        "--nproc",
        "2",
        "--layers",
        "4",
        "--layer-size",
        "20000",
        "--bucket-cap-mb",
        "0.1",
        "--iters",
        "2",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("4 layers x 20000 f32, 4 buckets"), "{text}");
    for row in ["backward alone", "reduce + update alone", "backward, then reduce + update", "buckets reduced during backward"] {
        let line = text.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row} row in {text}"));
        let ms: f64 = line[row.len()..].trim().parse().unwrap();
        assert!(ms.is_finite() && ms > 0.0, "{line}");
    }
}

#[test]
fn bench_ps_prints_latency_and_throughput_next_to_tcp_and_memcpy() {
    let out = distoptim(&["bench", "ps", "--sizes", "300000", "--clients", "1,2", "--iters", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<f64>> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("300000"))
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    for r in rows {
        assert_eq!(r.len(), 7);
        assert!(r[2..].iter().all(|x| x.is_finite() && *x > 0.0), "{r:?}");
    }
}

#[test]
fn lists_are_accepted_space_or_comma_separated_as_help_shows_them() {
    for args in [&["--sizes", "1000", "2000", "--threads", "1", "2"][..], &["--sizes", "1000,2000", "--threads", "1,2"][..]] {
        let out = distoptim(&[&["bench", "optim", "--tensors", "0", "--iters", "1"][..], args].concat());
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("adamw ")).count(), 4, "{args:?}");
    }
}

#[test]
fn one_size_parser_reads_suffixes_everywhere() {
    let out = distoptim(&["bench", "optim", "--sizes", "1k", "2K", "--tensors", "0", "--threads", "1", "--iters", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("adamw ") && l.contains(" 1K ")), "{text}");
    for (cmd, flag) in [("optim", "--sizes"), ("step", "--params"), ("collectives", "--min-bytes")] {
        let out = distoptim(&["bench", cmd, flag, "0.5"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("\"0.5\" is not a"),
            "{cmd} {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out =
        distoptim(&["estimate", "--params", "25M", "--nproc", "2", "--latency-us", "1", "--bandwidth-gbs", "10", "--memory-gbs", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `selftest` and `bench collectives` take their backend from the environment, as `train`
/// does, and refuse at once what would silently run the wrong job: shm under an MPI
/// launcher, and a shm `MASTER_ADDR` of another host.
#[test]
fn collectives_commands_refuse_the_wrong_backend_at_once() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let t = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_distoptim")).args(args).envs(env.iter().copied()).output().unwrap();
        assert!(!out.status.success(), "{args:?} {env:?} succeeded");
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{args:?} took {:?}", t.elapsed());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for cmd in [&["selftest", "--backend", "shm"][..], &["bench", "collectives", "--backend", "shm"][..]] {
        let err = run(cmd, &[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")]);
        assert!(err.contains("started by an MPI launcher") && err.contains("use --backend mpi"), "{cmd:?}: {err}");
    }
    let torchrun = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "192.0.2.1"), ("MASTER_PORT", "29500")];
    for cmd in [&["selftest"][..], &["bench", "collectives"][..]] {
        let err = run(cmd, &torchrun);
        assert!(err.contains("MASTER_ADDR=\"192.0.2.1\" is not an address of this host") && err.contains("mpirun"), "{cmd:?}: {err}");
    }
    let err = run(&["selftest", "--backend", "mpi"], &[]);
    assert!(err.contains("outside an MPI job"), "{err}");
}
