//! `bench collectives`, in the style of nccl-tests: for each size and op, the median time
//! of several iterations after warm-up (each iteration timed from a barrier; the slowest
//! rank counts), algbw = bytes / time, busbw = algbw × the op's factor (all-reduce
//! 2(n−1)/n; reduce-scatter, all-gather and all-to-all (n−1)/n; broadcast and reduce 1), and the
//! memcpy bandwidth of the same size measured by every rank at once in the same run.
//! Each row ends with a check of the op's result against the expected values. The
//! all-to-all sends `bytes / n` to every rank (into a second buffer of the same kind).
//!
//! The backend comes from the environment, as for `train`: under `mpirun` the MPI job,
//! under `distoptim launch` that job, and otherwise the command launches itself on
//! `--nproc` shm processes (rank 0 prints).

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use distoptim_collective::{shard_range, Communicator, ReduceOp};

use super::median;

#[derive(Args, Clone)]
pub struct CollectivesArgs {
    /// Ranks (processes for shm, threads for threads; mpirun decides for mpi).
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Where to run: from the environment (mpirun, `distoptim launch`; otherwise a shm job
    /// started here), or shm (processes over /dev/shm), threads (one process), mpi.
    #[arg(long, value_enum, default_value_t = crate::value::BackendChoice::Auto)]
    backend: crate::value::BackendChoice,
    /// Smallest message, in bytes (K, M, G suffixes allowed).
    #[arg(long, default_value = "4K", value_parser = crate::value::bytes)]
    min_bytes: usize,
    /// Largest message, in bytes.
    #[arg(long, default_value = "256M", value_parser = crate::value::bytes)]
    max_bytes: usize,
    /// Each size is this factor times the previous one.
    #[arg(long, default_value_t = 4)]
    factor: usize,
    /// Ops to run.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = ["all_reduce".to_string(), "reduce_scatter".into(), "all_gather".into(), "broadcast".into(), "reduce".into(), "all_to_all".into()])]
    ops: Vec<String>,
    /// Timed iterations per size and op (the median is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Buffers: `shared` (allocated from the communicator: zero-copy on shm) or `plain`
    /// (caller-owned vectors: one copy in and out).
    #[arg(long, default_value = "shared")]
    buffers: String,
}

const OPS: [&str; 6] = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all"];

pub fn run(args: CollectivesArgs) -> Result<()> {
    for op in &args.ops {
        if !OPS.contains(&op.as_str()) {
            bail!("unknown op {op:?} (expected one of {})", OPS.join(", "));
        }
    }
    if args.buffers != "shared" && args.buffers != "plain" {
        bail!("--buffers must be shared or plain, not {:?}", args.buffers);
    }
    if args.min_bytes == 0 || args.min_bytes > args.max_bytes || args.factor < 2 {
        bail!("need 0 < --min-bytes <= --max-bytes and --factor >= 2");
    }
    args.backend.run(args.nproc, |comm| body(comm, &args))
}

fn body(comm: &Communicator, args: &CollectivesArgs) -> Result<()> {
    let (me, n) = (comm.rank(), comm.size());
    let out = me == 0;
    if out {
        println!(
            "# distoptim bench collectives: backend {}, {n} ranks, f32, {} buffers, median of {} iterations after {} warm-up",
            comm.topology(),
            args.buffers,
            args.iters,
            args.warmup
        );
        println!("# memcpy: every rank copies the same number of bytes at the same time (GB/s = bytes / time)");
        println!(
            "{:>12} {:>11} {:<15} {:>11} {:>9} {:>9} {:>12} {:>9}  check",
            "bytes", "elements", "op", "time(us)", "algbw", "busbw", "memcpy GB/s", "bus/copy"
        );
    }
    let mut bytes = args.min_bytes;
    while bytes <= args.max_bytes {
        let len = bytes / 4;
        let copy = time_memcpy(comm, bytes, args.iters)?;
        let buffer = || -> Result<Box<dyn AsMutSlice>> {
            Ok(if args.buffers == "shared" { Box::new(comm.alloc::<f32>(len)?) } else { Box::new(vec![0f32; len]) })
        };
        let mut storage = buffer()?;
        // The all-to-all's receiving buffer.
        let mut second = if args.ops.iter().any(|op| op == "all_to_all") { buffer()? } else { Box::new(Vec::new()) };
        for op in &args.ops {
            let (buf, recv) = (storage.slice(), second.slice());
            fill(buf, me);
            let mut times = Vec::with_capacity(args.iters);
            for i in 0..args.warmup + args.iters {
                comm.barrier()?;
                let t0 = Instant::now();
                run_op(comm, op, buf, recv)?;
                if i >= args.warmup {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            // The slowest rank decides each iteration.
            comm.all_reduce(&mut times, ReduceOp::Max)?;
            let time = median(times);
            fill(buf, me);
            run_op(comm, op, buf, recv)?;
            let bad = if op == "all_to_all" { check_all_to_all(recv, me, n) } else { check(op, buf, me, n) };
            let mut failures = [i32::from(bad.is_some())];
            comm.all_reduce(&mut failures, ReduceOp::Sum)?;
            let algbw = (len * 4) as f64 / time / 1e9;
            let busbw = algbw * bus_factor(op, n);
            if out {
                let verdict = match (failures[0], &bad) {
                    (0, _) => "ok".to_string(),
                    (k, Some(why)) => format!("FAIL on {k} rank(s): rank 0 {why}"),
                    (k, None) => format!("FAIL on {k} rank(s)"),
                };
                println!(
                    "{:>12} {:>11} {:<15} {:>11.2} {:>9.2} {:>9.2} {:>12.2} {:>8.0}%  {verdict}",
                    len * 4,
                    len,
                    op,
                    time * 1e6,
                    algbw,
                    busbw,
                    copy,
                    100.0 * busbw / copy
                );
            }
            if failures[0] > 0 {
                bail!("{op} of {} bytes gave wrong results", len * 4);
            }
        }
        bytes = bytes.saturating_mul(args.factor);
    }
    Ok(())
}

/// A buffer the bench can reuse for every op of one size.
trait AsMutSlice {
    fn slice(&mut self) -> &mut [f32];
}

impl<T: AsMut<[f32]>> AsMutSlice for T {
    fn slice(&mut self) -> &mut [f32] {
        self.as_mut()
    }
}

fn run_op(comm: &Communicator, op: &str, buf: &mut [f32], recv: &mut [f32]) -> Result<()> {
    match op {
        "all_to_all" => {
            let counts = vec![buf.len() / comm.size(); comm.size()];
            let used = counts[0] * comm.size();
            comm.all_to_all(&buf[..used], &counts, &mut recv[..used], &counts)?
        }
        "all_reduce" => comm.all_reduce(buf, ReduceOp::Sum)?,
        "reduce_scatter" => comm.reduce_scatter(buf, ReduceOp::Sum)?,
        "all_gather" => comm.all_gather(buf)?,
        "broadcast" => comm.broadcast(buf, 0)?,
        _ => comm.reduce(buf, ReduceOp::Sum, 0)?,
    }
    Ok(())
}

fn bus_factor(op: &str, n: usize) -> f64 {
    let n = n as f64;
    match op {
        "all_reduce" => 2.0 * (n - 1.0) / n,
        "reduce_scatter" | "all_gather" | "all_to_all" => (n - 1.0) / n,
        _ => 1.0,
    }
}

/// Rank r's input: r + 1 + (i mod 7), exact in f32 for any sum the bench makes.
fn value(rank: usize, i: usize) -> f32 {
    (rank + 1 + i % 7) as f32
}

fn fill(buf: &mut [f32], rank: usize) {
    for (i, x) in buf.iter_mut().enumerate() {
        *x = value(rank, i);
    }
}

/// What is wrong with `buf` after one `op`, if anything.
fn check(op: &str, buf: &[f32], me: usize, n: usize) -> Option<String> {
    let sum = |i: usize| (0..n).map(|r| value(r, i)).sum::<f32>();
    let len = buf.len();
    let expect: Box<dyn Fn(usize) -> Option<f32>> = match op {
        "all_reduce" => Box::new(|i| Some(sum(i))),
        "reduce_scatter" => {
            let mine = shard_range(len, n, me);
            Box::new(move |i| mine.contains(&i).then(|| sum(i)))
        }
        "all_gather" => Box::new(|i| (0..n).find(|&r| shard_range(len, n, r).contains(&i)).map(|r| value(r, i))),
        "broadcast" => Box::new(|i| Some(value(0, i))),
        _ => Box::new(|i| Some(if me == 0 { sum(i) } else { value(me, i) })),
    };
    // Every element is checked except on huge buffers, where a stride covers all pages.
    let stride = if len > 1 << 22 { 61 } else { 1 };
    (0..len).step_by(stride).find_map(|i| match expect(i) {
        Some(want) if buf[i] != want => Some(format!("element {i} is {} instead of {want}", buf[i])),
        _ => None,
    })
}

/// What is wrong with `recv` after an all-to-all of `len / n` elements per rank, if
/// anything: piece r holds rank r's piece for this rank.
fn check_all_to_all(recv: &[f32], me: usize, n: usize) -> Option<String> {
    let piece = recv.len() / n;
    let stride = if recv.len() > 1 << 22 { 61 } else { 1 };
    (0..piece * n).step_by(stride).find_map(|i| {
        let want = value(i / piece, me * piece + i % piece);
        (recv[i] != want).then(|| format!("element {i} is {} instead of {want}", recv[i]))
    })
}

/// GB/s of a memcpy of `bytes`, every rank copying at once (median of `iters`).
fn time_memcpy(comm: &Communicator, bytes: usize, iters: usize) -> Result<f64> {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        comm.barrier()?;
        let t0 = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(&mut dst);
    }
    Ok(bytes as f64 / median(times) / 1e9)
}
