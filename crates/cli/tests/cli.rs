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
        ("zero2_adamw_clip_ws3.json", "unsupported"),
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
    let out = distoptim(&["bench", "optim", "--sizes", "100000", "--tensors", "3", "--threads", "1,2", "--iters", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("% of copy"), "{text}");
    // 2 workloads x 2 optimizers x 2 thread counts, each with a positive copy figure.
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("sgd_momentum") || l.starts_with("adamw")).collect();
    assert_eq!(rows.len(), 8, "{text}");
    for r in rows {
        let copy: f64 = r.split_whitespace().nth(6).unwrap().parse().unwrap();
        assert!(copy > 0.0, "{r}");
    }
}
