//! Data parallelism on torch's c10d: the process group a rank trains in, and every point where
//! ranks talk to each other besides the gradient buckets (those run from autograd hooks, see
//! [`c10d::GradSync`]).
//!
//! - [`launch`]: rank, world size and rendezvous address from torchrun's or Slurm's variables.
//! - [`c10d`]: TCPStore, Gloo / NCCL process groups, collectives, the gradient-hook engine.
//! - [`health`]: heartbeats through the store, so a dead or hung rank ends the job with its name.
//!
//! One process needs none of it: [`Comm::single`] answers every call locally. A process joins
//! its job once ([`Comm::for_process`]); every trainer it builds (a comparison trains several)
//! shares that communicator, and [`shutdown`] ends it in order.

pub mod c10d;
pub mod health;
pub mod launch;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::{Device, Tensor};

use crate::error::TrainError;
pub use c10d::{Group, Overlap, ReduceOp, Store};
pub use launch::{Launch, Launcher};

/// Which c10d backend a job uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Gloo on CPU, NCCL on CUDA.
    Auto,
    Gloo,
    Nccl,
}

impl Backend {
    /// The backend a job on `device` uses.
    pub fn resolve(self, device: Device) -> Backend {
        match self {
            Backend::Auto if device.is_cuda() => Backend::Nccl,
            Backend::Auto => Backend::Gloo,
            b => b,
        }
    }
}

/// This rank's communicator: the launch, and for a job of several processes the store, the
/// process group and the heartbeat.
#[derive(Debug)]
pub struct Comm {
    pub launch: Launch,
    joined: Option<Joined>,
    /// Agreements made so far (each gets its own store keys).
    agreements: AtomicU64,
    finished: AtomicBool,
}

/// The communicator of this process, once it joined a job of several.
static SHARED: Mutex<Option<Arc<Comm>>> = Mutex::new(None);

/// Ends this process's part in its job in order (see [`Comm::finish`]); nothing for one
/// process. Call once training is over.
pub fn shutdown() -> Result<(), TrainError> {
    let comm = SHARED.lock().unwrap_or_else(|e| e.into_inner()).take();
    comm.map_or(Ok(()), |c| c.finish())
}

#[derive(Debug)]
struct Joined {
    /// This attempt's namespace of the rendezvous store.
    store: Store,
    /// Keeps the server alive when this rank serves the store (rank 0 without an agent).
    server: Option<Store>,
    group: Group,
    health: health::Health,
    device: Device,
    timeout: Duration,
}

impl Comm {
    /// One process: every collective is the identity.
    pub fn single() -> Self {
        Self::unjoined(Launch::single())
    }

    fn unjoined(launch: Launch) -> Self {
        Comm { launch, joined: None, agreements: AtomicU64::new(0), finished: AtomicBool::new(false) }
    }

    /// This process's communicator: joins the job on first use (see [`Comm::join`]), then
    /// hands out the same one. One process gets a fresh [`Comm::single`]-like value.
    pub fn for_process(
        launch: Launch,
        backend: Backend,
        device: Device,
        timeout: Duration,
    ) -> Result<Arc<Self>, TrainError> {
        if !launch.is_distributed() {
            return Ok(Arc::new(Self::unjoined(launch)));
        }
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = shared.as_ref() {
            if c.launch != launch || c.joined.as_ref().is_some_and(|j| j.device != device) {
                return Err(TrainError::Distributed(
                    "this process already joined a job with another rank, world size or device".into(),
                ));
            }
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(Self::join(launch, backend, device, timeout)?);
        *shared = Some(Arc::clone(&c));
        Ok(c)
    }

    /// Joins the job `launch` describes: the TCPStore rendezvous (rank 0 serves it unless a
    /// launcher agent does), then a Gloo or NCCL process group for `device`. One process
    /// joins nothing.
    pub fn join(launch: Launch, backend: Backend, device: Device, timeout: Duration) -> Result<Self, TrainError> {
        if !launch.is_distributed() {
            return Ok(Self::unjoined(launch));
        }
        let backend = backend.resolve(device);
        if backend == Backend::Nccl && !device.is_cuda() {
            return Err(TrainError::Config {
                path: "train.dist_backend".into(),
                msg: "nccl needs a CUDA device (train.device); use gloo on CPU".into(),
            });
        }
        let (host, port, rank, world) = (launch.master_addr.as_str(), launch.master_port, launch.rank, launch.world);
        let where_ = format!("{host}:{port}");
        let serve = !launch.agent_store && rank == 0;
        let base = if serve {
            Store::tcp(host, port, true, Some(world), timeout).map_err(|e| {
                TrainError::Distributed(format!(
                    "rank 0 cannot serve the rendezvous store on {where_} within {:.0}s (port taken by another \
                     job, or not every rank joined): {e}",
                    timeout.as_secs_f64()
                ))
            })?
        } else {
            // A client of rank 0's store counts itself in, which rank 0 waits for.
            let count_in = (!launch.agent_store).then_some(world);
            Store::tcp(host, port, false, count_in, timeout).map_err(|e| {
                TrainError::Distributed(format!(
                    "rank {rank} cannot reach the rendezvous store at {where_} within {:.0}s: {e}",
                    timeout.as_secs_f64()
                ))
            })?
        };
        let store = base.prefixed(&format!("motley/{}", launch.restart))?;
        let group = match backend {
            Backend::Nccl => {
                let index = match device {
                    Device::Cuda(i) => i,
                    _ => 0,
                };
                Group::nccl(&store, rank, world, timeout, index)?
            }
            _ => {
                let iface = std::env::var("GLOO_SOCKET_IFNAME").ok().filter(|s| !s.is_empty());
                // On one machine the loopback address always works; elsewhere let Gloo
                // resolve this host's own name, as torch does.
                let local = matches!(host, "127.0.0.1" | "localhost" | "::1");
                Group::gloo(&store, rank, world, timeout, iface.as_deref(), local.then_some("127.0.0.1"))?
            }
        };
        let served_by = if launch.agent_store { "the launcher (torchrun's agent or motley --nproc)" } else { "rank 0" };
        let health = health::Health::start(
            store.connect_again()?,
            rank,
            world,
            timeout,
            format!("{where_}, served by {served_by}"),
        );
        let server = serve.then_some(base);
        let joined = Joined { store, server, group, health, device, timeout };
        Ok(Comm { joined: Some(joined), ..Self::unjoined(launch) })
    }

    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    pub fn world(&self) -> usize {
        self.launch.world
    }

    pub fn is_distributed(&self) -> bool {
        self.joined.is_some()
    }

    /// The process group (None for one process).
    pub fn group(&self) -> Option<&Group> {
        self.joined.as_ref().map(|j| &j.group)
    }

    /// `gloo`, `nccl`, or `none` for one process.
    pub fn backend_name(&self) -> &'static str {
        self.group().map_or("none", |g| g.backend)
    }

    /// `err` from a failed collective, with what the store knows of the rank to blame.
    pub fn explain(&self, err: TrainError) -> TrainError {
        match &self.joined {
            Some(j) => TrainError::Distributed(format!("rank {}: {}; {err}", self.rank(), j.health.diagnose())),
            None => err,
        }
    }

    /// Sums `values` over ranks, in place (f64, through the group's device).
    pub fn all_reduce_sum(&self, values: &mut [f64]) -> Result<(), TrainError> {
        let Some(j) = &self.joined else { return Ok(()) };
        if values.is_empty() {
            return Ok(());
        }
        let t = Tensor::from_slice(values).to_device(j.device);
        let run = || -> Result<Vec<f64>, TrainError> {
            j.group.all_reduce(&t, ReduceOp::Sum)?.wait()?;
            Vec::<f64>::try_from(t.to_device(Device::Cpu)).map_err(TrainError::torch("read all-reduce"))
        };
        let out = run().map_err(|e| self.explain(e))?;
        values.copy_from_slice(&out);
        Ok(())
    }

    /// Overwrites `t` on every rank with rank `root`'s `t`.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), TrainError> {
        let Some(j) = &self.joined else { return Ok(()) };
        j.group.broadcast(t, root).and_then(c10d::Work::wait).map_err(|e| self.explain(e))
    }

    pub fn barrier(&self) -> Result<(), TrainError> {
        let Some(j) = &self.joined else { return Ok(()) };
        j.group.barrier().map_err(|e| self.explain(e))
    }

    /// Checks every rank holds the same value of each fact (name → text), through the store.
    /// A mismatch is an error naming the fact, the ranks that differ from rank 0 and, for
    /// TOML texts, the keys that differ.
    pub fn agree(&self, topic: &str, facts: &[(&str, String)]) -> Result<(), TrainError> {
        let Some(j) = &self.joined else { return Ok(()) };
        let n = self.agreements.fetch_add(1, Ordering::SeqCst);
        let topic_key = format!("agree/{n}/{topic}");
        let mine = serde_json::to_vec(&facts.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<Vec<_>>())
            .map_err(|e| TrainError::Distributed(format!("{topic}: {e}")))?;
        j.store.set(&format!("{topic_key}/{}", self.rank()), &mine)?;
        let mut all = Vec::with_capacity(self.world());
        for r in 0..self.world() {
            let v = j.store.get(&format!("{topic_key}/{r}")).map_err(|e| {
                TrainError::Distributed(format!("rank {r} did not report its {topic} within the timeout: {e}"))
            })?;
            let v: Vec<(String, String)> =
                serde_json::from_slice(&v).map_err(|e| TrainError::Distributed(format!("rank {r}'s {topic}: {e}")))?;
            all.push(v);
        }
        // Nobody leaves before everyone has read: rank 0 may serve the store, and a rank
        // that returns an error exits.
        let done = format!("{topic_key}/read");
        j.store.add(&done, 1)?;
        let deadline = std::time::Instant::now() + j.timeout;
        while j.store.add(&done, 0)? < self.world() as i64 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut problems = Vec::new();
        for (i, (name, value0)) in all[0].iter().enumerate() {
            let differing: Vec<usize> =
                (1..all.len()).filter(|&r| all[r].get(i).is_none_or(|(n, v)| n != name || v != value0)).collect();
            for &r in &differing {
                let other = all[r].get(i).map_or("", |(_, v)| v.as_str());
                let keys = toml_differences(value0, other);
                let detail = if keys.is_empty() { String::new() } else { format!(": {}", keys.join("; ")) };
                problems.push(format!("rank {r}'s {name} differs from rank 0's{detail}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TrainError::Distributed(format!("ranks disagree on the {topic}: {}", problems.join(" | "))))
        }
    }

    /// Posts this rank's failure for the others (their errors then name it).
    pub fn report_failure(&self, err: &TrainError) {
        if let Some(j) = &self.joined {
            j.health.report_failure(&err.to_string());
            if j.server.is_some() {
                // The store dies with this process: give the others a moment to read why.
                j.health.linger(Duration::from_secs(10).min(j.timeout));
            }
        }
    }

    /// Orderly end: marks this rank done, waits for every rank at a barrier, and keeps a store
    /// this rank serves up until every rank has let go of it. Later calls do nothing.
    pub fn finish(&self) -> Result<(), TrainError> {
        let Some(j) = &self.joined else { return Ok(()) };
        if self.finished.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        j.health.done();
        let barrier = j.group.barrier();
        let done = j.store.add("finished", 1);
        if j.server.is_some() {
            let deadline = std::time::Instant::now() + j.timeout;
            while j.store.add("finished", 0).unwrap_or(i64::MAX) < self.world() as i64
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        barrier?;
        done.map(|_| ())
    }
}

/// `key = value` lines of two TOML texts that differ (a few, for error messages).
fn toml_differences(a: &str, b: &str) -> Vec<String> {
    let (Ok(a), Ok(b)) = (a.parse::<toml::Table>(), b.parse::<toml::Table>()) else { return Vec::new() };
    let (mut fa, mut fb) = (Vec::new(), Vec::new());
    flatten("", &toml::Value::Table(a), &mut fa);
    flatten("", &toml::Value::Table(b), &mut fb);
    let ma: std::collections::BTreeMap<_, _> = fa.into_iter().collect();
    let mb: std::collections::BTreeMap<_, _> = fb.into_iter().collect();
    let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    keys.into_iter()
        .filter(|k| ma.get(*k) != mb.get(*k))
        .take(5)
        .map(|k| {
            let show = |m: &std::collections::BTreeMap<String, String>| m.get(k).cloned().unwrap_or("(absent)".into());
            format!("{k} = {} on rank 0, {} there", show(&ma), show(&mb))
        })
        .collect()
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Intra-op threads for one of `local_world` ranks sharing this machine's cores: the cores
/// divided among them (at least one), as torchrun's `OMP_NUM_THREADS=1` intends but without
/// leaving cores idle. Oversubscribed OpenMP threads spin: two ranks with all cores each ran
/// a tiny model ~20× slower than with the cores split (docs/BENCHMARKS.md).
pub fn default_threads(local_world: usize) -> i32 {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    i32::try_from((cores / local_world.max(1)).max(1)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_differences_name_the_keys() {
        let a = "[train]\nsteps = 10\nseed = 1\n[model]\nd_model = 32\n";
        let b = "[train]\nsteps = 12\nseed = 1\n[model]\nd_model = 32\n";
        assert_eq!(toml_differences(a, b), vec!["train.steps = 10 on rank 0, 12 there".to_string()]);
        assert!(toml_differences(a, a).is_empty());
        assert!(toml_differences("not toml [", a).is_empty());
    }

    #[test]
    fn one_process_communicates_nothing() {
        let c = Comm::single();
        let mut v = [1.0, 2.0];
        c.all_reduce_sum(&mut v).expect("identity");
        assert_eq!(v, [1.0, 2.0]);
        c.agree("config", &[("config", "x".into())]).expect("one rank agrees");
        assert_eq!(c.backend_name(), "none");
        assert!(default_threads(1) >= 1 && default_threads(64) == 1.max(default_threads(64)));
    }
}
