//! How a training process keeps its memory.
//!
//! A CPU step frees and re-allocates buffers the size of the embedding
//! (50,368 × 256 floats, 52 MB, several per step) and of the layers'
//! activations. glibc serves every allocation above 32 MB (its largest
//! `mmap` threshold) with a fresh `mmap`, which the kernel page-faults and
//! zeroes on first touch and unmaps on free: for ettin-17m that was half of
//! a 1 × 128-token step. Serving them from the heap instead, and not
//! returning freed heap to the system, lets the next step reuse the same
//! pages. The price is that the process's resident memory stays at its
//! peak, which a training process reaches every step anyway.

/// Keeps freed memory for reuse instead of returning it to the system
/// (glibc on Linux; elsewhere the allocator's own policy stands). Call once
/// at the start of a process that trains.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)] // two glibc settings, no pointers involved
    // SAFETY: mallopt only changes allocator parameters; it is thread-safe
    // and leaves existing allocations valid.
    unsafe {
        // No mmap-served chunks: everything comes from (and returns to) the heap.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // Trim the heap's free top only beyond 2 GiB.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
