//! Threads that each run a single-threaded tokio runtime, for connections that should stay on
//! one thread: the server's connection threads and the load generator's lanes.
//!
//! A connection spawned on one of these runtimes (with its socket moved there: [`adopt`]) has
//! its socket registered in that thread's poller, and every task it spawns runs on that thread
//! too. Nothing is stolen or woken across threads, as it is on a multi-threaded runtime, where
//! a connection's wake-ups go to whichever worker is free; on a small machine that costs a
//! tenth of the CPU per request when each read carries only a few requests
//! (`docs/BENCHMARKS-HISTORY.md`).

use std::future::Future;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Runtimes on threads of their own, each running until [`RuntimeThreads::stop`] (or drop).
#[derive(Debug)]
pub struct RuntimeThreads {
    runtimes: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: usize,
}

impl RuntimeThreads {
    /// Starts `count` threads (at least one) named `name-N`.
    pub fn start(name: &str, count: usize) -> std::io::Result<RuntimeThreads> {
        let mut pool = RuntimeThreads {
            runtimes: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
            next: 0,
        };
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            pool.runtimes.push(runtime.handle().clone());
            pool.stops.push(stop);
            let thread = std::thread::Builder::new().name(format!("{name}-{index}"));
            pool.threads.push(thread.spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                })
            })?);
        }
        Ok(pool)
    }

    /// The runtime of the next thread, in turn.
    pub fn next_runtime(&mut self) -> &Handle {
        let runtime = &self.runtimes[self.next];
        self.next = (self.next + 1) % self.runtimes.len();
        runtime
    }

    /// Spawns `future` on the next thread in turn.
    pub fn spawn<F>(&mut self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.next_runtime().spawn(future)
    }

    /// Stops every thread, dropping whatever its runtime still holds, and waits for each
    /// (blocking: from async code, call it through `spawn_blocking`).
    pub fn stop(self) {
        drop(self.stops);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// A socket accepted or connected on one runtime, ready to move to another: take it out of
/// its poller here, then [`adopt`] it on the runtime that will serve it.
pub fn release(stream: TcpStream) -> std::io::Result<std::net::TcpStream> {
    stream.into_std()
}

/// Registers a released socket with the current runtime's poller.
pub fn adopt(stream: std::net::TcpStream) -> std::io::Result<TcpStream> {
    TcpStream::from_std(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each thread's tasks run on that thread, the threads are taken in turn, and a socket
    /// moved to one of them is served there.
    #[tokio::test]
    async fn tasks_stay_on_their_thread_and_threads_are_taken_in_turn() {
        let mut pool = RuntimeThreads::start("test-rt", 2).unwrap();
        let name = || std::thread::current().name().unwrap_or_default().to_owned();
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(pool.spawn(async move { name() }).await.unwrap());
        }
        assert_eq!(names, ["test-rt-0", "test-rt-1", "test-rt-0", "test-rt-1"]);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(b"ping").await.unwrap();
        });
        let (accepted, _) = listener.accept().await.unwrap();
        let released = release(accepted).unwrap();
        let served = pool.spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut stream = adopt(released).unwrap();
            let mut bytes = [0u8; 4];
            stream.read_exact(&mut bytes).await.unwrap();
            (bytes, name())
        });
        assert_eq!(served.await.unwrap(), (*b"ping", "test-rt-0".to_owned()));
        client.await.unwrap();
        tokio::task::spawn_blocking(move || pool.stop()).await.unwrap();
    }
}
