//! Liveness of the ranks of a job, through the rendezvous store: every rank bumps a heartbeat
//! counter; each rank watches the next one in a ring (O(world) store traffic) and, when that
//! rank stops beating for the timeout without having said it is done, posts who was lost and
//! ends its own process — so no rank waits forever on one that died or hung. A rank that fails
//! with an error posts the error, so the others' messages name the rank and say why.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::c10d::Store;

/// Exit status of a rank that gave up on a lost peer (a watchdog decision, not an error of
/// its own).
pub const EXIT_PEER_LOST: i32 = 3;

const LOST: &str = "health/lost";
const FAILED: &str = "health/failed";

fn beat_key(rank: usize) -> String {
    format!("health/beat/{rank}")
}

fn exit_key(rank: usize) -> String {
    format!("health/exit/{rank}")
}

/// The heartbeat and watchdog thread of one rank.
#[derive(Debug)]
pub struct Health {
    store: Arc<Store>,
    rank: usize,
    world: usize,
    interval: Duration,
    timeout: Duration,
    /// Where the store lives and who serves it, for messages when it is gone.
    store_host: String,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Heartbeat interval for a timeout: a twentieth of it, between 0.2 and 5 seconds.
pub fn interval_for(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

impl Health {
    /// Starts beating on `store` (a connection of this thread's own) and watching rank
    /// `rank + 1`. `store_host` says where the store is and who serves it, for messages.
    pub fn start(store: Store, rank: usize, world: usize, timeout: Duration, store_host: String) -> Self {
        let store = Arc::new(store);
        let interval = interval_for(timeout);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (store, stop, host) = (Arc::clone(&store), Arc::clone(&stop), store_host.clone());
            std::thread::Builder::new()
                .name(format!("motley-health-{rank}"))
                .spawn(move || watch(&store, rank, world, interval, timeout, &host, &stop))
                .ok()
        };
        let thread = Mutex::new(thread);
        Health { store, rank, world, interval, timeout, store_host, stop, thread }
    }

    /// Posts this rank's failure, so the other ranks' errors can say why it went away.
    pub fn report_failure(&self, msg: &str) {
        let note = format!("rank {}: {}", self.rank, first_line(msg));
        let _ = self.store.set(&exit_key(self.rank), note.as_bytes());
        if !self.store.check(FAILED).unwrap_or(true) {
            let _ = self.store.set(FAILED, note.as_bytes());
        }
    }

    /// Waits (up to `max`) until every other rank has posted an exit note or gone silent,
    /// so notes in a store this process serves can still be read.
    pub fn linger(&self, max: Duration) {
        let started = Instant::now();
        let others: Vec<usize> = (0..self.world).filter(|&r| r != self.rank).collect();
        while started.elapsed() < max {
            if others.iter().all(|&r| self.store.check(&exit_key(r)).unwrap_or(true)) {
                return;
            }
            std::thread::sleep(self.interval.min(Duration::from_millis(200)));
        }
    }

    /// Marks this rank done (its heartbeat may stop without alarming anyone) and stops the
    /// thread.
    pub fn done(&self) {
        let _ = self.store.set(&exit_key(self.rank), b"done");
        self.stop_thread();
    }

    fn stop_thread(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// After a collective failed: which rank is to blame, as well as the store can tell. Waits
    /// a few heartbeat intervals (never more than the timeout) for a failure note, a lost-rank
    /// note, or a rank whose heartbeat stopped.
    pub fn diagnose(&self) -> String {
        let started = Instant::now();
        let budget = (self.interval * 4 + Duration::from_secs(1)).min(self.timeout);
        let read = |key: &str| -> Option<String> {
            match self.store.check(key) {
                Ok(true) => self.store.get(key).ok().map(|v| String::from_utf8_lossy(&v).into_owned()),
                _ => None,
            }
        };
        let beats = || -> Option<Vec<i64>> { (0..self.world).map(|r| self.store.add(&beat_key(r), 0).ok()).collect() };
        let Some(first) = beats() else {
            return format!("lost contact with the rendezvous store at {}: that process died or hung", self.store_host);
        };
        loop {
            if let Some(note) = read(FAILED) {
                return format!("{note} (that rank failed first)");
            }
            if let Some(note) = read(LOST) {
                return note;
            }
            if started.elapsed() >= budget {
                break;
            }
            std::thread::sleep(self.interval);
        }
        let Some(now) = beats() else {
            return format!("lost contact with the rendezvous store at {}: that process died or hung", self.store_host);
        };
        let stale: Vec<String> = (0..self.world)
            .filter(|&r| r != self.rank && now[r] == first[r] && read(&exit_key(r)).as_deref() != Some("done"))
            .map(|r| r.to_string())
            .collect();
        match stale.len() {
            0 => "no rank was found dead: a network error, or a rank left the collective early".into(),
            1 => format!(
                "rank {} lost: no heartbeat for {:.1}s (the process died or hung)",
                stale[0],
                started.elapsed().as_secs_f64()
            ),
            _ => format!("ranks {} lost: no heartbeat for {:.1}s", stale.join(", "), started.elapsed().as_secs_f64()),
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// Ends the process from the watchdog: the training thread may be blocked inside a
/// collective, so normal unwinding is not an option, and exit handlers could block on it.
fn give_up(store: &Store, rank: usize, msg: &str) -> ! {
    let _ = store.set(&exit_key(rank), format!("rank {rank} gave up: {msg}").as_bytes());
    eprintln!("rank {rank}: {msg}; exiting");
    // SAFETY: _exit ends the process at once; stderr is unbuffered, and nothing else this
    // process holds needs flushing for the job to stay consistent (checkpoints are atomic).
    unsafe { libc::_exit(EXIT_PEER_LOST) }
}

fn watch(
    store: &Store,
    rank: usize,
    world: usize,
    interval: Duration,
    timeout: Duration,
    host: &str,
    stop: &AtomicBool,
) {
    let watched = (rank + 1) % world;
    let (mut last_seen, mut last_change) = (-1i64, Instant::now());
    let mut store_ok = Instant::now();
    let read = |key: &str| -> Option<String> {
        match store.check(key) {
            Ok(true) => store.get(key).ok().map(|v| String::from_utf8_lossy(&v).into_owned()),
            _ => None,
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let beat = store.add(&beat_key(rank), 1);
        let theirs = if watched != rank { store.add(&beat_key(watched), 0) } else { Ok(0) };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match (beat, theirs) {
            (Ok(_), Ok(v)) => {
                store_ok = Instant::now();
                if v != last_seen {
                    (last_seen, last_change) = (v, Instant::now());
                } else if last_change.elapsed() >= timeout && watched != rank && read(&exit_key(watched)).is_none() {
                    let note = format!(
                        "rank {watched} lost: no heartbeat for {:.0}s (the process died or hung; noticed by rank {rank})",
                        last_change.elapsed().as_secs_f64()
                    );
                    let _ = store.set(LOST, note.as_bytes());
                    give_up(store, rank, &note);
                }
                if let Some(note) = read(LOST) {
                    give_up(store, rank, &note);
                }
                // Another rank failed: this one's collectives would only wait for it. A rank
                // that posted its own exit note (failing, or done) lets its own thread finish.
                if let Some(note) = read(FAILED)
                    && read(&exit_key(rank)).is_none()
                {
                    give_up(store, rank, &format!("{note} (that rank failed)"));
                }
            }
            _ if store_ok.elapsed() >= timeout => give_up(
                store,
                rank,
                &format!(
                    "lost the rendezvous store at {host} for {:.0}s: that process died or hung",
                    store_ok.elapsed().as_secs_f64()
                ),
            ),
            _ => {}
        }
        std::thread::sleep(interval);
    }
}
