//! The merge-method trait. A method is one file under `methods/` implementing [`Kernel`]: the
//! statistics it needs, requested stage by stage from a small set of shared kinds, and its chunk
//! kernel given those statistics. The engine (`pipeline/kernel.rs`) schedules the passes from the
//! requests — one pass per stage, shared by every parameter set and tensor that asks for it — so
//! a new method touches its own file and a registry line (`methods/registry.rs`), never the
//! engine.
//!
//! Statistics are per tensor. A stage is either
//! - [`Stage::Sums`]: `slots` f64 accumulators per unit (the whole tensor, or each row along
//!   the last dimension), filled by [`Kernel::accumulate`] chunk by chunk and summed in chunk
//!   order (so a thread count cannot change them); for whole-tensor units every chunk also sees
//!   the sums of the chunks before it (ties at a cut are ranked by position with them), or
//! - [`Stage::Select`]: exact order statistics of per-element scores ([`Kernel::score`], one
//!   or more rows of them) over the tensor, at the ascending ranks [`Kernel::ranks`] asks for,
//!   or
//! - [`Stage::Trim`]: per task, the magnitude |τ_t| at a rank (a trim threshold), and with the
//!   thresholds the sign tally Σ sign(Σ_t τ_t·[|τ_t| ≥ thr_t]) — TIES's statistics, which the
//!   engine gathers in one windowed pass where the sampled windows decide the tally.
//!
//! A method whose statistics span the whole model ([`Kernel::scope`] = [`Scope::Global`]) is
//! asked as if the model were one flat tensor, and every tensor sees the same results.
//! A method that ranks within rows ([`Kernel::rows`]) gets, for rows longer than a chunk, the
//! exact position-ranked cuts of each piece ([`TensorStats::cuts`]) before its own stages.
//!
//! Stages may depend on every earlier stage's results, and a method may stop asking per tensor
//! (an iterative mean that has converged), so the number of passes is the method's to decide.

use std::collections::BTreeMap;
use std::fmt::Debug;

use super::breadcrumbs::Piece;
use super::{Rows, Scope};
use crate::plan::TensorPlan;

/// What a kernel reads besides the deltas τ_t = θ_t − θ_base (always there, unweighted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inputs {
    Deltas,
    /// The models' values θ_t as well (interpolations between models, not between deltas).
    Values,
}

impl Inputs {
    /// Deltas for a method interpolating deltas from a base, values for one without a base.
    pub fn relative(relative: bool) -> Inputs {
        if relative {
            Inputs::Deltas
        } else {
            Inputs::Values
        }
    }
}

/// What a kernel writes into M.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The merged delta: the model is θ_base + λ·M.
    Delta,
    /// The merged values themselves (mergekit's arithmetic, written as it is at λ = 1; as
    /// M − θ_base for any other λ and in Weight Weaving's A*).
    Value,
}

impl Output {
    /// A delta for a method working on deltas from a base, the values for one without a base.
    pub fn relative(relative: bool) -> Output {
        if relative {
            Output::Delta
        } else {
            Output::Value
        }
    }
}

/// The unit a [`Stage::Sums`] accumulates over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Tensor,
    /// Rows along the last dimension (a 0-d or 1-d tensor is one row).
    Row,
    /// Vectors along the first dimension: elements whose index agrees modulo
    /// numel / `shape[0]` (a 0-d or 1-d tensor is one).
    Column,
}

impl Unit {
    /// How many units tensor `t` has.
    pub fn count(self, t: &TensorPlan) -> usize {
        match self {
            Unit::Tensor => 1,
            Unit::Row => rows_of(t),
            Unit::Column => columns_of(t),
        }
    }

    /// The unit of element `e` of tensor `t`.
    #[inline(always)]
    pub fn of(self, t: &TensorPlan, e: usize) -> usize {
        match self {
            Unit::Tensor => 0,
            Unit::Row => e / t.row_len(),
            Unit::Column => e % columns_of(t),
        }
    }
}

/// One statistics stage of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Sums {
        unit: Unit,
        slots: usize,
    },
    /// Like [`Stage::Sums`], but the accumulators keep the largest value (they start at −∞;
    /// a max is order-free, so no chunk order is needed).
    Maxes {
        unit: Unit,
        slots: usize,
    },
    /// Order statistics of `rows` rows of scores.
    Select {
        rows: usize,
    },
    /// Per-task trim thresholds of |τ_t| (one rank per task at most; none keeps every entry)
    /// and the sign tally of what they keep.
    Trim,
}

/// A stage's results.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Found {
    /// `units × slots` sums, and (whole-tensor units) the sums before each chunk by its start.
    Sums {
        slots: usize,
        sums: Vec<f64>,
        before: std::collections::BTreeMap<usize, Vec<f64>>,
    },
    /// The values at the requested ranks, in request order.
    Select(Vec<f32>),
    /// Per task the threshold (0 where nothing is trimmed), and Σ sign(Σ_t trimmed_t).
    Trim { thr: Vec<f32>, count: i64 },
}

/// The statistics of one tensor for one parameter set: every finished stage's results.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorStats {
    pub stages: Vec<Found>,
    /// Per task, the cuts of the piece of a long row starting at each chunk start (rows
    /// longer than a chunk, for a method ranking within rows).
    pub cuts: BTreeMap<usize, Vec<Option<Piece>>>,
    /// Per-element state the method keeps from one statistics pass to the next.
    #[serde(skip)]
    pub held: Held,
}

/// One `u16` per element of a tensor, kept by a method between its statistics passes (an
/// iterate that mergekit rounds to bf16/f16 at every step, which no statistic can rebuild), and
/// shared by every parameter set the statistics serve: clones share it. Allocated on first use.
/// Chunks are disjoint, so each element has one writer per pass. Not serialised: a cluster unit
/// gathers its own tensors' per-tensor statistics.
#[derive(Clone, Default)]
pub struct Held(std::sync::OnceLock<std::sync::Arc<Vec<std::sync::atomic::AtomicU16>>>);

impl Held {
    /// The state of a tensor of `n` elements (zeros until written).
    pub fn of(&self, n: usize) -> &[std::sync::atomic::AtomicU16] {
        self.0
            .get_or_init(|| std::sync::Arc::new((0..n).map(|_| Default::default()).collect()))
    }
}

impl Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({} elements)", self.0.get().map_or(0, |v| v.len()))
    }
}

/// State is not a statistic: two sets' statistics agree whatever their methods hold.
impl PartialEq for Held {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl TensorStats {
    /// Stage `s`'s sums of unit `u` (a tensor has one unit, index 0).
    pub fn sums(&self, s: usize, u: usize) -> &[f64] {
        match &self.stages[s] {
            Found::Sums { slots, sums, .. } => &sums[u * slots..(u + 1) * slots],
            _ => panic!("stage {s} is not a sums stage"),
        }
    }

    /// Stage `s`'s whole-tensor sums over the chunks before the one starting at `start`.
    pub fn before(&self, s: usize, start: usize) -> &[f64] {
        match &self.stages[s] {
            Found::Sums { before, .. } => &before[&start],
            _ => panic!("stage {s} is not a sums stage"),
        }
    }

    /// Stage `s`'s order statistics.
    pub fn selected(&self, s: usize) -> &[f32] {
        match &self.stages[s] {
            Found::Select(v) => v,
            _ => panic!("stage {s} is not a select"),
        }
    }

    /// Stage `s`'s trim thresholds and sign tally.
    pub fn trim(&self, s: usize) -> (&[f32], i64) {
        match &self.stages[s] {
            Found::Trim { thr, count } => (thr, *count),
            _ => panic!("stage {s} is not a trim"),
        }
    }
}

/// One chunk of one tensor as a kernel sees it. Slices are `n` long.
pub struct ChunkIn<'a> {
    pub tensor: &'a TensorPlan,
    /// The chunk's first element within the tensor.
    pub start: usize,
    pub n: usize,
    pub base: &'a [f32],
    /// τ_t, unweighted (the kernel applies `weights` as its method does).
    pub deltas: &'a [&'a [f32]],
    /// θ_t (only with [`Inputs::Values`]; empty otherwise).
    pub values: &'a [&'a [f32]],
    /// The set's per-model weights (ones where none are given).
    pub weights: &'a [f32],
    /// M of this chunk computed outside the core (the SVD methods' 2-D tensors), if any.
    pub given: Option<&'a [f32]>,
    pub seed: u64,
}

impl ChunkIn<'_> {
    pub fn tasks(&self) -> usize {
        self.deltas.len()
    }

    /// The row (along the last dimension) element `i` of the chunk belongs to.
    #[inline]
    pub fn row_of(&self, i: usize) -> usize {
        (self.start + i) / self.tensor.row_len()
    }

    /// The chunk's pieces of rows (along the last dimension): each row's index and the range of
    /// its elements within the chunk, in order. Kernels loop over these rather than divide per
    /// element, and look a row's statistics up once.
    pub fn row_spans(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        let len = self.tensor.row_len().max(1);
        let mut i = 0;
        std::iter::from_fn(move || {
            (i < self.n).then(|| {
                let row = (self.start + i) / len;
                let end = ((row + 1) * len - self.start).min(self.n);
                let span = (row, i..end);
                i = end;
                span
            })
        })
    }
}

/// Chunk-sized scratch a kernel may use freely.
pub struct Scratch<'a> {
    pub a: &'a mut Vec<f32>,
    pub b: &'a mut Vec<f32>,
    pub per_task: &'a mut Vec<Vec<f32>>,
    pub keys: &'a mut Vec<u64>,
    pub wide: &'a mut Vec<f64>,
}

/// A merge method: f_merge(τ_1..τ_T) → M, with the statistics it needs.
pub trait Kernel: Send + Sync + Debug {
    /// The name a recipe gives.
    fn name(&self) -> &'static str;

    /// The effective parameters, recorded in the output's metadata.
    fn params_json(&self) -> serde_json::Value;

    fn inputs(&self) -> Inputs {
        Inputs::Deltas
    }

    /// Whether, with [`Inputs::Values`], the kernel takes θ_t − θ_base from `ChunkIn::deltas`
    /// when `ChunkIn::values` comes empty, for a tensor whose values are all `loaded` values
    /// (stored plain in that dtype, or rounded to it as they load) and whose deltas the load
    /// formed as the f32 differences of those values (`Engine::takes_values_from_deltas`). For
    /// mergekit's arithmetic in that dtype, rounding such a value to it changes nothing, so the
    /// values would only repeat the deltas' decoding.
    fn values_from_deltas(&self, _loaded: crate::dtype::DType) -> bool {
        false
    }

    /// Whether the kernel reads `ChunkIn::deltas` (with [`Inputs::Values`], a kernel that reads
    /// only the values and the base returns false, and a plain merge at λ = 1 then skips
    /// forming the deltas).
    fn reads_deltas(&self) -> bool {
        true
    }

    /// Whether the kernel sees the deltas as the papers' methods take them: τ'_t = w_t·τ_t (the
    /// set's weights), after [`Kernel::dare`] — the same buffers Weight Weaving's A* is made
    /// of. Otherwise (mergekit's methods) the deltas come unweighted with the weights beside.
    fn weighted(&self) -> bool {
        false
    }

    /// DARE's random drop and rescale, applied by the engine to every weighted delta first.
    fn dare(&self) -> Option<&super::DareParams> {
        None
    }

    /// Whether M is exactly Σ_t τ'_t (the mean pool then reuses it instead of summing again).
    fn sum_of_deltas(&self) -> bool {
        false
    }

    /// Whether M of 2-D tensors comes from outside the core (the torch backend's SVD methods).
    fn external(&self) -> bool {
        false
    }

    /// Refuses per-model weights the method cannot use (checked before any work).
    /// Whether the method takes per-model weights. mergekit's methods without a `weight`
    /// parameter do not: weights given to them (MetaGPT's too) are an error, never ignored.
    fn takes_weights(&self) -> bool {
        true
    }

    fn check_weights(&self, _weights: &[f32]) -> crate::error::Result<()> {
        Ok(())
    }

    fn output(&self) -> Output {
        Output::Delta
    }

    /// The rows the method ranks within. [`Rows::Slab`]: every chunk holds whole rows, and of a
    /// tensor of 3 or more dimensions whole slices along dimension 0 (the chunk size grows to
    /// hold the longest). [`Rows::Last`] and [`Rows::Tensor`]: chunks hold whole rows where a
    /// row fits one, and a longer row comes in pieces with their cuts
    /// ([`TensorStats::cuts`], from [`Kernel::kept_ranks`]).
    fn rows(&self) -> Rows {
        Rows::None
    }

    /// The descending ranks [g, g + k) of |τ_t| task `t` keeps of a row of `n` (`None`: none),
    /// for a method ranking within rows.
    fn kept_ranks(&self, n: usize, _t: usize) -> Option<(u64, u64)> {
        Some((0, n as u64))
    }

    /// Where the statistics are gathered: per tensor, or over the whole model as one tensor.
    fn scope(&self) -> Scope {
        Scope::Tensor
    }

    /// Checks the number of fine-tunes (and per-model lists) before any work.
    fn check_tasks(&self, _tasks: usize) -> crate::error::Result<()> {
        Ok(())
    }

    /// Refuses a tensor the method cannot merge exactly (checked before any work).
    fn check_tensor(&self, _t: &TensorPlan) -> crate::error::Result<()> {
        Ok(())
    }

    /// Whether the output pass may run with statistics guessed from a sample and rewrite
    /// afterwards the elements [`crate::methods::sign_tally::SignTally::observe_marking`] marks: M
    /// must be settled elsewhere by any thresholds inside the sampled windows
    /// (`pipeline/speculate.rs`). Global TIES only.
    fn speculates(&self) -> bool {
        false
    }

    /// Whether [`Kernel::next_stage`] ever asks for a stage.
    fn needs_statistics(&self) -> bool {
        true
    }

    /// A rough count of statistics passes, for progress reports.
    fn passes(&self) -> u64 {
        u64::from(self.needs_statistics())
    }

    /// Statistics this parameter set shares with another that returns the same key (the
    /// engine adds the set's own weights where it has them).
    fn stats_key(&self) -> String {
        self.params_json().to_string()
    }

    /// Select rows this parameter set shares with another whose key agrees at this stage
    /// (`done` finished; the ranks may differ: one TIES select serves every density).
    fn select_key(&self, _done: &TensorStats) -> String {
        self.stats_key()
    }

    /// The stage after `done` finished stages of tensor `t` (merging `tasks` fine-tunes), or
    /// None when M can be computed.
    fn next_stage(&self, _t: &TensorPlan, _tasks: usize, _done: &TensorStats) -> Option<Stage> {
        None
    }

    /// [`Kernel::next_stage`], knowing whether every chunk of the pass holds whole rows of the
    /// tensor (along the last dimension; [`Rows::Whole`] asks for such chunks where rows fit):
    /// then a row's statistics can be finished within its chunk.
    fn next_stage_for(
        &self,
        t: &TensorPlan,
        tasks: usize,
        done: &TensorStats,
        whole_rows: bool,
    ) -> Option<Stage> {
        let _ = whole_rows;
        self.next_stage(t, tasks, done)
    }

    /// [`Kernel::next_stage_for`], knowing the set's `weights` (one per fine-tune): for a method
    /// whose stages guess scalars that depend on them, to see whether the guesses held.
    fn next_stage_weighted(
        &self,
        t: &TensorPlan,
        tasks: usize,
        weights: &[f32],
        done: &TensorStats,
        whole_rows: bool,
    ) -> Option<Stage> {
        let _ = weights;
        self.next_stage_for(t, tasks, done, whole_rows)
    }

    /// Refuses statistics the method cannot merge from (mergekit raises there), after the
    /// last stage and before any output. `weights` are the set's, one per fine-tune.
    fn check_stats(
        &self,
        _t: &TensorPlan,
        _weights: &[f32],
        _st: &TensorStats,
    ) -> crate::error::Result<()> {
        Ok(())
    }

    /// Adds a chunk's contribution to a [`Stage::Sums`]: `acc` holds `slots` values per unit
    /// the chunk touches, the first being the unit of its first element.
    fn accumulate(&self, _x: &ChunkIn, _st: &TensorStats, _scratch: Scratch, _acc: &mut [f64]) {}

    /// The per-element scores a [`Stage::Select`] ranks, row `r` into `out[r][..n]`; returns
    /// how many each row holds. With a `floor`, a score the kernel can show to be below
    /// `floor[r]` may be written as −∞ instead, or left out: every row then holds its other
    /// scores first, as many in each row (the select only counts the ones left out, in
    /// any order). Without a floor, every score is exact and in place (returns n).
    fn score(
        &self,
        x: &ChunkIn,
        _st: &TensorStats,
        _s: Scratch,
        _floor: Option<&[f32]>,
        _out: &mut [Vec<f32>],
    ) -> usize {
        x.n
    }

    /// The ascending ranks a [`Stage::Select`] or [`Stage::Trim`] over tensor `t` wants, as
    /// (row, rank); a trim's rows are the tasks.
    fn ranks(&self, _t: &TensorPlan, _tasks: usize, _st: &TensorStats) -> Vec<(usize, u64)> {
        Vec::new()
    }

    /// A [`Stage::Select`] ranked from the top of the nonzero values instead of by
    /// [`Kernel::ranks`]: Some(f) asks, for each of its rows, for the ⌊nonzero · f⌋-th largest
    /// score (+∞ when that is none), the row's count of nonzero scores taken in the same pass
    /// (`pipeline/top_nonzero.rs`). The engine records that stage as two: a one-slot
    /// [`Found::Sums`] per row holding the count, then the [`Found::Select`].
    fn top_of_nonzero(&self, _st: &TensorStats) -> Option<f32> {
        None
    }

    /// M of one chunk into `m[..n]`.
    fn merge(&self, x: &ChunkIn, st: &TensorStats, scratch: Scratch, m: &mut [f32]);
}

/// Vectors along the first dimension of tensor `t`.
pub fn columns_of(t: &TensorPlan) -> usize {
    match t.shape.first() {
        Some(&d) if d > 0 && t.shape.len() > 1 => t.numel / d,
        _ => 1,
    }
}

/// Rows of tensor `t` (along the last dimension; a 0-d or 1-d tensor is one row).
pub fn rows_of(t: &TensorPlan) -> usize {
    t.numel.div_ceil(t.row_len()).max(1)
}
