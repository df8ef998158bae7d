//! Test-only global allocator that measures the peak heap of chosen threads, so a unit test
//! can check that memory stays flat (e.g. `stats --deep` over many shards) without timing or
//! RSS guesses. Counting is off on every thread until [`measure`] turns it on.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicIsize, Ordering};

/// The allocator: `System`, plus byte counts for tracked threads.
#[derive(Debug)]
pub struct Tracking;

thread_local! {
    // const-initialized Cell: reading it never allocates (safe inside an allocator).
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
/// One measurement at a time (unit tests run in parallel).
static MEASURING: Mutex<()> = Mutex::new(());

fn tracked() -> bool {
    TRACKED.try_with(Cell::get).unwrap_or(false)
}

fn add(n: isize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated around it.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if tracked() {
            add(layout.size() as isize);
        }
        // SAFETY: same contract as this function.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if tracked() {
            add(layout.size() as isize);
        }
        // SAFETY: same contract as this function.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tracked() {
            add(-(layout.size() as isize));
        }
        // SAFETY: same contract as this function.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if tracked() {
            add(new_size as isize - layout.size() as isize);
        }
        // SAFETY: same contract as this function.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Marks the current thread as tracked (e.g. from a rayon pool's start handler).
pub fn track_this_thread() {
    TRACKED.with(|t| t.set(true));
}

/// Runs `f` on this thread with counting on for it and for threads that called
/// [`track_this_thread`]; returns `f`'s result and the peak of live heap bytes they
/// allocated meanwhile (frees by untracked threads are not seen, so it errs high).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let _one = MEASURING.lock().unwrap_or_else(|p| p.into_inner());
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    track_this_thread();
    let r = f();
    TRACKED.with(|t| t.set(false));
    (r, PEAK.load(Ordering::Relaxed).max(0) as usize)
}
