//! ZeRO-3 (fully sharded data parallel, `train.zero = 3`): each rank keeps only its chunk of
//! every weight — the optimizer's shard, laid out per unit by [`Layout::units`] — and a unit's
//! weights exist whole only while it runs. Unit 0 (embedding, final norm, LM head, latent
//! projections) is gathered for a step's forwards and backwards; block `i` (unit `i + 1`) is
//! gathered in its checkpointed forward and freed after it, gathered again for the
//! recomputation in its backward, and its gradients are reduce-scattered into the owners'
//! chunks (summed over micro-batches) as soon as that backward is done, the collective left
//! running while the next block's backward computes. The next block's all-gather is issued
//! while the current one computes (Gloo and NCCL run both beside the compute). So a rank holds
//! its 1/N of weights, gradients and moments, plus unit 0, at most two gathered blocks, and
//! two blocks' gradient buffers (one filling, one being reduced).
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

/// A parameter of a unit: its handle (the model's variable), name, shape, and where it lies
/// in the unit's flat range.
struct UnitParam {
    tensor: Tensor,
    name: String,
    shape: Vec<i64>,
    offset: i64,
    numel: i64,
}

/// One unit's parameters and what is gathered of it now.
struct Unit {
    /// Its buckets, consecutive in the layout, and the range they cover.
    buckets: Vec<usize>,
    start: i64,
    len: i64,
    /// Its parameters in layout order.
    params: Vec<UnitParam>,
    /// The gathered weights `[len]` while the unit is in use.
    full: Option<Tensor>,
    /// Its gradient buffer `[len]` while a backward writes into it.
    grad: Option<Tensor>,
}

/// A block's reduce-scatter left running while the next block's backward computes: its
/// output chunks, where they add into the shard gradient, and the gradient buffer it reads.
struct Reducing {
    works: Vec<Work>,
    /// (output, shard offset) per bucket.
    outs: Vec<(Tensor, i64)>,
    _grad: Tensor,
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
    reducing: Option<Reducing>,
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
        params: Vec<(String, Tensor, Vec<i64>)>,
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
            let (name, t, shape) = &params[e.param];
            u.params.push(UnitParam {
                tensor: t.shallow_clone(),
                name: name.clone(),
                shape: shape.clone(),
                offset: e.offset - u.start,
                numel: e.numel,
            });
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
                reducing: None,
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
        inner.finish_reducing()
    }

    /// Frees everything gathered (after the optimizer step: the gathered copies are stale).
    pub fn release_all(&self) -> Result<(), TrainError> {
        let mut inner = self.lock();
        inner.settle()?;
        inner.finish_reducing()?;
        for u in 0..inner.units.len() {
            inner.release(u);
        }
        Ok(())
    }

    /// Each unit whole in turn — an all-gather every rank takes part in — handed to `f` as
    /// (parameter name, tensor) pairs, then freed: a checkpoint's weights or a hash of them
    /// without the whole model on the device at once.
    pub fn each_unit_gathered(
        &self,
        mut f: impl FnMut(&[(String, Tensor)]) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        for u in 0..self.n_units() {
            self.gather(u)?;
            let params = self.lock().named(u);
            let result = f(&params);
            self.release(u);
            result?;
        }
        Ok(())
    }

    /// Each unit made whole from zeros without communication, handed to `f` to fill (every
    /// rank fills it alike, from a checkpoint), then this rank's chunks kept and the unit freed.
    pub fn each_unit_filled(
        &self,
        mut f: impl FnMut(&[(String, Tensor)]) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        for u in 0..self.n_units() {
            self.lock().materialize(u);
            let params = self.lock().named(u);
            let result = f(&params);
            if result.is_ok() {
                self.lock().keep(u);
            }
            self.release(u);
            result?;
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
    /// Unit `u`'s parameters by name (handles to the model's variables).
    fn named(&self, u: usize) -> Vec<(String, Tensor)> {
        self.units[u].params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect()
    }

    /// Points unit `u`'s parameters at a zeroed buffer of its own, as a gather would.
    fn materialize(&mut self, u: usize) {
        if self.units[u].full.is_some() {
            return;
        }
        let buffer = Tensor::zeros([self.units[u].len], (self.shard_param.kind(), self.shard_param.device()));
        self.install(u, buffer);
    }

    /// Makes `buffer` unit `u`'s whole weights.
    fn install(&mut self, u: usize, buffer: Tensor) {
        let unit = &mut self.units[u];
        for p in &mut unit.params {
            // set_data swaps the storage under every handle of the variable (model, VarStore).
            p.tensor.set_data(&buffer.narrow(0, p.offset, p.numel).view(p.shape.as_slice()));
        }
        self.gathered += unit.len;
        self.peak_gathered = self.peak_gathered.max(self.gathered);
        unit.full = Some(buffer);
    }

    /// Copies this rank's chunks of unit `u`'s whole weights into its shard.
    fn keep(&mut self, u: usize) {
        let unit = &self.units[u];
        let Some(full) = &unit.full else { return };
        let rank = self.comm.rank();
        tch::no_grad(|| {
            for &b in &unit.buckets {
                let k = &self.layout.buckets[b];
                let (start, n) = self.layout.chunk(b, rank);
                self.shard_param.narrow(0, k.shard_offset, n).copy_(&full.narrow(0, start - unit.start, n));
            }
        });
    }

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
        self.install(u, buffer);
        Ok(())
    }

    fn release(&mut self, u: usize) {
        let unit = &mut self.units[u];
        if unit.full.take().is_none() {
            return;
        }
        for p in &mut unit.params {
            p.tensor.set_data(&self.empty);
        }
        self.gathered -= unit.len;
    }

    fn link_grads(&mut self, u: usize) -> Result<(), TrainError> {
        let unit = &mut self.units[u];
        if unit.grad.is_some() {
            return Ok(());
        }
        let grad = Tensor::zeros([unit.len], (self.shard_param.kind(), self.shard_param.device()));
        for p in &unit.params {
            crate::optim::set_grad(&p.tensor, &grad.narrow(0, p.offset, p.numel).view(p.shape.as_slice())).map_err(
                |e| TrainError::Torch { op: "link a ZeRO-3 gradient".into(), source: tch::TchError::Torch(e) },
            )?;
        }
        unit.grad = Some(grad);
        Ok(())
    }

    /// Waits for the reduce-scatter left running and adds its chunks into the shard gradient.
    fn finish_reducing(&mut self) -> Result<(), TrainError> {
        let Some(r) = self.reducing.take() else { return Ok(()) };
        for w in r.works {
            w.wait().map_err(|e| self.comm.explain(e))?;
        }
        for (out, offset) in &r.outs {
            let mut dst = self.shard_grad.narrow(0, *offset, out.numel() as i64);
            let _ = tch::no_grad(|| dst.f_add_(out)).map_err(torch_err("add a reduced gradient"))?;
        }
        Ok(())
    }

    /// Starts unit `u`'s reduce-scatter and leaves it running (the previous one is finished
    /// first, so at most one block's gradient buffer waits on the network).
    fn reduce_grads(&mut self, u: usize) -> Result<(), TrainError> {
        let Some(grad) = self.units[u].grad.take() else { return Ok(()) };
        self.finish_reducing()?;
        let unit = &self.units[u];
        for p in &unit.params {
            crate::optim::set_grad(&p.tensor, &Tensor::new()).map_err(|e| TrainError::Torch {
                op: "clear a ZeRO-3 gradient".into(),
                source: tch::TchError::Torch(e),
            })?;
        }
        let world = self.layout.world as i64;
        let (mut works, mut outs) = (Vec::new(), Vec::new());
        for &b in &unit.buckets {
            let k = &self.layout.buckets[b];
            let n = k.len / world;
            let input = grad.narrow(0, k.start - unit.start, k.len);
            match self.comm.group() {
                Some(g) => {
                    let out = Tensor::empty([n], (grad.kind(), grad.device()));
                    works.push(g.reduce_scatter_into(&out, &input, ReduceOp::Sum).map_err(|e| self.comm.explain(e))?);
                    outs.push((out, k.shard_offset));
                }
                None => {
                    let mut dst = self.shard_grad.narrow(0, k.shard_offset, n);
                    let _ = tch::no_grad(|| dst.f_add_(&input.narrow(0, 0, n))).map_err(torch_err("add a gradient"))?;
                }
            }
        }
        if !works.is_empty() {
            self.reducing = Some(Reducing { works, outs, _grad: grad });
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
