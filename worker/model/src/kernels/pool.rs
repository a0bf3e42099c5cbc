//! The threads a CPU model computes on.
//!
//! The kernels split each product over a rayon pool. Called from a thread outside that pool,
//! every product hands its work to the pool's threads and sleeps until they finish, and between
//! products those threads spin and yield for a core the calling thread needs for the serial parts
//! (norms, rotary embeddings, attention bookkeeping). On two cores that cost a fifth or more of
//! a decode step (BENCHMARKS.md). So each model owns a pool and runs the whole forward pass on
//! one of its threads: one hand-over per pass, and the serial parts run on a pool thread.
//!
//! The pool is the model's own, not rayon's global one, because ranks of one tensor-parallel
//! group may live in one process (tests do this): in a shared pool a thread waiting inside one
//! rank's product can pick up another rank's whole forward pass and block in its all-reduce,
//! waiting for the rank buried under it on its own stack.

use std::sync::Arc;

/// Spins before candle's element-wise pool threads park; candle's default is 25,000. Those
/// threads are not the model's: while they spin they hold cores the compute pool needs, and a
/// 512-token bf16 prefill ran 8% faster with 1,000 (BENCHMARKS.md).
const CANDLE_SPIN_LIMIT: &str = "1000";

/// Sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to [`CANDLE_SPIN_LIMIT`] unless the environment already
/// sets it. candle reads it once, when its pool starts; call this at the top of `main`, before
/// other threads exist.
pub fn limit_candle_spinning() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
}

/// A model's compute threads.
#[derive(Clone)]
pub struct ComputePool(Arc<rayon::ThreadPool>);

impl ComputePool {
    /// As many threads as candle uses (`RAYON_NUM_THREADS`, which `tessera --threads` sets, else
    /// the physical cores).
    pub fn new() -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads())
            .thread_name(|i| format!("tessera-compute-{i}"))
            .build()?;
        Ok(Self(Arc::new(pool)))
    }

    /// Runs `f` on one of the pool's threads (directly, if this already is one) and returns its
    /// result; the caller blocks meanwhile. What `f` borrows must be `Send`: a forward pass's
    /// collective comes as `dyn Collective + Send` (`Collective::as_send`).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.0.current_thread_index().is_some() {
            return f();
        }
        self.0.install(f)
    }
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ComputePool({} threads)", self.0.current_num_threads())
    }
}

/// A raw pointer to an output buffer that a product's pool tasks share (the GEMMs in
/// `gemm/bf16.rs` and `gemm/q8.rs`); each task writes its own columns only.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub *mut f32);
// SAFETY: tasks write disjoint elements (their own panel's columns) and the buffer outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: the tasks sharing it only write through it, at disjoint elements.
unsafe impl Sync for OutPtr {}

/// Runs `f` on this thread's value in `cell` (a kernel's buffers, kept between calls so that a
/// decode step allocates none), or on a fresh value when a caller further up this thread's
/// stack holds it (a pool thread that took other work while waiting).
pub(crate) fn with_reused<T: Default + 'static, R>(
    cell: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut held) => f(&mut held),
        Err(_) => f(&mut T::default()),
    })
}
