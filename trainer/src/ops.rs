//! What tch does not expose, through small C++ shims in `csrc/`: how many ATen operators a
//! piece of work dispatches (each costs host time and usually a kernel launch on CUDA, so the
//! count says how launch-bound a step is, measurable on a CPU-only machine), how many bytes it
//! allocates at its peak ([`track_memory`]), a CUDA device's compute capability,
//! [`tower_linear`] (MoT's per-tower projection as one autograd op) and
//! [`linear_cross_entropy`] (LM head and loss in row chunks).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_void};
use std::sync::Mutex;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::TrainError;

unsafe extern "C" {
    fn motley_op_count_start() -> *mut c_char;
    fn motley_op_count_stop();
    fn motley_op_count_names() -> *mut c_char;
    fn motley_free_error(message: *mut c_char);
    fn motley_cuda_capability(device: i32, major: *mut i32, minor: *mut i32) -> i32;
    fn motley_tower_linear(
        x: *const C_tensor,
        w: *const C_tensor,
        sizes: *const i64,
        n_sizes: usize,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn motley_linear_cross_entropy(
        x: *const C_tensor,
        w: *const C_tensor,
        targets: *const C_tensor,
        chunk: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn motley_checkpoint(
        x: *const C_tensor,
        data: *mut c_void,
        call: extern "C" fn(*mut c_void, i32, *const C_tensor, *mut *mut C_tensor) -> *mut c_char,
        drop: extern "C" fn(*mut c_void),
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn motley_mem_track_start(out: *mut *mut MemTrackHandle) -> *mut c_char;
    fn motley_mem_track_stop(h: *mut MemTrackHandle, live: *mut i64, peak: *mut i64) -> *mut c_char;
}

#[repr(C)]
struct MemTrackHandle {
    _p: [u8; 0],
}

/// Per-token cross-entropy of `x @ wᵀ` against `targets` (`-100`: no loss, 0), computed
/// `chunk` rows at a time as one autograd node (`csrc/linear_cross_entropy.cpp`): the full
/// `[N, V]` logits never exist, in the forward or the backward (each chunk's logits are
/// recomputed there). `x`: `[N, D]`, `w`: `[V, D]`, both in the compute dtype; the result is
/// fp32 `[N]`, and its gradients equal those of `cross_entropy(x @ wᵀ)` up to rounding.
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor, chunk: i64) -> Result<Tensor, TrainError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensor handles borrowed for the call; on success the shim hands over a new
    // heap tensor, which from_ptr owns; C++ exceptions come back as a message.
    unsafe {
        let err = motley_linear_cross_entropy(x.as_ptr(), w.as_ptr(), targets.as_ptr(), chunk, &mut out);
        if let Some(msg) = take_string(err) {
            return Err(TrainError::Torch { op: "linear_cross_entropy".into(), source: tch::TchError::Torch(msg) });
        }
        Ok(Tensor::from_ptr(out))
    }
}

/// A block's forward for [`checkpoint`]: owns what it uses (shallow clones), since autograd
/// may call it again as long as the graph lives. A closure `Fn(&Tensor) -> Result<Tensor,
/// String>` is one; a block whose weights live elsewhere between runs (ZeRO-3) also implements
/// the hooks around each run.
pub trait CheckpointFn: Send {
    fn forward(&self, x: &Tensor) -> Result<Tensor, String>;
    /// Before a run: the graph-free forward (`recompute` false) or the recomputation in backward.
    fn before(&self, _recompute: bool) -> Result<(), String> {
        Ok(())
    }
    /// After the graph-free forward (`backward` false), or after the backward through the
    /// recomputation (the block's parameters hold their gradients).
    fn after(&self, _backward: bool) -> Result<(), String> {
        Ok(())
    }
}

impl<F: Fn(&Tensor) -> Result<Tensor, String> + Send> CheckpointFn for F {
    fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
        self(x)
    }
}

pub type BlockFn = Box<dyn CheckpointFn>;

/// The shim's phases (`csrc/checkpoint.cpp`).
const PHASE_FORWARD: i32 = 0;
const PHASE_RECOMPUTE: i32 = 1;

extern "C" fn call_block(data: *mut c_void, phase: i32, x: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char {
    // SAFETY: `data` is the BlockFn boxed by `checkpoint`, alive until `drop_block`.
    let f = unsafe { &*(data as *const BlockFn) };
    let run = || -> Result<Option<Tensor>, String> {
        if phase != PHASE_FORWARD && phase != PHASE_RECOMPUTE {
            f.after(true)?;
            return Ok(None);
        }
        // SAFETY: in these phases `x` is a live tensor the shim lends for the call
        // (shallow-cloned into a handle of our own).
        let x = unsafe { Tensor::clone_from_ptr(x as *mut C_tensor) };
        f.before(phase == PHASE_RECOMPUTE)?;
        let y = f.forward(&x)?;
        if phase == PHASE_FORWARD {
            f.after(false)?;
        }
        Ok(Some(y))
    };
    let msg = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(y)) => {
            if let Some(mut y) = y {
                // SAFETY: hands the heap tensor to the shim, which deletes it after copying.
                unsafe { *out = y.as_mut_ptr() };
                std::mem::forget(y);
            }
            return std::ptr::null_mut();
        }
        Ok(Err(msg)) => msg,
        Err(_) => "the block's forward panicked".to_string(),
    };
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: strdup copies into malloc'd memory, which the shim frees.
    unsafe { libc::strdup(c.as_ptr()) }
}

extern "C" fn drop_block(data: *mut c_void) {
    // SAFETY: called once by the shim, when the last owner of the closure goes away.
    drop(unsafe { Box::from_raw(data as *mut BlockFn) });
}

/// `f(x)` with activation checkpointing (`csrc/checkpoint.cpp`): run without recording a graph,
/// one autograd node in its place holding only `x`; backward runs `f` again with the graph on
/// and back-propagates through it, so parameters inside `f` get their usual gradients and
/// nothing `f` computed is kept in between. `f` must be deterministic (the model draws no
/// random numbers).
pub fn checkpoint(x: &Tensor, f: BlockFn) -> Result<Tensor, TrainError> {
    let data = Box::into_raw(Box::new(f)) as *mut c_void;
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the shim takes ownership of `data` (freed through drop_block, also on error);
    // on success it hands over a new heap tensor.
    unsafe {
        let err = motley_checkpoint(x.as_ptr(), data, call_block, drop_block, &mut out);
        if let Some(msg) = take_string(err) {
            return Err(TrainError::Torch { op: "checkpoint".into(), source: tch::TchError::Torch(msg) });
        }
        Ok(Tensor::from_ptr(out))
    }
}

/// Bytes the allocators handed out while a closure ran, as the allocators report them (the
/// hook of torch.profiler's memory profiling): still allocated at its end, and at the peak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemorySpan {
    pub live: i64,
    pub peak: i64,
}

/// Runs `f`, tracking what it allocates on this thread and in the autograd threads its
/// backward passes use. Frees of tensors made before `f` do not count (the allocator does not
/// know their size then), so `peak` is the most `f` held on top of what existed before it.
pub fn track_memory<R>(f: impl FnOnce() -> R) -> Result<(R, MemorySpan), TrainError> {
    let mut h: *mut MemTrackHandle = std::ptr::null_mut();
    let err = |e: String| TrainError::Torch { op: "track memory".into(), source: tch::TchError::Torch(e) };
    // SAFETY: out-pointer to a local; the shim catches C++ exceptions.
    if let Some(e) = unsafe { take_string(motley_mem_track_start(&mut h)) } {
        return Err(err(e));
    }
    /// Stops tracking if `f` unwinds.
    struct StopOnUnwind(*mut MemTrackHandle);
    impl Drop for StopOnUnwind {
        fn drop(&mut self) {
            let (mut a, mut b) = (0, 0);
            // SAFETY: the handle from start, stopped once (the normal path forgets this guard).
            let _ = unsafe { take_string(motley_mem_track_stop(self.0, &mut a, &mut b)) };
        }
    }
    let guard = StopOnUnwind(h);
    let out = f();
    std::mem::forget(guard);
    let mut span = MemorySpan::default();
    // SAFETY: the handle from start, stopped once; it is freed by the shim.
    if let Some(e) = unsafe { take_string(motley_mem_track_stop(h, &mut span.live, &mut span.peak)) } {
        return Err(err(e));
    }
    Ok((out, span))
}

/// `y[rows of tower m] = x[rows of tower m] @ w[m]ᵀ` for rows grouped by tower (`sizes[m]`
/// rows each, in tower order); `x`: `[N, in]`, `w`: `[towers, out, in]`, `y`: `[N, out]`.
/// One autograd node whose forward and backward are only the per-tower matmuls, each writing
/// into its rows of the result (`csrc/tower_linear.cpp`). The same product written as split →
/// linear per tower → cat, with `w` unbound, is three more ops and three more full copies per
/// call (the cat, the split's backward cat, the unbind's backward stack). A tower with no
/// rows gets a zero weight gradient.
pub fn tower_linear(x: &Tensor, w: &Tensor, sizes: &[i64]) -> Result<Tensor, TrainError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: x and w are live tensor handles and `sizes` a live slice, borrowed for the call;
    // on success the shim hands over a new heap tensor, which from_ptr takes ownership of; it
    // catches every C++ exception and returns its message instead.
    unsafe {
        let err = motley_tower_linear(x.as_ptr(), w.as_ptr(), sizes.as_ptr(), sizes.len(), &mut out);
        if let Some(msg) = take_string(err) {
            return Err(TrainError::Torch { op: "tower_linear".into(), source: tch::TchError::Torch(msg) });
        }
        Ok(Tensor::from_ptr(out))
    }
}

/// `(major, minor)` compute capability of CUDA device `index` (H100/H200: (9, 0); A100:
/// (8, 0)); None without a CUDA runtime or device.
pub fn cuda_capability(index: usize) -> Option<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    let index = i32::try_from(index).ok()?;
    // SAFETY: two out-pointers to live locals; the shim only reads device attributes.
    let rc = unsafe { motley_cuda_capability(index, &mut major, &mut minor) };
    (rc == 0).then_some((major, minor))
}

/// The shim keeps one counter: runs are serialized.
static COUNTING: Mutex<()> = Mutex::new(());

/// Operators dispatched while one closure ran. `total` counts every dispatch: composite
/// operators (`aten::linear`) once themselves and once for each operator they dispatch, as in
/// `torch.profiler`. `kernels` counts the leaves that do work: operators that are no view,
/// allocation or metadata op and dispatched nothing but those (`aten::mm`, `aten::add_`; not
/// `aten::as_strided`, not `aten::linear`) — on CUDA, about one kernel launch each. The view
/// list is in the shim. An operator that dispatches a copy of its input before its own kernel
/// counts as that copy (the count is about one short there). Autograd's own bookkeeping
/// records are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpCount {
    pub total: u64,
    pub kernels: u64,
    /// Per operator name: dispatches.
    pub by_name: BTreeMap<String, u64>,
    /// Per operator name: work-doing leaf dispatches (the `kernels` breakdown).
    pub kernels_by_name: BTreeMap<String, u64>,
}

/// Takes ownership of a malloc'd C string from a shim in `csrc/` (errors, listings).
///
/// SAFETY: `p` is null or a string a shim allocated with `strdup` and nobody else frees.
pub(crate) unsafe fn take_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per the contract above.
    unsafe {
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        motley_free_error(p);
        Some(s)
    }
}

/// Runs `f` and counts the operators it dispatches on this thread and in the autograd
/// threads its backward passes use; other threads' work is not counted.
pub fn count_ops<R>(f: impl FnOnce() -> R) -> Result<(R, OpCount), TrainError> {
    let _one_at_a_time = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: the shim catches C++ exceptions and returns their message as a C string.
    if let Some(err) = unsafe { take_string(motley_op_count_start()) } {
        return Err(TrainError::Torch { op: "count operators".into(), source: tch::TchError::Torch(err) });
    }
    /// Stops counting if `f` unwinds, so a panic cannot leave the callback registered.
    struct StopOnUnwind;
    impl Drop for StopOnUnwind {
        fn drop(&mut self) {
            // SAFETY: no arguments; stopping twice or when not counting is a no-op.
            unsafe { motley_op_count_stop() };
        }
    }
    let guard = StopOnUnwind;
    let out = f();
    std::mem::forget(guard);
    // SAFETY: no arguments; counting was started above.
    unsafe { motley_op_count_stop() };
    // SAFETY: the shim returns a fresh `strdup`'d listing.
    let listing = unsafe { take_string(motley_op_count_names()) }.unwrap_or_default();
    let mut count = OpCount::default();
    for line in listing.lines() {
        let mut fields = line.rsplitn(3, '\t');
        let (Some(leaves), Some(dispatched), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let (Ok(leaves), Ok(dispatched)) = (leaves.parse::<u64>(), dispatched.parse::<u64>()) else { continue };
        if name.starts_with("autograd::") {
            continue;
        }
        count.total += dispatched;
        count.by_name.insert(name.to_string(), dispatched);
        if leaves > 0 {
            count.kernels += leaves;
            count.kernels_by_name.insert(name.to_string(), leaves);
        }
    }
    Ok((out, count))
}

impl OpCount {
    /// The work-doing operators `self` dispatched more often than `base` (negative: fewer),
    /// largest difference first.
    pub fn extra_kernels_over(&self, base: &OpCount) -> Vec<(String, i64)> {
        let (mine, theirs) = (&self.kernels_by_name, &base.kernels_by_name);
        let count = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0) as i64;
        let mut d: Vec<(String, i64)> = mine
            .keys()
            .chain(theirs.keys().filter(|k| !mine.contains_key(*k)))
            .map(|k| (k.clone(), count(mine, k) - count(theirs, k)))
            .filter(|(_, n)| *n != 0)
            .collect();
        d.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        d
    }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::*;

    #[test]
    fn counts_forward_and_backward_ops() {
        let a = values(&[4, 3], 0.0).set_requires_grad(true);
        let b = values(&[3, 2], 1.0);
        let (_, fwd) = count_ops(|| a.mm(&b)).expect("counting");
        assert_eq!(fwd.by_name.get("aten::mm"), Some(&1), "{fwd:?}");
        assert_eq!(fwd.kernels_by_name.get("aten::mm"), Some(&1), "{fwd:?}");
        assert_eq!(fwd.total, fwd.by_name.values().sum::<u64>());
        assert_eq!(fwd.kernels, fwd.kernels_by_name.values().sum::<u64>());
        // A composite counts as dispatched, not as a kernel; the views it makes are no kernels.
        let (_, lin) = count_ops(|| a.linear::<Tensor>(&b.tr(), None)).expect("counting");
        assert_eq!(lin.by_name.get("aten::linear"), Some(&1), "{lin:?}");
        assert_eq!(lin.kernels_by_name.get("aten::linear"), None, "{lin:?}");
        for view in ["aten::t", "aten::transpose", "aten::as_strided", "aten::resolve_conj"] {
            assert_eq!(lin.kernels_by_name.get(view), None, "{lin:?}");
        }
        assert_eq!(lin.kernels_by_name.get("aten::mm"), Some(&1), "{lin:?}");
        // mm's backward dispatches its own mm for a's gradient: the ops of backward count.
        let (_, both) = count_ops(|| a.mm(&b).sum(Kind::Float).backward()).expect("counting");
        assert!(both.by_name.get("aten::mm").copied().unwrap_or(0) >= 2, "{both:?}");
        assert!(both.total > fwd.total && both.kernels > fwd.kernels);
        assert!(both.by_name.keys().all(|k| !k.starts_with("autograd::")), "{both:?}");
        // A panicking closure stops the count too: the next one starts cleanly.
        let caught = std::panic::catch_unwind(|| count_ops(|| panic!("inside the count")));
        assert!(caught.is_err());
        // Nothing dispatched outside the closure is counted, and counting ended.
        let (_, none) = count_ops(|| ()).expect("counting");
        assert_eq!(none, OpCount::default());
    }

    /// Deterministic test values of `shape`. Not from torch's global generator: drawing from
    /// it here would race with the seeded model initializations of tests running beside these.
    fn values(shape: &[i64], salt: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.7 + salt).sin().reshape(shape)
    }

    /// The same product as split → linear per tower → cat, with `w` unbound.
    fn composite(x: &Tensor, w: &Tensor, sizes: &[i64]) -> Tensor {
        let ws = w.unbind(0);
        let parts: Vec<Tensor> = x
            .split_with_sizes(sizes, 0)
            .iter()
            .enumerate()
            .filter(|(m, _)| sizes[*m] > 0)
            .map(|(m, xs)| xs.linear::<Tensor>(&ws[m], None))
            .collect();
        Tensor::cat(&parts, 0)
    }

    #[test]
    fn tower_linear_matches_split_linear_cat_in_value_and_gradients() {
        for sizes in [[5i64, 3, 4], [0, 7, 2], [6, 0, 0]] {
            let n: i64 = sizes.iter().sum();
            let x = values(&[n, 8], 0.0);
            let w = values(&[3, 6, 8], 1.0);
            // Upstream gradient that is not contiguous, as a transpose's backward gives.
            let g = values(&[6, n], 2.0).transpose(0, 1);
            let run = |fused: bool| {
                let (x, w) = (x.copy().set_requires_grad(true), w.copy().set_requires_grad(true));
                let y =
                    if fused { tower_linear(&x, &w, &sizes).expect("tower_linear") } else { composite(&x, &w, &sizes) };
                (&y * &g).sum(tch::Kind::Float).backward();
                (y.detach(), x.grad(), w.grad())
            };
            let (y1, gx1, gw1) = run(true);
            let (y2, gx2, gw2) = run(false);
            assert!(y1.allclose(&y2, 1e-5, 1e-6, false), "{sizes:?}: outputs differ");
            assert!(gx1.allclose(&gx2, 1e-5, 1e-6, false), "{sizes:?}: input gradients differ");
            assert!(gw1.allclose(&gw2, 1e-5, 1e-6, false), "{sizes:?}: weight gradients differ");
        }
    }

    #[test]
    fn tower_linear_rejects_bad_shapes_with_an_error() {
        let opts = (tch::Kind::Float, tch::Device::Cpu);
        let (x, w) = (Tensor::zeros([6, 8], opts), Tensor::zeros([3, 4, 8], opts));
        let err = tower_linear(&x, &w, &[2, 2, 1]).expect_err("sizes add up to 5");
        assert!(err.to_string().contains("add up to 5"), "{err}");
        assert!(tower_linear(&x, &w, &[6, 0]).is_err());
        assert!(tower_linear(&x, &Tensor::zeros([3, 4, 7], opts), &[2, 2, 2]).is_err());
        let (y, count) = count_ops(|| tower_linear(&x, &w, &[2, 0, 4]).expect("ok")).expect("count");
        assert_eq!(y.size(), [6, 4]);
        assert_eq!(count.kernels_by_name.get("aten::mm"), Some(&2), "{count:?}");
    }

    #[test]
    fn cuda_capability_is_unknown_without_a_gpu() {
        if !tch::Cuda::is_available() {
            assert_eq!(cuda_capability(0), None);
        } else {
            assert!(cuda_capability(0).is_some_and(|(major, _)| major >= 3));
        }
    }

    #[test]
    fn extra_kernels_over_lists_differences_largest_first() {
        let mk = |v: &[(&str, u64)]| OpCount {
            kernels_by_name: v.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            ..OpCount::default()
        };
        let mot = mk(&[("aten::mm", 9), ("aten::cat", 4), ("aten::add", 2)]);
        let dense = mk(&[("aten::mm", 3), ("aten::add", 2), ("aten::rsqrt", 1)]);
        assert_eq!(
            mot.extra_kernels_over(&dense),
            vec![("aten::mm".into(), 6), ("aten::cat".into(), 4), ("aten::rsqrt".into(), -1)]
        );
    }
}
