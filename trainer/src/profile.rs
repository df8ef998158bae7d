//! torch's profiler over a window of training steps (`train.profile_steps = [first, last]`, as
//! torchtitan's `profiling` section and a torch.profiler schedule do): every rank writes the
//! Chrome trace torch.profiler writes (Perfetto, chrome://tracing or TensorBoard open it),
//! with each step (`ProfilerStep#N`) and its phases marked; and [`summarize`], the operators by
//! self time that `prof.key_averages().table()` prints, read back from such a trace.

use std::collections::BTreeMap;
use std::ffi::{CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::TrainError;
use crate::ops::take_string;

unsafe extern "C" {
    fn motley_profiler_prepare(cuda: i32) -> *mut c_char;
    fn motley_profiler_start(cuda: i32) -> *mut c_char;
    fn motley_profiler_stop(path: *const c_char) -> *mut c_char;
    fn motley_range_push(name: *const c_char) -> *mut c_void;
    fn motley_range_pop(range: *mut c_void);
}

/// Whether a profiler records now: ranges cost nothing (not even their name) otherwise.
static RECORDING: AtomicBool = AtomicBool::new(false);

/// A named range in the trace (a user annotation), open until dropped; a no-op unless a
/// profiler records. Drop it on the thread that opened it.
#[derive(Debug)]
#[must_use = "the range closes when dropped"]
pub struct Range(*mut c_void);

pub fn range(name: &str) -> Range {
    if !RECORDING.load(Ordering::Relaxed) {
        return Range(std::ptr::null_mut());
    }
    let Ok(name) = CString::new(name) else { return Range(std::ptr::null_mut()) };
    // SAFETY: a NUL-terminated string the shim copies; it returns null or a range it owns
    // until motley_range_pop.
    Range(unsafe { motley_range_push(name.as_ptr()) })
}

impl Drop for Range {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a range motley_range_push returned, closed once.
            unsafe { motley_range_pop(self.0) }
        }
    }
}

fn check(err: *mut c_char, what: &str, path: &Path) -> Result<(), TrainError> {
    // SAFETY: the shim returns null or a string for motley_free_error.
    match unsafe { take_string(err) } {
        None => Ok(()),
        Some(msg) => Err(TrainError::Profile { path: path.to_path_buf(), msg: format!("profiler {what}: {msg}") }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Prepared,
    Recording,
    Done,
}

/// The profiler of one rank's run: warmed up the step before `first`, recording steps
/// `first..=last` (each inside a `ProfilerStep#N` range), saved after `last` to
/// `RUN/profile/steps-FIRST-LAST/rank-RRRRR.pt.trace.json`.
#[derive(Debug)]
pub struct Profiler {
    first: u64,
    last: u64,
    path: PathBuf,
    cuda: bool,
    state: State,
}

impl Profiler {
    pub fn new(window: [u64; 2], run: &Path, rank: usize, cuda: bool) -> Profiler {
        let [first, last] = window;
        let path =
            run.join("profile").join(format!("steps-{first}-{last}")).join(format!("rank-{rank:05}.pt.trace.json"));
        Profiler { first, last, path, cuda, state: State::Idle }
    }

    /// Whether it records now (between the start of step `first` and the end of `last`).
    pub fn recording(&self) -> bool {
        self.state == State::Recording
    }

    /// Where the trace goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Before step `step` runs (numbered as in the log): warms up or starts recording, and
    /// returns the step's range.
    pub fn before_step(&mut self, step: u64) -> Result<Range, TrainError> {
        if self.state == State::Idle && step + 1 >= self.first && step <= self.last {
            check(unsafe { motley_profiler_prepare(self.cuda as i32) }, "prepare", &self.path)?;
            self.state = State::Prepared;
        }
        if self.state == State::Prepared && step >= self.first {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).map_err(TrainError::io("create", dir))?;
            // SAFETY: no arguments but a flag; an error comes back as a message.
            check(unsafe { motley_profiler_start(self.cuda as i32) }, "start", &self.path)?;
            self.state = State::Recording;
            RECORDING.store(true, Ordering::Relaxed);
        }
        Ok(range(&format!("ProfilerStep#{step}")))
    }

    /// After step `step` (its range dropped): saves the trace once the window is over, or
    /// when `ending` (the run stops inside the window). Returns the trace's path then.
    pub fn after_step(&mut self, step: u64, ending: bool) -> Result<Option<PathBuf>, TrainError> {
        if self.state != State::Recording || (step < self.last && !ending) {
            return Ok(None);
        }
        RECORDING.store(false, Ordering::Relaxed);
        self.state = State::Done;
        let c = CString::new(self.path.to_string_lossy().as_bytes())
            .map_err(|_| TrainError::Profile { path: self.path.clone(), msg: "path holds a NUL byte".into() })?;
        // SAFETY: a NUL-terminated path the shim reads during the call.
        check(unsafe { motley_profiler_stop(c.as_ptr()) }, "save", &self.path)?;
        Ok(Some(self.path.clone()))
    }
}

/// One operator (or annotated range) of a trace, summed over its calls.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpTime {
    pub name: String,
    pub calls: u64,
    /// Time inside it but not inside an operator it called, milliseconds.
    pub self_ms: f64,
    pub total_ms: f64,
}

/// One `ProfilerStep#N` range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepTime {
    pub step: u64,
    pub ms: f64,
}

/// What [`summarize`] reads from a trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    pub trace: PathBuf,
    /// The steps recorded, in order.
    pub steps: Vec<StepTime>,
    /// CPU operators by self time, longest first.
    pub ops: Vec<OpTime>,
    /// Device kernels by time, longest first (empty on the CPU).
    pub kernels: Vec<OpTime>,
    /// Other annotated ranges by total time: motley's phases (`motley::forward`, …) and c10d's
    /// collectives (`gloo:all_reduce`, `nccl:…`).
    pub ranges: Vec<OpTime>,
}

impl TraceSummary {
    /// A table like `key_averages().table(sort_by="self_cpu_time_total", row_limit=top)`.
    pub fn table(&self, top: usize) -> String {
        let mut s = format!("{}\n", self.trace.display());
        let steps: Vec<String> = self.steps.iter().map(|t| format!("step {} {:.1} ms", t.step, t.ms)).collect();
        s += &format!("steps: {}\n", if steps.is_empty() { "none marked".into() } else { steps.join(", ") });
        let self_sum: f64 = self.ops.iter().map(|o| o.self_ms).sum::<f64>().max(1e-9);
        let mut section = |title: &str, rows: &[OpTime], share: bool| {
            if rows.is_empty() {
                return;
            }
            let w = rows.iter().take(top).map(|o| o.name.chars().count()).max().unwrap_or(0).clamp(24, 96);
            s += &format!("\n{title:<w$} {:>8} {:>11} {:>7} {:>11}\n", "calls", "self ms", "self %", "total ms");
            for o in rows.iter().take(top) {
                let pct = if share { format!("{:.1}%", 100.0 * o.self_ms / self_sum) } else { "-".into() };
                s += &format!("{:<w$} {:>8} {:>11.3} {:>7} {:>11.3}\n", o.name, o.calls, o.self_ms, pct, o.total_ms);
            }
        };
        section("operator", &self.ops, true);
        section("kernel", &self.kernels, false);
        section("range", &self.ranges, false);
        s
    }
}

/// Reads a Chrome trace torch's profiler wrote: per thread, CPU operators nest by time, and an
/// operator's self time is its duration less its direct children's.
pub fn summarize(trace: &Path) -> Result<TraceSummary, TrainError> {
    let bad = |msg: String| TrainError::Profile { path: trace.to_path_buf(), msg };
    let text = std::fs::read_to_string(trace).map_err(TrainError::io("read", trace))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let events = v.get("traceEvents").and_then(|e| e.as_array()).ok_or_else(|| bad("no traceEvents array".into()))?;
    // (thread, start, duration, name) of complete ("X") CPU operator events.
    let mut cpu: BTreeMap<String, Vec<(f64, f64, String)>> = BTreeMap::new();
    let (mut kernels, mut ranges) = (BTreeMap::<String, OpTime>::new(), BTreeMap::<String, OpTime>::new());
    let mut steps = Vec::new();
    for e in events {
        if e.get("ph").and_then(|p| p.as_str()) != Some("X") {
            continue;
        }
        let (Some(name), Some(cat), Some(ts), Some(dur)) = (
            e.get("name").and_then(|n| n.as_str()),
            e.get("cat").and_then(|c| c.as_str()),
            e.get("ts").and_then(|t| t.as_f64()),
            e.get("dur").and_then(|d| d.as_f64()),
        ) else {
            continue;
        };
        let ms = dur / 1000.0;
        match cat {
            "cpu_op" => {
                let thread = format!(
                    "{}/{}",
                    e.get("pid").unwrap_or(&serde_json::Value::Null),
                    e.get("tid").unwrap_or(&serde_json::Value::Null)
                );
                cpu.entry(thread).or_default().push((ts, dur, name.to_string()));
            }
            "kernel" => add(&mut kernels, name, ms, ms),
            "user_annotation" => match name.strip_prefix("ProfilerStep#").and_then(|n| n.parse().ok()) {
                Some(step) => steps.push(StepTime { step, ms }),
                None => add(&mut ranges, name, ms, ms),
            },
            _ => {}
        }
    }
    let mut ops = BTreeMap::<String, OpTime>::new();
    for mut evs in cpu.into_values() {
        // Parents before their children: earlier start, then longer.
        evs.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        // Open operators: (end, index into evs); children's time per event.
        let mut open: Vec<(f64, usize)> = Vec::new();
        let mut child = vec![0f64; evs.len()];
        for (i, (ts, dur, _)) in evs.iter().enumerate() {
            while open.last().is_some_and(|&(end, _)| end <= *ts) {
                open.pop();
            }
            if let Some(&(_, parent)) = open.last() {
                child[parent] += dur;
            }
            open.push((ts + dur, i));
        }
        for ((_, dur, name), c) in evs.iter().zip(child) {
            add(&mut ops, name, (dur - c).max(0.0) / 1000.0, dur / 1000.0);
        }
    }
    steps.sort_by_key(|s| s.step);
    let sorted = |m: BTreeMap<String, OpTime>, by_self: bool| {
        let mut v: Vec<OpTime> = m.into_values().collect();
        v.sort_by(|a, b| if by_self { b.self_ms.total_cmp(&a.self_ms) } else { b.total_ms.total_cmp(&a.total_ms) });
        v
    };
    Ok(TraceSummary {
        trace: trace.to_path_buf(),
        steps,
        ops: sorted(ops, true),
        kernels: sorted(kernels, false),
        ranges: sorted(ranges, false),
    })
}

fn add(m: &mut BTreeMap<String, OpTime>, name: &str, self_ms: f64, total_ms: f64) {
    let o = m.entry(name.to_string()).or_insert_with(|| OpTime {
        name: name.to_string(),
        calls: 0,
        self_ms: 0.0,
        total_ms: 0.0,
    });
    o.calls += 1;
    o.self_ms += self_ms;
    o.total_ms += total_ms;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Self time subtracts direct children only, per thread; steps and phases are read from
    /// user annotations, kernels from their own category.
    #[test]
    fn self_time_nests_per_thread() {
        let ev = |name: &str, cat: &str, tid: u64, ts: f64, dur: f64| serde_json::json!({"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur});
        let trace = serde_json::json!({"traceEvents": [
            ev("aten::linear", "cpu_op", 1, 0.0, 1000.0),
            ev("aten::addmm", "cpu_op", 1, 100.0, 600.0),
            ev("aten::copy_", "cpu_op", 1, 200.0, 100.0),
            ev("aten::t", "cpu_op", 1, 800.0, 100.0),
            // Another thread overlapping in time is not a child.
            ev("aten::addmm", "cpu_op", 2, 150.0, 400.0),
            ev("ProfilerStep#7", "user_annotation", 1, 0.0, 2000.0),
            ev("motley::forward", "user_annotation", 1, 0.0, 1500.0),
            ev("gemm_kernel", "kernel", 3, 0.0, 50.0),
            {"ph": "i", "name": "instant", "ts": 5.0},
        ]});
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.json");
        std::fs::write(&path, trace.to_string()).expect("write");
        let s = summarize(&path).expect("summary");
        let op = |n: &str| s.ops.iter().find(|o| o.name == n).cloned().expect(n);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let linear = op("aten::linear");
        assert!(near(linear.self_ms, 0.3) && near(linear.total_ms, 1.0), "{linear:?}");
        let addmm = op("aten::addmm");
        assert!(addmm.calls == 2 && near(addmm.self_ms, 0.9) && near(addmm.total_ms, 1.0), "{addmm:?}");
        assert_eq!(s.ops[0].name, "aten::addmm", "longest self time first");
        assert_eq!(s.steps, vec![StepTime { step: 7, ms: 2.0 }]);
        assert_eq!(s.ranges[0].name, "motley::forward");
        assert!(near(s.kernels[0].total_ms, 0.05));
        assert!(s.table(5).contains("aten::addmm"));
        std::fs::write(&path, "{\"other\": 1}").expect("write");
        assert!(summarize(&path).expect_err("no events").to_string().contains("traceEvents"));
    }
}
