//! Failing fast: a panic in a shard or its log writer ends the process.

/// Ends the process after a panic in a shard (or its log writer): the shard's state may be
/// half-changed, with an invariant broken, so nothing more may be applied or acknowledged. The
/// panic is logged at ERROR, then the process aborts (status: killed by `SIGABRT`); a
/// supervisor restarts it and recovery rebuilds every shard from its snapshot and log. Nothing
/// of the batch that panicked was logged or answered: its records are handed to the writer
/// only after the whole batch is applied. (Keeping the process up with the shard stopped for
/// good, as before, left a dead shard behind a ready server.)
pub(crate) fn fail_fast(what: &str, panic: &(dyn std::any::Any + Send)) -> ! {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)");
    tracing::error!(
        part = what,
        panic = message,
        "panicked; its state may be half-changed: aborting the process so that a restart recovers it from the log"
    );
    std::process::abort();
}
