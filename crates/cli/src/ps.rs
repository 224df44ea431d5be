//! `distoptim ps`: run a parameter-server worker, or ask one for its stats or a
//! checkpoint.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use distoptim_ps::{ClientConfig, Worker, WorkerClient, WorkerConfig};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum PsCommand {
    /// Serves parameters and local optimizers on a TCP address until killed.
    Serve(ServeArgs),
    /// Prints a worker's counters (parameters, open contexts, steps, refusals) as JSON.
    Stats(ClientArgs),
    /// Asks a worker to write its checkpoint now.
    Checkpoint(ClientArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the line printed names it).
    #[arg(long, default_value = "127.0.0.1:7070")]
    bind: String,
    /// The job token every request must carry (or DISTOPTIM_PS_TOKEN).
    #[arg(long, env = "DISTOPTIM_PS_TOKEN", hide_env_values = true)]
    token: String,
    /// Checkpoint directory: written on request, and restarted from when it holds one.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// A safetensors file of f32 tensors to serve as parameters (when not restarting).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Seconds after which a context nobody sends gradients to is dropped.
    #[arg(long, default_value_t = 60.0)]
    context_timeout: f64,
    /// Largest frame accepted, in MiB.
    #[arg(long, default_value_t = 1024)]
    max_frame_mb: usize,
    /// Seconds a new connection may stay silent before it shows the token.
    #[arg(long, default_value_t = 5.0)]
    auth_timeout: f64,
    /// Connections held before they show the token; a new one evicts the oldest.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_unauthenticated: u32,
    /// Connections held in all; past it a new one is closed at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
}

#[derive(Args)]
pub struct ClientArgs {
    /// The worker's address.
    #[arg(long)]
    worker: String,
    #[arg(long, env = "DISTOPTIM_PS_TOKEN", hide_env_values = true)]
    token: String,
}

pub fn run(cmd: PsCommand) -> Result<()> {
    match cmd {
        PsCommand::Serve(args) => serve(args),
        PsCommand::Stats(args) => {
            let stats = connect(&args)?.stats()?;
            println!("{}", serde_json::to_string(&stats)?);
            Ok(())
        }
        PsCommand::Checkpoint(args) => {
            connect(&args)?.checkpoint()?;
            println!("worker {} wrote its checkpoint", args.worker);
            Ok(())
        }
    }
}

fn connect(args: &ClientArgs) -> Result<WorkerClient> {
    Ok(WorkerClient::connect(&args.worker, ClientConfig::new(args.token.clone()))?)
}

fn serve(args: ServeArgs) -> Result<()> {
    for (name, seconds) in [("--context-timeout", args.context_timeout), ("--auth-timeout", args.auth_timeout)] {
        if !(seconds.is_finite() && seconds > 0.0 && seconds < 1e9) {
            anyhow::bail!("{name} must be a positive number of seconds, got {seconds}");
        }
    }
    let config = WorkerConfig {
        max_frame_bytes: args.max_frame_mb.checked_mul(1 << 20).context("--max-frame-mb is too large")?,
        context_timeout: Duration::from_secs_f64(args.context_timeout),
        auth_timeout: Duration::from_secs_f64(args.auth_timeout),
        max_unauthenticated: args.max_unauthenticated as usize,
        max_connections: args.max_connections as usize,
        checkpoint_dir: args.checkpoint_dir,
        ..WorkerConfig::new(args.token)
    };
    let worker = Worker::bind(&args.bind, config, args.init.as_deref())?;
    println!("ps worker listening on {}", worker.local_addr()?);
    std::io::stdout().flush()?;
    Ok(worker.serve()?)
}
