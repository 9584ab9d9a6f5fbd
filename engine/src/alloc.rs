//! Process-wide allocator tuning for a process that holds an engine's state.

/// How much more than it needs glibc's allocator takes from the system each time an arena's
/// heap grows: 64 MiB instead of the 128 KiB default.
///
/// Restoring a shard builds millions of small allocations on several threads, each in its own
/// arena; with the default every few hundred of them grow the arena's heap by one `mprotect`
/// call (6.5% of a recovery's profile, besides the page faults). Address space taken this
/// way and not yet used costs no memory. Measured on recovery of 1,000,000 users and
/// 1,000,000 codes: snapshot load 3.3–3.5 s → 2.4–2.9 s (`docs/BENCHMARKS-HISTORY.md`).
pub const ARENA_TOP_PAD: usize = 64 << 20;

/// Tunes the allocator for an engine's process (glibc's `M_TOP_PAD` to 64 MiB). Call once at process
/// start, before the engine starts, in a process that keeps glibc's allocator. (`settlegate
/// serve` does not need it: it runs on jemalloc, which recovered and served faster still.)
/// Does nothing where the allocator is not glibc's. It also fixes glibc's threshold for
/// serving a request from `mmap` at its default (128 KiB) instead of letting it rise: the
/// engine's large buffers (snapshots, log batches) are few.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let pad = libc::c_int::try_from(ARENA_TOP_PAD).expect("fits in a C int");
        // SAFETY: `mallopt` only sets a tuning parameter of the allocator; it is called at
        // process start, before other threads allocate.
        let applied = unsafe { libc::mallopt(libc::M_TOP_PAD, pad) };
        if applied != 1 {
            tracing::warn!("the allocator refused M_TOP_PAD; recovery may be slower");
        }
    }
}
