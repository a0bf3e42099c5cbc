//! How the process heap treats the forward pass's short-lived buffers.
//!
//! glibc serves large allocations (from 128 KiB, a threshold it raises only as such blocks are
//! freed) with their own `mmap` and returns them to the kernel on free. A forward pass allocates
//! and frees the same activation, score and logit buffers on every layer and every step, so each
//! came back as fresh pages that the kernel zero-fills on first touch: a tenth of a 512-token
//! prefill went to page faults (BENCHMARKS.md). Raising the threshold to its maximum and
//! trimming the heap rarely keeps those blocks for reuse. The process keeps its peak heap, which
//! a server holding a model does anyway. (Decode steps no longer allocate such buffers at all:
//! they write into the model's workspace, `workspace.rs`; this is for prefill chunks.)

/// Applies the settings above once per process (glibc on Linux; elsewhere nothing to do).
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tunables; it is safe to call at any time.
            unsafe {
                // 32 MiB is glibc's largest allowed mmap threshold on 64-bit targets.
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        });
    }
}
