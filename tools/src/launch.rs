//! `motley train --nproc N`: starts N ranks of the same command on this machine, as
//! `torchrun --standalone --nproc-per-node N` does, with no Python. Like torchrun's agent it
//! serves the rendezvous store itself (every rank is a client, `TORCHELASTIC_USE_AGENT_STORE`),
//! gives each child its `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`
//! and `MASTER_PORT`, and waits. When a rank fails the others end on their own (they name it);
//! any still running a timeout later are killed. Children die with the launcher. SIGTERM,
//! SIGINT and SIGUSR1 are passed on to the ranks (each in its own process group, so a Ctrl-C
//! arrives once), which checkpoint and stop together.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use motley_trainer::dist::Store;

/// The command line without `--nproc N` / `--nproc=N`.
pub fn strip_nproc(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        match a.to_str() {
            Some("--nproc") => skip = true,
            Some(s) if s.starts_with("--nproc=") => {}
            _ => out.push(a),
        }
    }
    out
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(9)) => "killed (signal 9)".into(),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Passes SIGTERM, SIGINT and SIGUSR1 on to every rank started so far (as torchrun does), so
/// each finishes its step, the job checkpoints and the ranks exit; the launcher then exits
/// with their code.
fn forward_signals() -> anyhow::Result<Forwarding> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let pids = Arc::new(Mutex::new(Vec::<i32>::new()));
    let last = Arc::new(AtomicI32::new(0));
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])?;
    let (to, seen) = (pids.clone(), last.clone());
    std::thread::Builder::new().name("motley-signals".into()).spawn(move || {
        for sig in signals.forever() {
            seen.store(sig, Ordering::SeqCst);
            eprintln!("motley: signal {sig}: passing it to the ranks");
            for &pid in to.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                // SAFETY: kill(2) with a child's pid and a valid signal number.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
        }
    })?;
    Ok(Forwarding { pids, last })
}

/// Where signals go: the ranks' process ids (pushed as they start), and the last signal
/// passed on (0: none).
struct Forwarding {
    pids: Arc<Mutex<Vec<i32>>>,
    last: Arc<AtomicI32>,
}

/// Most ranks `--nproc` starts on one machine.
pub const MAX_LOCAL_RANKS: usize = 256;

/// Runs `args` (this binary's arguments, `--nproc` removed) as `nproc` ranks and returns the
/// exit code the launcher should end with: 0 when every rank succeeded, else the first
/// failing rank's.
pub fn run_local(nproc: usize, args: &[OsString], timeout: Duration) -> anyhow::Result<i32> {
    // One machine's ranks: a GPU node has 8 or 16; past a few hundred processes the spawn
    // itself would exhaust the machine before a rank could report a problem.
    if nproc > MAX_LOCAL_RANKS {
        anyhow::bail!(
            "--nproc {nproc}: at most {MAX_LOCAL_RANKS} ranks on one machine; start more machines with torchrun or srun"
        );
    }
    if std::env::var_os("WORLD_SIZE").is_some() {
        anyhow::bail!("--nproc inside a launch (WORLD_SIZE is already set): let one launcher start the ranks");
    }
    let exe = std::env::current_exe().context("locating the motley binary")?;
    let store = Store::tcp("127.0.0.1", 0, true, None, timeout).context("serving the rendezvous store")?;
    let port = store.port();
    eprintln!("motley: starting {nproc} ranks (rendezvous 127.0.0.1:{port})");
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(nproc);
    let Forwarding { pids, last: signalled } = forward_signals()?;
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(&args[1..])
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("TORCHELASTIC_USE_AGENT_STORE", "True")
            .env("TORCHELASTIC_RESTART_COUNT", "0")
            .stdin(Stdio::null())
            // Its own process group: a Ctrl-C reaches the ranks once, through the launcher.
            .process_group(0);
        // SAFETY: the closure only calls prctl, which is async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // A rank must not outlive its launcher (killed by a scheduler, Ctrl-C).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting rank {rank}"))?;
        pids.lock().unwrap_or_else(|p| p.into_inner()).push(child.id() as i32);
        children.push((rank, child));
    }
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    let mut results: Vec<(usize, ExitStatus)> = Vec::new();
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = children.remove(i);
                    // A rank that stopped on the signal passed to it did what it was asked.
                    let sig = signalled.load(Ordering::SeqCst);
                    let stopped = sig > 0 && status.code() == Some(128 + sig);
                    if !status.success() && !stopped && first_failure.is_none() {
                        first_failure = Some((rank, status, Instant::now()));
                        eprintln!("motley: rank {rank} failed ({}); waiting for the others to stop", describe(status));
                    }
                    results.push((rank, status));
                }
                Ok(None) => i += 1,
                Err(e) => return Err(e).context("waiting for a rank"),
            }
        }
        if let Some((rank, _, at)) = first_failure
            && at.elapsed() > timeout + Duration::from_secs(10)
        {
            for (r, c) in &mut children {
                eprintln!(
                    "motley: rank {r} still running {:.0}s after rank {rank} failed; killing it",
                    at.elapsed().as_secs_f64()
                );
                let _ = c.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(store);
    match first_failure {
        None if results.iter().any(|(_, s)| !s.success()) => {
            let sig = signalled.load(Ordering::SeqCst);
            eprintln!("motley: every rank stopped on signal {sig} after checkpointing; `--resume` continues");
            Ok(128 + sig)
        }
        None => Ok(0),
        Some((rank, status, _)) => {
            results.sort_by_key(|(r, _)| *r);
            let all: Vec<String> = results.iter().map(|(r, s)| format!("rank {r}: {}", describe(*s))).collect();
            eprintln!("motley: rank {rank} failed first; {}", all.join(", "));
            Ok(status.code().filter(|&c| c != 0).unwrap_or(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nproc_is_removed_from_the_command_line() {
        let args = ["motley", "train", "--nproc", "2", "--preset", "tiny", "--nproc=3", "--json"].map(OsString::from);
        let got: Vec<String> = strip_nproc(args).into_iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(got, ["motley", "train", "--preset", "tiny", "--json"]);
    }

    #[test]
    fn absurd_rank_counts_are_refused_before_any_spawn() {
        let args = ["motley", "train"].map(OsString::from);
        for n in [MAX_LOCAL_RANKS + 1, usize::MAX] {
            let err = run_local(n, &args, Duration::from_secs(1)).expect_err("refused");
            assert!(err.to_string().contains("at most"), "{err}");
        }
    }
}
