//! Threads lent to the fast CPU backend: a thread with nothing else to do calls [`help_until`]
//! and runs halves of other threads' large ops, posted through [`join`], until told to stop.
//!
//! `experiment::run_parallel` lends each worker once no fold is left to start, so the last
//! folds do not leave cores idle. One slot, process-wide: a thread that finds it busy, or no
//! helper waiting, runs both halves itself. Helpers spin (the core is idle anyway) because a
//! posted half is a few microseconds of work: waking a sleeping thread costs as much.
//!
//! Only the split changes, never an element's arithmetic: the callers split by output columns
//! (matmul) or elements (Adam), so the results are the same bits with or without help.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// A posted half, with its lifetime erased (see [`join`] for why that is sound).
type Job = *mut (dyn FnMut() + Send);

const EMPTY: u8 = 0;
/// A poster is writing the job.
const FILLING: u8 = 1;
const POSTED: u8 = 2;
/// A helper is running the job.
const TAKEN: u8 = 3;
const DONE: u8 = 4;
/// The job panicked on the helper.
const PANICKED: u8 = 5;

struct Slot {
    state: AtomicU8,
    job: UnsafeCell<Option<Job>>,
    /// Threads inside [`help_until`].
    helpers: AtomicUsize,
}

// SAFETY: `job` is written only by the thread that moved `state` EMPTY -> FILLING, and read only
// by the thread that moved it POSTED -> TAKEN; the Release/Acquire pairs on `state` order both.
unsafe impl Sync for Slot {}

static SLOT: Slot = Slot {
    state: AtomicU8::new(EMPTY),
    job: UnsafeCell::new(None),
    helpers: AtomicUsize::new(0),
};

/// Jobs run by helpers so far (for tests).
static HELPED: AtomicUsize = AtomicUsize::new(0);

#[cfg(test)]
pub(super) fn helped() -> usize {
    HELPED.load(Ordering::Relaxed)
}

/// Runs `a` and `b`, `b` on a helper thread if one is waiting and the slot is free, else both
/// here. Returns when both have finished; a panic in either panics here.
pub(super) fn join(a: impl FnOnce(), b: impl FnOnce() + Send) {
    if SLOT.helpers.load(Ordering::Relaxed) == 0
        || SLOT
            .state
            .compare_exchange(EMPTY, FILLING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        a();
        b();
        return;
    }
    let mut b = Some(b);
    let mut run_b = move || {
        if let Some(b) = b.take() {
            b()
        }
    };
    let job: *mut (dyn FnMut() + Send + '_) = &mut run_b;
    // SAFETY: only the lifetime changes. The job is run (by a helper) or taken back (here)
    // before this function returns, as the loop below does not exit before either, so the
    // erased borrow never outlives `run_b`.
    let job: Job = unsafe { std::mem::transmute(job) };
    // SAFETY: this thread holds the slot (FILLING).
    unsafe { *SLOT.job.get() = Some(job) };
    SLOT.state.store(POSTED, Ordering::Release);
    // `a` may not unwind past the posted job, which borrows this frame: caught, and rethrown
    // once the job is back or finished.
    let ran_a = std::panic::catch_unwind(std::panic::AssertUnwindSafe(a));
    // Take the job back if no helper has started it; otherwise wait for it.
    if SLOT
        .state
        .compare_exchange(POSTED, FILLING, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
    {
        // SAFETY: this thread holds the slot again (FILLING).
        unsafe { *SLOT.job.get() = None };
        SLOT.state.store(EMPTY, Ordering::Release);
        if let Err(panic) = ran_a {
            std::panic::resume_unwind(panic);
        }
        run_b();
        return;
    }
    let mut polls = 0u32;
    let end = loop {
        match SLOT.state.load(Ordering::Acquire) {
            s @ (DONE | PANICKED) => break s,
            _ => pause(&mut polls),
        }
    };
    SLOT.state.store(EMPTY, Ordering::Release);
    if let Err(panic) = ran_a {
        std::panic::resume_unwind(panic);
    }
    assert!(
        end == DONE,
        "a helper thread panicked running half of this op"
    );
}

/// Whether a helper is waiting for work (so that splitting an op can pay off).
pub(super) fn available() -> bool {
    SLOT.helpers.load(Ordering::Relaxed) > 0 && SLOT.state.load(Ordering::Relaxed) == EMPTY
}

/// Lends this thread to [`join`] until `stop()` is true.
pub(super) fn help_until(stop: &dyn Fn() -> bool) {
    SLOT.helpers.fetch_add(1, Ordering::Relaxed);
    let mut polls = 0u32;
    while !stop() {
        // Read before trying to take: a failed compare-exchange still pulls the line away from
        // the posters.
        if SLOT.state.load(Ordering::Relaxed) == POSTED
            && SLOT
                .state
                .compare_exchange(POSTED, TAKEN, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            // SAFETY: this thread holds the slot (TAKEN); the poster waits for DONE, so the job
            // it points to is alive.
            let job = unsafe { (*SLOT.job.get()).take() }.expect("a posted job");
            // A panic in the job must still release the poster, which then panics itself.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                // SAFETY: as above; only this thread runs the job.
                (*job)()
            }));
            HELPED.fetch_add(1, Ordering::Relaxed);
            let end = if ran.is_ok() { DONE } else { PANICKED };
            SLOT.state.store(end, Ordering::Release);
        } else {
            pause(&mut polls);
        }
    }
    SLOT.helpers.fetch_sub(1, Ordering::Relaxed);
}

/// One poll of a spin-wait: a spin hint, and every [`YIELD_EVERY`] polls a yield, so that on a
/// machine with more running threads than cores (a test run, say) a spinning thread does not
/// hold a core for its whole time slice while the thread it waits for is descheduled.
fn pause(polls: &mut u32) {
    *polls = polls.wrapping_add(1);
    if polls.is_multiple_of(YIELD_EVERY) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Spin polls between yields: 1024 spin hints (an x86 `pause` is some 40-140 cycles on recent
/// cores, so tens of microseconds, an estimate, not a measurement): longer than a posted half
/// usually waits to be picked up, short against a time slice.
const YIELD_EVERY: u32 = 1 << 10;

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use std::thread::ThreadId;
    use std::time::Duration;

    /// One test at a time lends a helper (the slot is process-wide).
    pub static LENDING: Mutex<()> = Mutex::new(());

    /// Runs `f` while another thread is lent through [`help_until`].
    pub fn with_helper<T>(f: impl FnOnce(ThreadId) -> T) -> T {
        let _one = LENDING.lock().unwrap_or_else(|e| e.into_inner());
        /// Stops the helper however `f` ends: a failed assertion in `f` unwinds through the
        /// scope, which joins the helper, so without this a failing test would hang instead.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let _stop = Stop(&stop);
            let helper = s.spawn(|| help_until(&|| stop.load(Ordering::Acquire)));
            while !available() {
                std::thread::yield_now();
            }
            f(helper.thread().id())
        })
    }

    #[test]
    fn the_second_half_runs_on_a_waiting_helper() {
        with_helper(|helper| {
            // The slot can be busy with another test's matmul for a moment: try a few times.
            let ran_on = (0..100)
                .map(|_| {
                    let mut on = None;
                    join(
                        || std::thread::sleep(Duration::from_millis(2)),
                        || on = Some(std::thread::current().id()),
                    );
                    on.expect("the second half ran")
                })
                .find(|&id| id == helper);
            assert_eq!(ran_on, Some(helper));
        });
    }

    #[test]
    fn without_a_helper_both_halves_run_here() {
        let _one = LENDING.lock().unwrap_or_else(|e| e.into_inner());
        let (mut a, mut b) = (None, None);
        join(
            || a = Some(std::thread::current().id()),
            || b = Some(std::thread::current().id()),
        );
        assert_eq!(a, Some(std::thread::current().id()));
        assert_eq!(b, a);
    }

    #[test]
    fn a_panic_on_the_helper_panics_the_caller_and_frees_the_slot() {
        with_helper(|_| {
            let caught = std::panic::catch_unwind(|| {
                join(
                    || std::thread::sleep(Duration::from_millis(5)),
                    || panic!("half b failed"),
                )
            });
            assert!(caught.is_err());
            // The caller's own half panicking is resumed too. The other half either never
            // started (taken back from the slot) or had finished before `join` returned: it
            // borrows this frame, so it may not still be running once the panic is resumed.
            for _ in 0..20 {
                let (started, finished) = (AtomicBool::new(false), AtomicBool::new(false));
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    join(
                        || {
                            std::thread::sleep(Duration::from_micros(200));
                            panic!("half a failed")
                        },
                        || {
                            started.store(true, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(2));
                            finished.store(true, Ordering::SeqCst);
                        },
                    )
                }));
                assert!(caught.is_err());
                assert_eq!(
                    started.load(Ordering::SeqCst),
                    finished.load(Ordering::SeqCst),
                    "join returned while the other half was still running"
                );
            }
            // And the slot works again.
            let mut sum = 0;
            join(|| (), || sum = 2);
            assert_eq!(sum, 2);
        });
    }
}
