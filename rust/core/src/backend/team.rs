//! The threads of one forward step: the step runs on one of rayon's workers while the others
//! stay awake and take its work: rayon's jobs, the parts of a decode product (`for_each`,
//! `from_both_ends`), and in between, the start of the next product's helper share (`warm`).
//!
//! Why: a batch-1 decode step is bound by the memory's read bandwidth, and a single core reads
//! about half of it (18.6 of 36-38 GB/s on the 2-core Xeon). The step's stretches on one thread
//! (RoPE, the KV write, attention, norms: about a tenth of a bf16 step of the default model)
//! leave half the bandwidth unused. With two threads the helper spends them pulling the end of
//! the next product's weights into its L2, and the product then runs from both ends
//! (`from_both_ends`: the step's thread from the front, the helper from the back, in chunks, until
//! they meet), so the helper's warmed bytes, a late start or a slower core only move where they
//! meet and neither waits for the other. A fixed split moved by the bytes warmed
//! (`PackedLinear::warm`, before) gained on the 2-core Xeon (8.78 against 8.90 ms a bf16 step)
//! but on a Zen 4 left the step's thread waiting at the end of each product for 12% of the
//! samples; from both ends it waits 2.5% and the step is 3-8% faster (docs/benchmarks.md).

use std::any::Any;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

/// Run `f` (a whole step) on one of rayon's workers while the others stay awake.
///
/// Called from the engine's own thread, every parallel region (about five a layer) would inject
/// its job into the pool and put the caller to sleep on a latch: a futex wake and a context
/// switch per region, 150 a decode step, which cost a quarter of a batch-1 step on two cores. So
/// the step runs on a worker, and the regions' jobs go on its own deque. The other workers then
/// still fell asleep between regions (the norms and RoPE between two GEMMs are long enough for
/// rayon to park them): futex and `sched_yield` were 16% of a batch-1 decode's samples in
/// `perf`. Each other worker therefore runs a helper that takes the step's parts (`for_each`)
/// and rayon jobs as they appear (`rayon::yield_now`) and spins in between, until the step ends:
/// on a 2-core Xeon, decode of the bf16 default model went from 72-79 to 77-83 tok/s at 1
/// sequence and from 904-958 to 984-1,171 at 32 (alternating runs).
pub fn step<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let team = Team::default();
    rayon::scope(|scope| {
        let step = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            let team = &team;
            scope.spawn(move |_| {
                // A helper that the step's own worker picks up (while it waits inside a region)
                // returns at once: spinning there would wait on itself. Parts are claimed, not
                // assigned, so the step does not count on any helper being there.
                if rayon::current_thread_index() == step {
                    return;
                }
                while !team.ended.load(Ordering::Acquire) {
                    if !team.run_a_part() && !team.warm_some() && rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // Ends the helpers when the step ends, by returning or by panicking (the scope waits for
        // them before it unwinds), and forgets the team on this thread.
        struct End<'a>(&'a Team);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                self.0.ended.store(true, Ordering::Release);
                CURRENT.set(std::ptr::null());
            }
        }
        let _end = End(&team);
        CURRENT.set(&team);
        f()
    })
}

/// `run(i)` for every i in 0..parts, on the step's team where this thread runs a step (`step`),
/// else through rayon. Parts are claimed in order by whichever thread is free, the caller first
/// (so with one helper, part 0 is the caller's and part 1 the helper's unless it is late), and a
/// missing or busy helper only means the caller does more. It returns when every part has run,
/// and a part's panic reaches the caller after the others finish. For a few parts of equal
/// size: rayon's splitting keeps each thread's tasks together, which the GEMM's many-task
/// products need (f32 prefill of 512 tokens ran 6-10% slower through this).
pub fn for_each(parts: usize, run: impl Fn(usize) + Sync) {
    let team = CURRENT.get();
    if team.is_null() || parts < 2 {
        if parts == 1 {
            run(0);
        } else {
            (0..parts).into_par_iter().for_each(&run);
        }
        return;
    }
    // SAFETY: CURRENT points at the `Team` of the `step` running on this thread; it outlives
    // the call (the step's guard clears CURRENT before the team is dropped).
    let team = unsafe { &*team };
    // A part that itself calls `for_each` goes through rayon: the team runs one job at a time.
    CURRENT.set(std::ptr::null());
    team.run(parts, &run);
    CURRENT.set(team);
}

/// Ask the helper to pull `len` bytes from `at` into its cache while this thread works alone,
/// so that the next product's helper part (`from_both_ends`: its back end) reads that much less
/// from memory. Only with two threads, one helper; a no-op outside a step and off x86-64 (the
/// helper pulls with prefetch instructions).
pub(crate) fn warm(at: *const u8, len: usize) {
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    with_pair(|team| {
        let seq = team.warm_seq.load(Ordering::Relaxed);
        team.warm_at.store(at.cast_mut(), Ordering::Relaxed);
        team.warm_len.store(len.min(u32::MAX as usize), Ordering::Relaxed);
        // Odd: a region is up.
        team.warm_seq.store(seq + if seq & 1 == 1 { 2 } else { 1 }, Ordering::Release);
    });
}

/// Stop the helper's warming (`warm`): the product it was for is about to run.
pub(crate) fn end_warm() {
    with_pair(|team| {
        let seq = team.warm_seq.load(Ordering::Relaxed);
        if seq & 1 == 1 {
            team.warm_seq.store(seq + 1, Ordering::Release);
        }
    });
}

/// `run(c)` for every chunk c in 0..chunks, as `for_each` runs its parts, but claimed from both
/// ends: the calling thread takes chunks from the front, the step's helper (where there is one,
/// as `for_each`'s part 1) from the back, one at a time, until they meet. Each thread's chunks
/// are one sequential stream, as with two fixed shares, and the point where they meet follows
/// whichever thread is faster, so neither waits for the other at the end. Without a helper the
/// caller takes every chunk.
pub fn from_both_ends(chunks: usize, run: impl Fn(usize) + Sync) {
    assert!(chunks as u64 <= u32::MAX as u64, "{chunks} chunks");
    // The next chunk at the front and one past the last at the back: `front << 32 | back`.
    let ends = AtomicU64::new(chunks as u64);
    for_each(2, |part| loop {
        let mut now = ends.load(Ordering::Acquire);
        let chunk = loop {
            let (front, back) = (now >> 32, now & 0xffff_ffff);
            if front >= back {
                return;
            }
            let (next, chunk) = if part == 0 { (now + (1 << 32), front) } else { (now - 1, back - 1) };
            match ends.compare_exchange_weak(now, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break chunk as usize,
                Err(seen) => now = seen,
            }
        };
        run(chunk);
    });
}

/// Wait until the helper has pulled up the whole region of the last `warm` (false after
/// `timeout`, or outside a two-thread step).
#[cfg(test)]
pub(crate) fn wait_warmed(timeout: std::time::Duration) -> bool {
    with_pair(|team| {
        let t = std::time::Instant::now();
        let seq = team.warm_seq.load(Ordering::Relaxed);
        let len = team.warm_len.load(Ordering::Relaxed) as u64;
        while t.elapsed() < timeout {
            if team.warm_done.load(Ordering::Acquire) == (seq & 0xffff_ffff) << 32 | len {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    })
    .unwrap_or(false)
}

/// `f` on the team of the step on this thread, where the pool has two threads.
fn with_pair<R>(f: impl FnOnce(&Team) -> R) -> Option<R> {
    let team = CURRENT.get();
    // SAFETY: as in `for_each`.
    (!team.is_null() && rayon::current_num_threads() == 2).then(|| f(unsafe { &*team }))
}

/// Bytes the helper pulls in before it looks for parts again.
const WARM_CHUNK: usize = 4096;

thread_local! {
    /// The team of the step this thread runs, if any (null otherwise).
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

/// Bits of `Team::claim` for the part count and the next part; the generation is above them.
const PART_BITS: u32 = 16;
const PART_MASK: u64 = (1 << PART_BITS) - 1;

#[derive(Default)]
struct Team {
    /// The current job's generation, part count and next unclaimed part, in one word so that a
    /// claim (a compare-and-swap) can only succeed for the job it read: `gen << 32 | parts << 16
    /// | next`.
    claim: AtomicU64,
    /// The current job; valid while any of its parts is claimed but unfinished.
    job: AtomicPtr<Job<'static>>,
    /// Set when the step ends: the helpers return.
    ended: AtomicBool,
    /// The region to warm (`warm`), live while `warm_seq` is odd, and the helper's progress on
    /// it, `seq << 32 | bytes`. Only prefetch instructions touch the region (they never fault),
    /// so a helper reading a region as it is replaced costs time, never safety.
    warm_at: AtomicPtr<u8>,
    warm_len: AtomicUsize,
    warm_seq: AtomicU64,
    warm_done: AtomicU64,
}

struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    finished: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Team {
    /// Publish `run` as `parts` parts, take parts until none is left, wait for the others.
    fn run(&self, parts: usize, run: &(dyn Fn(usize) + Sync)) {
        assert!(parts as u64 <= PART_MASK, "{parts} parts for one job");
        let job = Job { run, finished: AtomicUsize::new(0), panic: Mutex::new(None) };
        // The lifetime is erased only while this function waits for every part to finish.
        self.job.store(&job as *const Job<'_> as *mut Job<'static>, Ordering::Release);
        let generation = (self.claim.load(Ordering::Relaxed) >> 32) + 1;
        self.claim.store(generation << 32 | (parts as u64) << PART_BITS, Ordering::Release);
        while self.run_a_part() {}
        while job.finished.load(Ordering::Acquire) < parts {
            std::hint::spin_loop();
        }
        let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
    }

    /// Pull the next chunk of the region up for warming, if any; false if there is none.
    fn warm_some(&self) -> bool {
        let seq = self.warm_seq.load(Ordering::Acquire);
        if seq & 1 == 0 {
            return false;
        }
        let (at, len) = (self.warm_at.load(Ordering::Relaxed), self.warm_len.load(Ordering::Relaxed));
        let progress = self.warm_done.load(Ordering::Relaxed);
        let done = if progress >> 32 == seq & 0xffff_ffff { (progress & 0xffff_ffff) as usize } else { 0 };
        if done >= len {
            return false;
        }
        let end = (done + WARM_CHUNK).min(len);
        for line in (done..end).step_by(64) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch is a hint; it never faults, whatever the address.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(line) as *const i8);
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (at, line); // never reached: `warm` posts nothing there
        }
        self.warm_done.store((seq & 0xffff_ffff) << 32 | end as u64, Ordering::Release);
        true
    }

    /// Claim and run one part of the current job; false if none is left.
    fn run_a_part(&self) -> bool {
        let mut claim = self.claim.load(Ordering::Acquire);
        loop {
            let (parts, next) = ((claim >> PART_BITS) & PART_MASK, claim & PART_MASK);
            if next >= parts {
                return false;
            }
            match self.claim.compare_exchange_weak(claim, claim + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => claim = now,
            }
        }
        // SAFETY: this thread holds an unfinished part of the job published with the claim word
        // it swapped (the publisher stores `job` before the word, and waits for every part to
        // finish before it returns and publishes another), so the job is alive and current.
        let job = unsafe { &*self.job.load(Ordering::Acquire) };
        let part = (claim & PART_MASK) as usize;
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.run)(part))) {
            job.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(panic);
        }
        job.finished.fetch_add(1, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{for_each, from_both_ends, step};
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The step's result comes back, its rayon regions and its parts run (each part once), and a
    /// panic inside a step, in a region or in a part, ends the helpers and reaches the caller
    /// instead of hanging; the pool and the team work after it.
    #[test]
    fn steps_run_regions_and_parts_and_return_panics() {
        let sum: u64 = step(|| (0..100_000u64).into_par_iter().map(|x| x % 7).sum());
        assert_eq!(sum, (0..100_000u64).map(|x| x % 7).sum::<u64>());
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        step(|| {
            for parts in [1, 2, 3, 7, 1000] {
                for_each(parts, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                    // A nested call runs too (through rayon).
                    for_each(2, |_| {});
                });
            }
        });
        let counts: Vec<usize> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
        assert!(counts[..1].iter().all(|&c| c == 5) && counts[1..2].iter().all(|&c| c == 4), "{:?}", &counts[..8]);
        assert!(counts[2..3].iter().all(|&c| c == 3) && counts[3..7].iter().all(|&c| c == 2));
        assert!(counts[7..].iter().all(|&c| c == 1), "each part of 1000 ran once");
        for in_part in [false, true] {
            let caught = std::panic::catch_unwind(|| {
                step(|| {
                    if in_part {
                        for_each(64, |i| assert!(i != 40, "a part failed"));
                    } else {
                        (0..1000).into_par_iter().for_each(|i| assert!(i != 500, "a region failed"));
                    }
                })
            });
            let message = caught.expect_err("the panic reached the caller");
            let text = message.downcast_ref::<&str>().copied().unwrap_or_default();
            assert!(text.contains("failed"), "{text}");
        }
        assert_eq!(step(|| (0..10u32).into_par_iter().sum::<u32>()), 45);
        let total = AtomicUsize::new(0);
        step(|| for_each(9, |i| _ = total.fetch_add(i, Ordering::Relaxed)));
        assert_eq!(total.into_inner(), 36);
        // Outside a step, `for_each` goes through rayon.
        let total = AtomicUsize::new(0);
        for_each(9, |i| _ = total.fetch_add(i, Ordering::Relaxed));
        assert_eq!(total.into_inner(), 36);
    }

    /// Every chunk runs once; the step's thread takes them from the front in order, the helper
    /// from the back, and they meet: the caller's chunks all come before the helper's. The
    /// caller is made slow (2 ms a chunk), so the helper takes some; without a step (rayon) or
    /// with one chunk, all still run once.
    #[test]
    fn from_both_ends_meets_in_the_middle() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let caller = std::sync::Mutex::new(Vec::new());
        let helper = std::sync::Mutex::new(Vec::new());
        pool.install(|| {
            step(|| {
                let me = rayon::current_thread_index();
                from_both_ends(100, |c| {
                    if rayon::current_thread_index() == me {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        caller.lock().unwrap().push(c);
                    } else {
                        helper.lock().unwrap().push(c);
                    }
                })
            })
        });
        let (caller, helper) = (caller.into_inner().unwrap(), helper.into_inner().unwrap());
        assert!(caller.windows(2).all(|w| w[0] + 1 == w[1]) && caller.first() == Some(&0), "{caller:?}");
        assert!(!helper.is_empty() && helper.windows(2).all(|w| w[0] == w[1] + 1) && helper[0] == 99, "{helper:?}");
        assert_eq!(caller.len() + helper.len(), 100);
        assert_eq!(caller.last().unwrap() + 1, *helper.last().unwrap(), "they meet");
        for chunks in [0, 1, 7] {
            let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            from_both_ends(chunks, |c| _ = hits[c].fetch_add(1, Ordering::Relaxed));
            pool.install(|| step(|| from_both_ends(chunks, |c| _ = hits[c].fetch_add(1, Ordering::Relaxed))));
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 2), "{chunks} chunks");
        }
    }
}
