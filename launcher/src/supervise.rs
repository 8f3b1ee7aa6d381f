//! Supervision of the running service: starting the shard group, noticing a child that died
//! or hung, and bringing it back.
//!
//! A crashed shard takes its whole tensor-parallel group down and back up (ranks only work as a
//! group). A shard that stops answering is treated as crashed once it has been silent for
//! `--shard-hang-timeout`: a process stopped by SIGSTOP, wedged in a driver call or swapped to a
//! standstill never exits, so only a timeout can find it. A router that dies after it was
//! serving is started again against the running shards (it clears their cache on connect);
//! one that dies before it ever served has a configuration problem that a restart would only
//! repeat, so that stops everything. Restarts back off exponentially, at most
//! `--max-restarts` in a row per kind of child.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::args::Args;
use crate::health;
use crate::process::{describe, Supervised};
use crate::{router_command, shard_command, stop_all};

/// How often each shard is asked whether it is alive.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A child kind's run of restarts, earned back after ten quiet minutes.
struct Restarts {
    what: &'static str,
    count: u32,
    up_since: Instant,
}

impl Restarts {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            count: 0,
            up_since: Instant::now(),
        }
    }

    /// The wait before the next restart, or an error once the budget is spent.
    fn next(&mut self, args: &Args, why: &str) -> anyhow::Result<Duration> {
        if self.up_since.elapsed() > Duration::from_secs(600) {
            self.count = 0;
        }
        if self.count >= args.max_restarts {
            bail!(
                "{why}; giving up after {} restarts (--max-restarts)",
                self.count
            );
        }
        self.count += 1;
        let doubling = f64::from(1u32 << (self.count - 1).min(5));
        let backoff = Duration::from_secs_f64(args.restart_backoff.max(0.0) * doubling);
        tracing::error!(
            "{why}; restarting the {} in {:.1}s (restart {} of {})",
            self.what,
            backoff.as_secs_f64(),
            self.count,
            args.max_restarts
        );
        Ok(backoff)
    }

    fn restarted(&mut self) {
        self.up_since = Instant::now();
    }
}

/// Since when each shard has failed every liveness probe (`None` while it answers).
struct Watchdog {
    sockets: Vec<PathBuf>,
    silent_since: Vec<Option<Instant>>,
    next_probe: Instant,
    timeout: Option<Duration>,
}

impl Watchdog {
    fn new(args: &Args) -> Self {
        let sockets = shard_sockets(args);
        Self {
            silent_since: vec![None; sockets.len()],
            sockets,
            next_probe: Instant::now(),
            timeout: (args.shard_hang_timeout > 0.0)
                .then(|| Duration::from_secs_f64(args.shard_hang_timeout)),
        }
    }

    fn reset(&mut self) {
        self.silent_since.fill(None);
    }

    /// The rank that has been silent past the timeout, and for how long.
    fn hung(&mut self) -> Option<(usize, Duration)> {
        let timeout = self.timeout?;
        if Instant::now() < self.next_probe {
            return None;
        }
        self.next_probe = Instant::now() + PROBE_EVERY;
        let wait = timeout.min(PROBE_EVERY);
        for (rank, socket) in self.sockets.iter().enumerate() {
            let asked = Instant::now();
            self.silent_since[rank] = match health::shard_alive(socket, wait) {
                true => None,
                false => self.silent_since[rank].or(Some(asked)),
            };
        }
        self.silent_since
            .iter()
            .enumerate()
            .filter_map(|(rank, since)| Some((rank, since.as_ref()?.elapsed())))
            .find(|(_, silent)| *silent >= timeout)
    }
}

fn shard_sockets(args: &Args) -> Vec<PathBuf> {
    (0..args.world_size())
        .map(|r| PathBuf::from(format!("{}-{r}", args.shard_uds_path)))
        .collect()
}

/// Starts every shard (one per tensor-parallel rank) and waits until all answer Health.
/// `None` when a signal arrived meanwhile. If one fails to start, the others are stopped.
pub fn start_shards(
    args: &Args,
    model_dir: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Vec<Supervised>>> {
    let timeout = Duration::from_secs(args.graceful_termination_timeout);
    let world = args.world_size();
    let sockets = shard_sockets(args);
    for socket in &sockets {
        if socket.exists() {
            std::fs::remove_file(socket).map_err(|e| {
                anyhow::anyhow!("cannot remove stale socket {}: {e}", socket.display())
            })?;
        }
    }
    // The NCCL group id of a previous start must not be read by this one's ranks (GPU groups).
    let _ = std::fs::remove_file(format!("{}-nccl-id", args.shard_uds_path));
    let mut shards = Vec::with_capacity(world);
    for rank in 0..world {
        tracing::info!("Starting shard {rank}");
        match Supervised::spawn(
            &format!("shard {rank}"),
            shard_command(args, model_dir, rank),
            args.json_output,
        ) {
            Ok(s) => shards.push(s),
            Err(e) => {
                stop_all(&mut shards, timeout);
                return Err(e);
            }
        }
    }
    let start = Instant::now();
    let mut last_note = Instant::now();
    while !sockets.iter().all(|s| health::shard_ready(s)) {
        if stop.load(Ordering::SeqCst) {
            stop_all(&mut shards, timeout);
            return Ok(None);
        }
        if let Some(rank) = shards.iter_mut().position(|s| s.exited().is_some()) {
            let status = shards[rank].exited().map(describe).unwrap_or_default();
            let why = shards[rank].last_words();
            stop_all(&mut shards, timeout);
            bail!("shard {rank} failed to start ({status}): {why}");
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            tracing::info!("Waiting for shards to be ready...");
            last_note = Instant::now();
        }
        thread::sleep(Duration::from_millis(100));
    }
    tracing::info!(
        "{} ready in {:.2}s",
        if world == 1 {
            "Shard".to_string()
        } else {
            format!("{world} shards")
        },
        start.elapsed().as_secs_f64()
    );
    Ok(Some(shards))
}

/// Why the shard group must restart: a rank that exited, or one that stopped answering (which
/// is killed here, so that its socket closes and the router's calls to it fail at once).
fn shard_failure(shards: &mut [Supervised], watchdog: &mut Watchdog) -> Option<String> {
    if let Some(rank) = shards.iter_mut().position(|s| s.exited().is_some()) {
        let status = shards[rank].exited().map(describe).unwrap_or_default();
        return Some(format!(
            "shard {rank} exited unexpectedly ({status}): {}",
            shards[rank].last_words()
        ));
    }
    let (rank, silent) = watchdog.hung()?;
    shards[rank].kill();
    Some(format!(
        "shard {rank} did not answer for {:.1}s (hung; --shard-hang-timeout): killed it",
        silent.as_secs_f64()
    ))
}

/// Sleeps until `until`, or until a stop signal; whether the signal came.
fn wait_unless_stopped(until: Instant, stop: &AtomicBool) -> bool {
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    stop.load(Ordering::SeqCst)
}

/// Watches the children until a signal (stop all, Ok) or a failure that restarts cannot mend.
pub fn supervise(
    args: &Args,
    model_dir: &Path,
    max_batch_prefill_tokens: u32,
    stop: &AtomicBool,
    mut shards: Vec<Supervised>,
    router: Supervised,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.graceful_termination_timeout);
    let mut shard_restarts = Restarts::new("shards");
    let mut router_restarts = Restarts::new("router");
    let mut watchdog = Watchdog::new(args);
    let mut router = vec![router];
    let mut router_served = false;
    let mut next_router_check = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            tracing::info!("Shutting down");
            shards.append(&mut router); // stop_all stops the router (last) first
            stop_all(&mut shards, timeout);
            return Ok(());
        }
        if !router_served && Instant::now() >= next_router_check {
            router_served = health::router_serving(&args.hostname, args.port);
            next_router_check = Instant::now() + Duration::from_millis(500);
        }
        if let Some(status) = router[0].exited() {
            let why = format!(
                "router exited unexpectedly ({}): {}",
                describe(status),
                router[0].last_words()
            );
            // A router that exited on its own before it ever served failed on its
            // configuration: restarting would repeat that. A signal came from outside.
            let killed = std::os::unix::process::ExitStatusExt::signal(&status).is_some();
            let backoff = match router_served || killed {
                true => router_restarts.next(args, &why),
                false => Err(anyhow::anyhow!("{why}")),
            };
            let backoff = match backoff {
                Ok(backoff) => backoff,
                Err(e) => {
                    stop_all(&mut shards, timeout);
                    return Err(e);
                }
            };
            if wait_unless_stopped(Instant::now() + backoff, stop) {
                continue;
            }
            tracing::info!("Starting router");
            router[0] = match Supervised::spawn(
                "router",
                router_command(args, model_dir, max_batch_prefill_tokens),
                args.json_output,
            ) {
                Ok(r) => r,
                Err(e) => {
                    stop_all(&mut shards, timeout);
                    return Err(e);
                }
            };
            router_served = false;
            router_restarts.restarted();
            continue;
        }
        if let Some(why) = shard_failure(&mut shards, &mut watchdog) {
            stop_all(&mut shards, timeout);
            let backoff = match shard_restarts.next(args, &why) {
                Ok(backoff) => backoff,
                Err(e) => {
                    stop_all(&mut router, timeout);
                    return Err(e);
                }
            };
            if wait_unless_stopped(Instant::now() + backoff, stop) {
                continue;
            }
            match start_shards(args, model_dir, stop) {
                Ok(Some(new)) => {
                    shards = new;
                    shard_restarts.restarted();
                    watchdog.reset();
                }
                Ok(None) => continue,
                Err(e) => {
                    stop_all(&mut router, timeout);
                    return Err(e.context(why));
                }
            }
            continue;
        }
        thread::sleep(Duration::from_millis(100));
    }
}
