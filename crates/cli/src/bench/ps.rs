//! `bench ps`: the parameter server on loopback. For each parameter size and number of
//! concurrent clients, every client repeatedly sends a gradient under a new context and
//! steps (AdamW on the worker); reported: the median send and step latency per client,
//! and the gradient throughput of all clients together, next to a plain TCP stream of
//! the same bytes and a memcpy, measured in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use distoptim_optim::{AdamConfig, OptimizerConfig};
use distoptim_ps::{send_grads, ClientConfig, ContextId, DistributedOptimizer, Worker, WorkerClient, WorkerConfig};

use super::median;

#[derive(Args)]
pub struct PsArgs {
    /// Parameter sizes (elements: `1M`, `16M`…).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "1000000,16000000", value_parser = crate::value::count)]
    sizes: Vec<usize>,
    /// Numbers of concurrent clients.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "1,2,3,4")]
    clients: Vec<usize>,
    /// Steps per client (after one warm-up step).
    #[arg(long, default_value_t = 8)]
    iters: usize,
    /// Then: a good client's step latency with this many idle unauthenticated
    /// connections open against the worker, next to its latency without them, and what a
    /// stranger's 1 GiB frame costs the worker (0: skip).
    #[arg(long, default_value_t = 1000)]
    idle_conns: usize,
}

const TOKEN: &str = "bench";

pub fn run(args: PsArgs) -> Result<()> {
    let worker = Worker::bind("127.0.0.1:0", WorkerConfig::new(TOKEN), None)?.spawn()?;
    let addr = worker.addr().to_string();
    println!(
        "# distoptim bench ps: one worker on loopback, AdamW, each client: send_grads + step per context; {} steps per client",
        args.iters
    );
    println!(
        "{:>10} {:>8} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "elements", "clients", "send ms", "step ms", "grad GB/s", "tcp GB/s", "memcpy GB/s"
    );
    for (i, &n) in args.sizes.iter().enumerate() {
        let name = format!("p{i}");
        let admin = WorkerClient::connect(&addr, ClientConfig::new(TOKEN))?;
        admin.create_params(&[(&name, &[n], &vec![0.5f32; n])], false)?;
        let (tcp, memcpy) = (tcp_gbps(n)?, memcpy_gbps(n));
        for &clients in &args.clients {
            let results: Vec<Result<(Vec<f64>, Vec<f64>)>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..clients).map(|_| s.spawn(|| client_loop(&addr, &name, n, args.iters))).collect();
                handles.into_iter().map(|h| h.join().expect("client thread")).collect()
            });
            let (mut sends, mut steps) = (Vec::new(), Vec::new());
            // The slowest client's busy time: all clients' gradients were moved within it.
            let mut wall = 0.0f64;
            for r in results {
                let (s, t) = r?;
                wall = wall.max(s.iter().zip(&t).map(|(a, b)| a + b).sum());
                sends.extend(s);
                steps.extend(t);
            }
            let bytes = (clients * args.iters * n * 4) as f64;
            println!(
                "{:>10} {:>8} {:>10.2} {:>10.2} {:>12.2} {:>12.2} {:>12.2}",
                n,
                clients,
                median(sends) * 1e3,
                median(steps) * 1e3,
                bytes / wall / 1e9,
                tcp,
                memcpy
            );
        }
    }
    if args.idle_conns > 0 {
        strangers(&addr, args.idle_conns, args.iters)?;
    }
    worker.stop();
    Ok(())
}

/// The worker under strangers: step latency of a 1M-element client with and without
/// `idle` unauthenticated connections, and the worker's memory while a stranger streams
/// a frame that announces 1 GiB of data under a wrong token.
fn strangers(addr: &str, idle: usize, iters: usize) -> Result<()> {
    const N: usize = 1 << 20;
    let admin = WorkerClient::connect(addr, ClientConfig::new(TOKEN))?;
    admin.create_params(&[("strangers", &[N], &vec![0.5f32; N])], true)?;
    let step_ms = || -> Result<f64> {
        let (_, steps) = client_loop(addr, "strangers", N, iters.max(8))?;
        Ok(median(steps) * 1e3)
    };
    let alone = step_ms()?;
    let mut sockets = Vec::with_capacity(idle);
    for _ in 0..idle {
        // Connected and silent; the worker holds at most its cap of them.
        sockets.push(TcpStream::connect(addr)?);
    }
    let crowded = step_ms()?;
    drop(sockets);
    println!(
        "# {idle} idle unauthenticated connections: good client's step {crowded:.2} ms vs {alone:.2} ms alone ({:.2}x)",
        crowded / alone
    );

    let rss = |pid: u32| -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
            .unwrap_or(0.0)
            / 1024.0
    };
    let me = std::process::id();
    let before = rss(me);
    let mut s = TcpStream::connect(addr)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let header = br#"{"token":"wrong","op":"send_grads","context":1,"name":"strangers"}"#;
    let mut prefix = Vec::from(*b"DOPS");
    prefix.extend_from_slice(&1u16.to_le_bytes());
    prefix.extend_from_slice(&0u16.to_le_bytes());
    prefix.extend_from_slice(&(header.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&(1u32 << 30).to_le_bytes());
    s.write_all(&prefix)?;
    s.write_all(header)?;
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0usize;
    while sent < 1 << 30 && s.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    println!(
        "# a stranger's frame announcing 1024 MiB under a wrong token: the worker closed it after {:.1} MiB were sent (socket buffers), worker RSS {:+.1} MiB",
        sent as f64 / (1 << 20) as f64,
        rss(me) - before
    );
    Ok(())
}

/// One client: its own connection, `iters` timed contexts after a warm-up; returns the
/// send and step times.
fn client_loop(addr: &str, name: &str, n: usize, iters: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let client = WorkerClient::connect(addr, ClientConfig::new(TOKEN))?;
    let param = client.remote(&[name])?.remove(0);
    let opt = DistributedOptimizer::new(
        &format!("bench-{name}"),
        OptimizerConfig::Adam(AdamConfig::adamw()),
        std::slice::from_ref(&param),
        None,
    )?;
    let grad = vec![1e-3f32; n];
    let (mut sends, mut steps) = (Vec::new(), Vec::new());
    for i in 0..=iters {
        let ctx = ContextId::new();
        let t = Instant::now();
        send_grads(ctx, &param, &grad)?;
        let sent = t.elapsed().as_secs_f64();
        let t = Instant::now();
        opt.step(ctx)?;
        if i > 0 {
            sends.push(sent);
            steps.push(t.elapsed().as_secs_f64());
        }
    }
    Ok((sends, steps))
}

/// A plain TCP stream over loopback moving `n` f32s (the floor for sending a gradient).
fn tcp_gbps(n: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let bytes = n * 4;
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; bytes];
        for _ in 0..4 {
            s.read_exact(&mut buf)?;
            s.write_all(&[1])?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let data = vec![7u8; bytes];
    let mut ack = [0u8; 1];
    let mut times = Vec::new();
    for _ in 0..4 {
        let t = Instant::now();
        s.write_all(&data)?;
        s.read_exact(&mut ack)?;
        times.push(t.elapsed().as_secs_f64());
    }
    sink.join().map_err(|_| anyhow::anyhow!("tcp sink panicked"))??;
    Ok(bytes as f64 / median(times) / 1e9)
}

fn memcpy_gbps(n: usize) -> f64 {
    let (src, mut dst) = (vec![0.25f32; n], vec![0f32; n]);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        times.push(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    (n * 4) as f64 / median(times) / 1e9
}
