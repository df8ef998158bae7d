//! Safe handles over torch's c10d through the shims in `csrc/` (c10d.cpp, c10d_nccl.cpp,
//! grad_sync.cpp): the TCPStore rendezvous, Gloo and NCCL process groups, their collectives on
//! tch tensors, and the bucketed gradient reduction that runs from autograd hooks.

use std::ffi::{CString, c_char};
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::TrainError;
use crate::ops::take_string;

#[repr(C)]
struct RawStore {
    _p: [u8; 0],
}
#[repr(C)]
struct RawGroup {
    _p: [u8; 0],
}
#[repr(C)]
struct RawWork {
    _p: [u8; 0],
}
#[repr(C)]
struct RawGradSync {
    _p: [u8; 0],
}

unsafe extern "C" {
    fn motley_store_tcp(
        host: *const c_char,
        port: i32,
        is_server: i32,
        num_workers: i32,
        wait_workers: i32,
        timeout_ms: i64,
        out: *mut *mut RawStore,
    ) -> *mut c_char;
    fn motley_store_prefixed(base: *mut RawStore, prefix: *const c_char, out: *mut *mut RawStore) -> *mut c_char;
    fn motley_store_clone(s: *mut RawStore, out: *mut *mut RawStore) -> *mut c_char;
    fn motley_store_port(s: *mut RawStore) -> i32;
    fn motley_store_free(s: *mut RawStore);
    fn motley_store_set_timeout(s: *mut RawStore, timeout_ms: i64) -> *mut c_char;
    fn motley_store_set(s: *mut RawStore, key: *const c_char, data: *const u8, len: usize) -> *mut c_char;
    fn motley_store_get(s: *mut RawStore, key: *const c_char, data: *mut *mut u8, len: *mut usize) -> *mut c_char;
    fn motley_free_bytes(data: *mut u8);
    fn motley_store_check(s: *mut RawStore, key: *const c_char, present: *mut i32) -> *mut c_char;
    fn motley_store_add(s: *mut RawStore, key: *const c_char, delta: i64, value: *mut i64) -> *mut c_char;
    fn motley_group_gloo(
        s: *mut RawStore,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        iface: *const c_char,
        hostname: *const c_char,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn motley_group_nccl(
        s: *mut RawStore,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        device: i32,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn motley_group_free(g: *mut RawGroup);
    fn motley_group_allreduce(g: *mut RawGroup, t: *const C_tensor, op: i32, work: *mut *mut RawWork) -> *mut c_char;
    fn motley_group_broadcast(g: *mut RawGroup, t: *const C_tensor, root: i32, work: *mut *mut RawWork) -> *mut c_char;
    fn motley_group_allgather_into(
        g: *mut RawGroup,
        output: *const C_tensor,
        input: *const C_tensor,
        work: *mut *mut RawWork,
    ) -> *mut c_char;
    fn motley_group_reduce_scatter_into(
        g: *mut RawGroup,
        output: *const C_tensor,
        input: *const C_tensor,
        op: i32,
        work: *mut *mut RawWork,
    ) -> *mut c_char;
    fn motley_group_barrier(g: *mut RawGroup, work: *mut *mut RawWork) -> *mut c_char;
    fn motley_work_wait(w: *mut RawWork) -> *mut c_char;
    fn motley_work_free(w: *mut RawWork);
    fn motley_grad_sync_new(
        g: *mut RawGroup,
        params: *const *const C_tensor,
        bucket_of: *const i64,
        n_params: usize,
        grads: *const *const C_tensor,
        shards: *const *const C_tensor,
        n_buckets: usize,
        out: *mut *mut RawGradSync,
    ) -> *mut c_char;
    fn motley_grad_sync_arm(s: *mut RawGradSync);
    fn motley_grad_sync_finish(s: *mut RawGradSync, in_backward: *mut i64, at_finish: *mut i64) -> *mut c_char;
    fn motley_grad_sync_free(s: *mut RawGradSync);
}

fn c10d_err(op: &str, msg: String) -> TrainError {
    TrainError::Distributed(format!("{op}: {}", msg.trim()))
}

fn cstr(s: &str) -> Result<CString, TrainError> {
    CString::new(s).map_err(|_| TrainError::Distributed(format!("{s:?} contains a NUL byte")))
}

/// A shim error pointer → Result.
///
/// # Safety
/// `err` is null or a message the shim allocated, not yet freed.
unsafe fn check(op: &str, err: *mut c_char) -> Result<(), TrainError> {
    // SAFETY: forwarded from the caller.
    match unsafe { take_string(err) } {
        None => Ok(()),
        Some(msg) => Err(c10d_err(op, msg)),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A c10d key-value store: a `TCPStore` (server or client), possibly under a prefix.
#[derive(Debug)]
pub struct Store {
    raw: *mut RawStore,
}

// SAFETY: c10d stores serialize their own operations (TCPStore holds a lock per client); the
// handle is only freed once, on drop.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Connects to (or, with `server`, serves) the TCPStore at `host:port`. A server on port 0
    /// binds a free port ([`Store::port`]). With `wait_for` workers, every instance counts itself
    /// in and a server then waits until that many have (itself included), up to `timeout`.
    pub fn tcp(
        host: &str,
        port: u16,
        server: bool,
        wait_for: Option<usize>,
        timeout: Duration,
    ) -> Result<Self, TrainError> {
        let host_c = cstr(host)?;
        let mut raw = std::ptr::null_mut();
        let workers = wait_for.map_or(-1, |n| i32::try_from(n).unwrap_or(i32::MAX));
        // SAFETY: live C string and out-pointer; errors come back as a message.
        unsafe {
            check(
                &format!("TCPStore at {host}:{port}{}", if server { " (serving)" } else { "" }),
                motley_store_tcp(
                    host_c.as_ptr(),
                    i32::from(port),
                    i32::from(server),
                    workers,
                    i32::from(wait_for.is_some()),
                    millis(timeout),
                    &mut raw,
                ),
            )?;
        }
        Ok(Store { raw })
    }

    /// The same store with every key under `prefix`.
    pub fn prefixed(&self, prefix: &str) -> Result<Self, TrainError> {
        let p = cstr(prefix)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live handle, C string and out-pointer.
        unsafe { check("PrefixStore", motley_store_prefixed(self.raw, p.as_ptr(), &mut raw))? };
        Ok(Store { raw })
    }

    /// A second connection to the same store, for another thread.
    pub fn connect_again(&self) -> Result<Self, TrainError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: live handle and out-pointer.
        unsafe { check("store clone", motley_store_clone(self.raw, &mut raw))? };
        Ok(Store { raw })
    }

    /// The TCP port (a server started on port 0 reports the one it bound).
    pub fn port(&self) -> u16 {
        // SAFETY: live handle.
        u16::try_from(unsafe { motley_store_port(self.raw) }).unwrap_or(0)
    }

    pub fn set_timeout(&self, timeout: Duration) -> Result<(), TrainError> {
        // SAFETY: live handle.
        unsafe { check("store timeout", motley_store_set_timeout(self.raw, millis(timeout))) }
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), TrainError> {
        let k = cstr(key)?;
        // SAFETY: live handle, C string and byte slice for the call.
        unsafe {
            check(&format!("store set {key}"), motley_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len()))
        }
    }

    /// The value of `key`, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, TrainError> {
        let k = cstr(key)?;
        let (mut data, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: live handle and out-pointers; on success the shim hands over a malloc'd
        // buffer of `len` bytes, copied and freed here.
        unsafe {
            check(&format!("store get {key}"), motley_store_get(self.raw, k.as_ptr(), &mut data, &mut len))?;
            let v = std::slice::from_raw_parts(data, len).to_vec();
            motley_free_bytes(data);
            Ok(v)
        }
    }

    /// Whether `key` exists (without waiting).
    pub fn check(&self, key: &str) -> Result<bool, TrainError> {
        let k = cstr(key)?;
        let mut present = 0;
        // SAFETY: live handle, C string and out-pointer.
        unsafe { check(&format!("store check {key}"), motley_store_check(self.raw, k.as_ptr(), &mut present))? };
        Ok(present != 0)
    }

    /// Adds `delta` to the counter `key` and returns its new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, TrainError> {
        let k = cstr(key)?;
        let mut value = 0;
        // SAFETY: live handle, C string and out-pointer.
        unsafe { check(&format!("store add {key}"), motley_store_add(self.raw, k.as_ptr(), delta, &mut value))? };
        Ok(value)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once.
        unsafe { motley_store_free(self.raw) }
    }
}

/// How a collective combines values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Avg = 1,
    Max = 2,
}

/// A c10d process group backend (Gloo or NCCL) of `size` ranks.
#[derive(Debug)]
pub struct Group {
    raw: *mut RawGroup,
    pub rank: usize,
    pub size: usize,
    pub backend: &'static str,
}

// SAFETY: c10d backends are used from one thread at a time here (the training thread, or
// autograd's while that thread waits in backward), which is how c10d expects collectives to be
// issued; the handle is only freed on drop.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

/// A collective in flight.
#[derive(Debug)]
#[must_use = "a collective must be waited on"]
pub struct Work {
    raw: *mut RawWork,
    op: &'static str,
}

impl Work {
    /// Blocks until the collective is done (Gloo; its timeout applies), or makes the current
    /// CUDA stream wait for it (NCCL).
    pub fn wait(self) -> Result<(), TrainError> {
        // SAFETY: live handle; freed by Drop.
        unsafe { check(self.op, motley_work_wait(self.raw)) }
    }
}

// SAFETY: a c10d Work may be waited on and freed from any thread (the Reducer does both).
unsafe impl Send for Work {}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once.
        unsafe { motley_work_free(self.raw) }
    }
}

impl Group {
    /// Gloo over `store`: on `iface` if given (GLOO_SOCKET_IFNAME), else on the address
    /// `hostname` resolves to, else torch's default choice.
    pub fn gloo(
        store: &Store,
        rank: usize,
        size: usize,
        timeout: Duration,
        iface: Option<&str>,
        hostname: Option<&str>,
    ) -> Result<Self, TrainError> {
        let iface = iface.map(cstr).transpose()?;
        let hostname = hostname.map(cstr).transpose()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live handle, optional C strings (null when absent) and out-pointer.
        unsafe {
            check(
                "Gloo process group",
                motley_group_gloo(
                    store.raw,
                    rank as i32,
                    size as i32,
                    millis(timeout),
                    iface.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                    hostname.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                    &mut raw,
                ),
            )?;
        }
        Ok(Group { raw, rank, size, backend: "gloo" })
    }

    /// NCCL over `store`, this rank on `cuda:device`.
    pub fn nccl(store: &Store, rank: usize, size: usize, timeout: Duration, device: usize) -> Result<Self, TrainError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: live handle and out-pointer.
        unsafe {
            check(
                "NCCL process group",
                motley_group_nccl(store.raw, rank as i32, size as i32, millis(timeout), device as i32, &mut raw),
            )?;
        }
        Ok(Group { raw, rank, size, backend: "nccl" })
    }

    fn work(&self, op: &'static str, f: impl FnOnce(*mut *mut RawWork) -> *mut c_char) -> Result<Work, TrainError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `f` calls a shim with live handles and this out-pointer.
        unsafe { check(op, f(&mut raw))? };
        Ok(Work { raw, op })
    }

    /// Starts an in-place all-reduce of `t` (contiguous, on the group's device).
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Work, TrainError> {
        // SAFETY: live group and tensor handles for the call.
        self.work("all_reduce", |w| unsafe { motley_group_allreduce(self.raw, t.as_ptr(), op as i32, w) })
    }

    /// Starts a broadcast of `t` from `root` into every rank's `t`.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Work, TrainError> {
        // SAFETY: live group and tensor handles for the call.
        self.work("broadcast", |w| unsafe { motley_group_broadcast(self.raw, t.as_ptr(), root as i32, w) })
    }

    /// Starts gathering every rank's `input` into `output` (`size × input.numel()`, rank order).
    pub fn all_gather_into(&self, output: &Tensor, input: &Tensor) -> Result<Work, TrainError> {
        // SAFETY: live group and tensor handles for the call.
        self.work("all_gather", |w| unsafe {
            motley_group_allgather_into(self.raw, output.as_ptr(), input.as_ptr(), w)
        })
    }

    /// Starts reducing every rank's `input` and scattering chunk `rank` into `output`.
    pub fn reduce_scatter_into(&self, output: &Tensor, input: &Tensor, op: ReduceOp) -> Result<Work, TrainError> {
        // SAFETY: live group and tensor handles for the call.
        self.work("reduce_scatter", |w| unsafe {
            motley_group_reduce_scatter_into(self.raw, output.as_ptr(), input.as_ptr(), op as i32, w)
        })
    }

    pub fn barrier(&self) -> Result<(), TrainError> {
        // SAFETY: live group handle.
        self.work("barrier", |w| unsafe { motley_group_barrier(self.raw, w) })?.wait()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once.
        unsafe { motley_group_free(self.raw) }
    }
}

/// Buckets started during backward and at the end of it, in one round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Overlap {
    pub in_backward: u64,
    pub at_finish: u64,
}

/// Gradient reduction from autograd hooks (csrc/grad_sync.cpp): parameter `i`'s gradient
/// lives in bucket `bucket_of[i]`; an armed round reduces each bucket as soon as all its
/// parameters' gradients are accumulated, in bucket order.
#[derive(Debug)]
pub struct GradSync {
    raw: *mut RawGradSync,
}

// SAFETY: the C++ state is behind a mutex; the handle is only freed on drop.
unsafe impl Send for GradSync {}

impl GradSync {
    /// `grads[b]` is bucket b's slice of the flat gradient buffer (every parameter's gradient
    /// a view inside it); `shards[b]`, when given, receives this rank's reduce-scattered chunk
    /// instead of an in-place all-reduce.
    pub fn new(
        group: &Group,
        params: &[Tensor],
        bucket_of: &[i64],
        grads: &[Tensor],
        shards: Option<&[Tensor]>,
    ) -> Result<Self, TrainError> {
        if params.len() != bucket_of.len() || shards.is_some_and(|s| s.len() != grads.len()) {
            return Err(TrainError::Distributed("gradient buckets: mismatched lengths".into()));
        }
        let p: Vec<*const C_tensor> = params.iter().map(|t| t.as_ptr()).collect();
        let g: Vec<*const C_tensor> = grads.iter().map(|t| t.as_ptr()).collect();
        let s: Option<Vec<*const C_tensor>> = shards.map(|s| s.iter().map(|t| t.as_ptr()).collect());
        let mut raw = std::ptr::null_mut();
        // SAFETY: arrays of live tensor handles (the shim copies the tensors it keeps) and an
        // out-pointer.
        unsafe {
            check(
                "gradient hooks",
                motley_grad_sync_new(
                    group.raw,
                    p.as_ptr(),
                    bucket_of.as_ptr(),
                    p.len(),
                    g.as_ptr(),
                    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    g.len(),
                    &mut raw,
                ),
            )?;
        }
        Ok(GradSync { raw })
    }

    /// The next backward reduces its gradients.
    pub fn arm(&mut self) {
        // SAFETY: live handle.
        unsafe { motley_grad_sync_arm(self.raw) }
    }

    /// Starts the buckets still waiting, waits for every bucket, and ends the round.
    pub fn finish(&mut self) -> Result<Overlap, TrainError> {
        let (mut a, mut b) = (0i64, 0i64);
        // SAFETY: live handle and out-pointers.
        unsafe { check("gradient reduction", motley_grad_sync_finish(self.raw, &mut a, &mut b))? };
        Ok(Overlap { in_backward: a as u64, at_finish: b as u64 })
    }
}

impl Drop for GradSync {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once (its hooks are removed there).
        unsafe { motley_grad_sync_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::config::OptimConfig;
    use crate::flat::BucketCap;
    use crate::optim::{AdamW, Sharding};

    const T: Duration = Duration::from_secs(30);

    /// Runs `f(rank, group)` on `world` threads, each a rank of its own Gloo group over a
    /// TCPStore on a free port of 127.0.0.1.
    fn with_group<R: Send>(world: usize, f: impl Fn(usize, &Group) -> R + Sync) -> Vec<R> {
        let server = Store::tcp("127.0.0.1", 0, true, None, T).expect("store server");
        let port = server.port();
        assert!(port > 0);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    let f = &f;
                    s.spawn(move || {
                        tch::set_num_threads(1);
                        let store = Store::tcp("127.0.0.1", port, false, None, T).expect("store client");
                        let store = store.prefixed("test").expect("prefix");
                        let g = Group::gloo(&store, r, world, T, None, Some("127.0.0.1")).expect("gloo group");
                        f(r, &g)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::try_from(t.to_kind(Kind::Float).view([-1])).expect("values")
    }

    #[test]
    fn store_keys_counters_and_prefixes() {
        let server = Store::tcp("127.0.0.1", 0, true, None, T).expect("server");
        let client = Store::tcp("127.0.0.1", server.port(), false, None, T).expect("client");
        // PrefixStore joins with a slash: "a" + "k" is "a/k".
        let a = client.prefixed("a").expect("prefix");
        a.set("k", b"v1").expect("set");
        assert_eq!(a.get("k").expect("get"), b"v1");
        assert!(server.check("a/k").expect("check"));
        assert!(!a.check("missing").expect("check"));
        assert_eq!(a.add("n", 2).expect("add"), 2);
        assert_eq!(a.connect_again().expect("clone").add("n", 0).expect("read"), 2);
        a.set_timeout(Duration::from_millis(200)).expect("timeout");
        let e = a.get("never").expect_err("times out");
        assert!(e.to_string().contains("store get never"), "{e}");
    }

    #[test]
    fn a_second_server_on_a_taken_port_is_an_error() {
        let first = Store::tcp("127.0.0.1", 0, true, None, T).expect("server");
        let e = Store::tcp("127.0.0.1", first.port(), true, None, Duration::from_secs(2)).expect_err("port taken");
        assert!(e.to_string().contains(&format!("127.0.0.1:{}", first.port())), "{e}");
    }

    #[test]
    fn gloo_collectives_across_two_ranks() {
        let out = with_group(2, |r, g| {
            let x = Tensor::from_slice(&[r as f32 + 1.0, 10.0 * (r as f32 + 1.0)]);
            g.all_reduce(&x, ReduceOp::Sum).expect("start").wait().expect("all_reduce");
            let b = Tensor::from_slice(&[r as f32; 3]);
            g.broadcast(&b, 1).expect("start").wait().expect("broadcast");
            let gathered = Tensor::zeros([4], (Kind::Float, Device::Cpu));
            let mine = Tensor::from_slice(&[r as f32, r as f32 + 0.5]);
            g.all_gather_into(&gathered, &mine).expect("start").wait().expect("all_gather");
            let input = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]) * (r as f64 + 1.0);
            let chunk = Tensor::zeros([2], (Kind::Float, Device::Cpu));
            g.reduce_scatter_into(&chunk, &input, ReduceOp::Sum).expect("start").wait().expect("reduce_scatter");
            g.barrier().expect("barrier");
            (values(&x), values(&b), values(&gathered), values(&chunk))
        });
        for (r, (x, b, gathered, chunk)) in out.iter().enumerate() {
            assert_eq!(x, &[3.0, 30.0]);
            assert_eq!(b, &[1.0; 3], "rank 1's values everywhere");
            assert_eq!(gathered, &[0.0, 0.5, 1.0, 1.5]);
            let want: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0][2 * r..2 * r + 2].iter().map(|v| v * 3.0).collect();
            assert_eq!(chunk, &want, "rank {r} gets its chunk of the sum");
        }
    }

    /// Three parameters on two ranks; rank 1 leaves `c` without a gradient. The buckets must
    /// all reduce (the empty one at `finish`), in the same order on both ranks.
    fn reduce_grads(zero: bool) -> Vec<(Vec<f32>, Overlap, Option<Vec<f32>>)> {
        with_group(2, |r, g| {
            let t = |v: &[f32]| Tensor::from_slice(v).set_requires_grad(true);
            let vars = [
                ("a".to_string(), t(&[1.0, 2.0, 3.0, 4.0])),
                ("b".to_string(), t(&[5.0, 6.0])),
                ("c".to_string(), t(&[7.0, 8.0, 9.0])),
            ];
            let sharding = Sharding {
                rank: r,
                world: 2,
                zero,
                full_shard: false,
                device: None,
                buckets: BucketCap { first: 4, rest: 4 },
            };
            let shared = vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
            let opt = AdamW::sharded(shared, &OptimConfig::default(), sharding).expect("flat");
            let b = opt.buckets().expect("buckets");
            let (params, shards) = (b.params, b.shards);
            let mut sync = GradSync::new(g, &params, &b.bucket_of, &b.grads, shards.as_deref()).expect("hooks");
            let scale = r as f64 + 1.0;
            // A micro-batch that does not communicate, then the armed one.
            let loss = |with_c: bool| {
                let mut l = (&vars[0].1 * &vars[0].1).sum(Kind::Float) * scale + vars[1].1.sum(Kind::Float) * scale;
                if with_c {
                    l += vars[2].1.sum(Kind::Float);
                }
                l
            };
            loss(r == 0).backward();
            sync.arm();
            loss(r == 0).backward();
            let overlap = sync.finish().expect("reduced");
            let flat: Vec<f32> = params.iter().flat_map(|p| values(&p.grad())).collect();
            (flat, overlap, shards.map(|s| s.iter().flat_map(values).collect()))
        })
    }

    #[test]
    fn gradient_buckets_sum_over_ranks_from_hooks() {
        let out = reduce_grads(false);
        // d/da: 2a·scale, two micro-batches, summed over scales 1 and 2: 2a·2·3 = 12a.
        // d/db: scale, two micro-batches, summed: 2·3 = 6. d/dc: rank 0 only, twice: 2.
        let want = [12.0, 24.0, 36.0, 48.0, 6.0, 6.0, 2.0, 2.0, 2.0];
        for (flat, overlap, _) in &out {
            assert_eq!(flat, &want);
            assert_eq!(overlap.in_backward + overlap.at_finish, 3, "three buckets: a | b | c");
        }
        // Rank 1 never sees c's gradient: its bucket starts at finish, after the others.
        assert!(out[1].1.at_finish >= 1);
        assert_eq!(out[0].0, out[1].0, "replicas agree");
    }

    #[test]
    fn zero_buckets_reduce_scatter_into_each_rank_s_chunks() {
        let out = reduce_grads(true);
        let (s0, s1) = (out[0].2.clone().expect("shards"), out[1].2.clone().expect("shards"));
        // Buckets padded to multiples of 8 (2 ranks × 4): a [4] → 8, b [2] → 8, c [3] → 8;
        // each rank owns 4 elements of each.
        assert_eq!(s0, [12.0, 24.0, 36.0, 48.0, 6.0, 6.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0]);
        assert_eq!(s1, vec![0.0; 12], "rank 1's chunks are the zero padding here");
    }

    #[test]
    fn nccl_without_a_gpu_is_a_clean_error() {
        if tch::Cuda::is_available() {
            return; // the CUDA checks run the real thing (scripts/gpu/check.sh)
        }
        let server = Store::tcp("127.0.0.1", 0, true, None, T).expect("server");
        let e = Group::nccl(&server, 0, 1, Duration::from_secs(5), 0).expect_err("no CUDA here");
        assert!(e.to_string().contains("NCCL process group"), "{e}");
    }
}
