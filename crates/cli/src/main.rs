//! `distoptim`: the command-line front end.
//!
//! - `replay CASE.json`: the conformance interface (one JSON object on stdout; on failure
//!   nothing on stdout, `replay: CLASS: message` on stderr and exit status 1);
//! - `launch --nproc N -- PROGRAM ARGS…`: torchrun for one host (shm backend);
//! - `bench optim`: optimizer kernels against the memory-copy roofline;
//! - `bench collectives`: collectives in the style of nccl-tests, next to memcpy;
//! - `train`: data-parallel training of a candle MLP on real data, end to end;
//! - `checkpoint consolidate DIR OUT`: one model.safetensors + optimizer.safetensors;
//! - `ps serve|stats|checkpoint`: a parameter-server worker, and asking one;
//! - `bench ps`: the parameter server's latency and throughput on loopback;
//! - `selftest`: the collective conformance suite on a backend (CI runs it under mpirun).

mod bench;
mod estimate;
mod launch;
mod ps;
mod selftest;
mod train;
mod value;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "distoptim", version, about = "Data-parallel optimizers with PyTorch's numbers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replays a conformance case and prints the result as JSON.
    Replay {
        /// The case file (see tests/conformance/FORMAT.md).
        case: PathBuf,
        /// Run ddp and zero cases in deterministic mode (the exact sum of `train
        /// --deterministic`); cases it does not cover run as usual.
        #[arg(long)]
        deterministic: bool,
    },
    /// Starts N processes of PROGRAM with the torchrun environment (shm backend) and
    /// stops them all when one fails.
    Launch {
        /// Number of processes (ranks).
        #[arg(long)]
        nproc: usize,
        /// Communication backend the ranks use (launch serves shm; use mpirun for mpi).
        #[arg(long, default_value = "shm")]
        backend: String,
        /// Seconds between SIGTERM and SIGKILL when stopping the ranks.
        #[arg(long, default_value_t = 5.0)]
        grace: f64,
        /// Do not prefix output lines with `[rank N]`.
        #[arg(long)]
        no_prefix: bool,
        #[command(flatten)]
        elastic: launch::ElasticArgs,
        /// The program and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Trains a candle MLP data-parallel on the embedded digits data set (or a 25M
    /// synthetic model), on `--nproc` processes.
    Train(Box<train::TrainArgs>),
    /// Works on checkpoints written by `train` or `distoptim::checkpoint::save`.
    Checkpoint {
        #[command(subcommand)]
        what: CheckpointCommand,
    },
    /// The parameter server (torch's RPC DistributedOptimizer): run a worker, query one.
    Ps {
        #[command(subcommand)]
        what: ps::PsCommand,
    },
    /// Runs the collective layer's conformance suite on a backend.
    Selftest(selftest::SelftestArgs),
    /// Plans a job: bytes per rank by category, bytes sent per step and the predicted
    /// optimizer-step time, per strategy, precision and world size.
    Estimate(estimate::EstimateArgs),
    /// Benchmarks, each next to its reference measured in the same run.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Writes OUT/model.safetensors and OUT/optimizer.safetensors from the per-rank files
    /// of DIR, tensor by tensor (memory ≈ the largest tensor), checking every checksum.
    Consolidate {
        /// A checkpoint directory (`--checkpoint-dir`: its `latest`, else its newest
        /// complete checkpoint) or one `step-*` directory in it.
        dir: PathBuf,
        /// Where to write model.safetensors and optimizer.safetensors (created if needed).
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    // Die quietly on a closed stdout (`distoptim bench optim | head`), as Unix tools do,
    // instead of panicking in `println!`.
    // SAFETY: setting a signal's disposition to the default before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match Cli::parse().command {
        Command::Replay { case, deterministic } => replay(&case, deterministic),
        Command::Launch { nproc, backend, grace, no_prefix, elastic, command } => {
            let spec = launch::LaunchSpec {
                nproc,
                backend,
                grace: std::time::Duration::from_secs_f64(grace.max(0.0)),
                program: command[0].clone(),
                args: command[1..].to_vec(),
                prefix: !no_prefix,
                elastic: elastic.spec(),
            };
            report("launch", launch::launch(&spec))
        }
        Command::Train(args) => report("train", train::run(*args)),
        Command::Checkpoint { what: CheckpointCommand::Consolidate { dir, out } } => {
            report("checkpoint consolidate", consolidate(&dir, &out))
        }
        Command::Ps { what } => report("ps", ps::run(what)),
        Command::Selftest(args) => report("selftest", selftest::run(args)),
        Command::Bench { what } => report("bench", bench::run(what)),
        Command::Estimate(args) => report("estimate", estimate::run(args)),
    }
}

fn report(command: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn consolidate(dir: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let c = distoptim::consolidate(dir, out)?;
    println!("wrote {} and {} ({} tensors; largest {} elements)", c.model.display(), c.optimizer.display(), c.tensors, c.largest);
    Ok(())
}

fn replay(path: &std::path::Path, deterministic: bool) -> ExitCode {
    let options = distoptim_replay::ReplayOptions::default().with_deterministic(deterministic);
    let result = std::fs::read_to_string(path)
        .map_err(|e| format!("invalid_config: cannot read {}: {e}", path.display()))
        .and_then(|text| distoptim_replay::replay_json_with(&text, &options).map_err(|e| e.to_string()))
        .and_then(|out| serde_json::to_string(&out).map_err(|e| format!("invalid_config: cannot encode the output: {e}")));
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("replay: {msg}");
            ExitCode::FAILURE
        }
    }
}
