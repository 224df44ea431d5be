//! Workers and clients on loopback TCP, in one process (each worker on its own threads,
//! as `distoptim ps serve` runs it).

use distoptim_optim::{AdamConfig, Layout, Optimizer, OptimizerConfig, SgdConfig};
use distoptim_ps::protocol::{write_frame, Kind, Op, Request};
use distoptim_ps::{
    send_grads, ClientConfig, ContextId, DistributedOptimizer, PsError, RemoteParam, RunningWorker, Worker, WorkerClient, WorkerConfig,
};
use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const TOKEN: &str = "job-secret";

fn worker(config: WorkerConfig) -> RunningWorker {
    Worker::bind("127.0.0.1:0", config, None).unwrap().spawn().unwrap()
}

fn client(w: &RunningWorker) -> WorkerClient {
    WorkerClient::connect(&w.addr().to_string(), ClientConfig::new(TOKEN)).unwrap()
}

/// Values on a 1/1024 grid in [-1, 1): sums of a few of them, times lr = 1/2, are exact in
/// f32 whatever the order.
fn grid(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 37 + seed * 101) % 2048) as f32 / 1024.0 - 1.0).collect()
}

/// Parameter "a" (1000 elements) on worker 0, "b" (300) on worker 1.
fn model(workers: &[RunningWorker]) -> Vec<RemoteParam> {
    let a = client(&workers[0]).create_params(&[("a", &[10, 100], &grid(1000, 0))], true).unwrap();
    let b = client(&workers[1]).create_params(&[("b", &[300], &grid(300, 1))], true).unwrap();
    a.into_iter().chain(b).collect()
}

/// Client c's gradient for parameter p at its step t.
fn grad(n: usize, c: usize, p: usize, t: usize) -> Vec<f32> {
    grid(n, 7 + c * 13 + p * 5 + t * 3)
}

/// Three clients, each with its own connections, stepping `steps` contexts concurrently
/// through optimizer `name` (shared: same name on every client).
fn three_clients(workers: &[RunningWorker], name: &str, config: OptimizerConfig, steps: usize) {
    std::thread::scope(|s| {
        for c in 0..3 {
            let config = config.clone();
            s.spawn(move || {
                let clients = [client(&workers[0]), client(&workers[1])];
                let params: Vec<RemoteParam> = clients.iter().zip(["a", "b"]).flat_map(|(w, n)| w.remote(&[n]).unwrap()).collect();
                let opt = DistributedOptimizer::new(name, config.clone(), &params, None).unwrap();
                for t in 0..steps {
                    let ctx = ContextId::new();
                    for (p, param) in params.iter().enumerate() {
                        send_grads(ctx, param, &grad(param.numel(), c, p, t)).unwrap();
                    }
                    opt.step(ctx).unwrap();
                }
            });
        }
    });
}

#[test]
fn plain_sgd_from_three_concurrent_clients_subtracts_every_gradient_exactly_once() {
    let workers = [worker(WorkerConfig::new(TOKEN)), worker(WorkerConfig::new(TOKEN))];
    let params = model(&workers);
    three_clients(&workers, "sgd", OptimizerConfig::Sgd(SgdConfig { lr: 0.5, ..Default::default() }), 4);
    for (p, param) in params.iter().enumerate() {
        let n = param.numel();
        let mut want = grid(n, p);
        for c in 0..3 {
            for t in 0..4 {
                want.iter_mut().zip(grad(n, c, p, t)).for_each(|(w, g)| *w -= 0.5 * g);
            }
        }
        assert_eq!(param.fetch().unwrap(), want, "parameter {}", param.name());
    }
    for w in &workers {
        let stats = client(w).stats().unwrap();
        assert_eq!((stats.steps_applied, stats.open_contexts), (12, 0));
    }
}

/// Every order of the contexts that keeps each client's own steps in order.
fn interleavings(clients: usize, steps: usize) -> Vec<Vec<(usize, usize)>> {
    fn go(next: &mut Vec<usize>, steps: usize, order: &mut Vec<(usize, usize)>, out: &mut Vec<Vec<(usize, usize)>>) {
        if next.iter().all(|&t| t == steps) {
            out.push(order.clone());
        }
        for c in 0..next.len() {
            if next[c] < steps {
                order.push((c, next[c]));
                next[c] += 1;
                go(next, steps, order, out);
                next[c] -= 1;
                order.pop();
            }
        }
    }
    let mut out = Vec::new();
    go(&mut vec![0; clients], steps, &mut Vec::new(), &mut out);
    out
}

#[test]
fn stateful_optimizers_end_at_some_serial_order_of_the_contexts_on_each_worker() {
    let configs = [
        OptimizerConfig::Adam(AdamConfig { lr: 0.01, ..AdamConfig::adamw() }),
        OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, ..Default::default() }),
    ];
    let orders = interleavings(3, 2);
    assert_eq!(orders.len(), 90);
    for config in configs {
        let workers = [worker(WorkerConfig::new(TOKEN)), worker(WorkerConfig::new(TOKEN))];
        let params = model(&workers);
        three_clients(&workers, "shared", config.clone(), 2);
        for (p, param) in params.iter().enumerate() {
            let n = param.numel();
            let got = param.fetch().unwrap();
            let serial = |order: &[(usize, usize)]| {
                let mut opt = Optimizer::new(Layout::new([("p", vec![n])]).unwrap(), config.clone()).unwrap();
                let mut x = grid(n, p);
                for &(c, t) in order {
                    opt.step(&mut x, &grad(n, c, p, t)).unwrap();
                }
                x
            };
            assert!(orders.iter().any(|o| serial(o) == got), "{} matches no serial order ({config:?})", param.name());
            // And the test can tell orders apart.
            assert_ne!(serial(&orders[0]), serial(&orders[89]));
        }
    }
}

/// Sends raw bytes as a client would, returns what the worker answers before closing.
fn raw_exchange(w: &RunningWorker, bytes: &[u8]) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect(w.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn bad_clients_are_refused_while_good_ones_keep_working() {
    let workers = [worker(WorkerConfig { max_frame_bytes: 1 << 16, ..WorkerConfig::new(TOKEN) }), worker(WorkerConfig::new(TOKEN))];
    let params = model(&workers);
    let good = DistributedOptimizer::new("sgd", OptimizerConfig::Sgd(SgdConfig { lr: 0.5, ..Default::default() }), &params, None).unwrap();
    let addr = workers[0].addr().to_string();

    // Wrong token: refused, nothing created.
    let intruder = WorkerClient::connect(&addr, ClientConfig::new("guess")).unwrap();
    let err = intruder.create_params(&[("evil", &[1], &[0.0])], false).unwrap_err().to_string();
    assert_eq!(err, format!("worker {addr}: wrong job token"));
    // Not our protocol, a future version, an oversized frame, a truncated one.
    assert!(raw_exchange(&workers[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").contains("bad magic"));
    let mut frame = Vec::new();
    let req = Request { token: TOKEN.into(), op: Op::SendGrads { context: 1, name: "a".into() } };
    write_frame(&mut frame, Kind::Request, &req, &vec![0.0; 20_000]).unwrap();
    assert!(raw_exchange(&workers[0], &frame).contains("over the limit of 65536"));
    let mut future = frame.clone();
    future[4] = 2;
    assert!(raw_exchange(&workers[0], &future).contains("protocol version 2"));
    let mut bad_json = Vec::new();
    write_frame(&mut bad_json, Kind::Request, &serde_json::json!({"token": TOKEN, "op": "launch_missiles"}), &[]).unwrap();
    assert!(raw_exchange(&workers[0], &bad_json).contains("header"));
    // Unknown parameter, shape mismatch (sent raw: the client library checks shapes first).
    let ghost = WorkerClient::connect(&addr, ClientConfig::new(TOKEN)).unwrap();
    let err = ghost.remote(&["nope"]).unwrap_err().to_string();
    assert!(err.contains("unknown parameter 'nope'"), "{err}");
    let mut wrong_shape = Vec::new();
    let req = Request { token: TOKEN.into(), op: Op::SendGrads { context: 1, name: "a".into() } };
    write_frame(&mut wrong_shape, Kind::Request, &req, &[1.0; 7]).unwrap();
    let mut s = TcpStream::connect(workers[0].addr()).unwrap();
    std::io::Write::write_all(&mut s, &wrong_shape).unwrap();
    let (reply, _): (distoptim_ps::protocol::Reply, _) = distoptim_ps::protocol::read_frame(&mut s, Kind::Reply, 1 << 20).unwrap();
    assert!(reply.error.unwrap().contains("has 7 elements, the parameter has shape [10, 100] (1000)"));

    // The good client was never disturbed, and the worker holds only what it sent.
    let before = params[0].fetch().unwrap();
    let ctx = ContextId::new();
    send_grads(ctx, &params[0], &vec![1.0; 1000]).unwrap();
    good.step(ctx).unwrap();
    assert_eq!(params[0].fetch().unwrap(), before.iter().map(|x| x - 0.5).collect::<Vec<_>>());
    let stats = client(&workers[0]).stats().unwrap();
    assert_eq!((stats.params, stats.open_contexts), (1, 0));
    assert!(stats.requests_refused >= 7, "{stats:?}");
}

/// A frame prefix announcing `data_len` bytes after `header`.
fn prefix(header: &[u8], data_len: u32) -> Vec<u8> {
    let mut p = Vec::from(*b"DOPS");
    p.extend_from_slice(&1u16.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    p.extend_from_slice(&(header.len() as u32).to_le_bytes());
    p.extend_from_slice(&data_len.to_le_bytes());
    p.extend_from_slice(header);
    p
}

#[test]
fn strangers_cost_the_worker_a_header_and_cannot_crowd_out_a_client() {
    use std::io::Write;
    let config = WorkerConfig { auth_timeout: Duration::from_millis(300), max_unauthenticated: 16, ..WorkerConfig::new(TOKEN) };
    let w = worker(config);
    let params = client(&w).create_params(&[("a", &[4], &[1.0; 4])], false).unwrap();
    let opt = DistributedOptimizer::new("sgd", OptimizerConfig::Sgd(SgdConfig { lr: 0.5, ..Default::default() }), &params, None).unwrap();

    // A wrong token announcing 1 GiB: refused after the header, the data never read.
    let mut s = TcpStream::connect(w.addr()).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&prefix(br#"{"token":"guess","op":"send_grads","context":1,"name":"a"}"#, 1 << 30)).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0usize;
    while sent < 1 << 30 && s.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    assert!(sent < 256 << 20, "the worker kept reading a stranger's data: {sent} bytes");
    // An unauthenticated header over 64 KiB is refused before it is read.
    let big = format!(r#"{{"token":"{}","op":"stats"}}"#, "x".repeat(100_000));
    assert!(raw_exchange(&w, &prefix(big.as_bytes(), 0)).contains("over the limit of 65536"));

    // A silent connection is closed after the authentication timeout.
    let mut idle = TcpStream::connect(w.addr()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    assert_eq!(idle.read(&mut [0u8; 16]).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(2), "idle stranger held for {:?}", t.elapsed());

    // 200 idle strangers: the oldest are evicted, a new client still gets in and steps.
    let crowd: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(w.addr()).unwrap()).collect();
    let late = WorkerClient::connect(&w.addr().to_string(), ClientConfig::new(TOKEN)).unwrap();
    let p = late.remote(&["a"]).unwrap();
    let ctx = ContextId::new();
    send_grads(ctx, &p[0], &[2.0; 4]).unwrap();
    opt.step(ctx).unwrap();
    assert_eq!(p[0].fetch().unwrap(), vec![0.0; 4]);
    drop(crowd);

    // Shapes whose element count overflows are refused, and the connection stays usable.
    let raw = WorkerClient::connect(&w.addr().to_string(), ClientConfig::new(TOKEN)).unwrap();
    for shapes in [vec![vec![1usize << 32, 1 << 32]], vec![vec![1 << 63], vec![1 << 63]]] {
        let named: Vec<(String, Vec<usize>)> = shapes.into_iter().enumerate().map(|(i, s)| (format!("huge{i}"), s)).collect();
        let list: Vec<(&str, &[usize], &[f32])> = named.iter().map(|(n, s)| (n.as_str(), s.as_slice(), &[][..])).collect();
        let err = raw.create_params(&list, false).unwrap_err().to_string();
        assert!(err.contains("more elements than fit") || err.contains("overflow"), "{err}");
    }
    assert_eq!(raw.stats().unwrap().params, 1);
}

#[test]
fn a_dead_or_silent_worker_fails_the_step_fast_and_by_name() {
    let workers = vec![worker(WorkerConfig::new(TOKEN)), worker(WorkerConfig::new(TOKEN))];
    let params = model(&workers);
    let opt = DistributedOptimizer::new("sgd", OptimizerConfig::Sgd(SgdConfig { lr: 0.5, ..Default::default() }), &params, None).unwrap();
    let ctx = ContextId::new();
    send_grads(ctx, &params[0], &vec![1.0; 1000]).unwrap();
    send_grads(ctx, &params[1], &vec![1.0; 300]).unwrap();
    let b_before = params[1].fetch().unwrap();
    let mut workers = workers;
    let dead = workers.remove(0);
    let dead_addr = dead.addr().to_string();
    dead.stop();
    let started = Instant::now();
    let err = opt.step(ctx).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let msg = err.to_string();
    assert!(msg.contains(&format!("failed on 1 of 2 workers: worker {dead_addr}")), "{msg}");
    // The live worker applied its part; retrying there does not apply it again.
    let b_after = params[1].fetch().unwrap();
    assert_eq!(b_after, b_before.iter().map(|x| x - 0.5).collect::<Vec<_>>());
    let b_only =
        DistributedOptimizer::new("sgd", OptimizerConfig::Sgd(SgdConfig { lr: 0.5, ..Default::default() }), &params[1..], None).unwrap();
    b_only.step(ctx).unwrap();
    assert_eq!(params[1].fetch().unwrap(), b_after);

    // A worker that accepts connections but never answers: the client's timeout, named.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let _hold = std::thread::spawn(move || {
        let conns: Vec<_> = silent.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(5));
        drop(conns);
    });
    let config = ClientConfig { timeout: Duration::from_millis(300), ..ClientConfig::new(TOKEN) };
    let hung = WorkerClient::connect(&silent_addr, config).unwrap();
    let started = Instant::now();
    let err = hung.stats().unwrap_err();
    assert!(matches!(err, PsError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains(&silent_addr));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_client_that_vanishes_mid_context_leaks_nothing() {
    let w = worker(WorkerConfig { context_timeout: Duration::from_millis(200), ..WorkerConfig::new(TOKEN) });
    {
        let c = client(&w);
        let p = c.create_params(&[("a", &[4], &[0.0; 4])], false).unwrap();
        send_grads(ContextId::new(), &p[0], &[1.0; 4]).unwrap();
        assert_eq!(c.stats().unwrap().open_contexts, 1);
    } // the client disconnects without stepping
    let observer = client(&w);
    let deadline = Instant::now() + Duration::from_secs(5);
    while observer.stats().unwrap().open_contexts > 0 {
        assert!(Instant::now() < deadline, "context never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(observer.stats().unwrap().contexts_expired, 1);
}

#[test]
fn a_worker_restarts_from_its_checkpoint_and_continues_the_same_run() {
    let dir = std::env::temp_dir().join(format!("distoptim-ps-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let adam = OptimizerConfig::Adam(AdamConfig { lr: 0.01, amsgrad: true, ..AdamConfig::adamw() });
    let schedule = Some(distoptim_optim::Schedule::LinearWithWarmup { warmup: 2, total: 10 });
    let run = |w: &RunningWorker, create: bool, steps: std::ops::Range<usize>| {
        let c = client(w);
        let p = if create { c.create_params(&[("w", &[3, 5], &grid(15, 2))], false).unwrap() } else { c.remote(&["w"]).unwrap() };
        let opt = DistributedOptimizer::new("adam", adam.clone(), &p, schedule.clone()).unwrap();
        let mut lrs = Vec::new();
        for t in steps {
            let ctx = ContextId::new();
            send_grads(ctx, &p[0], &grad(15, 0, 0, t)).unwrap();
            lrs.push(opt.step(ctx).unwrap());
        }
        (p[0].fetch().unwrap(), lrs, c)
    };
    let reference = worker(WorkerConfig::new(TOKEN));
    let (want, want_lrs, _) = run(&reference, true, 0..5);

    let config = WorkerConfig { checkpoint_dir: Some(dir.clone()), ..WorkerConfig::new(TOKEN) };
    let first = worker(config.clone());
    let (_, lrs_a, c) = run(&first, true, 0..3);
    c.checkpoint().unwrap();
    first.stop();
    let second = Worker::bind("127.0.0.1:0", config.clone(), None).unwrap().spawn().unwrap();
    let (got, lrs_b, _) = run(&second, false, 3..5);
    assert_eq!(got, want);
    assert_eq!([lrs_a, lrs_b].concat(), want_lrs);
    second.stop();

    // A corrupted checkpoint is refused by name, never loaded.
    let file = dir.join("worker.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let err = Worker::bind("127.0.0.1:0", config, None).err().unwrap().to_string();
    assert!(err.contains("worker.safetensors") && err.contains("checksum"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
