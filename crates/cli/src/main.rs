//! `distoptim`: the command-line front end.
//!
//! - `replay CASE.json`: the conformance interface (one JSON object on stdout; on failure
//!   nothing on stdout, `replay: CLASS: message` on stderr and exit status 1);
//! - `bench optim`: optimizer kernels against the memory-copy roofline.

mod bench;

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
    },
    /// Benchmarks, each next to its reference measured in the same run.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Replay { case } => replay(&case),
        Command::Bench { what } => match bench::run(what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn replay(path: &std::path::Path) -> ExitCode {
    let result = std::fs::read_to_string(path)
        .map_err(|e| format!("invalid_config: cannot read {}: {e}", path.display()))
        .and_then(|text| distoptim_replay::replay_json(&text).map_err(|e| e.to_string()))
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
