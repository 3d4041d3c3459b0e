//! The handle a front end holds to serve an `Engine` (vLLM's `EngineCoreProc` to `Engine`'s
//! `EngineCore`): an inbox so that adding or aborting a request never waits for a running step
//! (tens of milliseconds on a CPU), the step loop on its own thread, the engine's figures for
//! metrics and the per-step log for fitting cost models.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::engine::{Engine, RequestOutput, StepSample};
use super::history_file::{self, HistoryFile};
use crate::error::{HoraeError, Result};
use crate::grammar::Compiler;
use crate::request::{FinishReason, ReqId, RequestLimits, RequestParams, RequestSpec};
use crate::route::ReplicaStats;
use crate::sched::SpecStats;

/// Steps kept for `take_step_log` before the oldest are dropped.
const STEP_LOG_CAP: usize = 1 << 20;

/// The engine's figures after a step, for metrics. Counters are totals since the engine started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_used_blocks: usize,
    pub kv_total_blocks: usize,
    pub block_size: usize,
    pub predicted_peak_tokens: Option<u64>,
    pub preemptions: u64,
    pub prefix_hit_blocks: u64,
    pub prefix_queried_blocks: u64,
    /// The step just run (None outside a step).
    pub step_seconds: Option<f64>,
    pub spec: Option<SpecStats>,
}

/// What one step produced.
#[derive(Debug, Default)]
pub struct StepEvents {
    pub outputs: Vec<RequestOutput>,
    pub stats: EngineStats,
}

struct EngineState {
    engine: Engine,
    /// Requests the engine refused when the inbox was applied: reported with the next events.
    refused: Vec<RequestOutput>,
    preemptions: u64,
    step_log: Vec<StepSample>,
    /// Where Past-Future's history is saved, and the recorded count at the last save.
    history: Option<(HistoryFile, u64)>,
}

/// Lengths to write to the history file, taken under the engine lock and written after it is
/// released, so that a step never waits on the disk.
struct HistoryWrite {
    file: HistoryFile,
    lengths: Vec<u32>,
    /// Lengths recorded when the snapshot was taken: orders concurrent writes.
    recorded: u64,
}

impl EngineState {
    /// The history to write, if a file is set and `force` or `SAVE_EVERY` lengths came since the
    /// last snapshot. A failed write is reported and retried at the next snapshot, never fatal.
    fn history_due(&mut self, force: bool) -> Option<HistoryWrite> {
        let recorded = self.engine.scheduler().stats().lengths_recorded;
        let (file, saved_at) = self.history.as_mut()?;
        if !force && recorded < *saved_at + history_file::SAVE_EVERY {
            return None;
        }
        let lengths = self.engine.scheduler().recorded_lengths()?;
        *saved_at = recorded;
        Some(HistoryWrite { file: file.clone(), lengths, recorded })
    }
}

#[derive(Default)]
struct Inbox {
    /// Each with the seconds it had waited before it came (`RequestParams::waited`).
    adds: Vec<(ReqId, RequestSpec, f64)>,
    aborts: Vec<ReqId>,
}

struct Shared {
    state: Mutex<EngineState>,
    inbox: Mutex<Inbox>,
    /// Signalled when the inbox gets work or the loop is told to stop.
    wake: Condvar,
    stop: AtomicBool,
    /// Why the step loop died (a step panicked), once it has: nothing more is taken.
    died: Mutex<Option<String>>,
    /// Held while the history file is written; the recorded count of the last write, so that an
    /// older snapshot never overwrites a newer one.
    history_written: Mutex<u64>,
}

/// What a panic said (its payload is a `&str` or a `String` when it came from `panic!`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock poisons it. Outside a step (a caller's thread holding the
    // inbox or the history lock) the state is still consistent, since every mutation goes through
    // the core's own checks, so keep serving; a step that panicked kills the engine instead
    // (`guarded_step`), and nothing reads its state after that but the figures.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The engine, with everything queued in the inbox applied first.
    fn engine(&self) -> MutexGuard<'_, EngineState> {
        let mut st = lock(&self.state);
        let inbox = std::mem::take(&mut *lock(&self.inbox));
        for (id, mut spec, waited) in inbox.adds {
            if waited > 0.0 {
                spec.arrival = Some(st.engine.now() - waited);
            }
            if let Err(e) = st.engine.add_request_with_id(id, spec) {
                let error = Some(e.to_string());
                st.refused.push(RequestOutput {
                    id,
                    finish_reason: Some(FinishReason::Error),
                    error,
                    ..Default::default()
                });
            }
        }
        for id in inbox.aborts {
            // An id that already finished (or was refused) has nothing left to free.
            let _ = st.engine.abort(id);
        }
        st
    }

    /// `step`, where a panic (a bug) kills the engine instead of unwinding into the caller (the
    /// loop's thread would end without a word, leaving every caller waiting): it is reported
    /// once as `EngineDied`, and every later step or request is refused with it, since the
    /// engine's state is not to be trusted after a half-done step.
    fn guarded_step(&self) -> Result<StepEvents> {
        if let Some(why) = lock(&self.died).clone() {
            return Err(HoraeError::EngineDied(why));
        }
        panic::catch_unwind(AssertUnwindSafe(|| self.step())).unwrap_or_else(|payload| {
            let why = panic_message(payload.as_ref());
            *lock(&self.died) = Some(why.clone());
            Err(HoraeError::EngineDied(why))
        })
    }

    fn step(&self) -> Result<StepEvents> {
        let mut st = self.engine();
        let mut outputs = std::mem::take(&mut st.refused);
        if !st.engine.has_work() {
            return Ok(StepEvents { outputs, stats: stats_of(&st, None) });
        }
        let out = st.engine.step()?;
        let due = st.history_due(false);
        st.preemptions += out.preempted.len() as u64;
        outputs.extend(out.outputs);
        let duration = out.sample.map(|s| s.duration);
        if let Some(sample) = out.sample {
            if st.step_log.len() == STEP_LOG_CAP {
                st.step_log.drain(..STEP_LOG_CAP / 2);
            }
            st.step_log.push(sample);
        }
        let stats = stats_of(&st, duration);
        drop(st);
        self.report_history_write(due);
        Ok(StepEvents { outputs, stats })
    }

    /// Write a history snapshot (outside the engine lock).
    fn write_history(&self, due: Option<HistoryWrite>) -> Result<bool> {
        let Some(w) = due else { return Ok(false) };
        let mut written = lock(&self.history_written);
        if w.recorded < *written {
            return Ok(false);
        }
        w.file.save(&w.lengths)?;
        *written = w.recorded;
        Ok(true)
    }

    /// As `write_history`, for the engine thread: a failed write is logged, never fatal.
    fn report_history_write(&self, due: Option<HistoryWrite>) {
        if let Err(e) = self.write_history(due) {
            eprintln!("horae: {e}");
        }
    }

    /// Blocks until there is something to do (a queued request or abort, or running requests),
    /// or the loop is told to stop.
    fn wait_for_work(&self) {
        if self.engine().engine.has_work() {
            return;
        }
        let inbox = lock(&self.inbox);
        if inbox.adds.is_empty() && inbox.aborts.is_empty() && !self.stop.load(Ordering::Acquire) {
            // The timeout only bounds a missed wake-up; every push notifies.
            let _ = self.wake.wait_timeout(inbox, Duration::from_millis(200));
        }
    }
}

fn stats_of(st: &EngineState, step_seconds: Option<f64>) -> EngineStats {
    let s = st.engine.scheduler();
    let pool = s.kv().pool();
    EngineStats {
        running: s.num_running(),
        waiting: s.num_waiting(),
        kv_used_blocks: pool.num_used(),
        kv_total_blocks: pool.num_total(),
        block_size: s.kv().block_size(),
        predicted_peak_tokens: s.predicted_peak(),
        preemptions: st.preemptions,
        prefix_hit_blocks: pool.hit_blocks,
        prefix_queried_blocks: pool.queried_blocks,
        step_seconds,
        spec: s.spec_stats(),
    }
}

/// A served engine. Every method takes `&self` and is safe to call from any thread.
pub struct EngineHandle {
    shared: Arc<Shared>,
    limits: RequestLimits,
    /// Structured output's compiler for the model's vocabulary (`None`: no tokenizer).
    grammars: Option<Compiler>,
    next_id: AtomicU64,
    looper: Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    pub fn new(engine: Engine, limits: RequestLimits) -> Self {
        let state = EngineState { engine, refused: Vec::new(), preemptions: 0, step_log: Vec::new(), history: None };
        let shared = Shared {
            state: Mutex::new(state),
            inbox: Mutex::default(),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            died: Mutex::new(None),
            history_written: Mutex::new(0),
        };
        Self { shared: Arc::new(shared), limits, grammars: None, next_id: AtomicU64::new(0), looper: Mutex::new(None) }
    }

    /// Serve structured output, compiled by `grammars` (`engine::build` gives every model's).
    pub fn with_grammars(mut self, grammars: Compiler) -> Self {
        self.grammars = Some(grammars);
        self
    }

    /// Make structured output's first compile cheap (`Compiler::prepare`); an error says why
    /// this engine cannot have it.
    pub fn prepare_structured_output(&self) -> Result<()> {
        match &self.grammars {
            Some(g) => g.prepare(),
            None => Err(HoraeError::Model("structured output needs the model's tokenizer and end-of-sequence".into())),
        }
    }

    /// Save Past-Future's history to `file` as requests finish and when the engine stops.
    pub fn with_history_file(self, file: Option<HistoryFile>) -> Self {
        lock(&self.shared.state).history = file.map(|f| (f, 0));
        self
    }

    /// Past-Future's recorded lengths, oldest first (waits for a running step).
    pub fn recorded_lengths(&self) -> Option<Vec<u32>> {
        self.shared.engine().engine.scheduler().recorded_lengths()
    }

    /// Write the history file now (the front ends call this on shutdown); `false` when there is
    /// no file or no history to write.
    pub fn save_history(&self) -> Result<bool> {
        let due = lock(&self.shared.state).history_due(true);
        self.shared.write_history(due)
    }

    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    fn push(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut lock(&self.shared.inbox));
        self.shared.wake.notify_all();
    }

    pub fn looping(&self) -> bool {
        lock(&self.looper).is_some()
    }

    /// Check a request and queue it; returns its id. Never waits for a running step.
    pub fn add_request(&self, params: RequestParams) -> Result<ReqId> {
        let waited = params.waited;
        // A grammar compiles here, on the caller's thread: a bad one is the caller's 400, and a
        // slow one never holds up a step.
        let spec = params.into_spec(&self.limits, self.grammars.as_ref())?;
        if let Some(why) = lock(&self.shared.died).clone() {
            return Err(HoraeError::EngineDied(why)); // no loop will ever take it
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.push(|inbox| inbox.adds.push((id, spec, waited)));
        Ok(id)
    }

    /// Stop a request; its KV blocks are freed before the next step (at once when no loop runs).
    /// Ids that already finished are ignored.
    pub fn abort(&self, id: ReqId) {
        self.push(|inbox| inbox.aborts.push(id));
        if !self.looping() {
            drop(self.shared.engine()); // no step can be running: apply it now
        }
    }

    pub fn has_unfinished(&self) -> bool {
        self.shared.engine().engine.has_work()
    }

    /// The figures metrics report, now (waits for a running step).
    pub fn stats(&self) -> EngineStats {
        stats_of(&self.shared.engine(), None)
    }

    /// Forget the prefix cache, now (waits for a running step; pending aborts are applied
    /// first); false while a request holds KV blocks (`Engine::reset_prefix_cache`).
    pub fn reset_prefix_cache(&self) -> bool {
        self.shared.engine().engine.reset_prefix_cache()
    }

    /// What this engine publishes for a router, now (waits for a running step).
    pub fn replica_stats(&self) -> ReplicaStats {
        self.shared.engine().engine.replica_stats()
    }

    /// The steps run since the last call (cost-model features, measured seconds, batch figures).
    pub fn take_step_log(&self) -> Vec<StepSample> {
        std::mem::take(&mut self.shared.engine().step_log)
    }

    /// One step on the caller's thread (not while the loop runs).
    pub fn step(&self) -> Result<StepEvents> {
        if self.looping() {
            return Err(HoraeError::InvalidConfig(
                "the background loop is running this engine; step() is not available".into(),
            ));
        }
        self.shared.guarded_step()
    }

    /// Run the step loop on a thread of its own: after every step with something to say,
    /// `on_step` gets its events, or the error that failed the step.
    pub fn start_loop(&self, mut on_step: impl FnMut(Result<StepEvents>) + Send + 'static) -> Result<()> {
        let mut looper = lock(&self.looper);
        if looper.is_some() {
            return Err(HoraeError::InvalidConfig("the background loop is already running".into()));
        }
        self.shared.stop.store(false, Ordering::Release);
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("horae-engine".into())
            .spawn(move || {
                while !shared.stop.load(Ordering::Acquire) {
                    shared.wait_for_work();
                    if shared.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let result = shared.guarded_step();
                    if let Err(died @ HoraeError::EngineDied(_)) = result {
                        on_step(Err(died)); // said once; nothing more runs
                        break;
                    }
                    if matches!(&result, Ok(events) if events.outputs.is_empty()) {
                        continue;
                    }
                    on_step(result);
                }
                let due = lock(&shared.state).history_due(true);
                shared.report_history_write(due);
            })
            .map_err(|e| HoraeError::InvalidConfig(format!("cannot start the engine thread: {e}")))?;
        *looper = Some(handle);
        Ok(())
    }

    /// Tell the loop to stop after its current step; the caller joins the returned thread (a
    /// binding releases its interpreter lock first, since the loop's last callback may need it).
    pub fn stop_loop(&self) -> Option<JoinHandle<()>> {
        let handle = lock(&self.looper).take()?;
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        Some(handle)
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        // Stop, but do not join: the loop may be waiting for the lock of whoever drops us. The
        // loop saves the history as it ends; without a loop, save here if no one holds the lock.
        if self.stop_loop().is_none() {
            let due = self.shared.state.try_lock().ok().and_then(|mut st| st.history_due(true));
            self.shared.report_history_write(due);
        }
    }
}
