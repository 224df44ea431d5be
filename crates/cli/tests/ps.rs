//! End-to-end: `distoptim ps serve` worker processes, a Rust client, and a worker killed
//! with SIGKILL.

use distoptim_optim::{OptimizerConfig, SgdConfig};
use distoptim_ps::{send_grads, ClientConfig, ContextId, DistributedOptimizer, WorkerClient};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "e2e-token";

/// Starts a worker on a free port; returns it and its address (from its first line).
fn serve(extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_distoptim"))
        .args(["ps", "serve", "--bind", "127.0.0.1:0", "--token", TOKEN])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the distoptim binary runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("ps worker listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
    (child, addr)
}

#[test]
fn workers_serve_steps_and_a_killed_one_is_named_fast() {
    let (mut a, addr_a) = serve(&[]);
    let (mut b, addr_b) = serve(&[]);
    let config = ClientConfig { timeout: Duration::from_secs(5), ..ClientConfig::new(TOKEN) };
    let wa = WorkerClient::connect(&addr_a, config.clone()).unwrap();
    let wb = WorkerClient::connect(&addr_b, config).unwrap();
    let mut params = wa.create_params(&[("fc.w", &[2, 3], &[1.0; 6])], false).unwrap();
    params.extend(wb.create_params(&[("fc.b", &[3], &[1.0; 3])], false).unwrap());
    let opt = DistributedOptimizer::new("sgd", OptimizerConfig::Sgd(SgdConfig { lr: 0.5, ..Default::default() }), &params, None).unwrap();
    let ctx = ContextId::new();
    send_grads(ctx, &params[0], &[1.0; 6]).unwrap();
    send_grads(ctx, &params[1], &[2.0; 3]).unwrap();
    opt.step(ctx).unwrap();
    assert_eq!(params[0].fetch().unwrap(), vec![0.5; 6]);
    assert_eq!(params[1].fetch().unwrap(), vec![0.0; 3]);

    // The CLI's own client commands.
    let out = Command::new(env!("CARGO_BIN_EXE_distoptim")).args(["ps", "stats", "--worker", &addr_b, "--token", TOKEN]).output().unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats are JSON");
    assert_eq!((stats["params"].as_u64(), stats["steps_applied"].as_u64()), (Some(1), Some(1)));
    let out =
        Command::new(env!("CARGO_BIN_EXE_distoptim")).args(["ps", "checkpoint", "--worker", &addr_b, "--token", TOKEN]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a checkpoint directory"));

    // SIGKILL worker b: the next step fails within a second and names it.
    b.kill().unwrap();
    b.wait().unwrap();
    let ctx = ContextId::new();
    send_grads(ctx, &params[0], &[1.0; 6]).unwrap();
    let started = Instant::now();
    let err = opt.step(ctx).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert!(err.contains(&format!("worker {addr_b}")) && !err.contains(&format!("worker {addr_a}")), "{err}");
    assert_eq!(params[0].fetch().unwrap(), vec![0.0; 6], "the live worker applied its part");
    a.kill().unwrap();
    a.wait().unwrap();
}

#[test]
fn serve_refuses_bad_settings_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_distoptim"))
        .args(["ps", "serve", "--bind", "127.0.0.1:0", "--token", TOKEN, "--context-timeout", "0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--context-timeout must be a positive number"));
    let out = Command::new(env!("CARGO_BIN_EXE_distoptim"))
        .args(["ps", "serve", "--bind", "127.0.0.1:0", "--token", TOKEN, "--init", "/nonexistent.safetensors"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.safetensors"));
}
