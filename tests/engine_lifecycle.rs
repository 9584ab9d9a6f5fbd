//! Stopping the engine: `shutdown().await`, `shutdown_blocking()`, and dropping the last clone
//! inside a Tokio runtime (stopped on the blocking pool) and outside one (stopped inline).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use settlegate_engine::{Engine, EngineError};

use crate::support::*;

#[tokio::test]
async fn shutdown_is_awaited_and_may_be_repeated() {
    let h = Harness::new();
    let user = h.user("stopping").await;
    h.engine.shutdown().await;
    assert_eq!(h.engine.unavailable_shards().len(), h.engine.shard_count());
    h.engine.shutdown().await;
    h.engine.shutdown_blocking();
    let stopped = h.engine.login(&user.user, PASSWORD).await;
    assert_eq!(stopped, Err(EngineError::Stopped));
}

/// The stop waits for a stalled shard; the stall is released by a task on the same
/// single-threaded executor, which runs only if dropping the engine returned without stopping
/// it there. A watchdog thread releases it after 10 s, so that a regression fails, not hangs.
#[tokio::test(flavor = "current_thread")]
async fn dropping_the_last_engine_in_a_runtime_does_not_block_the_executor() {
    let h = Harness::new();
    let user = h.user("dropped").await;
    let release = h.engine.stall_shard_of(&user.user);
    let watchdog_release = release.clone();
    let watchdog_fired = Arc::new(AtomicBool::new(false));
    let fired = Arc::clone(&watchdog_fired);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        fired.store(true, Ordering::SeqCst);
        let _ = watchdog_release.send(());
    });
    let releaser = tokio::spawn(async move {
        let _ = release.send(());
    });
    drop(h);
    assert!(!watchdog_fired.load(Ordering::SeqCst), "dropping the engine blocked the executor");
    releaser.await.unwrap();
}

#[test]
fn dropping_the_last_engine_outside_a_runtime_stops_it_inline() {
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(dir.path(), 0);
    let engine = Engine::start(config.clone()).expect("engine starts");
    drop(engine);
    // Stopped: its data directory opens again at once.
    let engine = Engine::start(config).expect("engine restarts");
    engine.shutdown_blocking();
}
