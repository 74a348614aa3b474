//! Measured tuning. Per problem (one N, K, experts and M bucket): the cost model ranks the legal
//! configurations; a share of them is timed (each checked against the CPU reference first, by
//! the [`Measure`] at hand); the search seeds with the model's best and the best of each kernel
//! family, then walks the neighbourhood of the fastest so far; the finalists are re-timed side by
//! side (timings taken minutes apart on a warming GPU do not compare) and the fastest is chosen.
//! `--exhaustive` times every legal configuration, and also reports what the pruned search and
//! the model alone would have chosen, re-timed among the same finalists.

use std::collections::{HashMap, HashSet};
use std::fmt;

use fp8forge_kernels::{GemmConfig, GemmShape, GpuArch, KernelError, KernelKind, Multicast, Why, search_space};
use serde::{Serialize, Serializer};

use crate::gpu::GpuSpec;
use crate::model::rank;
use crate::table::{Entry, Problem, SkippedShape, Source, Table, TableError, config_id};

/// The time of one configuration in microseconds, or why it has none.
pub type Timing = Result<f64, Untimed>;

/// Why a candidate configuration has no time.
#[derive(Debug, thiserror::Error)]
pub enum Untimed {
    /// It could not be compiled (or loaded) for the GPU.
    #[error("compile: {0}")]
    Compile(KernelError),
    /// It ran and failed its check against the CPU reference, or could not run; the harness's
    /// reason.
    #[error("{0}")]
    Failed(String),
    /// The harness passed it but reported no time.
    #[error("no time")]
    NoTime,
    /// The harness returned no row for it.
    #[error("not measured")]
    NotMeasured,
    /// The measurer returned fewer results than it was given configurations.
    #[error("no result")]
    NoResult,
    /// A time that is not a positive finite number.
    #[error("invalid time {0}")]
    InvalidTime(f64),
    /// Replaying an exhaustive sweep for the pruned search: the candidate failed in the sweep.
    #[error("failed in the sweep")]
    FailedInSweep,
    /// A finalist that had a time in the search and none when re-timed (a race shows up so).
    #[error("re-timing: {0}")]
    Retiming(Box<Untimed>),
}

impl Serialize for Untimed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the tuner needs from a GPU.
pub trait Measure {
    /// Checks each of `configs` on `problem` against the CPU reference, then times those that
    /// pass, interleaved in the same replays. One result per configuration, in order.
    ///
    /// # Errors
    ///
    /// A failure that stops the whole problem (no device memory, a lost device).
    fn measure(&mut self, problem: &Problem, configs: &[GemmConfig]) -> Result<Vec<Timing>, TuneError>;
}

/// Why tuning (or a benchmark) stopped.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    /// The GPU could not be opened (no CUDA driver, no device).
    #[error(transparent)]
    OpenDevice(KernelError),
    /// The GPU, its driver or a kernel library failed, or the GPU is not one the kernels run on.
    #[error(transparent)]
    Device(#[from] KernelError),
    /// The GPU present is not in the spec table, whose figures the cost model needs.
    #[error(
        "{name} ({sms} SMs, compute capability {major}.{minor}) is not in the GPU table \
         (h100-sxm, h100-pcie, h800-sxm, h800-pcie, h200, h20)"
    )]
    UnknownGpu {
        /// The driver's name of the device.
        name: String,
        /// Its multiprocessors.
        sms: u32,
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
    },
    /// A table for one GPU was asked of a measured run on another.
    #[error("asked for {asked} but the GPU here is {found} ({name})")]
    OtherGpu {
        /// The GPU id asked for.
        asked: String,
        /// The GPU id present.
        found: String,
        /// The driver's name of the device present.
        name: String,
    },
    /// Every candidate failed its check or could not run.
    #[error("{problem}: no configuration passed its check ({failures} failed; first: {first})")]
    NothingPassed {
        /// The problem.
        problem: String,
        /// Candidates that failed.
        failures: usize,
        /// The first failure.
        first: String,
    },
    /// The search space has nothing legal for the problem.
    #[error("{0}: no legal configuration")]
    NoCandidate(String),
    /// None of the shapes asked for is one any kernel can run.
    #[error(
        "nothing to tune: none of the {shapes} shape(s) is legal for any kernel{}; no table written",
        first_skipped(.skipped)
    )]
    NothingToTune {
        /// The shapes asked for.
        shapes: usize,
        /// Why each was left out.
        skipped: Vec<SkippedShape>,
    },
    /// The cost model found no legal configuration for any problem on the GPU.
    #[error("nothing to tune: no kernel configuration is legal for these shapes on {gpu}; no table written")]
    NoLegalConfiguration {
        /// The GPU id.
        gpu: String,
    },
    /// The share of candidates to time is not in (0, 1].
    #[error("budget {0} must be in (0, 1]")]
    Budget(f64),
    /// An M bucket of zero rows.
    #[error("M values must be positive")]
    ZeroM,
    /// A shape to benchmark that no kernel can run.
    #[error("shape {shape}: {why}")]
    Shape {
        /// The shape.
        shape: GemmShape,
        /// Why.
        why: Why,
    },
    /// A tuning table could not be read, merged or written.
    #[error(transparent)]
    Table(#[from] TableError),
    /// Saving the table failed (the caller's error, kept whole).
    #[error("{0}")]
    Save(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// `" (first reason, ...)"` for [`TuneError::NothingToTune`], or nothing.
fn first_skipped(skipped: &[SkippedShape]) -> String {
    match skipped {
        [] => String::new(),
        [one] => format!(" ({one})"),
        [first, ..] => format!(" ({first}, ...)"),
    }
}

impl TuneError {
    /// True when the user's input is at fault (an option, a shape, a table, the GPU asked for):
    /// the CLI exits 2 for these, 1 for a failure of the machine.
    pub fn is_bad_input(&self) -> bool {
        match self {
            TuneError::OpenDevice(e) | TuneError::Device(e) => e.is_bad_input(),
            TuneError::Table(e) => e.is_bad_input(),
            TuneError::OtherGpu { .. }
            | TuneError::NothingToTune { .. }
            | TuneError::NoLegalConfiguration { .. }
            | TuneError::Budget(_)
            | TuneError::ZeroM
            | TuneError::Shape { .. } => true,
            TuneError::UnknownGpu { .. }
            | TuneError::NothingPassed { .. }
            | TuneError::NoCandidate(_)
            | TuneError::Save(_) => false,
        }
    }
}

/// How much to time.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// Share of the legal candidates the pruned search times (at least [`MIN_TIMED`]).
    pub budget: f64,
    /// Time every legal candidate.
    pub exhaustive: bool,
    /// The fastest candidates re-timed side by side at the end.
    pub finalists: usize,
    /// Candidates timed together in one batch.
    pub batch: usize,
    /// [`tune_all`]: skip the problems the table already holds as measured.
    pub resume: bool,
}

/// The least number of candidates the pruned search times (fewer when fewer are legal).
pub const MIN_TIMED: usize = 4;

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions { budget: 0.15, exhaustive: false, finalists: 3, batch: 8, resume: false }
    }
}

impl TuneOptions {
    /// Checks the options: the budget is a share in (0, 1].
    ///
    /// # Errors
    ///
    /// [`TuneError::Budget`].
    pub fn validate(&self) -> Result<(), TuneError> {
        if self.budget > 0.0 && self.budget <= 1.0 { Ok(()) } else { Err(TuneError::Budget(self.budget)) }
    }
}

/// One configuration's time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timed {
    /// The configuration.
    #[serde(with = "config_id")]
    pub config: GemmConfig,
    /// Microseconds.
    pub us: f64,
}

/// A candidate with no time, and why (in JSON: `[id, why]`).
#[derive(Debug, Serialize)]
pub struct CandidateFailure(#[serde(with = "config_id")] pub GemmConfig, pub Untimed);

impl fmt::Display for CandidateFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0, self.1)
    }
}

/// What tuning one problem found.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// The problem.
    pub problem: Problem,
    /// The chosen configuration.
    #[serde(with = "config_id")]
    pub config: GemmConfig,
    /// Its time in the finalists' round, microseconds.
    pub us: f64,
    /// Its TFLOP/s.
    pub tflops: f64,
    /// Legal candidates.
    pub candidates: usize,
    /// Candidates timed by the search (the finalists' re-timing not counted again).
    pub timed: usize,
    /// The cost model's first choice and its time in the finalists' round (none when it failed).
    #[serde(with = "config_id")]
    pub model_pick: GemmConfig,
    /// See `model_pick`.
    pub model_pick_us: Option<f64>,
    /// Exhaustive runs: what the pruned search picks from the same timings, and its time in the
    /// finalists' round.
    #[serde(serialize_with = "config_id::serialize_option")]
    pub pruned_pick: Option<GemmConfig>,
    /// See `pruned_pick`.
    pub pruned_pick_us: Option<f64>,
    /// Candidates with no time, and why.
    pub failures: Vec<CandidateFailure>,
    /// The finalists' round.
    pub finalists: Vec<Timed>,
    /// Every time the search took, fastest first.
    pub timings: Vec<Timed>,
}

/// What the search learned so far.
#[derive(Default)]
struct Log {
    tried: HashSet<GemmConfig>,
    times: HashMap<GemmConfig, f64>,
    failures: Vec<CandidateFailure>,
}

impl Log {
    fn record(&mut self, configs: &[GemmConfig], timings: Vec<Timing>) {
        let mut timings = timings.into_iter();
        for c in configs {
            // Every candidate counts as tried, even one a faulty measurer gave no result for.
            self.tried.insert(*c);
            match timings.next().unwrap_or(Err(Untimed::NoResult)) {
                Ok(us) if us.is_finite() && us > 0.0 => {
                    self.times.insert(*c, us);
                }
                Ok(us) => self.failures.push(CandidateFailure(*c, Untimed::InvalidTime(us))),
                Err(why) => self.failures.push(CandidateFailure(*c, why)),
            }
        }
    }

    /// Measured configurations, fastest first (ties by id, so the order is deterministic).
    fn fastest(&self) -> Vec<(GemmConfig, f64)> {
        let mut v: Vec<(GemmConfig, f64)> = self.times.iter().map(|(c, t)| (*c, *t)).collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.id().cmp(&b.0.id())));
        v
    }

    /// [`TuneError::NothingPassed`] for `problem`, naming the `last` or the first failure.
    fn nothing_passed(&self, problem: &Problem, last: bool) -> TuneError {
        let named = if last { self.failures.last() } else { self.failures.first() };
        TuneError::NothingPassed {
            problem: problem.to_string(),
            failures: self.failures.len(),
            first: named.map(|f| f.to_string()).unwrap_or_default(),
        }
    }
}

/// The family a configuration belongs to: the search times the model's best of each.
fn family(c: &GemmConfig) -> (bool, u32, Multicast) {
    (matches!(c.kind, KernelKind::Wgmma), c.block_m, c.multicast)
}

/// How far apart two configurations are: one step per knob turned (BLOCK_N by 8, one BLOCK_M
/// doubling, the pipeline depth, the multicast, the warp layout); `None` across kernel kinds.
fn distance(a: &GemmConfig, b: &GemmConfig) -> Option<u32> {
    let warps = |c: &GemmConfig| match c.kind {
        KernelKind::MmaSync { warps_m, warps_n } => Some((warps_m, warps_n)),
        KernelKind::Wgmma => None,
    };
    if warps(a).is_some() != warps(b).is_some() {
        return None;
    }
    let bm = a.block_m.max(b.block_m) / a.block_m.min(b.block_m).max(1);
    Some(
        bm.trailing_zeros()
            + a.block_n.abs_diff(b.block_n).div_ceil(8)
            + u32::from(a.stages != b.stages)
            + u32::from(a.multicast != b.multicast)
            + u32::from(a.swizzle != b.swizzle)
            + u32::from(warps(a) != warps(b)),
    )
}

/// Times a batch of candidates (the [`Measure`], or a replay of earlier timings).
type TimeFn<'a> = dyn FnMut(&[GemmConfig]) -> Result<Vec<Timing>, TuneError> + 'a;

/// Candidates within this many steps of a centre of the search count as its neighbours.
const NEIGHBOURHOOD: u32 = 2;

/// The pruned search over `ranked` (best predicted first), timing at most `budget` candidates.
fn search(ranked: &[GemmConfig], budget: usize, batch: usize, time: &mut TimeFn<'_>) -> Result<Log, TuneError> {
    let mut log = Log::default();
    let batch = batch.max(1);
    // Seed: the model's best three, then the model's best of every family.
    let seed_n = budget.div_ceil(2).max(1);
    let mut seed: Vec<GemmConfig> = ranked.iter().take(3).copied().collect();
    let mut families = HashSet::new();
    for c in ranked {
        if families.insert(family(c)) && !seed.contains(c) {
            seed.push(*c);
        }
    }
    seed.truncate(seed_n);
    for chunk in seed.chunks(batch) {
        let t = time(chunk)?;
        log.record(chunk, t);
    }
    // Refine: the untried neighbours of the centres (the two fastest, and the fastest of each of
    // the three fastest families), best predicted first; when there are none, the next best
    // predicted.
    while log.tried.len() < budget.min(ranked.len()) {
        let left = budget - log.tried.len();
        let fastest = log.fastest();
        let mut centres: Vec<GemmConfig> = fastest.iter().take(2).map(|(c, _)| *c).collect();
        let mut families = Vec::new();
        for (c, _) in &fastest {
            if families.len() < 3 && !families.contains(&family(c)) {
                families.push(family(c));
                centres.push(*c);
            }
        }
        let untried = || ranked.iter().filter(|c| !log.tried.contains(c));
        // Nearest first; among equally near, best predicted first (the sort is stable).
        let mut near: Vec<(u32, GemmConfig)> = untried()
            .filter_map(|c| centres.iter().filter_map(|x| distance(x, c)).min().map(|d| (d, *c)))
            .filter(|(d, _)| *d <= NEIGHBOURHOOD)
            .collect();
        near.sort_by_key(|(d, _)| *d);
        let near: Vec<GemmConfig> = near.into_iter().take(left.min(batch)).map(|(_, c)| c).collect();
        let next = if near.is_empty() { untried().take(left.min(batch)).copied().collect() } else { near };
        let t = time(&next)?;
        log.record(&next, t);
    }
    Ok(log)
}

/// Times every one of `ranked` (`--exhaustive`), then replays those timings through the pruned
/// search to learn what it would have picked.
fn sweep(
    ranked: &[GemmConfig],
    budget: usize,
    batch: usize,
    time: &mut TimeFn<'_>,
) -> Result<(Log, Option<GemmConfig>), TuneError> {
    let mut log = Log::default();
    for chunk in ranked.chunks(batch.max(1) * 4) {
        let t = time(chunk)?;
        log.record(chunk, t);
    }
    let mut replay = |configs: &[GemmConfig]| -> Result<Vec<Timing>, TuneError> {
        Ok(configs.iter().map(|c| log.times.get(c).copied().ok_or(Untimed::FailedInSweep)).collect())
    };
    let pruned = search(ranked, budget, batch, &mut replay)?;
    let pick = pruned.fastest().first().map(|(c, _)| *c);
    Ok((log, pick))
}

/// The finalists' round: `finalists` re-timed side by side, fastest first. A finalist with no
/// time now (a race shows up this way) is logged as a failure and never chosen.
fn retime(
    problem: &Problem,
    finalists: &[GemmConfig],
    time: &mut TimeFn<'_>,
    log: &mut Log,
) -> Result<Vec<(GemmConfig, f64)>, TuneError> {
    let again = time(finalists)?;
    let mut round: Vec<(GemmConfig, f64)> = Vec::new();
    let mut again = again.into_iter();
    for c in finalists {
        match again.next().unwrap_or(Err(Untimed::NoResult)) {
            Ok(us) if us.is_finite() && us > 0.0 => round.push((*c, us)),
            Ok(us) => log.failures.push(CandidateFailure(*c, Untimed::Retiming(Box::new(Untimed::InvalidTime(us))))),
            Err(why) => log.failures.push(CandidateFailure(*c, Untimed::Retiming(Box::new(why)))),
        }
    }
    if round.is_empty() {
        return Err(log.nothing_passed(problem, true));
    }
    round.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.id().cmp(&b.0.id())));
    Ok(round)
}

/// Tunes one problem on `gpu`'s search space with `measure`: rank, search (or sweep), re-time
/// the finalists, choose.
///
/// # Errors
///
/// [`TuneError`]: the device failed, nothing is legal, or every candidate failed its check.
pub fn tune_problem(
    gpu: &GpuSpec,
    problem: &Problem,
    measure: &mut dyn Measure,
    opts: &TuneOptions,
) -> Result<Outcome, TuneError> {
    let shape = problem.shape();
    let space = search_space(GpuArch::Sm90a);
    let ranked: Vec<GemmConfig> = rank(gpu, &shape, &space).into_iter().map(|(c, _)| c).collect();
    let Some(&model_pick) = ranked.first() else { return Err(TuneError::NoCandidate(problem.to_string())) };
    let budget = ((opts.budget * ranked.len() as f64).floor() as usize).max(MIN_TIMED).min(ranked.len());

    let mut time = |configs: &[GemmConfig]| measure.measure(problem, configs);
    let (mut log, pruned_pick) = if opts.exhaustive {
        sweep(&ranked, budget, opts.batch, &mut time)?
    } else {
        (search(&ranked, budget, opts.batch, &mut time)?, None)
    };
    let fastest = log.fastest();
    if fastest.is_empty() {
        return Err(log.nothing_passed(problem, false));
    }
    // Finalists: the fastest few, the model's pick and the pruned pick.
    let mut finalists: Vec<GemmConfig> = fastest.iter().take(opts.finalists.max(1)).map(|(c, _)| *c).collect();
    for c in [Some(model_pick), pruned_pick].into_iter().flatten() {
        if log.times.contains_key(&c) && !finalists.contains(&c) {
            finalists.push(c);
        }
    }
    let round = retime(problem, &finalists, &mut time, &mut log)?;
    let (best, us) = round[0];
    let in_round = |c: GemmConfig| round.iter().find(|(x, _)| *x == c).map(|(_, t)| *t);
    let timed = |v: &[(GemmConfig, f64)]| v.iter().map(|&(config, us)| Timed { config, us }).collect();
    Ok(Outcome {
        problem: problem.clone(),
        config: best,
        us,
        tflops: shape.flops() / (us * 1e-6) / 1e12,
        candidates: ranked.len(),
        timed: log.tried.len(),
        model_pick,
        model_pick_us: in_round(model_pick),
        pruned_pick,
        pruned_pick_us: pruned_pick.and_then(in_round),
        finalists: timed(&round),
        timings: timed(&fastest),
        failures: log.failures,
    })
}

/// Progress of a tuning run, one step per problem.
pub trait TuneProgress {
    /// Tuning starts: this many problems.
    fn begin(&self, _problems: u64) {}
    /// A problem is being tuned.
    fn problem(&self, _what: &str) {}
    /// A problem is done (tuned or resumed).
    fn advance(&self) {}
}

/// A [`TuneProgress`] that ignores everything.
pub struct NoProgress;
impl TuneProgress for NoProgress {}

/// Tunes every problem into `table`, calling `save` after each one so an interrupted run loses
/// at most the problem in flight. With `opts.resume`, problems the table already holds as measured
/// are skipped. Returns the outcomes of the problems tuned in this run.
///
/// # Errors
///
/// The first [`TuneError`]; the table keeps what was tuned before it.
pub fn tune_all(
    gpu: &GpuSpec,
    problems: &[Problem],
    table: &mut Table,
    measure: &mut dyn Measure,
    opts: &TuneOptions,
    progress: &dyn TuneProgress,
    save: &mut dyn FnMut(&Table) -> Result<(), TuneError>,
) -> Result<Vec<Outcome>, TuneError> {
    progress.begin(problems.len() as u64);
    let mut out = Vec::new();
    for p in problems {
        let done = table
            .entries
            .iter()
            .any(|e| (e.n, e.k, e.experts, e.m) == (p.n, p.k, p.experts, p.m) && e.source == Source::Measured);
        if opts.resume && done {
            progress.advance();
            continue;
        }
        progress.problem(&p.to_string());
        let o = tune_problem(gpu, p, measure, opts)?;
        table.insert(Entry {
            n: p.n,
            k: p.k,
            experts: p.experts,
            m: p.m,
            config: o.config,
            us: o.us,
            tflops: o.tflops,
            source: Source::Measured,
            what: p.what.clone(),
            timed: o.timed,
            candidates: o.candidates,
        });
        save(table)?;
        progress.advance();
        out.push(o);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::by_id;
    use crate::model::predict;
    use crate::table::problems;

    /// A GPU that is not the model: the model's time, off by what a model misses on real
    /// hardware: a bias per kernel family (−8% to +15%) and an idiosyncratic error per
    /// configuration (±2%, from a salted hash of the id; repeat timings on the H100 agree within
    /// ~1%). The model's ranking is then wrong in places;
    /// the search must still land within 2% of the best. (The real check is on a GPU:
    /// `bench/autotune.sh`.)
    struct Synthetic {
        gpu: &'static GpuSpec,
        calls: usize,
        timed: usize,
        fail: fn(&GemmConfig) -> bool,
        salt: &'static str,
    }

    fn hash(s: &str) -> u64 {
        s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    }

    impl Synthetic {
        fn new(fail: fn(&GemmConfig) -> bool) -> Self {
            Synthetic { gpu: by_id("h100-sxm").expect("gpu"), calls: 0, timed: 0, fail, salt: "" }
        }

        fn truth(&self, shape: &GemmShape, c: &GemmConfig) -> f64 {
            let bias = match (c.block_m, c.multicast) {
                (256, _) => 1.15,
                (64, _) => 0.92,
                (_, Multicast::A) => 0.95,
                (_, Multicast::B) => 1.08,
                _ => 1.0,
            };
            let noise = 0.98 + 0.04 * (hash(&(c.id() + self.salt)) % 1000) as f64 / 1000.0;
            predict(self.gpu, c, shape).us * bias * noise
        }
    }

    impl Measure for Synthetic {
        fn measure(&mut self, p: &Problem, configs: &[GemmConfig]) -> Result<Vec<Timing>, TuneError> {
            self.calls += 1;
            self.timed += configs.len();
            let shape = p.shape();
            Ok(configs
                .iter()
                .map(|c| {
                    if (self.fail)(c) { Err(Untimed::Failed("check failed".into())) } else { Ok(self.truth(&shape, c)) }
                })
                .collect())
        }
    }

    fn kernels_issue_problems() -> Vec<Problem> {
        let mut v = Vec::new();
        for m in [64, 128, 4096] {
            for (n, k) in [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)] {
                v.push(Problem { n, k, experts: 1, m, what: String::new() });
            }
        }
        for (experts, m) in [(4, 8192), (8, 4096)] {
            for (n, k) in [(4096, 7168), (7168, 2048)] {
                v.push(Problem { n, k, experts, m, what: String::new() });
            }
        }
        v
    }

    #[test]
    fn pruned_search_finds_the_exhaustive_best_within_2_percent_timing_15_percent() {
        let gpu = by_id("h100-sxm").expect("gpu");
        // Four GPUs that disagree with the model differently.
        for salt in ["", "a", "b", "c"] {
            for p in kernels_issue_problems() {
                let mut pruned = Synthetic { salt, ..Synthetic::new(|_| false) };
                let o = tune_problem(gpu, &p, &mut pruned, &TuneOptions::default()).expect("tune");
                let mut all = Synthetic { salt, ..Synthetic::new(|_| false) };
                let ex = tune_problem(gpu, &p, &mut all, &TuneOptions { exhaustive: true, ..TuneOptions::default() })
                    .expect("exhaustive");
                assert_eq!(ex.timed, ex.candidates);
                assert!(o.timed * 100 <= 15 * o.candidates, "{p}: timed {} of {}", o.timed, o.candidates);
                let (pick, best) = (o.config, ex.config);
                assert!(
                    ex.us / o.us >= 0.98,
                    "{p} ({salt}): pruned {pick} {:.2} us vs exhaustive {best} {:.2} us",
                    o.us,
                    ex.us
                );
                // The replayed pruned pick of the exhaustive run is the pruned run's pick.
                assert_eq!(ex.pruned_pick, Some(o.config), "{p}");
                // Every candidate the synthetic GPU timed, the search counted (plus the finalists).
                assert_eq!(pruned.timed, o.timed + o.finalists.len(), "{p}");
            }
        }
    }

    #[test]
    fn candidates_that_fail_their_check_are_never_chosen() {
        let gpu = by_id("h100-sxm").expect("gpu");
        let p = Problem { n: 4096, k: 7168, experts: 1, m: 4096, what: String::new() };
        let fails = |c: &GemmConfig| c.multicast != Multicast::None;
        let o = tune_problem(gpu, &p, &mut Synthetic::new(fails), &TuneOptions::default()).expect("tune");
        assert_eq!(o.config.multicast, Multicast::None);
        assert!(!o.failures.is_empty());
        assert!(o.failures.iter().all(|f| f.0.multicast != Multicast::None && matches!(f.1, Untimed::Failed(_))));
        let err = tune_problem(gpu, &p, &mut Synthetic::new(|_| true), &TuneOptions::default()).unwrap_err();
        assert!(matches!(err, TuneError::NothingPassed { .. }), "{err}");
    }

    /// In the finalists' round (every configuration seen before), fails the first (the fastest)
    /// as a racy kernel would; with `short`, answers for only half of each batch.
    struct Flaky {
        inner: Synthetic,
        seen: HashSet<GemmConfig>,
        short: bool,
        failed: Option<GemmConfig>,
    }

    impl Measure for Flaky {
        fn measure(&mut self, p: &Problem, configs: &[GemmConfig]) -> Result<Vec<Timing>, TuneError> {
            let mut t = self.inner.measure(p, configs)?;
            let round = configs.iter().all(|c| self.seen.contains(c));
            self.seen.extend(configs.iter().copied());
            if round && !self.short {
                t[0] = Err(Untimed::Failed("check failed: relative error 3e-1".into()));
                self.failed = Some(configs[0]);
            }
            if self.short {
                t.truncate(t.len() / 2);
            }
            Ok(t)
        }
    }

    #[test]
    fn a_finalist_that_fails_its_second_check_is_not_chosen() {
        let gpu = by_id("h100-sxm").expect("gpu");
        let p = Problem { n: 4096, k: 7168, experts: 1, m: 4096, what: String::new() };
        let mut m = Flaky { inner: Synthetic::new(|_| false), seen: HashSet::new(), short: false, failed: None };
        let o = tune_problem(gpu, &p, &mut m, &TuneOptions::default()).expect("tune");
        let failed = m.failed.expect("a finalists' round");
        assert_ne!(o.config, failed);
        assert_eq!(o.timings[0].config, failed, "the fastest in the search was the one that failed");
        assert!(o.failures.iter().any(|f| f.0 == failed && matches!(f.1, Untimed::Retiming(_))));
        // A measurer that answers for only half of each batch still ends (every candidate counts
        // as tried) and never chooses one it gave no time for.
        let mut m = Flaky { inner: Synthetic::new(|_| false), seen: HashSet::new(), short: true, failed: None };
        let o = tune_problem(gpu, &p, &mut m, &TuneOptions::default()).expect("tune");
        assert!(o.timed * 100 <= 15 * o.candidates);
        assert!(o.failures.iter().any(|f| matches!(f.1, Untimed::NoResult)));
        assert!(o.timings.iter().any(|t| t.config == o.config));
        let no_result = |u: &Untimed| match u {
            Untimed::Retiming(u) => matches!(**u, Untimed::NoResult),
            u => matches!(u, Untimed::NoResult),
        };
        assert!(!o.failures.iter().any(|f| f.0 == o.config && no_result(&f.1)));
    }

    #[test]
    fn tune_all_saves_after_each_problem_and_resume_skips_what_is_measured() {
        let gpu = by_id("h100-sxm").expect("gpu");
        let shapes = vec![crate::shapes::WeightShape { n: 4096, k: 7168, groups: 1, what: "o_proj".into() }];
        let (list, skipped) = problems(&shapes, &[64, 128, 256]);
        assert!(skipped.is_empty());
        let mut table = Table::new(gpu);
        let mut saves = 0;
        let mut m = Synthetic::new(|_| false);
        let opts = TuneOptions::default();
        let out = tune_all(gpu, &list[..2], &mut table, &mut m, &opts, &NoProgress, &mut |t| {
            saves += 1;
            assert_eq!(t.entries.len(), saves);
            Ok(())
        })
        .expect("tune");
        assert_eq!((out.len(), saves), (2, 2));
        assert!(table.entries.iter().all(|e| e.source == Source::Measured && e.timed > 0 && e.candidates > 0));
        // Resuming the full list tunes only the third problem.
        let calls_before = m.calls;
        let resume = TuneOptions { resume: true, ..opts.clone() };
        let out = tune_all(gpu, &list, &mut table, &mut m, &resume, &NoProgress, &mut |_| Ok(())).expect("resume");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].problem.m, 256);
        assert!(m.calls > calls_before);
        assert_eq!(table.entries.len(), 3);
        // A failure stops the run and reports the problem.
        let mut broken = Synthetic::new(|_| true);
        let mut fresh = Table::new(gpu);
        let err = tune_all(gpu, &list, &mut fresh, &mut broken, &opts, &NoProgress, &mut |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("4096x7168"), "{err}");
    }

    #[test]
    fn distance_counts_knobs() {
        let a = GemmConfig::wgmma(128, 128, 4, Multicast::None);
        assert_eq!(distance(&a, &a), Some(0));
        assert_eq!(distance(&a, &GemmConfig::wgmma(128, 136, 4, Multicast::None)), Some(1));
        assert_eq!(distance(&a, &GemmConfig::wgmma(64, 128, 4, Multicast::A)), Some(2));
        assert_eq!(distance(&a, &GemmConfig::wgmma(256, 112, 5, Multicast::None)), Some(4));
        assert_eq!(distance(&a, &GemmConfig::mma(128, 128, 2, 4, 4)), None);
    }
}
