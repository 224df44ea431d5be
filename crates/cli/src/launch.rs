//! `distoptim launch`: torchrun for one host.
//!
//! Starts N copies of a program with the torchrun environment (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) plus a fresh
//! `DISTOPTIM_JOB_ID` and secret `DISTOPTIM_TOKEN` that make the job's shared memory
//! private. Each output line is prefixed with its rank. When a rank fails, the others get
//! SIGTERM, then SIGKILL after a grace period, and the launcher exits non-zero naming the
//! rank; Ctrl-C (SIGINT/SIGTERM to the launcher) stops them all the same way.
//!
//! With `--elastic` a dead rank does not end the job: the launcher stops the others and
//! starts it again (see [`Elastic`]), and the ranks continue from the in-memory snapshots
//! they keep in the launcher's shared-memory directory (`distoptim::elastic`).

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The job to start.
pub struct LaunchSpec {
    pub nproc: usize,
    pub backend: String,
    pub grace: Duration,
    pub program: String,
    pub args: Vec<String>,
    /// Prefix output lines with `[rank N]`.
    pub prefix: bool,
    /// Restart the job when a rank dies (see [`Elastic`]); `None`: fail like torchrun
    /// without restarts.
    pub elastic: Option<Elastic>,
}

/// Elastic recovery on one host: when a rank dies, the launcher stops the survivors and
/// starts the job again, on the survivors (`shrink`) or on as many ranks as before. The
/// ranks find the launcher's snapshot directory in `DISTOPTIM_SNAPSHOT_DIR` (shared
/// memory the launcher owns, so it outlives any rank) and continue from the last
/// snapshot written there; `DISTOPTIM_RESTART_COUNT` numbers the restarts (torchrun's
/// `TORCHELASTIC_RESTART_COUNT`) and `DISTOPTIM_FAILED_AT_NS` holds the time of the
/// death (Unix ns), for the ranks to report how long recovery took.
#[derive(Clone, Debug)]
pub struct Elastic {
    /// Restart on the ranks that did not die instead of on `nproc`.
    pub shrink: bool,
    /// Fail instead of shrinking below this many ranks.
    pub min_nproc: usize,
    /// Restarts allowed in all.
    pub max_restarts: usize,
}

/// The command-line flags of elastic recovery (`launch` and `train`).
#[derive(clap::Args, Clone, Debug)]
pub struct ElasticArgs {
    /// Survive a dead rank: stop the others and restart the job from the last in-memory
    /// snapshot (see --shrink, --max-restarts); the program must write snapshots into
    /// DISTOPTIM_SNAPSHOT_DIR (`train` does).
    #[arg(long)]
    pub elastic: bool,
    /// With --elastic: restart on the surviving ranks instead of on as many as before.
    #[arg(long, requires = "elastic")]
    pub shrink: bool,
    /// With --elastic --shrink: the fewest ranks to continue on.
    #[arg(long, default_value_t = 1, requires = "elastic", value_parser = clap::value_parser!(u64).range(1..))]
    pub min_nproc: u64,
    /// With --elastic: restarts allowed in all.
    #[arg(long, default_value_t = 3, requires = "elastic")]
    pub max_restarts: u64,
}

impl ElasticArgs {
    /// The launcher's setting, `None` without --elastic.
    pub fn spec(&self) -> Option<Elastic> {
        self.elastic.then_some(Elastic {
            shrink: self.shrink,
            min_nproc: self.min_nproc as usize,
            max_restarts: self.max_restarts as usize,
        })
    }
}

/// A signal the launcher received (0: none), set by the handler.
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// How one start of the job ended.
enum Ended {
    /// Every rank exited with status 0.
    Done,
    /// Ranks died: the first one seen, its description, and how many ended on their own.
    Died { rank: usize, what: String, dead: usize, at: SystemTime },
}

/// Runs the job; `Ok` only when every rank exits with status 0 (after restarts, under
/// `elastic`).
pub fn launch(spec: &LaunchSpec) -> Result<()> {
    if spec.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if spec.backend != "shm" {
        bail!("launch starts processes on this host for the shm backend; for --backend {} use mpirun or srun", spec.backend);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let Some(elastic) = &spec.elastic else {
        return match start(spec, spec.nproc, &[])? {
            Ended::Done => Ok(()),
            Ended::Died { what, .. } => bail!("{what}; stopped the other ranks"),
        };
    };
    if elastic.min_nproc == 0 || elastic.min_nproc > spec.nproc {
        bail!("--min-nproc must be in 1..={} (--nproc), got {}", spec.nproc, elastic.min_nproc);
    }
    let snapshots = SnapshotDir::create()?;
    let mut nproc = spec.nproc;
    let mut env = vec![("DISTOPTIM_SNAPSHOT_DIR".to_string(), snapshots.0.display().to_string())];
    for restart in 0.. {
        env.retain(|(k, _)| k != "DISTOPTIM_RESTART_COUNT");
        env.push(("DISTOPTIM_RESTART_COUNT".into(), restart.to_string()));
        let (rank, what, dead, at) = match start(spec, nproc, &env)? {
            Ended::Done => return Ok(()),
            Ended::Died { rank, what, dead, at } => (rank, what, dead, at),
        };
        let next = if elastic.shrink { nproc.saturating_sub(dead.max(1)) } else { nproc };
        if restart >= elastic.max_restarts {
            bail!("{what}; stopped the other ranks; no restart left (--max-restarts {} used)", elastic.max_restarts);
        }
        if next < elastic.min_nproc {
            bail!("{what}; stopped the other ranks; {next} would be left, below --min-nproc {}", elastic.min_nproc);
        }
        eprintln!(
            "elastic: {what} (start {restart}, rank {rank} of {nproc}); restarting on {next} ranks from the last snapshot ({} of --max-restarts {} left)",
            elastic.max_restarts - restart - 1,
            elastic.max_restarts
        );
        env.retain(|(k, _)| k != "DISTOPTIM_FAILED_AT_NS");
        env.push(("DISTOPTIM_FAILED_AT_NS".into(), at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()).to_string()));
        nproc = next;
    }
    unreachable!("the restart loop returns")
}

/// The launcher's snapshot directory in shared memory, private to it (mode 0700, a
/// fresh random name) and removed, with what the ranks wrote there, when the launcher
/// is done.
struct SnapshotDir(std::path::PathBuf);

impl SnapshotDir {
    fn create() -> Result<SnapshotDir> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::var_os("DISTOPTIM_SHM_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| "/dev/shm".into());
        remove_orphans(&dir);
        let path = dir.join(format!("distoptim-snapshots-{}-{:x}", std::process::id(), random_u64()?));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating the snapshot directory {}", path.display()))?;
        Ok(SnapshotDir(path))
    }
}

/// Removes the snapshot directories of launchers that no longer run (killed with
/// SIGKILL, which skips their cleanup): named by the dead launcher's pid, and ours
/// (another user's are not ours to remove, and the OS would refuse).
fn remove_orphans(dir: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid(2) cannot fail.
    let me = unsafe { libc::getuid() };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) =
            name.to_str().and_then(|n| n.strip_prefix("distoptim-snapshots-")).and_then(|r| r.split('-').next()?.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only asks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        let ours = std::fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if gone && ours {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        // Only this launcher's own fresh directory: created above with a random name.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `nproc` ranks with `env` added and waits for the outcome.
fn start(spec: &LaunchSpec, nproc: usize, env: &[(String, String)]) -> Result<Ended> {
    let job = format!("{}-{:x}", std::process::id(), random_u64()?);
    let token = format!("{:016x}{:016x}", random_u64()?, random_u64()?);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(29500);
    let mut ranks = Vec::with_capacity(nproc);
    let mut printers = Vec::new();
    for rank in 0..nproc {
        let mut child = Command::new(&spec.program);
        child
            .args(&spec.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("DISTOPTIM_JOB_ID", &job)
            .env("DISTOPTIM_TOKEN", &token)
            .env("DISTOPTIM_BACKEND", &spec.backend)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = die_with_launcher(&mut child).spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut ranks, spec.grace);
                return Err(e).with_context(|| format!("starting rank {rank}: {}", spec.program));
            }
        };
        let prefix = if spec.prefix { format!("[rank {rank}] ") } else { String::new() };
        printers.push(forward(child.stdout.take(), prefix.clone(), false));
        printers.push(forward(child.stderr.take(), prefix, true));
        ranks.push(Some(child));
    }
    let outcome = supervise(&mut ranks, spec.grace);
    for p in printers {
        let _ = p.join();
    }
    cleanup_segments(&job);
    outcome
}

/// Makes the rank die with the launcher: SIGKILL when the launcher's thread that spawned
/// it ends (PR_SET_PDEATHSIG), and an immediate exit if the launcher is already gone by
/// the time the child runs (the race the signal alone leaves open). A launcher killed by
/// SIGKILL therefore leaves no rank training on, or writing checkpoints, behind it.
fn die_with_launcher(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid(2) is async-signal-safe; called here, in the parent.
    let launcher = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and calls only the
    // async-signal-safe prctl(2), getppid(2) and _exit(2); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != launcher {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// Waits for every rank; on the first failure or a signal, stops the rest.
fn supervise(ranks: &mut [Option<Child>], grace: Duration) -> Result<Ended> {
    loop {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            stop_all(ranks, grace);
            bail!("interrupted by signal {sig}: stopped all {} ranks", ranks.len());
        }
        let mut running = 0;
        let mut died: Option<(usize, String)> = None;
        let mut dead = 0;
        for (rank, slot) in ranks.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) => {
                    let pid = child.id();
                    *slot = None;
                    if !status.success() {
                        dead += 1;
                        died.get_or_insert_with(|| (rank, format!("rank {rank} (pid {pid}) {}", describe(status))));
                    }
                }
                Err(e) => bail!("waiting for rank {rank}: {e}"),
            }
        }
        if let Some((rank, what)) = died {
            let at = SystemTime::now();
            stop_all(ranks, grace);
            return Ok(Ended::Died { rank, what, dead, at });
        }
        if running == 0 {
            return Ok(Ended::Done);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGTERM to every running rank, then SIGKILL to those still running after `grace`.
fn stop_all(ranks: &mut [Option<Child>], grace: Duration) {
    for child in ranks.iter().flatten() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && ranks.iter_mut().flatten().any(|c| matches!(c.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(10));
    }
    for child in ranks.iter_mut().flatten() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        _ => "ended abnormally".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}

/// Copies a child's stream to ours line by line, with the rank prefix.
fn forward(stream: Option<impl Read + Send + 'static>, prefix: String, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(stream) = stream else { return };
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).map(|n| n > 0).unwrap_or(false) {
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            let mut out: Box<dyn Write> = if to_stderr { Box::new(std::io::stderr().lock()) } else { Box::new(std::io::stdout().lock()) };
            let _ = out.write_all(prefix.as_bytes()).and_then(|_| out.write_all(&line)).and_then(|_| out.flush());
            line.clear();
        }
    })
}

/// Removes segments a crashed rank may have left before they were unlinked.
fn cleanup_segments(job: &str) {
    let dir = std::env::var_os("DISTOPTIM_SHM_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| "/dev/shm".into());
    let prefix = format!("distoptim-{job}");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) || name.starts_with(&format!(".{prefix}")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

fn random_u64() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("reading the OS random source for the job token: {e}"))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Runs this same command line on `nproc` processes (for subcommands that start their
/// own shm job when run outside one); only their output is shown, unprefixed.
pub fn launch_self(nproc: usize, elastic: Option<Elastic>) -> Result<()> {
    let exe = std::env::current_exe().context("locating this executable to launch it")?;
    launch(&LaunchSpec {
        nproc,
        backend: "shm".into(),
        grace: Duration::from_secs(5),
        program: exe.display().to_string(),
        args: std::env::args().skip(1).collect(),
        prefix: false,
        elastic,
    })
}
