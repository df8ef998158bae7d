//! Progress bars on stderr: input bytes with ETA and tasks done, then documents, tokens per
//! modality and rate. Hidden when disabled or when stderr is not a terminal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::run::ModalityCounts;

/// Live counters plus the bars that show them.
#[derive(Debug)]
pub struct Progress {
    bytes: ProgressBar,
    stats: ProgressBar,
    tasks_total: u64,
    tasks_done: AtomicU64,
    docs: AtomicU64,
    errors: AtomicU64,
    tokens: [AtomicU64; 3],
    start: Instant,
    last_draw_ms: AtomicU64,
}

impl Progress {
    pub fn new(enabled: bool, tasks_total: u64, tasks_done: u64, pending_bytes: u64) -> Progress {
        let target = if enabled { ProgressDrawTarget::stderr_with_hz(4) } else { ProgressDrawTarget::hidden() };
        let multi = MultiProgress::with_draw_target(target);
        let bytes = multi.add(ProgressBar::new(pending_bytes));
        bytes.set_style(
            ProgressStyle::with_template("ingest [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} | {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let stats = multi.add(ProgressBar::new_spinner());
        stats.set_style(
            ProgressStyle::with_template("       {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let p = Progress {
            bytes,
            stats,
            tasks_total,
            tasks_done: AtomicU64::new(tasks_done),
            docs: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            tokens: Default::default(),
            start: Instant::now(),
            last_draw_ms: AtomicU64::new(0),
        };
        p.redraw(true);
        p
    }

    pub fn bytes(&self, n: u64) {
        self.bytes.inc(n);
    }

    pub fn task_done(&self) {
        self.tasks_done.fetch_add(1, Ordering::Relaxed);
        self.redraw(true);
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn document(&self, per: &ModalityCounts) {
        self.docs.fetch_add(1, Ordering::Relaxed);
        for (slot, n) in self.tokens.iter().zip([per.text, per.image, per.speech]) {
            slot.fetch_add(n, Ordering::Relaxed);
        }
        self.redraw(false);
    }

    fn redraw(&self, force: bool) {
        let now = self.start.elapsed().as_millis() as u64;
        let last = self.last_draw_ms.load(Ordering::Relaxed);
        if !force && now.saturating_sub(last) < 200 {
            return;
        }
        self.last_draw_ms.store(now, Ordering::Relaxed);
        self.bytes.set_message(format!("tasks {}/{}", self.tasks_done.load(Ordering::Relaxed), self.tasks_total));
        let t: Vec<u64> = self.tokens.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let total: u64 = t.iter().sum();
        self.stats.set_message(format!(
            "docs {} | tokens text {} image {} speech {} | {:.0} tok/s | errors {}",
            self.docs.load(Ordering::Relaxed),
            t[0],
            t[1],
            t[2],
            total as f64 / secs,
            self.errors.load(Ordering::Relaxed)
        ));
        self.stats.tick();
    }

    pub fn finish(&self) {
        self.redraw(true);
        self.bytes.finish_and_clear();
        self.stats.finish_and_clear();
    }
}
