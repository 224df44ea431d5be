//! First-order optimizers (SGD, Adam, AdamW) over a range of the flat buffers.
//!
//! An [`Optimizer`] owns the state of the elements `shard` of a [`Layout`]: the whole
//! buffer for plain data parallelism, one rank's slice for ZeRO. It never sees the rest.
//! Parameters that straddle the shard boundary are updated piecewise on each side, which
//! is exact because every update is elementwise; the per-parameter step count (Adam's bias
//! correction, SGD's first momentum step) is kept per parameter as torch keeps it.
//!
//! A step walks the parameters overlapping the shard, merges neighbours that share a group
//! and a step count into one segment, and runs one fused, parallel pass per segment.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::OptimizerConfig;
use crate::error::{OptimError, Result};
use crate::kernels::{Quantized, Segment, StateStorage};
use crate::layout::Layout;
use crate::quantize;

/// A set of parameters (indices into the layout) sharing one set of hyperparameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamGroup {
    /// Indices of its parameters in the layout.
    pub params: Vec<usize>,
    /// Its rule and hyperparameters.
    pub config: OptimizerConfig,
}

/// Everything needed to continue a run exactly: hyperparameters (with the current lr),
/// per-parameter step counts and the state buffers over the shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerStateDict {
    /// The layout it was taken over.
    pub layout: Layout,
    /// The elements whose state it holds.
    pub shard: Range<usize>,
    /// The param groups, with their hyperparameters when taken.
    pub groups: Vec<ParamGroup>,
    /// Per parameter of the layout: how many steps it has taken (0: no state yet).
    pub steps: Vec<u64>,
    /// State buffer name (torch's: `exp_avg`, `momentum_buffer`...) → its values over the shard.
    pub buffers: BTreeMap<String, Vec<f32>>,
}

impl OptimizerStateDict {
    /// Joins the state dicts of consecutive shards (ZeRO ranks in rank order) into the
    /// state dict of their union: torch's `consolidate_state_dict`.
    pub fn consolidate(parts: &[OptimizerStateDict]) -> Result<OptimizerStateDict> {
        let Some(first) = parts.first() else { return Err(OptimError::StateDict("no shards to consolidate".into())) };
        let mut full = OptimizerStateDict { shard: first.shard.start..first.shard.start, buffers: BTreeMap::new(), ..first.clone() };
        for part in parts {
            if part.layout != first.layout || part.groups.len() != first.groups.len() || part.steps.len() != first.steps.len() {
                return Err(OptimError::StateDict("shards of different optimizers cannot be consolidated".into()));
            }
            if part.shard.start != full.shard.end {
                return Err(OptimError::StateDict(format!("shard {:?} does not follow {:?}", part.shard, full.shard)));
            }
            full.shard.end = part.shard.end;
            // A parameter split between shards has taken the same steps on each part.
            for (s, p) in full.steps.iter_mut().zip(&part.steps) {
                *s = (*s).max(*p);
            }
            for (name, values) in &part.buffers {
                full.buffers.entry(name.clone()).or_default().extend_from_slice(values);
            }
        }
        Ok(full)
    }

    /// The part of this state dict over `range` (which must lie inside its shard), for an
    /// optimizer that owns `range`, e.g. a ZeRO rank of a group of another size.
    pub fn restrict(&self, range: Range<usize>) -> Result<OptimizerStateDict> {
        if range.start < self.shard.start || range.end > self.shard.end || range.start > range.end {
            return Err(OptimError::StateDict(format!("elements {range:?} are not inside the saved shard {:?}", self.shard)));
        }
        let local = range.start - self.shard.start..range.end - self.shard.start;
        let owned: Vec<usize> = self.layout.overlapping(range.clone()).map(|(i, _)| i).collect();
        Ok(OptimizerStateDict {
            layout: self.layout.clone(),
            shard: range,
            groups: self.groups.clone(),
            steps: self.steps.iter().enumerate().map(|(i, s)| if owned.contains(&i) { *s } else { 0 }).collect(),
            buffers: self.buffers.iter().map(|(n, b)| (n.clone(), b[local.clone()].to_vec())).collect(),
        })
    }
    /// torch's `add_param_group` on a state dict: appends `params` to the layout as a new
    /// group with `config`, with no state yet (step 0, zeroed buffers). The state dict must
    /// reach the end of the layout (a whole one, or the last shard) because the new
    /// elements come after it. Returns the new parameters' indices; on error nothing changes.
    pub fn add_param_group(&mut self, params: Vec<(String, Vec<usize>)>, config: OptimizerConfig) -> Result<Vec<usize>> {
        if self.shard.end != self.layout.numel() {
            return Err(OptimError::StateDict(format!(
                "state over elements {:?} of {} cannot grow at the end: consolidate the shards first",
                self.shard,
                self.layout.numel()
            )));
        }
        let mut layout = self.layout.clone();
        let added = params.into_iter().map(|(name, shape)| layout.push(name, shape)).collect::<Result<Vec<_>>>()?;
        let mut groups = self.groups.clone();
        groups.push(ParamGroup { params: added.clone(), config });
        assign_groups(&layout, &groups)?;
        let shard = self.shard.start..layout.numel();
        let old = std::mem::take(&mut self.buffers);
        self.buffers = buffer_names(&groups)
            .into_iter()
            .map(|name| {
                let mut b = old.get(name).cloned().unwrap_or_default();
                b.resize(shard.len(), 0.0);
                (name.to_string(), b)
            })
            .collect();
        self.steps.resize(layout.len(), 0);
        (self.layout, self.groups, self.shard) = (layout, groups, shard);
        Ok(added)
    }
}

/// Param groups of any first-order rules (SGD, Adam/AdamW, Muon, Adafactor; several may
/// share one optimizer, as Muon for the matrices and AdamW for the rest) over the elements
/// `shard` of a layout.
#[derive(Debug)]
pub struct Optimizer {
    layout: Layout,
    shard: Range<usize>,
    groups: Vec<ParamGroup>,
    group_of: Vec<usize>,
    steps: Vec<u64>,
    /// The named state buffers the groups' rules use (torch's names: `exp_avg`,
    /// `momentum_buffer`, `row_var`…), each covering only the parameters whose rule
    /// keeps it: Muon + AdamW holds 4 bytes per matrix element and 8 per vector element,
    /// as torch's two optimizers do, not 12 everywhere.
    state: Vec<(&'static str, Buffer)>,
    /// Where each parameter's quantization blocks and scales lie.
    blocks: Blocks,
}

/// One named state buffer: its values, packed over the parameters that use it, in
/// layout order (one per element of a parameter's piece, or what a whole-parameter rule
/// asks for: [`Kernel::state_len`](crate::kernels::Kernel::state_len)).
#[derive(Debug)]
struct Buffer {
    data: Data,
    /// Per parameter of the layout: where its state starts in `data` (`None`: its rule
    /// keeps no such buffer).
    at: Vec<Option<usize>>,
    /// Per parameter: how many elements of `data` it holds (at the start of its piece
    /// when unpacked to one per element).
    len: Vec<usize>,
}

/// A buffer's values.
#[derive(Debug)]
enum Data {
    /// One `f32` per element.
    F32(Vec<f32>),
    /// Block-wise 8-bit ([`crate::quantize`]): one code per element, one scale per block.
    Q8 { signed: bool, codes: Vec<u8>, scales: Vec<f32> },
}

impl Buffer {
    /// Lays out buffer `name` over the pieces of `shard` whose rule keeps it.
    fn new(
        layout: &Layout,
        groups: &[ParamGroup],
        group_of: &[usize],
        shard: &Range<usize>,
        name: &str,
        blocks: &Blocks,
    ) -> Result<Buffer> {
        let (at, len, total) = Self::placement(layout, groups, group_of, shard, name);
        let data = match storage(groups, name)? {
            StateStorage::F32 => Data::F32(vec![0.0; total]),
            StateStorage::Q8 { signed } => Data::Q8 {
                signed,
                codes: vec![quantize::zero_code(quantize::dynamic_map(signed)); total],
                scales: vec![0.0; blocks.total_scales],
            },
        };
        Ok(Buffer { data, at, len })
    }

    /// Where each parameter's state of buffer `name` starts, how long it is, and the total.
    fn placement(
        layout: &Layout,
        groups: &[ParamGroup],
        group_of: &[usize],
        shard: &Range<usize>,
        name: &str,
    ) -> (Vec<Option<usize>>, Vec<usize>, usize) {
        let mut at = vec![None; layout.len()];
        let mut len = vec![0; layout.len()];
        let mut total = 0;
        for (i, piece) in layout.overlapping(shard.clone()) {
            let kernel = groups[group_of[i]].config.kernel();
            if kernel.state_buffers().contains(&name) {
                let spec = layout.param(i);
                let whole = kernel.whole_params() && piece == spec.range();
                at[i] = Some(total);
                len[i] = if whole { kernel.state_len(name, spec).min(piece.len()) } else { piece.len() };
                total += len[i];
            }
        }
        (at, len, total)
    }

    /// Where the state of the segment of parameters `first..=last` lies in `data`.
    fn span(&self, first: usize, last: usize) -> Option<Range<usize>> {
        Some(self.at[first]?..self.at[last]? + self.len[last])
    }
}

/// Per parameter of the layout, where its piece's quantization blocks lie: the offset
/// of its first scale, and its block size (1: its rule keeps no quantized state).
#[derive(Debug, Default)]
struct Blocks {
    scales: Vec<usize>,
    size: Vec<usize>,
    total_scales: usize,
}

impl Blocks {
    /// Lays out the quantized state of `shard`; refuses a shard that cuts a block.
    fn new(layout: &Layout, groups: &[ParamGroup], group_of: &[usize], shard: &Range<usize>) -> Result<Blocks> {
        let n = layout.len();
        let mut b = Blocks { scales: vec![0; n], size: vec![1; n], ..Default::default() };
        for (i, piece) in layout.overlapping(shard.clone()) {
            let size = groups[group_of[i]].config.kernel().block();
            if size <= 1 {
                continue;
            }
            let spec = layout.param(i);
            let (from, to) = (piece.start - spec.range().start, piece.end - spec.range().start);
            for at in [from, to] {
                if at % size != 0 && at != spec.numel() {
                    return Err(OptimError::InvalidConfig(format!(
                        "parameter '{}' is cut by this optimizer's shard {shard:?} at its element {at}, inside a quantization block of {size}: shards must cut it at multiples of {size}",
                        spec.name
                    )));
                }
            }
            (b.scales[i], b.size[i]) = (b.total_scales, size);
            b.total_scales += to.div_ceil(size) - from / size;
        }
        Ok(b)
    }

    /// The blocks of parameter `i`'s piece `piece` (layout coordinates), relative to
    /// `origin`.
    fn of(&self, layout: &Layout, i: usize, piece: &Range<usize>, origin: usize) -> impl Iterator<Item = Range<usize>> {
        let size = self.size[i].max(1);
        let start = layout.param(i).range().start;
        let (from, to) = (piece.start - start, piece.end - start);
        (from / size..to.div_ceil(size)).map(move |k| start + k * size - origin..(start + ((k + 1) * size).min(to)) - origin)
    }
}

/// A run of neighbouring parameters with the same group and step count.
struct Run {
    range: Range<usize>,
    group: usize,
    step: u64,
}

/// One piece of a parameter whose rule transforms whole matrices, as a shard holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformPiece {
    /// The parameter's index in the layout.
    pub param: usize,
    /// The elements of it the shard holds (layout coordinates).
    pub range: Range<usize>,
    /// Where their values start in [`Transforms::values`].
    pub at: usize,
}

/// The whole-matrix transforms of one step (Muon's Newton–Schulz), between the two
/// passes of [`Optimizer::step_with`]: the inputs of the pieces the shard holds, to be
/// replaced by the outputs.
pub struct Transforms<'a> {
    layout: &'a Layout,
    groups: &'a [ParamGroup],
    group_of: &'a [usize],
    /// The pieces, in layout order.
    pub pieces: Vec<TransformPiece>,
    /// Their values, packed in piece order: inputs on entry, outputs on return.
    pub values: Vec<f32>,
}

impl Transforms<'_> {
    /// The layout the pieces index.
    pub fn layout(&self) -> &Layout {
        self.layout
    }

    /// Parameter `param`'s transform: `values`, its whole input, become its output.
    pub fn transform(&self, param: usize, values: &mut [f32]) -> Result<()> {
        let spec = self.layout.params().get(param).ok_or_else(|| OptimError::ShapeMismatch(format!("no parameter {param}")))?;
        self.groups[self.group_of[param]].config.kernel().transform(spec, values)
    }

    /// Runs every transform here: each piece must be its whole parameter.
    pub fn run_local(&mut self) -> Result<()> {
        let mut values = std::mem::take(&mut self.values);
        for p in &self.pieces {
            let spec = self.layout.param(p.param);
            if p.range != spec.range() {
                return Err(OptimError::InvalidConfig(format!(
                    "parameter '{}' is cut by this optimizer's shard (it holds elements {:?} of {:?}): its rule transforms whole matrices, so the caller must assemble them (distoptim's ZeRO does)",
                    spec.name,
                    p.range,
                    spec.range()
                )));
            }
            self.transform(p.param, &mut values[p.at..p.at + p.range.len()])?;
        }
        self.values = values;
        Ok(())
    }
}

impl Optimizer {
    /// One group of all parameters, over the whole buffer.
    pub fn new(layout: Layout, config: OptimizerConfig) -> Result<Self> {
        let params = (0..layout.len()).collect();
        let shard = 0..layout.numel();
        Self::with_groups(layout, vec![ParamGroup { params, config }], shard)
    }

    /// Param groups over the elements `shard` of the layout.
    pub fn with_groups(layout: Layout, groups: Vec<ParamGroup>, shard: Range<usize>) -> Result<Self> {
        let group_of = assign_groups(&layout, &groups)?;
        if shard.start > shard.end || shard.end > layout.numel() {
            return Err(OptimError::ShapeMismatch(format!(
                "shard {}..{} is not inside the layout's {} elements",
                shard.start,
                shard.end,
                layout.numel()
            )));
        }
        let blocks = Blocks::new(&layout, &groups, &group_of, &shard)?;
        let state = buffer_names(&groups)
            .into_iter()
            .map(|n| Ok((n, Buffer::new(&layout, &groups, &group_of, &shard, n, &blocks)?)))
            .collect::<Result<_>>()?;
        let steps = vec![0; layout.len()];
        Ok(Optimizer { layout, shard, groups, group_of, steps, state, blocks })
    }

    /// The layout it steps.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The element range of the layout this optimizer updates and holds state for.
    pub fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }

    /// The param groups, with their current hyperparameters.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The learning rate of every group, in group order.
    pub fn lrs(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.config.lr()).collect()
    }

    /// Sets the learning rate of every group (what an LR scheduler does after each step).
    pub fn set_lrs(&mut self, lrs: &[f64]) -> Result<()> {
        if lrs.len() != self.groups.len() {
            return Err(OptimError::ShapeMismatch(format!("{} learning rates for {} param groups", lrs.len(), self.groups.len())));
        }
        for (g, &lr) in self.groups.iter_mut().zip(lrs) {
            g.config.set_lr(lr);
        }
        Ok(())
    }

    /// How many parameter elements this optimizer holds state for (whatever the number of
    /// state buffers).
    pub fn state_elems(&self) -> usize {
        if !self.state.is_empty() {
            self.shard.len()
        } else {
            0
        }
    }

    /// Steps taken by parameter `index` of the layout.
    pub fn param_step(&self, index: usize) -> u64 {
        self.steps[index]
    }

    /// The state buffers over the shard, by torch's names, one `f32` per element of the
    /// shard (zero where a parameter's rule keeps no such buffer): borrowed when the
    /// buffer is kept in `f32` over the whole shard, else unpacked or dequantized.
    pub fn buffers(&self) -> impl Iterator<Item = (&'static str, Cow<'_, [f32]>)> {
        self.state.iter().map(|(n, b)| (*n, self.buffer_f32(b)))
    }

    /// The bytes of state an optimizer with these groups over `shard` would keep (what
    /// [`state_bytes`](Self::state_bytes) reports once it exists), without allocating
    /// it: for planning a job (`distoptim estimate`). Refuses what
    /// [`with_groups`](Self::with_groups) refuses.
    pub fn planned_state_bytes(layout: &Layout, groups: &[ParamGroup], shard: Range<usize>) -> Result<u64> {
        let group_of = assign_groups(layout, groups)?;
        if shard.start > shard.end || shard.end > layout.numel() {
            return Err(OptimError::ShapeMismatch(format!("shard {shard:?} is not inside the layout's {} elements", layout.numel())));
        }
        let blocks = Blocks::new(layout, groups, &group_of, &shard)?;
        let mut bytes = 0u64;
        for name in buffer_names(groups) {
            let (_, _, total) = Buffer::placement(layout, groups, &group_of, &shard, name);
            bytes += match storage(groups, name)? {
                StateStorage::F32 => total as u64 * 4,
                StateStorage::Q8 { .. } => total as u64 + blocks.total_scales as u64 * 4,
            };
        }
        Ok(bytes)
    }

    /// Bytes of state this optimizer keeps in memory (codes, scales and `f32` buffers).
    pub fn state_bytes(&self) -> u64 {
        self.state
            .iter()
            .map(|(_, b)| match &b.data {
                Data::F32(v) => v.len() as u64 * 4,
                Data::Q8 { codes, scales, .. } => codes.len() as u64 + scales.len() as u64 * 4,
            })
            .sum()
    }

    /// One buffer as one `f32` per element of the shard.
    fn buffer_f32<'s>(&'s self, buffer: &'s Buffer) -> Cow<'s, [f32]> {
        if let Data::F32(v) = &buffer.data {
            if v.len() == self.shard.len() {
                return Cow::Borrowed(v);
            }
        }
        let mut out = vec![0f32; self.shard.len()];
        for (i, piece) in self.layout.overlapping(self.shard.clone()) {
            let Some(at) = buffer.at[i] else { continue };
            let local = piece.start - self.shard.start..piece.end - self.shard.start;
            let n = buffer.len[i];
            match &buffer.data {
                Data::F32(v) => out[local.start..local.start + n].copy_from_slice(&v[at..at + n]),
                Data::Q8 { signed, codes, scales } => {
                    let s0 = self.blocks.scales[i];
                    for (k, r) in self.blocks.of(&self.layout, i, &piece, piece.start).enumerate() {
                        let out = &mut out[local.start + r.start..local.start + r.end];
                        quantize::dequantize(&codes[at + r.start..at + r.end], scales[s0 + k], *signed, out);
                    }
                }
            }
        }
        Cow::Owned(out)
    }

    /// The parameters to evaluate and ship, over the shard: `params` itself, except for
    /// Schedule-Free groups, whose buffer holds y (where gradients are taken) and whose
    /// averaged iterate x is `lerp(y, z, 1 - 1/β1)`.
    pub fn eval_params(&self, params: &[f32], out: &mut [f32]) -> Result<()> {
        self.layout.check_len("the parameter buffer", params.len(), &self.shard)?;
        self.layout.check_len("the output buffer", out.len(), &self.shard)?;
        for seg in segments(&self.layout, &self.group_of, &self.steps, self.shard.clone()) {
            let l = seg.range.start - self.shard.start..seg.range.end - self.shard.start;
            let kernel = self.groups[seg.group].config.kernel();
            let (first, last) = ends(&self.layout, &seg.range);
            let state: Vec<&[f32]> = kernel
                .state_buffers()
                .iter()
                .filter_map(|name| match self.state.iter().find(|(n, _)| n == name) {
                    Some((_, b @ Buffer { data: Data::F32(v), .. })) => b.span(first, last).map(|r| &v[r]),
                    _ => None,
                })
                .collect();
            kernel.eval_params(&params[l.clone()], &state, seg.step - 1, &mut out[l]);
        }
        Ok(())
    }

    /// One optimizer step over the shard: `params` and `grads` hold exactly the shard's
    /// elements.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) -> Result<()> {
        self.step_scaled(params, grads, 1.0)
    }

    /// [`step`](Self::step) with every gradient multiplied by `grad_scale` as it is read:
    /// a clip coefficient applied without a separate pass over the gradients, with the
    /// same bits as clipping the buffer first. Whole-matrix transforms run here, so the
    /// shard must hold their parameters whole ([`Transforms::run_local`]).
    pub fn step_scaled(&mut self, params: &mut [f32], grads: &[f32], grad_scale: f32) -> Result<()> {
        self.step_with(params, grads, grad_scale, &mut |t: &mut Transforms<'_>| t.run_local())
    }

    /// [`step_scaled`](Self::step_scaled) with the whole-matrix transforms
    /// ([`Kernel::transforms_whole`]) left to `transform`: it is handed the inputs of every
    /// piece of such a parameter the shard holds and must replace them by the outputs,
    /// however it assembles each matrix (a sharded caller exchanges the pieces between
    /// ranks there). It is called once per step whenever some group has such a rule, even
    /// with no piece, so a collective inside it is reached by every rank.
    ///
    /// [`Kernel::transforms_whole`]: crate::kernels::Kernel::transforms_whole
    pub fn step_with(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        grad_scale: f32,
        transform: &mut dyn FnMut(&mut Transforms<'_>) -> Result<()>,
    ) -> Result<()> {
        self.layout.check_len("the parameter buffer", params.len(), &self.shard)?;
        self.layout.check_len("the gradient buffer", grads.len(), &self.shard)?;
        // Group-level counters (Schedule-Free's k, lr_max, weight_sum) advance once per
        // step on every rank, whether or not the shard holds the group's elements.
        for g in &mut self.groups {
            g.config.kernel_mut().begin_step();
        }
        let runs: Vec<Run> = segments(&self.layout, &self.group_of, &self.steps, self.shard.clone()).collect();
        let view = View { layout: &self.layout, groups: &self.groups, blocks: &self.blocks, shard: &self.shard };
        // First pass: every update, or the first half of a transforming one (its inputs
        // packed in segment order).
        let (mut pieces, mut values) = (Vec::new(), Vec::new());
        for seg in &runs {
            let (segment, kernel) = view.segment(&mut self.state, seg, params, grads, grad_scale)?;
            if kernel.transforms_whole() {
                let at = values.len();
                values.resize(at + seg.range.len(), 0f32);
                for (i, piece) in self.layout.overlapping(seg.range.clone()) {
                    pieces.push(TransformPiece { param: i, range: piece.clone(), at: at + piece.start - seg.range.start });
                }
                kernel.prepare(segment, &mut values[at..])?;
            } else {
                kernel.update(segment)?;
            }
        }
        if self.groups.iter().any(|g| g.config.kernel().transforms_whole()) {
            let mut t = Transforms { layout: &self.layout, groups: &self.groups, group_of: &self.group_of, pieces, values };
            transform(&mut t)?;
            values = t.values;
            // Second pass: the transforming rules' outputs applied.
            let mut at = 0;
            for seg in runs.iter().filter(|seg| self.groups[seg.group].config.kernel().transforms_whole()) {
                let (segment, kernel) = view.segment(&mut self.state, seg, params, grads, grad_scale)?;
                kernel.finish(segment, &values[at..at + seg.range.len()])?;
                at += seg.range.len();
            }
        }
        for (i, _) in self.layout.overlapping(self.shard.clone()) {
            self.steps[i] += 1;
        }
        Ok(())
    }
}

/// The parts of an [`Optimizer`] that a segment's buffers are cut from, borrowed apart
/// from its state.
struct View<'a> {
    layout: &'a Layout,
    groups: &'a [ParamGroup],
    blocks: &'a Blocks,
    shard: &'a Range<usize>,
}

impl<'a> View<'a> {
    /// The [`Segment`] of run `seg` over the shard's `params` and `grads`, with its kernel.
    fn segment<'b>(
        &self,
        buffers: &'b mut [(&'static str, Buffer)],
        seg: &Run,
        params: &'b mut [f32],
        grads: &'b [f32],
        grad_scale: f32,
    ) -> Result<(Segment<'b>, &'a dyn crate::kernels::Kernel)>
    where
        'a: 'b,
    {
        let local = seg.range.start - self.shard.start..seg.range.end - self.shard.start;
        let kernel = self.groups[seg.group].config.kernel();
        let names = kernel.state_buffers();
        // The segment's state: from its first parameter's on, to its last one's end.
        let (first, last) = ends(self.layout, &seg.range);
        let mut blocks = Vec::new();
        if self.blocks.size[first] > 1 {
            for (i, piece) in self.layout.overlapping(seg.range.clone()) {
                blocks.extend(self.blocks.of(self.layout, i, &piece, seg.range.start));
            }
        }
        let s0 = self.blocks.scales[first];
        let mut state = Vec::with_capacity(names.len());
        let mut quantized = Vec::new();
        let mut slots: Vec<(&str, Option<&mut Buffer>)> = buffers.iter_mut().map(|(n, b)| (*n, Some(b))).collect();
        for name in &names {
            let Some(buffer) = slots.iter_mut().find(|(n, _)| n == name).and_then(|(_, b)| b.take()) else {
                return Err(OptimError::StateDict(format!("the optimizer holds no '{name}' buffer")));
            };
            let Some(span) = buffer.span(first, last) else {
                return Err(OptimError::StateDict(format!("buffer '{name}' holds nothing for '{}'", self.layout.param(first).name)));
            };
            match &mut buffer.data {
                Data::F32(b) => state.push(&mut b[span]),
                Data::Q8 { codes, scales, .. } => {
                    quantized.push(Quantized { codes: &mut codes[span], scales: &mut scales[s0..s0 + blocks.len()] })
                }
            }
        }
        let whole = if kernel.whole_params() {
            whole_params(self.layout, seg.range.clone(), self.shard)?
        } else if kernel.transforms_whole() {
            let start = seg.range.start;
            self.layout.overlapping(seg.range.clone()).map(|(i, r)| (self.layout.param(i), r.start - start..r.end - start)).collect()
        } else {
            Vec::new()
        };
        let segment = Segment {
            params: &mut params[local.clone()],
            grads: &grads[local],
            state,
            quantized,
            blocks,
            step: seg.step,
            grad_scale,
            whole,
        };
        Ok((segment, kernel))
    }
}

impl Optimizer {
    /// torch's `add_param_group`: appends `params` to the layout as a new group with
    /// `config`; their state starts empty, the other parameters' state is kept. The
    /// parameter and gradient buffers passed to later steps grow by the new elements, at
    /// the end. Returns the new parameters' indices; on error nothing changes.
    pub fn add_param_group(&mut self, params: Vec<(String, Vec<usize>)>, config: OptimizerConfig) -> Result<Vec<usize>> {
        let mut sd = self.state_dict();
        let added = sd.add_param_group(params, config)?;
        let mut grown = Optimizer::with_groups(sd.layout.clone(), sd.groups.clone(), sd.shard.clone())?;
        grown.load_state_dict(&sd)?;
        *self = grown;
        Ok(added)
    }

    /// Everything needed to continue exactly (torch's `state_dict()`).
    pub fn state_dict(&self) -> OptimizerStateDict {
        OptimizerStateDict {
            layout: self.layout.clone(),
            shard: self.shard.clone(),
            groups: self.groups.clone(),
            steps: self.steps.clone(),
            buffers: self.buffers().map(|(n, b)| (n.to_string(), b.into_owned())).collect(),
        }
    }

    /// Restores a state dict taken from an optimizer over the same layout, groups and
    /// shard. Group hyperparameters (the lr among them) come from the state dict, as in
    /// torch. Nothing changes if the state dict does not fit.
    pub fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<()> {
        let mismatch = |msg: String| Err(OptimError::StateDict(msg));
        if let Some(diff) = sd.layout.first_difference(&self.layout) {
            return mismatch(format!(
                "the state dict was saved for another parameter layout (the state dict's, then this optimizer's): {diff}"
            ));
        }
        if sd.shard != self.shard {
            return mismatch(format!("saved for elements {:?}, this optimizer owns {:?}", sd.shard, self.shard));
        }
        if sd.groups.len() != self.groups.len()
            || sd.groups.iter().zip(&self.groups).any(|(a, b)| a.params != b.params || !a.config.same_algorithm(&b.config))
            || buffer_names(&sd.groups) != buffer_names(&self.groups)
        {
            return mismatch("param groups differ (parameters or algorithm)".into());
        }
        if sd.steps.len() != self.layout.len() {
            return mismatch(format!("{} step counts for {} parameters", sd.steps.len(), self.layout.len()));
        }
        for g in &sd.groups {
            g.config.validate()?;
        }
        if let Some(i) = (0..sd.groups.len()).find(|&i| sd.groups[i].config.kernel().block() != self.groups[i].config.kernel().block()) {
            return mismatch(format!(
                "param group {i} was saved with quantization blocks of {}, this optimizer's are {}",
                sd.groups[i].config.kernel().block(),
                self.groups[i].config.kernel().block()
            ));
        }
        let names = buffer_names(&sd.groups);
        for n in &names {
            match sd.buffers.get(*n) {
                Some(b) if b.len() != self.shard.len() => {
                    return mismatch(format!("buffer '{n}' has {} elements, expected {}", b.len(), self.shard.len()))
                }
                None => return mismatch(format!("buffer '{n}' is missing")),
                _ => {}
            }
        }
        if let Some(extra) = sd.buffers.keys().find(|k| !names.contains(&k.as_str())) {
            return mismatch(format!("unexpected buffer '{extra}'"));
        }
        let mut state = Vec::with_capacity(names.len());
        for n in names {
            let mut buffer = Buffer::new(&self.layout, &self.groups, &self.group_of, &self.shard, n, &self.blocks)?;
            self.pack(&sd.buffers[n], &mut buffer);
            state.push((n, buffer));
        }
        self.groups = sd.groups.clone();
        self.steps = sd.steps.clone();
        self.state = state;
        Ok(())
    }

    /// Fills `buffer` from `values` (one per element of the shard): the inverse of
    /// [`buffer_f32`](Self::buffer_f32), exactly so on values it produced (quantizing a
    /// dequantized block gives back its codes and scale).
    fn pack(&self, values: &[f32], buffer: &mut Buffer) {
        for (i, piece) in self.layout.overlapping(self.shard.clone()) {
            let Some(at) = buffer.at[i] else { continue };
            let local = piece.start - self.shard.start..piece.end - self.shard.start;
            let n = buffer.len[i];
            match &mut buffer.data {
                Data::F32(v) => v[at..at + n].copy_from_slice(&values[local.start..local.start + n]),
                Data::Q8 { signed, codes, scales } => {
                    let s0 = self.blocks.scales[i];
                    for (k, r) in self.blocks.of(&self.layout, i, &piece, piece.start).enumerate() {
                        let part = &values[local.start + r.start..local.start + r.end];
                        scales[s0 + k] = quantize::quantize(part, *signed, &mut codes[at + r.start..at + r.end]);
                    }
                }
            }
        }
    }
}

/// The first and last parameters a segment overlaps.
fn ends(layout: &Layout, range: &Range<usize>) -> (usize, usize) {
    let mut it = layout.overlapping(range.clone()).map(|(i, _)| i);
    let first = it.next().unwrap_or(0);
    (first, it.last().unwrap_or(first))
}

/// Neighbouring parameters of `shard` with the same group and step count, with the step
/// count they are about to take.
fn segments<'a>(layout: &'a Layout, group_of: &'a [usize], steps: &'a [u64], shard: Range<usize>) -> impl Iterator<Item = Run> + 'a {
    let mut pending: Option<Run> = None;
    let mut it = layout.overlapping(shard);
    std::iter::from_fn(move || loop {
        match it.next() {
            Some((i, r)) => {
                let (group, step) = (group_of[i], steps[i] + 1);
                match &mut pending {
                    Some(s) if s.group == group && s.step == step && s.range.end == r.start => s.range.end = r.end,
                    _ => {
                        let done = pending.replace(Run { range: r, group, step });
                        if done.is_some() {
                            return done;
                        }
                    }
                }
            }
            None => return pending.take(),
        }
    })
}

/// The parameters of the segment `range`, each with its range relative to the segment's
/// start; an error if the shard cuts one (whole-matrix rules need them whole).
fn whole_params<'a>(
    layout: &'a Layout,
    range: Range<usize>,
    shard: &Range<usize>,
) -> Result<Vec<(&'a crate::layout::ParamSpec, Range<usize>)>> {
    let start = range.start;
    layout
        .overlapping(range)
        .map(|(i, r)| {
            let spec = layout.param(i);
            if r == spec.range() {
                Ok((spec, r.start - start..r.end - start))
            } else {
                Err(cut(&spec.name, shard))
            }
        })
        .collect()
}

/// The error for a whole-matrix rule whose parameter `name` the shard cuts.
fn cut(name: &str, shard: &Range<usize>) -> OptimError {
    OptimError::InvalidConfig(format!(
        "parameter '{name}' is cut by this optimizer's shard {shard:?}: adafactor needs whole parameters (use ddp, or shards on parameter boundaries)"
    ))
}

/// How buffer `name` is stored: as every group that keeps it says, or an error naming
/// the two rules that disagree.
fn storage(groups: &[ParamGroup], name: &str) -> Result<StateStorage> {
    let mut found: Option<(StateStorage, &str)> = None;
    for g in groups {
        let kernel = g.config.kernel();
        if !kernel.state_buffers().contains(&name) {
            continue;
        }
        let s = kernel.state_storage(name);
        match found {
            Some((t, other)) if t != s => {
                return Err(OptimError::InvalidConfig(format!(
                    "state buffer '{name}' is kept as {t:?} by {other} and as {s:?} by {}: one buffer, one storage",
                    kernel.name()
                )))
            }
            _ => found = Some((s, kernel.name())),
        }
    }
    Ok(found.map_or(StateStorage::F32, |(s, _)| s))
}

/// Every buffer the groups use, each once, in a fixed (sorted) order.
fn buffer_names(groups: &[ParamGroup]) -> Vec<&'static str> {
    let names: std::collections::BTreeSet<&'static str> = groups.iter().flat_map(|g| g.config.kernel().state_buffers()).collect();
    names.into_iter().collect()
}

/// Checks the groups (valid configs, no LBFGS, every parameter in exactly one group)
/// and returns the group of each parameter.
fn assign_groups(layout: &Layout, groups: &[ParamGroup]) -> Result<Vec<usize>> {
    if groups.is_empty() {
        return Err(OptimError::InvalidConfig("an optimizer needs at least one param group".into()));
    }
    let mut group_of = vec![usize::MAX; layout.len()];
    for (gi, g) in groups.iter().enumerate() {
        g.config.validate()?;
        let kernel = g.config.kernel();
        if kernel.needs_closure() {
            return Err(OptimError::InvalidConfig(format!("{} needs a closure: use distoptim_optim::Lbfgs", kernel.name())));
        }
        for &p in &g.params {
            if let Some(spec) = layout.params().get(p) {
                kernel.check_param(spec)?;
            }
            let Some(slot) = group_of.get_mut(p) else {
                return Err(OptimError::InvalidConfig(format!("param group {gi} names parameter #{p}, the layout has {}", layout.len())));
            };
            if *slot != usize::MAX {
                return Err(OptimError::InvalidConfig(format!(
                    "parameter '{}' is in param groups {} and {gi}",
                    layout.param(p).name,
                    *slot
                )));
            }
            *slot = gi;
        }
    }
    if let Some(p) = group_of.iter().position(|&g| g == usize::MAX) {
        return Err(OptimError::InvalidConfig(format!("parameter '{}' is in no param group", layout.param(p).name)));
    }
    Ok(group_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AdamConfig, SgdConfig};
    use crate::kernels::CHUNK;

    /// Three params over three groups with different hyperparameters, sized so buffers span
    /// several kernel chunks and the groups interleave.
    fn setup(adam: bool) -> (Layout, Vec<ParamGroup>) {
        let layout = Layout::new([("a", vec![CHUNK + 123]), ("b", vec![7, 3]), ("c", vec![2 * CHUNK + 5]), ("d", vec![])]).unwrap();
        let cfg = |lr: f64, flag: bool| {
            if adam {
                OptimizerConfig::Adam(AdamConfig { lr, amsgrad: flag, weight_decay: 0.1, ..AdamConfig::adamw() })
            } else {
                OptimizerConfig::Sgd(SgdConfig { lr, momentum: 0.9, nesterov: flag, weight_decay: 0.01, ..Default::default() })
            }
        };
        let groups = vec![
            ParamGroup { params: vec![0, 2], config: cfg(0.01, true) },
            ParamGroup { params: vec![1], config: cfg(0.1, false) },
            ParamGroup { params: vec![3], config: cfg(0.05, false) },
        ];
        (layout, groups)
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn run(opt: &mut Optimizer, params: &mut [f32], steps: std::ops::Range<u32>) {
        let shard = opt.shard();
        for t in steps {
            let g = data(opt.layout().numel(), 100 + t);
            opt.step(params, &g[shard.clone()]).unwrap();
        }
    }

    #[test]
    fn shards_equal_the_whole_buffer_restricted_to_them() {
        for adam in [false, true] {
            let (layout, groups) = setup(adam);
            let n = layout.numel();
            let mut whole = data(n, 1);
            let mut opt = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n).unwrap();
            run(&mut opt, &mut whole, 0..4);
            // Cut points inside params, on param boundaries, and empty shards.
            for cuts in [vec![0, 5000, CHUNK + 123 + 10, n], vec![0, 0, CHUNK + 123, n, n]] {
                let mut pieced = data(n, 1);
                for w in cuts.windows(2) {
                    let mut o = Optimizer::with_groups(layout.clone(), groups.clone(), w[0]..w[1]).unwrap();
                    run(&mut o, &mut pieced[w[0]..w[1]], 0..4);
                    assert_eq!(o.state_elems(), w[1] - w[0]);
                }
                assert!(whole == pieced, "adam={adam} cuts={cuts:?}");
            }
        }
    }

    #[test]
    fn one_and_two_threads_give_the_same_bits() {
        for adam in [false, true] {
            let (layout, groups) = setup(adam);
            let n = layout.numel();
            let result = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let mut p = data(n, 2);
                    let mut o = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n).unwrap();
                    run(&mut o, &mut p, 0..3);
                    (p, o.state_dict())
                })
            };
            assert!(result(1) == result(2), "adam={adam}");
        }
    }

    #[test]
    fn state_dict_round_trip_mid_run_continues_identically() {
        for adam in [false, true] {
            let (layout, groups) = setup(adam);
            let n = layout.numel();
            let mut p = data(n, 3);
            let mut a = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n).unwrap();
            run(&mut a, &mut p, 0..2);
            let json = serde_json::to_string(&a.state_dict()).unwrap();
            let mut b = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n).unwrap();
            b.load_state_dict(&serde_json::from_str(&json).unwrap()).unwrap();
            let mut q = p.clone();
            run(&mut a, &mut p, 2..5);
            run(&mut b, &mut q, 2..5);
            assert!(p == q, "adam={adam}");
            assert_eq!(a.state_dict(), b.state_dict());
        }
    }

    #[test]
    fn mismatched_state_dicts_are_refused_without_change() {
        let (layout, groups) = setup(true);
        let n = layout.numel();
        let mut a = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n).unwrap();
        let before = a.state_dict();
        let other = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n - 1).unwrap().state_dict();
        assert!(matches!(a.load_state_dict(&other), Err(OptimError::StateDict(_))));
        let mut short = before.clone();
        short.buffers.get_mut("exp_avg").unwrap().pop();
        assert!(a.load_state_dict(&short).is_err());
        assert_eq!(a.state_dict(), before);
    }

    #[test]
    fn bad_groups_and_buffers_are_named() {
        let layout = Layout::new([("w", vec![2]), ("b", vec![1])]).unwrap();
        let sgd = OptimizerConfig::Sgd(SgdConfig::default());
        let one = |params: Vec<usize>| vec![ParamGroup { params, config: sgd.clone() }];
        let e = Optimizer::with_groups(layout.clone(), one(vec![0]), 0..3).unwrap_err();
        assert!(e.to_string().contains("'b' is in no param group"), "{e}");
        let e = Optimizer::with_groups(layout.clone(), one(vec![0, 1, 1]), 0..3).unwrap_err();
        assert!(e.to_string().contains("'b' is in param groups"), "{e}");
        let mut o = Optimizer::new(layout, sgd).unwrap();
        let e = o.step(&mut [0.0; 3], &[0.0; 2]).unwrap_err();
        assert!(e.to_string().contains("gradient buffer has 2 elements, expected 3"), "{e}");
    }

    #[test]
    fn adam_matches_a_hand_computed_second_step() {
        // Two steps with g = 1 then g = -1, lr 0.1, default betas, no decay.
        let layout = Layout::new([("x", vec![1])]).unwrap();
        let mut o = Optimizer::new(layout, OptimizerConfig::Adam(AdamConfig { lr: 0.1, ..AdamConfig::adam() })).unwrap();
        let mut p = [0.0f32];
        o.step(&mut p, &[1.0]).unwrap();
        o.step(&mut p, &[-1.0]).unwrap();
        let (m, v): (f64, f64) = (0.9 * 0.1 - 0.1, 0.999 * 0.001 + 0.001);
        let (bc1, bc2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
        let want = -0.1 + -(0.1 / bc1) * m / (v.sqrt() / bc2.sqrt() + 1e-8);
        assert!((p[0] as f64 - want).abs() < 1e-6, "{} vs {want}", p[0]);
        assert_eq!(o.param_step(0), 2);
    }
}

#[cfg(test)]
mod shard_state_tests {
    use super::*;
    use crate::config::{AdamConfig, OptimizerConfig};

    /// Shards stepped separately, consolidated, then restricted to other ranges: the
    /// same state as one optimizer over everything.
    #[test]
    fn consolidate_then_restrict_equals_the_whole() {
        let layout = Layout::new([("a", vec![5]), ("b", vec![4]), ("c", vec![3])]).unwrap();
        let groups = vec![ParamGroup { params: vec![0, 1, 2], config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
        let grads: Vec<f32> = (0..12).map(|i| i as f32 * 0.1 - 0.5).collect();
        let mut whole = Optimizer::with_groups(layout.clone(), groups.clone(), 0..12).unwrap();
        let mut p = vec![1f32; 12];
        whole.step(&mut p, &grads).unwrap();
        let parts: Vec<OptimizerStateDict> = [0..4, 4..9, 9..12]
            .into_iter()
            .map(|r| {
                let mut o = Optimizer::with_groups(layout.clone(), groups.clone(), r.clone()).unwrap();
                o.step(&mut vec![1f32; r.len()], &grads[r]).unwrap();
                o.state_dict()
            })
            .collect();
        let full = OptimizerStateDict::consolidate(&parts).unwrap();
        assert_eq!(full, whole.state_dict());
        let part = full.restrict(3..7).unwrap();
        assert_eq!(part.buffers["exp_avg"], whole.state_dict().buffers["exp_avg"][3..7].to_vec());
        assert_eq!(part.steps, vec![1, 1, 0]);
        assert!(full.restrict(10..13).is_err());
        assert!(OptimizerStateDict::consolidate(&[parts[0].clone(), parts[2].clone()]).is_err());
    }
}

#[cfg(test)]
mod scaled_step_tests {
    use super::*;
    use crate::config::{AdamConfig, OptimizerConfig, SgdConfig};

    /// Clipping fused into the step: the same bits as scaling the gradients first.
    #[test]
    fn step_scaled_equals_scaling_the_buffer_first() {
        let layout = Layout::new([("a", vec![300])]).unwrap();
        let grads: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
        let configs = [
            OptimizerConfig::Adam(AdamConfig { maximize: true, weight_decay: 0.1, ..AdamConfig::adam() }),
            OptimizerConfig::Adam(AdamConfig { amsgrad: true, ..AdamConfig::adamw() }),
            OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.01, ..Default::default() }),
        ];
        for config in configs {
            let (mut a, mut b) = (Optimizer::new(layout.clone(), config.clone()).unwrap(), Optimizer::new(layout.clone(), config).unwrap());
            let (mut pa, mut pb) = (vec![0.5f32; 300], vec![0.5f32; 300]);
            for scale in [0.37f32, 1.0, 0.011] {
                let scaled: Vec<f32> = grads.iter().map(|g| g * scale).collect();
                a.step(&mut pa, &scaled).unwrap();
                b.step_scaled(&mut pb, &grads, scale).unwrap();
                assert_eq!(pa, pb);
            }
        }
    }
}

#[cfg(test)]
mod add_param_group_tests {
    use super::*;
    use crate::config::{AdamConfig, OptimizerConfig, SgdConfig};

    fn grads(n: usize, t: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 13 + t * 5) % 17) as f32 * 0.1 - 0.8).collect()
    }

    /// After the add, the old parameters go on exactly as if nothing was added, and the new
    /// ones exactly as under a fresh optimizer of their own.
    #[test]
    fn old_parameters_keep_their_state_and_new_ones_start_fresh() {
        let adamw = |lr, amsgrad| OptimizerConfig::Adam(AdamConfig { lr, amsgrad, ..AdamConfig::adamw() });
        let sgd = |lr, momentum| OptimizerConfig::Sgd(SgdConfig { lr, momentum, ..Default::default() });
        // The new group may need a buffer the old one did not (amsgrad, momentum).
        for (old_cfg, new_cfg) in [(adamw(0.01, false), adamw(0.05, true)), (sgd(0.1, 0.0), sgd(0.2, 0.9))] {
            let old_layout = Layout::new([("w", vec![4, 5]), ("b", vec![5])]).unwrap();
            let mut grown = Optimizer::new(old_layout.clone(), old_cfg.clone()).unwrap();
            let mut alone = Optimizer::new(old_layout.clone(), old_cfg.clone()).unwrap();
            let mut params: Vec<f32> = (0..25).map(|i| i as f32 * 0.1).collect();
            let mut alone_params = params.clone();
            for t in 0..3 {
                grown.step(&mut params, &grads(25, t)).unwrap();
                alone.step(&mut alone_params, &grads(25, t)).unwrap();
            }
            let added = grown.add_param_group(vec![("head.w".into(), vec![3, 2]), ("head.b".into(), vec![2])], new_cfg.clone()).unwrap();
            assert_eq!(added, vec![2, 3]);
            let mut fresh = Optimizer::new(Layout::new([("head.w", vec![3, 2]), ("head.b", vec![2])]).unwrap(), new_cfg).unwrap();
            params.extend((0..8).map(|i| 1.0 - i as f32 * 0.2));
            let mut fresh_params = params[25..].to_vec();
            for t in 3..6 {
                let g = grads(33, t);
                grown.step(&mut params, &g).unwrap();
                alone.step(&mut alone_params, &g[..25]).unwrap();
                fresh.step(&mut fresh_params, &g[25..]).unwrap();
            }
            assert_eq!(&params[..25], &alone_params[..]);
            assert_eq!(&params[25..], &fresh_params[..]);
            assert_eq!(grown.lrs().len(), 2);
        }
    }

    #[test]
    fn a_bad_group_or_a_middle_shard_is_refused_and_changes_nothing() {
        let layout = Layout::new([("w", vec![10])]).unwrap();
        let mut opt = Optimizer::new(layout.clone(), OptimizerConfig::Adam(AdamConfig::adam())).unwrap();
        let before = opt.state_dict();
        let sgd = OptimizerConfig::Sgd(SgdConfig { lr: -1.0, ..SgdConfig::default() });
        let err = opt.add_param_group(vec![("x".into(), vec![2])], sgd).unwrap_err().to_string();
        assert!(err.contains("invalid learning rate"), "{err}");
        let err = opt.add_param_group(vec![("w".into(), vec![2])], OptimizerConfig::Adam(AdamConfig::adam())).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
        assert_eq!(opt.state_dict(), before);
        let groups = vec![ParamGroup { params: vec![0], config: OptimizerConfig::Adam(AdamConfig::adam()) }];
        let mut middle = Optimizer::with_groups(layout, groups, 2..6).unwrap();
        let err = middle.add_param_group(vec![("x".into(), vec![2])], OptimizerConfig::Adam(AdamConfig::adam())).unwrap_err().to_string();
        assert!(err.contains("consolidate"), "{err}");
    }

    /// 8-bit AdamW over shards cut between blocks: the bits of one process; 2 bytes of
    /// state per quantized element plus a scale per block; a state dict (the moments as
    /// f32) restores the same codes, so a resumed run continues bit for bit.
    #[test]
    fn adamw8bit_shards_and_resumes_exactly_and_refuses_a_cut_block() {
        use crate::kernels::{Adamw8bitConfig, CHUNK};
        let layout = Layout::new([("w", vec![3 * CHUNK + 100]), ("b", vec![37]), ("v", vec![700])]).unwrap();
        let n = layout.numel();
        let q = OptimizerConfig::Adamw8bit(Adamw8bitConfig { block_size: 256, ..Adamw8bitConfig::default() });
        let groups = vec![
            ParamGroup { params: vec![0, 2], config: q },
            ParamGroup { params: vec![1], config: OptimizerConfig::Adam(AdamConfig::adamw()) },
        ];
        let grads = |t: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 + t * 13) % 29) as f32 * 0.01 - 0.14).collect() };
        let mut whole = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n).unwrap();
        let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut parts: Vec<(Optimizer, Vec<f32>)> =
            [0..256 * 100, 256 * 100..layout.param(1).range().start + 20, layout.param(1).range().start + 20..n]
                .into_iter()
                .map(|r| (Optimizer::with_groups(layout.clone(), groups.clone(), r.clone()).unwrap(), p[r].to_vec()))
                .collect();
        for t in 0..4 {
            let g = grads(t);
            whole.step(&mut p, &g).unwrap();
            for (opt, mine) in &mut parts {
                opt.step(mine, &g[opt.shard()]).unwrap();
            }
        }
        let joined: Vec<f32> = parts.iter().flat_map(|(_, x)| x.clone()).collect();
        assert!(joined.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()));
        // Codes and scales: (1 + 4/256) bytes per element and moment for the 8-bit
        // group's parameters, f32 moments for AdamW's 37 elements only.
        let quantized = (3 * CHUNK + 100 + 700) as u64;
        let scales = ((3 * CHUNK + 100).div_ceil(256) + 700usize.div_ceil(256)) as u64;
        assert_eq!(whole.state_bytes(), 2 * (quantized + 4 * scales) + 2 * 4 * 37);
        assert_eq!(Optimizer::planned_state_bytes(&layout, &groups, 0..n).unwrap(), whole.state_bytes());
        for (opt, _) in &parts {
            assert_eq!(Optimizer::planned_state_bytes(&layout, &groups, opt.shard()).unwrap(), opt.state_bytes());
        }

        // Resume from the state dict: the same bits as going on.
        let sd = whole.state_dict();
        let mut resumed = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n).unwrap();
        resumed.load_state_dict(&sd).unwrap();
        assert_eq!(resumed.state_dict(), sd);
        let mut q = p.clone();
        for t in 4..7 {
            whole.step(&mut p, &grads(t)).unwrap();
            resumed.step(&mut q, &grads(t)).unwrap();
        }
        assert!(p.iter().zip(&q).all(|(a, b)| a.to_bits() == b.to_bits()));

        let err = Optimizer::with_groups(layout, groups, 100..n).unwrap_err().to_string();
        assert!(err.contains("'w'") && err.contains("element 100") && err.contains("multiples of 256"), "{err}");
    }
}
