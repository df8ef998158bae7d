//! ZeRO-3 (fully sharded data parallel, `train.zero = 3`): each rank keeps only its chunk of
//! every weight — the optimizer's shard, laid out per unit by [`Layout::units`] — and a unit's
//! weights exist whole only while it runs. Unit 0 (embedding, final norm, LM head, latent
//! projections) is gathered for a step's forwards and backwards; block `i` (unit `i + 1`) is
//! gathered in its checkpointed forward and freed after it, gathered again for the
//! recomputation in its backward, and its gradients are reduce-scattered into the owners'
//! chunks (summed over micro-batches) and freed as soon as that backward is done. The next
//! block's all-gather is issued while the current one computes (Gloo and NCCL run it beside
//! the compute). So a rank holds its 1/N of weights, gradients and moments, plus unit 0 and at
//! most two gathered blocks and one block's gradients.
//!
//! The gathers ride on the activation-checkpointing node (`csrc/checkpoint.cpp`), whose
//! callback is told which run it is: the recomputation is where backward needs the weights
//! again, so ZeRO-3 needs every block checkpointed (config validation says so).

use std::sync::{Arc, Mutex, MutexGuard};

use tch::Tensor;

use crate::dist::Comm;
use crate::dist::c10d::{ReduceOp, Work};
use crate::error::TrainError;
use crate::flat::Layout;

/// One unit's parameters and what is gathered of it now.
struct Unit {
    /// Its buckets, consecutive in the layout, and the range they cover.
    buckets: Vec<usize>,
    start: i64,
    len: i64,
    /// Parameter, shape, offset in the unit, elements.
    params: Vec<(Tensor, Vec<i64>, i64, i64)>,
    /// The gathered weights `[len]` while the unit is in use.
    full: Option<Tensor>,
    /// Its gradient buffer `[len]` while a backward writes into it.
    grad: Option<Tensor>,
}

/// An all-gather issued ahead of its use.
struct InFlight {
    unit: usize,
    buffer: Tensor,
    works: Vec<Work>,
}

struct Inner {
    comm: Arc<Comm>,
    layout: Layout,
    shard_param: Tensor,
    shard_grad: Tensor,
    units: Vec<Unit>,
    in_flight: Option<InFlight>,
    empty: Tensor,
    /// The first error inside a block's forward (the model's forward cannot return one; the
    /// trainer checks after every forward).
    failed: Option<String>,
    /// Elements of weights gathered now, and the most since [`Fsdp::reset_peak`].
    gathered: i64,
    peak_gathered: i64,
}

/// The ZeRO-3 engine of one rank.
pub struct Fsdp {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Fsdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fsdp").finish_non_exhaustive()
    }
}

/// Bytes of weights this rank holds under ZeRO-3.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resident {
    /// Its chunks of every unit.
    pub shard: u64,
    /// Gathered now, and at most at once since the last reset.
    pub gathered: u64,
    pub peak_gathered: u64,
    /// The largest unit, gathered.
    pub largest_unit: u64,
    /// Unit 0 (embedding, final norm, head), gathered.
    pub root_unit: u64,
}

fn torch_err(op: &str) -> impl Fn(tch::TchError) -> TrainError + '_ {
    move |e| TrainError::Torch { op: op.to_string(), source: e }
}

impl Fsdp {
    /// Over the optimizer's ZeRO-3 parts ([`crate::optim::AdamW::full_shard_parts`]).
    pub fn new(
        comm: Arc<Comm>,
        layout: Layout,
        shard_param: Tensor,
        shard_grad: Tensor,
        params: Vec<(Tensor, Vec<i64>)>,
    ) -> Self {
        let mut units: Vec<Unit> = (0..layout.n_units())
            .map(|_| Unit { buckets: Vec::new(), start: i64::MAX, len: 0, params: Vec::new(), full: None, grad: None })
            .collect();
        for (b, k) in layout.buckets.iter().enumerate() {
            let u = &mut units[k.unit];
            u.buckets.push(b);
            u.start = u.start.min(k.start);
            u.len += k.len;
        }
        for e in &layout.entries {
            let u = &mut units[layout.buckets[e.bucket].unit];
            let (t, shape) = &params[e.param];
            u.params.push((t.shallow_clone(), shape.clone(), e.offset - u.start, e.numel));
        }
        let empty = Tensor::empty([0], (shard_param.kind(), shard_param.device()));
        Fsdp {
            inner: Mutex::new(Inner {
                comm,
                layout,
                shard_param,
                shard_grad,
                units,
                in_flight: None,
                empty,
                failed: None,
                gathered: 0,
                peak_gathered: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn n_units(&self) -> usize {
        self.lock().units.len()
    }

    /// Makes unit `u`'s parameters whole (waits for its prefetch, or gathers now).
    pub fn gather(&self, u: usize) -> Result<(), TrainError> {
        self.lock().gather(u)
    }

    /// Issues unit `u`'s all-gather without waiting for it (a no-op if it is gathered or in
    /// flight, or in a world of one).
    pub fn prefetch(&self, u: usize) -> Result<(), TrainError> {
        self.lock().prefetch(u)
    }

    /// Frees unit `u`'s gathered weights.
    pub fn release(&self, u: usize) {
        self.lock().release(u);
    }

    /// Points unit `u`'s gradients at a zeroed buffer of its own (kept if already there, so
    /// micro-batches accumulate into it).
    pub fn link_grads(&self, u: usize) -> Result<(), TrainError> {
        self.lock().link_grads(u)
    }

    /// Reduce-scatters unit `u`'s gradient buffer into the owners' shard gradients (adding to
    /// what earlier micro-batches left there) and frees it.
    pub fn reduce_grads(&self, u: usize) -> Result<(), TrainError> {
        self.lock().reduce_grads(u)
    }

    /// After a step's last backward: every gradient buffer still held (unit 0's, or a block
    /// that ran without its checkpoint node) is reduced.
    pub fn reduce_pending(&self) -> Result<(), TrainError> {
        let mut inner = self.lock();
        for u in 0..inner.units.len() {
            inner.reduce_grads(u)?;
        }
        Ok(())
    }

    /// Frees everything gathered (after the optimizer step: the gathered copies are stale).
    pub fn release_all(&self) -> Result<(), TrainError> {
        let mut inner = self.lock();
        inner.settle()?;
        for u in 0..inner.units.len() {
            inner.release(u);
        }
        Ok(())
    }

    /// Gathers every unit (for a checkpoint's weights, or to load one into them).
    pub fn gather_all(&self) -> Result<(), TrainError> {
        let mut inner = self.lock();
        for u in 0..inner.units.len() {
            inner.gather(u)?;
        }
        Ok(())
    }

    /// Copies this rank's chunks of the gathered units back into its shard (after a
    /// checkpoint was loaded into the whole parameters), then frees them.
    pub fn keep_gathered(&self) -> Result<(), TrainError> {
        let mut inner = self.lock();
        let rank = inner.comm.rank();
        tch::no_grad(|| {
            for unit in &inner.units {
                let Some(full) = &unit.full else { continue };
                for &b in &unit.buckets {
                    let k = &inner.layout.buckets[b];
                    let (start, n) = inner.layout.chunk(b, rank);
                    inner.shard_param.narrow(0, k.shard_offset, n).copy_(&full.narrow(0, start - unit.start, n));
                }
            }
        });
        for u in 0..inner.units.len() {
            inner.release(u);
        }
        Ok(())
    }

    /// The first error a block's forward met, if any (cleared).
    pub fn take_error(&self) -> Result<(), TrainError> {
        match self.lock().failed.take() {
            Some(msg) => Err(TrainError::Distributed(format!("ZeRO-3 in a block's forward: {msg}"))),
            None => Ok(()),
        }
    }

    /// Records an error of a block's forward for [`Fsdp::take_error`].
    pub fn fail(&self, msg: String) {
        self.lock().failed.get_or_insert(msg);
    }

    /// What this rank holds of the weights.
    pub fn resident(&self) -> Resident {
        let inner = self.lock();
        let el = inner.shard_param.kind().elt_size_in_bytes() as u64;
        Resident {
            shard: inner.shard_param.numel() as u64 * el,
            gathered: inner.gathered as u64 * el,
            peak_gathered: inner.peak_gathered as u64 * el,
            largest_unit: inner.units.iter().skip(1).map(|u| u.len as u64).max().unwrap_or(0) * el,
            root_unit: inner.units.first().map_or(0, |u| u.len as u64) * el,
        }
    }

    pub fn reset_peak(&self) {
        let mut inner = self.lock();
        inner.peak_gathered = inner.gathered;
    }
}

impl Inner {
    /// Issues the all-gathers of unit `u` into a new buffer (copies in a world of one).
    fn start(&self, u: usize) -> Result<(Tensor, Vec<Work>), TrainError> {
        let unit = &self.units[u];
        let buffer = Tensor::empty([unit.len], (self.shard_param.kind(), self.shard_param.device()));
        let world = self.layout.world as i64;
        let mut works = Vec::with_capacity(unit.buckets.len());
        for &b in &unit.buckets {
            let k = &self.layout.buckets[b];
            let out = buffer.narrow(0, k.start - unit.start, k.len);
            let input = self.shard_param.narrow(0, k.shard_offset, k.len / world);
            match self.comm.group() {
                Some(g) => works.push(g.all_gather_into(&out, &input).map_err(|e| self.comm.explain(e))?),
                None => {
                    tch::no_grad(|| out.narrow(0, 0, input.numel() as i64).copy_(&input));
                }
            }
        }
        Ok((buffer, works))
    }

    /// Waits for the all-gather in flight, keeping its buffer for when its unit is asked for.
    fn settle(&mut self) -> Result<(), TrainError> {
        if let Some(f) = self.in_flight.take() {
            for w in f.works {
                w.wait().map_err(|e| self.comm.explain(e))?;
            }
            // Not needed now; dropping the buffer is right once its collective is done.
        }
        Ok(())
    }

    fn prefetch(&mut self, u: usize) -> Result<(), TrainError> {
        if u >= self.units.len() || self.units[u].full.is_some() || self.comm.group().is_none() {
            return Ok(());
        }
        if self.in_flight.as_ref().is_some_and(|f| f.unit == u) {
            return Ok(());
        }
        self.settle()?;
        let (buffer, works) = self.start(u)?;
        // Its buffer is memory held from now on.
        self.peak_gathered = self.peak_gathered.max(self.gathered + self.units[u].len);
        self.in_flight = Some(InFlight { unit: u, buffer, works });
        Ok(())
    }

    fn gather(&mut self, u: usize) -> Result<(), TrainError> {
        if self.units[u].full.is_some() {
            return Ok(());
        }
        let buffer = match self.in_flight.take() {
            Some(f) if f.unit == u => {
                for w in f.works {
                    w.wait().map_err(|e| self.comm.explain(e))?;
                }
                f.buffer
            }
            other => {
                self.in_flight = other;
                let (buffer, works) = self.start(u)?;
                for w in works {
                    w.wait().map_err(|e| self.comm.explain(e))?;
                }
                buffer
            }
        };
        let unit = &mut self.units[u];
        for (p, shape, off, n) in &mut unit.params {
            // set_data swaps the storage under every handle of the variable (model, VarStore).
            p.set_data(&buffer.narrow(0, *off, *n).view(shape.as_slice()));
        }
        self.gathered += unit.len;
        self.peak_gathered = self.peak_gathered.max(self.gathered);
        unit.full = Some(buffer);
        Ok(())
    }

    fn release(&mut self, u: usize) {
        let unit = &mut self.units[u];
        if unit.full.take().is_none() {
            return;
        }
        for (p, ..) in &mut unit.params {
            p.set_data(&self.empty);
        }
        self.gathered -= unit.len;
    }

    fn link_grads(&mut self, u: usize) -> Result<(), TrainError> {
        let unit = &mut self.units[u];
        if unit.grad.is_some() {
            return Ok(());
        }
        let grad = Tensor::zeros([unit.len], (self.shard_param.kind(), self.shard_param.device()));
        for (p, shape, off, n) in &unit.params {
            crate::optim::set_grad(p, &grad.narrow(0, *off, *n).view(shape.as_slice())).map_err(|e| {
                TrainError::Torch { op: "link a ZeRO-3 gradient".into(), source: tch::TchError::Torch(e) }
            })?;
        }
        unit.grad = Some(grad);
        Ok(())
    }

    fn reduce_grads(&mut self, u: usize) -> Result<(), TrainError> {
        let Some(grad) = self.units[u].grad.take() else { return Ok(()) };
        let unit = &self.units[u];
        for (p, ..) in &unit.params {
            crate::optim::set_grad(p, &Tensor::new()).map_err(|e| TrainError::Torch {
                op: "clear a ZeRO-3 gradient".into(),
                source: tch::TchError::Torch(e),
            })?;
        }
        let world = self.layout.world as i64;
        for &b in &unit.buckets {
            let k = &self.layout.buckets[b];
            let n = k.len / world;
            let input = grad.narrow(0, k.start - unit.start, k.len);
            let mut dst = self.shard_grad.narrow(0, k.shard_offset, n);
            match self.comm.group() {
                Some(g) => {
                    let out = Tensor::empty([n], (grad.kind(), grad.device()));
                    g.reduce_scatter_into(&out, &input, ReduceOp::Sum)
                        .and_then(Work::wait)
                        .map_err(|e| self.comm.explain(e))?;
                    let _ = tch::no_grad(|| dst.f_add_(&out)).map_err(torch_err("add a reduced gradient"))?;
                }
                None => {
                    let _ = tch::no_grad(|| dst.f_add_(&input.narrow(0, 0, n))).map_err(torch_err("add a gradient"))?;
                }
            }
        }
        Ok(())
    }
}

/// One block's hooks around its checkpointed runs: gather before, free after the graph-free
/// forward, reduce and free after the backward through the recomputation; the neighbour in
/// the direction of travel is prefetched.
#[derive(Debug)]
pub struct BlockUnit {
    pub fsdp: Arc<Fsdp>,
    /// The block's index (its unit is `layer + 1`).
    pub layer: usize,
}

impl BlockUnit {
    fn unit(&self) -> usize {
        self.layer + 1
    }

    pub fn before(&self, recompute: bool) -> Result<(), String> {
        let (u, f) = (self.unit(), &self.fsdp);
        f.gather(u).map_err(|e| e.to_string())?;
        // Forward walks up the blocks, backward down them.
        let next = if recompute { u.checked_sub(1).filter(|&n| n >= 1) } else { Some(u + 1) };
        if let Some(n) = next {
            f.prefetch(n).map_err(|e| e.to_string())?;
        }
        if recompute {
            f.link_grads(u).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn after(&self, backward: bool) -> Result<(), String> {
        let (u, f) = (self.unit(), &self.fsdp);
        if backward {
            f.reduce_grads(u).map_err(|e| e.to_string())?;
        }
        f.release(u);
        Ok(())
    }
}
