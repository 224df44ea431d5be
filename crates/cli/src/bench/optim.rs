//! `bench optim` times one optimizer step on flat f32 buffers and, on the same thread
//! pool, a plain parallel memory copy moving the same number of bytes. An optimizer step
//! is memory-bound, so the copy is its roofline: "% of copy" is the figure that matters.
//! Bytes moved per parameter: AdamW reads p, g, m, v and writes p, m, v (28 B); SGD with
//! momentum reads p, g, buf and writes p, buf (20 B); Lion reads p, g, m and writes p, m
//! (20 B); Schedule-Free AdamW reads y, g, z, v and writes y, z, v (28 B). Adafactor (a
//! 1-D parameter) needs RMS(p) before it may write p and RMS(U) over the whole parameter
//! before it may apply U, so it cannot be one pass: RMS(p), v and RMS(U) (read p, g, v,
//! write v: 16 B), then the update (read g, v, p, write p: 16 B), 32 B in all. 8-bit AdamW
//! reads p, g and two code bytes and writes p and two code bytes (16 B, plus 1/64 of that
//! in scales); under it the table prints the floor of its code work alone (both moments
//! dequantized and re-quantized from data in L1), which no step can beat. On a matrix
//! (`--adafactor-shapes`) Adafactor keeps factored statistics: its row and column sums in
//! one pass (read g), RMS(p) (read p), RMS(U) (read g), the update (read g, p, write p):
//! 24 B.
//!
//! Muon is compute-bound: its table gives the GFLOP/s of the Newton–Schulz products
//! (X·Xᵀ, S·S and T·X, five times, in bf16 rounding) next to the same three products of
//! the same shapes done as plain f32 matmuls by the same GEMM kernels, on the same pool.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use distoptim_optim::kernels::muon::{matmul, newton_schulz, newton_schulz_flops, MatrixView};
use distoptim_optim::quantize::{dequantize, quantize_with, Quantizer};
use distoptim_optim::{
    AdafactorConfig, AdamConfig, Layout, LionConfig, MuonConfig, Optimizer, OptimizerConfig, ScheduleFreeConfig, SgdConfig,
};
use rayon::prelude::*;

use super::median;

#[derive(Args)]
pub struct OptimArgs {
    /// Flat buffer sizes, in parameters (`10M`, `1k`…).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [1_000_000usize, 10_000_000, 100_000_000], value_parser = crate::value::count)]
    sizes: Vec<usize>,
    /// Also run a layout of this many tensors of 10K parameters (0: skip).
    #[arg(long, default_value_t = 1000)]
    tensors: usize,
    /// Thread counts to run with.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [1usize, 2])]
    threads: Vec<usize>,
    /// Timed iterations per measurement (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Matrix shapes for the Muon table (`ROWSxCOLS`; none: skip it).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1024x1024,1024x4096", value_parser = crate::value::matrix)]
    muon_shapes: Vec<(usize, usize)>,
    /// Matrix shapes for Adafactor's factored rows (`ROWSxCOLS`; none: skip them).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "4096x2442", value_parser = crate::value::matrix)]
    adafactor_shapes: Vec<(usize, usize)>,
}

pub fn run(args: OptimArgs) -> Result<()> {
    if args.threads.contains(&0) {
        bail!("--threads must be at least 1");
    }
    bench_optim(&args.sizes, args.tensors, &args.adafactor_shapes, &args.threads, args.iters.max(1))?;
    bench_muon(&args.muon_shapes, &args.threads, args.iters.max(1))
}

/// Muon's Newton–Schulz products next to plain f32 matmuls of the same shapes.
fn bench_muon(shapes: &[(usize, usize)], threads: &[usize], iters: usize) -> Result<()> {
    if shapes.is_empty() {
        return Ok(());
    }
    let config = MuonConfig::default();
    println!(
        "# muon: Newton-Schulz ({} steps, bf16 rounding of each op) vs the same products as plain f32 GEMMs; median of {iters}",
        config.ns_steps
    );
    println!(
        "{:<13} {:>11} {:>7} {:>10} {:>12} {:>10} {:>12} {:>10} {:>12}",
        "optimizer", "shape", "threads", "NS ms", "NS GFLOP/s", "plain ms", "plain GFLOP/s", "% of plain", "step ms"
    );
    for &(rows, cols) in shapes {
        let u: Vec<f32> = (0..rows * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) * 1e-3).collect();
        let flops = newton_schulz_flops(rows, cols, config.ns_steps);
        for &t in threads {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().context("building the thread pool")?;
            let (ns, plain, step) = pool.install(|| -> Result<(f64, f64, f64)> {
                let ns = timed(iters, || {
                    std::hint::black_box(newton_schulz(&u, rows, cols, &config));
                });
                let (m, n) = (rows.min(cols), rows.max(cols));
                let (x, mut s, mut ss, mut tx) = (u[..m * n].to_vec(), vec![0f32; m * m], vec![0f32; m * m], vec![0f32; m * n]);
                let plain = timed(iters, || {
                    for _ in 0..config.ns_steps {
                        let xv = MatrixView::row_major(&x, m, n);
                        matmul(xv, xv.t(), &mut s);
                        matmul(MatrixView::row_major(&s, m, m), MatrixView::row_major(&s, m, m), &mut ss);
                        matmul(MatrixView::row_major(&ss, m, m), xv, &mut tx);
                    }
                    std::hint::black_box(&tx);
                });
                let layout = Layout::new([("w", vec![rows, cols])])?;
                let step = time_step(&layout, OptimizerConfig::Muon(config.clone()), iters)?;
                Ok((ns, plain, step))
            })?;
            println!(
                "{:<13} {:>11} {:>7} {:>10.2} {:>12.1} {:>10.2} {:>12.1} {:>9.0}% {:>12.2}",
                "muon",
                format!("{rows}x{cols}"),
                t,
                ns * 1e3,
                flops / ns / 1e9,
                plain * 1e3,
                flops / plain / 1e9,
                100.0 * plain / ns,
                step * 1e3
            );
        }
    }
    Ok(())
}

/// The median seconds of `iters` runs of `f`, after one warm-up run.
fn timed(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..iters)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// An optimizer row of the table: its name, its configuration and the bytes one step
/// moves per parameter (the copy's size).
type Row = (&'static str, OptimizerConfig, usize);

struct Workload {
    label: String,
    layout: Layout,
}

fn bench_optim(sizes: &[usize], tensors: usize, matrices: &[(usize, usize)], threads: &[usize], iters: usize) -> Result<()> {
    let mut workloads: Vec<Workload> =
        sizes.iter().map(|&n| Ok(Workload { label: human(n), layout: Layout::new([("flat", vec![n])])? })).collect::<Result<_>>()?;
    if tensors > 0 {
        let layout = Layout::new((0..tensors).map(|i| (format!("t{i}"), vec![10_000])))?;
        workloads.push(Workload { label: format!("{tensors}x10K"), layout });
    }
    let optimizers: Vec<Row> = vec![
        ("sgd_momentum", OptimizerConfig::Sgd(SgdConfig { lr: 1e-3, momentum: 0.9, ..Default::default() }), 20),
        ("adamw", OptimizerConfig::Adam(AdamConfig::adamw()), 28),
        ("lion", OptimizerConfig::Lion(LionConfig { weight_decay: 0.1, ..LionConfig::default() }), 20),
        (
            "schedule_free",
            OptimizerConfig::ScheduleFreeAdamw(ScheduleFreeConfig { weight_decay: 0.01, ..ScheduleFreeConfig::default() }),
            28,
        ),
        // The flat buffer is one vector (unfactored v): the first pass reads p and g and
        // updates v (for RMS(p), v and RMS(U)), the second reads g and v and updates p.
        ("adafactor", OptimizerConfig::Adafactor(AdafactorConfig::default()), 32),
        // p read and written, g read, two code bytes read and written (scales: 1/64 more).
        ("adamw8bit", OptimizerConfig::Adamw8bit(distoptim_optim::kernels::Adamw8bitConfig::default()), 16),
    ];
    // A matrix takes Adafactor's factored path: its row and column sums in one pass
    // (read g), RMS(p) (read p), RMS(U) (read g), the update (read g and p, write p).
    let factored: Vec<Workload> = matrices
        .iter()
        .map(|&(r, c)| Ok(Workload { label: format!("{r}x{c}"), layout: Layout::new([("w", vec![r, c])])? }))
        .collect::<Result<_>>()?;
    println!(
        "# distoptim bench optim: median of {iters} steps after one warm-up; copy = parallel memcpy of the same bytes on the same pool"
    );
    println!(
        "{:<13} {:>9} {:>7} {:>10} {:>10} {:>9} {:>10} {:>10}",
        "optimizer", "params", "threads", "ms/step", "Mparam/s", "GB/s", "copy GB/s", "% of copy"
    );
    let mut runs: Vec<(&Workload, Vec<Row>)> = workloads.iter().map(|w| (w, optimizers.clone())).collect();
    runs.extend(factored.iter().map(|w| (w, vec![("adafactor", OptimizerConfig::Adafactor(AdafactorConfig::default()), 24)])));
    for (w, optimizers) in &runs {
        let n = w.layout.numel();
        for (name, config, bytes_per_param) in optimizers {
            for &t in threads {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().context("building the thread pool")?;
                let bytes = (n * bytes_per_param) as f64;
                let (step_s, copy_s) = pool.install(|| -> Result<(f64, f64)> {
                    let copy_s = time_copy(n * bytes_per_param / 2, iters);
                    let step_s = time_step(&w.layout, config.clone(), iters)?;
                    Ok((step_s, copy_s))
                })?;
                let gbs = bytes / step_s / 1e9;
                let copy_gbs = bytes / copy_s / 1e9;
                println!(
                    "{:<13} {:>9} {:>7} {:>10.3} {:>10.1} {:>9.2} {:>10.2} {:>9.0}%",
                    name,
                    w.label,
                    t,
                    step_s * 1e3,
                    n as f64 / step_s / 1e6,
                    gbs,
                    copy_gbs,
                    100.0 * gbs / copy_gbs
                );
                if *name == "adamw8bit" {
                    let codes_s = pool.install(|| time_codes(n, iters));
                    println!(
                        "#   adamw8bit's code work alone (both moments dequantized and re-quantized, in L1): {:.3} ms = {:.0}% of its step; a step at 70% of copy would take {:.3} ms",
                        codes_s * 1e3,
                        100.0 * codes_s / step_s,
                        copy_s / 0.7 * 1e3
                    );
                }
            }
        }
    }
    Ok(())
}

/// Seconds for the 8-bit step's code work alone over `n` parameters, 256-element block
/// by block on the pool: both moments dequantized and re-quantized from one block that
/// stays in L1, so no parameter, gradient or code traffic: a floor under the step.
fn time_codes(n: usize, iters: usize) -> f64 {
    const BLOCK: usize = 256;
    let (q1, q2) = (Quantizer::get(true), Quantizer::get(false));
    let signed: Vec<f32> = (0..BLOCK).map(|i| (i as f32 * 0.37).sin() * 0.5).collect();
    let unsigned: Vec<f32> = signed.iter().map(|x| x.abs()).collect();
    timed(iters, || {
        (0..n.div_ceil(BLOCK)).into_par_iter().for_each_init(
            || (vec![0u8; BLOCK], vec![0f32; BLOCK]),
            |(codes, out), _| {
                quantize_with(q1, &signed, 0.5, codes);
                dequantize(codes, 0.5, true, out);
                quantize_with(q2, &unsigned, 0.5, codes);
                dequantize(codes, 0.5, false, out);
                std::hint::black_box(&out);
            },
        )
    })
}

/// Seconds per optimizer step over the whole layout.
fn time_step(layout: &Layout, config: OptimizerConfig, iters: usize) -> Result<f64> {
    let n = layout.numel();
    let mut opt = Optimizer::new(layout.clone(), config)?;
    let mut params: Vec<f32> = (0..n).into_par_iter().map(|i| 0.5 + (i % 97) as f32 * 1e-3).collect();
    let grads: Vec<f32> = (0..n).into_par_iter().map(|i| ((i % 89) as f32 - 44.0) * 1e-4).collect();
    opt.step(&mut params, &grads)?; // warm-up: also touches the state pages
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        opt.step(&mut params, &grads)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&params);
    Ok(median(times))
}

/// Seconds per parallel copy of `bytes` bytes (read once, written once).
fn time_copy(bytes: usize, iters: usize) -> f64 {
    let n = bytes / 4;
    let src: Vec<f32> = (0..n).into_par_iter().map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    let copy = |dst: &mut [f32]| dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
    copy(&mut dst);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        copy(&mut dst);
        times.push(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    median(times)
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}K", n / 1_000),
        n => n.to_string(),
    }
}
