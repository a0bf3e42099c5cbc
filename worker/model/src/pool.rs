//! Where a CPU forward pass runs.
//!
//! The kernels split each product over rayon's pool. Called from a thread outside the pool, every
//! product hands its work to the pool's threads and sleeps until they finish, and between
//! products those threads spin and yield for a core the calling thread needs for the serial parts
//! (norms, rotary embeddings, attention bookkeeping). On two cores that costs more than a
//! fifth of a decode step (measured in BENCHMARKS.md). Running the whole pass on one of the
//! pool's threads hands over once per pass instead, and the serial parts run on a pool thread.

/// Runs `f` on a thread of rayon's global pool (directly, if this already is one) and returns
/// its result; the caller blocks meanwhile.
pub fn on_worker_thread<R: Send>(f: impl FnOnce() -> R) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let job = AssertSend(f);
    // `rayon::scope` runs its closure on a pool thread when called from outside the pool.
    rayon::scope(move |_| {
        let job = job;
        (job.0)()
    })
}

/// Lets a closure that borrows non-`Send` state (`&mut dyn Collective`) run on a pool thread.
struct AssertSend<F>(F);
// SAFETY: the calling thread is blocked in `rayon::scope` until the closure has finished, so the
// borrowed state is never used by two threads at once; what is borrowed is plain CPU-side state
// (TCP streams, tensors) with no affinity to the thread that created it.
unsafe impl<F> Send for AssertSend<F> {}
