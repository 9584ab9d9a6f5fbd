//! The baseline: Redis, with the same connections, depth, durations and loop as a settlegate
//! run, so a run can be set beside a reference server's. Two operations (`--redis-op`):
//!
//! - `set` (`redis_set`): `SET` of a new key with a 100-byte value, Redis's cheapest write;
//! - `auth` (`redis_auth_lua`): an authorization's bookkeeping without the cryptography, as
//!   one Lua script ([`AUTH_SCRIPT`], run by `EVALSHA`): the request ID's idempotency record
//!   (a duplicate gets the stored outcome back), the user's monotonic nonce, the balance check
//!   and debit, and the record of the user's last payment. Payers are dealt to slots as in
//!   settlegate's runs (over `--users` users, one slot each at a time), so nonces arrive in
//!   order.
//!
//! The open loop (`--rate`) and the closed loop in batches (the default, `redis-benchmark -P`'s
//! way) run through lanes ([`crate::lanes`]), exactly as settlegate runs do: the same schedule,
//! the same timing, the same client cost. The `window` closed loop runs each command as its own
//! request on a pipelined connection whose replies are matched in order, like settlegate's
//! protocol client. Every reply of either operation is one line.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _};
use settlegate_engine::ReasonCode;
use settlegate_protocol::ClientError;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::dataset::now_ms;
use crate::driver::{drive, ClosedLoop, Execute, Live, Plan};
use crate::lanes::{self, Found, Wire};
use crate::tally::{Outcome, Tally};

/// Bytes of each value (`set`).
const VALUE_LEN: usize = 100;
/// Most bytes the window loop's writer gathers into one write.
const WRITE_BATCH_MAX: usize = 256 * 1024;
/// Each payment's amount (`auth`), in minor units.
const AMOUNT_MINOR: u64 = 1_000;
/// A balance's opening value, set by the script on a user's first payment (`auth`): enough
/// for any run.
const OPENING_BALANCE_MINOR: u64 = 1_000_000_000_000;
/// How long an idempotency record is kept (`auth`), in seconds: settlegate's default, a day.
const IDEMPOTENCY_TTL_S: u64 = 86_400;

/// An authorization's bookkeeping in one atomic step.
///
/// KEYS: the request's idempotency record, the user's last nonce, balance and last payment.
/// ARGV: the nonce, the amount, the opening balance (taken on a user's first payment), the
/// idempotency record's TTL in seconds. Replies with a status line: `OK`, `REPLAYED_NONCE`,
/// `INSUFFICIENT_BALANCE`, or `DUPLICATE ` and the stored outcome.
pub const AUTH_SCRIPT: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored then
  return redis.status_reply('DUPLICATE ' .. stored)
end
local outcome = 'OK'
local last = redis.call('GET', KEYS[2])
if last and tonumber(ARGV[1]) <= tonumber(last) then
  outcome = 'REPLAYED_NONCE'
else
  redis.call('SET', KEYS[2], ARGV[1])
  local balance = redis.call('GET', KEYS[3])
  if not balance then
    balance = ARGV[3]
    redis.call('SET', KEYS[3], balance)
  end
  if tonumber(balance) < tonumber(ARGV[2]) then
    outcome = 'INSUFFICIENT_BALANCE'
  else
    redis.call('DECRBY', KEYS[3], ARGV[2])
    redis.call('HSET', KEYS[4], 'nonce', ARGV[1], 'amount', ARGV[2])
  end
end
redis.call('SET', KEYS[1], outcome, 'NX', 'EX', ARGV[4])
return redis.status_reply(outcome)
";

/// The Redis operation of the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RedisOp {
    /// `SET` of a new key with a 100-byte value.
    #[default]
    Set,
    /// An authorization's bookkeeping as a Lua script ([`AUTH_SCRIPT`]).
    #[value(help = "An authorization's bookkeeping as one Lua script run by EVALSHA")]
    Auth,
}

impl RedisOp {
    /// The operation's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            RedisOp::Set => "redis_set",
            RedisOp::Auth => "redis_auth_lua",
        }
    }
}

/// Runs the baseline `op` against the Redis at `addr` (`auth`: over `users` users): through
/// lanes ([`crate::lanes`]) in the open loop and the batch closed loop, as settlegate runs go;
/// through the per-request driver for `--closed-loop window`.
pub async fn baseline(
    addr: &str,
    op: RedisOp,
    users: usize,
    plan: Arc<Plan>,
    live: Arc<Live>,
) -> anyhow::Result<Tally> {
    let script = match op {
        RedisOp::Set => None,
        RedisOp::Auth => {
            let sha = load_script(&mut connect(addr).await?).await?;
            Some(AuthScript::new(sha, users, &plan))
        }
    };
    let wire = Arc::new(RespWire { value: "v".repeat(VALUE_LEN), script });
    let expected = wire.script.as_ref().map(|script| script.sha.clone());
    let open = || async {
        let mut stream = connect(addr).await?;
        if let Some(expected) = &expected {
            // Each connection loads the script (as a client would on connecting); a Redis that
            // answers with another digest runs another script.
            let sha = load_script(&mut stream).await?;
            if &sha != expected {
                bail!("SCRIPT LOAD gave {expected}, then {sha}");
            }
        }
        Ok(stream)
    };
    if plan.closed_loop == Some(ClosedLoop::Window) {
        let mut connections = Vec::with_capacity(plan.connections);
        for _ in 0..plan.connections {
            connections.push(RespConnection::start(open().await?));
        }
        let workload = Arc::new(RedisWindow { connections, wire });
        return Ok(drive(workload, plan, live).await);
    }
    lanes::drive(wire, plan, live, open).await
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Loads [`AUTH_SCRIPT`] with `SCRIPT LOAD` on `stream`; returns its digest.
async fn load_script(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut command = Vec::new();
    resp_command(&mut command, &[b"SCRIPT", b"LOAD", AUTH_SCRIPT.as_bytes()]);
    stream.write_all(&command).await.context("sending SCRIPT LOAD")?;
    // A bulk reply: `$40\r\n<sha1 hex>\r\n` (or an error line).
    const SHA_REPLY_LEN: usize = 5 + 40 + 2;
    let mut reply = Vec::new();
    let read = async {
        loop {
            if reply.starts_with(b"-") && reply.ends_with(b"\r\n") {
                bail!("SCRIPT LOAD: {}", String::from_utf8_lossy(&reply).trim_end());
            }
            if reply.len() == SHA_REPLY_LEN && reply.starts_with(b"$40\r\n") {
                return Ok(String::from_utf8_lossy(&reply[5..45]).into_owned());
            }
            if reply.len() > SHA_REPLY_LEN {
                bail!("SCRIPT LOAD: unexpected reply {:?}", String::from_utf8_lossy(&reply));
            }
            if stream.read_buf(&mut reply).await? == 0 {
                bail!("Redis closed the connection during SCRIPT LOAD");
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .context("no answer to SCRIPT LOAD")?
}

/// Appends a RESP command (an array of bulk strings) to `out`.
pub fn resp_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    push_number(out, args.len() as u64);
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.push(b'$');
        push_number(out, arg.len() as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn push_number(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// One authorization's bookkeeping for the script: whose, and the figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthCall {
    /// The payer.
    pub user: usize,
    /// The payer's nonce, greater than any before (it also names the request ID).
    pub nonce: u64,
    /// The amount to debit.
    pub amount: u64,
    /// The balance a user's first payment opens with.
    pub opening_balance: u64,
}

impl AuthCall {
    /// Appends the `EVALSHA sha ...` command (or, with `script` instead of a digest, `EVAL`)
    /// to `out`, its keys written through `scratch`.
    pub fn encode(&self, out: &mut Vec<u8>, how: ScriptRef<'_>, scratch: &mut String) {
        let (user, nonce) = (self.user, self.nonce);
        // The keys and numbers, one after another in `scratch`, and where each ends.
        scratch.clear();
        let mut ends = [0; 8];
        for (i, end) in ends.iter_mut().enumerate() {
            let _ = match i {
                0 => write!(scratch, "lg:req:{user}:{nonce}"),
                1 => write!(scratch, "lg:nonce:{user}"),
                2 => write!(scratch, "lg:bal:{user}"),
                3 => write!(scratch, "lg:last:{user}"),
                4 => write!(scratch, "{nonce}"),
                5 => write!(scratch, "{}", self.amount),
                6 => write!(scratch, "{}", self.opening_balance),
                _ => write!(scratch, "{IDEMPOTENCY_TTL_S}"),
            };
            *end = scratch.len();
        }
        let bytes = scratch.as_bytes();
        let field = |i: usize| &bytes[if i == 0 { 0 } else { ends[i - 1] }..ends[i]];
        let (command, body): (&[u8], &str) = match how {
            ScriptRef::Sha(sha) => (b"EVALSHA", sha),
            ScriptRef::Source => (b"EVAL", AUTH_SCRIPT),
        };
        #[rustfmt::skip]
        let args = [
            command, body.as_bytes(), b"4",
            field(0), field(1), field(2), field(3),
            field(4), field(5), field(6), field(7),
        ];
        resp_command(out, &args);
    }
}

/// How a command names the script.
#[derive(Debug, Clone, Copy)]
pub enum ScriptRef<'a> {
    /// By its digest (`EVALSHA`).
    Sha(&'a str),
    /// By its source (`EVAL`), which also puts it back in Redis's script cache.
    Source,
}

/// How a reply line counts (`auth`: the script's outcomes; `set`: `+OK`).
fn judge_reply(line: &[u8]) -> Outcome {
    match line.strip_suffix(b"\r\n").unwrap_or(line) {
        b"+OK" => Outcome::Ok,
        b"+REPLAYED_NONCE" => Outcome::Declined(ReasonCode::ReplayedNonce.code()),
        b"+INSUFFICIENT_BALANCE" => Outcome::Declined(ReasonCode::InsufficientBalance.code()),
        reply if reply.starts_with(b"+DUPLICATE") => {
            Outcome::Error("redis: a request ID used twice".into())
        }
        reply if reply.starts_with(b"-NOSCRIPT") => {
            Outcome::Error("redis NOSCRIPT (the script is reloaded)".into())
        }
        _ => Outcome::Error("redis error reply".into()),
    }
}

/// The `auth` operation's script and users.
struct AuthScript {
    /// The script's digest, from `SCRIPT LOAD`.
    sha: String,
    users: usize,
    /// Slots in the run, which payers are dealt over.
    stride: usize,
    pipeline: usize,
    /// Microseconds since the Unix epoch at the start: nonces start above it, so a later run
    /// against the same Redis never sends a nonce an earlier one used (a slot sends fewer than
    /// one request a microsecond).
    run_us: u64,
    /// Set on a `NOSCRIPT` reply (the script cache was flushed): the next command is an `EVAL`
    /// of the source, which loads the script again.
    reload: AtomicBool,
}

impl AuthScript {
    fn new(sha: String, users: usize, plan: &Plan) -> AuthScript {
        AuthScript {
            sha,
            users: users.max(1),
            stride: plan.connections * plan.pipeline,
            pipeline: plan.pipeline,
            run_us: now_ms() as u64 * 1_000,
            reload: AtomicBool::new(false),
        }
    }
}

/// A Redis operation over RESP, for a lane (and the window loop): answers come in order, one
/// line each.
struct RespWire {
    value: String,
    /// `auth`: the script; `set` when none.
    script: Option<AuthScript>,
}

/// A slot's state: its connection; `set`: its key prefix and counter; `auth`: the payers it
/// owns (dealt round-robin over the run's slots, as settlegate's runs deal them) and its
/// requests so far.
struct RespSlot {
    connection: usize,
    prefix: String,
    next: u64,
    /// The key (`set`) or the keys (`auth`) being built.
    key: String,
    global: usize,
    next_user: usize,
}

impl RespSlot {
    /// The slot's next key: every SET writes a new one.
    fn next_key(&mut self) -> &str {
        self.next += 1;
        self.key.clear();
        let _ = write!(self.key, "{}{}", self.prefix, self.next);
        &self.key
    }

    /// The next payer this slot owns, of `users`, slots `stride` apart.
    fn next_user(&mut self, users: usize, stride: usize) -> usize {
        if self.next_user >= users {
            self.next_user = self.global % users;
        }
        let user = self.next_user;
        self.next_user += stride;
        user
    }
}

impl RespWire {
    fn slot(&self, connection: usize, slot: usize) -> RespSlot {
        let global = connection * self.script.as_ref().map_or(0, |s| s.pipeline) + slot;
        RespSlot {
            connection,
            prefix: format!("lg:{connection}:{slot}:"),
            next: 0,
            key: String::new(),
            global,
            next_user: global,
        }
    }

    /// Appends the slot's next command to `out`.
    fn command(&self, slot: &mut RespSlot, out: &mut Vec<u8>) {
        let Some(script) = &self.script else {
            let key = slot.next_key();
            resp_command(out, &[b"SET", key.as_bytes(), self.value.as_bytes()]);
            return;
        };
        slot.next += 1;
        let call = AuthCall {
            user: slot.next_user(script.users, script.stride),
            nonce: script.run_us + slot.next,
            amount: AMOUNT_MINOR,
            opening_balance: OPENING_BALANCE_MINOR,
        };
        let how = if script.reload.swap(false, Ordering::Relaxed) {
            ScriptRef::Source
        } else {
            ScriptRef::Sha(&script.sha)
        };
        call.encode(out, how, &mut slot.key);
    }

    fn judge(&self, line: &[u8]) -> Outcome {
        let outcome = judge_reply(line);
        if let (Some(script), true) = (&self.script, line.starts_with(b"-NOSCRIPT")) {
            script.reload.store(true, Ordering::Relaxed);
        }
        outcome
    }
}

impl Wire for RespWire {
    type Slot = RespSlot;

    fn slot(&self, connection: usize, slot: usize) -> RespSlot {
        RespWire::slot(self, connection, slot)
    }

    fn encode(&self, _op: usize, slot: &mut RespSlot, _id: u64, out: &mut Vec<u8>) -> u16 {
        self.command(slot, out);
        0
    }

    type Answer<'a> = &'a [u8];

    fn split<'a>(&self, input: &'a [u8]) -> Result<Option<Found<&'a [u8]>>, ClientError> {
        let line = input.windows(2).position(|w| w == b"\r\n");
        Ok(line.map(|at| Found { id: None, len: at + 2, answer: &input[..at + 2] }))
    }

    fn judge(&self, _op: usize, _tag: u16, answer: &[u8]) -> Outcome {
        RespWire::judge(self, answer)
    }
}

/// Reply waiters in send order, and the writer's queue.
type Sending = (VecDeque<oneshot::Sender<Vec<u8>>>, mpsc::UnboundedSender<Vec<u8>>);

/// A pipelined RESP connection: commands go out in order through one writer task, and the
/// reader answers the oldest waiter with each reply line (every reply here is one line).
struct RespConnection {
    /// Waiters in send order, and the writer's queue: pushed together under the lock so the
    /// order of the queue is the order of the waiters.
    sending: Mutex<Sending>,
}

impl RespConnection {
    fn start(stream: TcpStream) -> Arc<RespConnection> {
        let (read_half, mut write_half) = stream.into_split();
        let (outgoing, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
        let connection =
            Arc::new(RespConnection { sending: Mutex::new((VecDeque::new(), outgoing)) });
        tokio::spawn(async move {
            let mut buffer = Vec::with_capacity(64 * 1024);
            while let Some(first) = queue.recv().await {
                buffer.clear();
                buffer.extend_from_slice(&first);
                while buffer.len() < WRITE_BATCH_MAX {
                    match queue.try_recv() {
                        Ok(more) => buffer.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                if write_half.write_all(&buffer).await.is_err() {
                    return;
                }
            }
        });
        let reader = Arc::downgrade(&connection);
        tokio::spawn(async move {
            let mut input = BufReader::new(read_half);
            loop {
                let mut line = Vec::new();
                match input.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let Some(connection) = reader.upgrade() else { return };
                let waiter = connection.sending.lock().expect("lock").0.pop_front();
                if let Some(waiter) = waiter {
                    let _ = waiter.send(line);
                }
            }
            // Closed: dropping the waiters tells every caller.
            if let Some(connection) = reader.upgrade() {
                connection.sending.lock().expect("lock").0.clear();
            }
        });
        connection
    }

    /// Sends `command`; its reply line, or `None` when the connection closed.
    async fn send(&self, command: Vec<u8>) -> Option<Vec<u8>> {
        let (reply, answer) = oneshot::channel();
        {
            let mut sending = self.sending.lock().expect("lock");
            sending.1.send(command).ok()?;
            sending.0.push_back(reply);
        }
        answer.await.ok()
    }
}

/// The window closed loop's Redis workload: each command its own request.
struct RedisWindow {
    connections: Vec<Arc<RespConnection>>,
    wire: Arc<RespWire>,
}

impl Execute for RedisWindow {
    type Slot = RespSlot;

    fn slot(&self, connection: usize, slot: usize) -> RespSlot {
        self.wire.slot(connection, slot)
    }

    fn execute<'a>(
        &'a self,
        _op: usize,
        slot: &'a mut RespSlot,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        let connection = &self.connections[slot.connection];
        let mut command = Vec::new();
        self.wire.command(slot, &mut command);
        async move {
            match connection.send(command).await {
                Some(line) => self.wire.judge(&line),
                None => Outcome::Error("connection closed".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// How long the tests wait for a fake Redis.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    fn set_command(key: &str, value: &str) -> Vec<u8> {
        let mut out = Vec::new();
        resp_command(&mut out, &[b"SET", key.as_bytes(), value.as_bytes()]);
        out
    }

    #[test]
    fn resp_set_is_well_formed() {
        assert_eq!(
            set_command("k1", "vv"),
            b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$2\r\nvv\r\n".to_vec()
        );
        let mut out = Vec::new();
        resp_command(&mut out, &[b"", &[b'x'; 1234]]);
        assert!(out.starts_with(b"*2\r\n$0\r\n\r\n$1234\r\nxxx"));
    }

    #[test]
    fn evalsha_is_well_formed() {
        let call =
            AuthCall { user: 7, nonce: 1_700_000_000_000_001, amount: 1_000, opening_balance: 5 };
        let mut out = Vec::new();
        let sha = "a".repeat(40);
        call.encode(&mut out, ScriptRef::Sha(&sha), &mut String::new());
        let expected = format!(
            "*11\r\n$7\r\nEVALSHA\r\n$40\r\n{sha}\r\n$1\r\n4\r\n\
             $25\r\nlg:req:7:1700000000000001\r\n$10\r\nlg:nonce:7\r\n$8\r\nlg:bal:7\r\n\
             $9\r\nlg:last:7\r\n$16\r\n1700000000000001\r\n$4\r\n1000\r\n$1\r\n5\r\n\
             $5\r\n86400\r\n"
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        // EVAL carries the source instead of the digest, the rest alike.
        let mut out = Vec::new();
        call.encode(&mut out, ScriptRef::Source, &mut String::new());
        let source =
            format!("$4\r\nEVAL\r\n${}\r\n{AUTH_SCRIPT}\r\n$1\r\n4\r\n", AUTH_SCRIPT.len());
        assert!(String::from_utf8(out).unwrap().starts_with(&format!("*11\r\n{source}")));
    }

    #[test]
    fn replies_count_as_the_script_means() {
        assert_eq!(judge_reply(b"+OK\r\n"), Outcome::Ok);
        assert_eq!(
            judge_reply(b"+REPLAYED_NONCE\r\n"),
            Outcome::Declined(ReasonCode::ReplayedNonce.code())
        );
        assert_eq!(
            judge_reply(b"+INSUFFICIENT_BALANCE\r\n"),
            Outcome::Declined(ReasonCode::InsufficientBalance.code())
        );
        assert!(matches!(judge_reply(b"+DUPLICATE OK\r\n"), Outcome::Error(_)));
        assert!(matches!(judge_reply(b"-ERR x\r\n"), Outcome::Error(_)));
    }

    /// Payers are dealt to slots round-robin: no two slots share one while there are enough.
    #[test]
    fn each_payer_belongs_to_one_slot() {
        let plan = plan(None, 2, 3);
        let wire =
            RespWire { value: String::new(), script: Some(AuthScript::new("s".into(), 12, &plan)) };
        let mut owner = std::collections::HashMap::new();
        for c in 0..2 {
            for s in 0..3 {
                let mut slot = wire.slot(c, s);
                for _ in 0..5 {
                    let user = slot.next_user(12, 6);
                    assert!(user < 12);
                    assert_eq!(*owner.entry(user).or_insert((c, s)), (c, s), "user {user}");
                }
            }
        }
        assert_eq!(owner.len(), 12);
    }

    fn plan(rate: Option<f64>, connections: usize, pipeline: usize) -> Plan {
        Plan {
            connections,
            pipeline,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(300),
            rate_per_s: rate,
            pacing: crate::driver::Pacing::Spin,
            closed_loop: if rate.is_some() { None } else { Some(ClosedLoop::Batch) },
            timeout: Duration::from_secs(5),
            seed: 1,
            weights: vec![1],
        }
    }

    /// A fake Redis answering `+OK` to every command (counting `*3` headers), and `-ERR` to
    /// every tenth.
    async fn fake_redis() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 64 * 1024];
                    let mut seen = 0u64;
                    let mut carry = Vec::new();
                    while let Ok(n) = stream.read(&mut buffer).await {
                        if n == 0 {
                            return;
                        }
                        carry.extend_from_slice(&buffer[..n]);
                        let mut replies = Vec::new();
                        while let Some(at) = carry.windows(4).position(|w| w == b"SET\r") {
                            carry.drain(..at + 4);
                            seen += 1;
                            replies.extend_from_slice(if seen.is_multiple_of(10) {
                                b"-ERR x\r\n"
                            } else {
                                b"+OK\r\n"
                            });
                        }
                        if stream.write_all(&replies).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn open_loop_baseline_matches_replies_in_order() {
        let addr = fake_redis().await;
        let plan = Arc::new(plan(Some(1_000.0), 2, 4));
        let run = baseline(&addr, RedisOp::Set, 0, plan, Arc::default());
        let tally = tokio::time::timeout(TEST_TIMEOUT, run).await.unwrap().unwrap();
        let op = &tally.ops[0];
        let errors = op.errors.get("redis error reply").copied().unwrap_or(0);
        let total = op.corrected_us.len() + errors;
        // 300 due; a loaded machine may leave a few unsent at the end.
        assert!((100..=300).contains(&total), "{total}");
        // Every tenth reply of each connection is an error, and each reply reached its caller.
        assert!(errors + 2 >= total / 10 && errors <= total / 10, "{errors} of {total}");
    }

    /// A `redis-server` of this test's own, on a free port below 32768 (the ephemeral range
    /// starts there); `None`, and the test is skipped, where none is installed.
    struct RedisServer {
        child: std::process::Child,
        addr: String,
        _dir: TempDir,
    }

    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl RedisServer {
        async fn start() -> Option<RedisServer> {
            let installed = std::process::Command::new("redis-server")
                .arg("--version")
                .output()
                .is_ok_and(|out| out.status.success());
            if !installed {
                eprintln!("redis-server is not installed: skipped");
                return None;
            }
            // A port of each test's own: tests run at once in one process, and other processes
            // may run these tests too.
            static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
            let pid = std::process::id() as u16;
            for _ in 0..20 {
                let attempt = NEXT.fetch_add(1, Ordering::Relaxed);
                let port =
                    20_000 + pid.wrapping_mul(97).wrapping_add(attempt.wrapping_mul(131)) % 12_000;
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                    continue;
                }
                let dir = std::env::temp_dir().join(format!("loadgen-redis-{pid}-{port}"));
                std::fs::create_dir_all(&dir).unwrap();
                let dir = TempDir(dir);
                let port_arg = port.to_string();
                let mut child = std::process::Command::new("redis-server")
                    .args(["--port", &port_arg, "--bind", "127.0.0.1", "--save", ""])
                    .args(["--appendonly", "no", "--dir"])
                    .arg(&dir.0)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                let addr = format!("127.0.0.1:{port}");
                for _ in 0..100 {
                    if TcpStream::connect(&addr).await.is_ok() {
                        return Some(RedisServer { child, addr, _dir: dir });
                    }
                    if child.try_wait().unwrap().is_some() {
                        break; // the port was taken meanwhile: another one
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("could not start redis-server on a free port");
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Sends `command` and reads one reply line.
    async fn ask(stream: &mut BufReader<TcpStream>, command: &[u8]) -> Vec<u8> {
        stream.get_mut().write_all(command).await.unwrap();
        let mut line = Vec::new();
        stream.read_until(b'\n', &mut line).await.unwrap();
        line
    }

    /// The script against a real Redis: a payment is taken once; a duplicate request ID, a
    /// stale nonce and a payment above the balance are refused and change nothing; a
    /// `NOSCRIPT` after the cache is flushed brings the script back.
    #[tokio::test]
    async fn auth_script_refuses_duplicates_stale_nonces_and_overdrafts() {
        let Some(redis) = RedisServer::start().await else { return };
        let mut stream = connect(&redis.addr).await.unwrap();
        let sha = load_script(&mut stream).await.unwrap();
        assert_eq!(sha.len(), 40);
        let mut stream = BufReader::new(stream);
        let mut scratch = String::new();
        let call = |nonce| AuthCall { user: 3, nonce, amount: 1_000, opening_balance: 2_500 };
        let mut run = async |call: AuthCall| {
            let mut command = Vec::new();
            call.encode(&mut command, ScriptRef::Sha(&sha), &mut scratch);
            String::from_utf8(ask(&mut stream, &command).await).unwrap()
        };
        assert_eq!(run(call(10)).await, "+OK\r\n");
        assert_eq!(run(call(10)).await, "+DUPLICATE OK\r\n", "the stored outcome");
        assert_eq!(run(call(9)).await, "+REPLAYED_NONCE\r\n");
        assert_eq!(run(call(10)).await, "+DUPLICATE OK\r\n");
        assert_eq!(run(call(11)).await, "+OK\r\n");
        assert_eq!(run(call(12)).await, "+INSUFFICIENT_BALANCE\r\n", "500 left");
        assert_eq!(run(call(12)).await, "+DUPLICATE INSUFFICIENT_BALANCE\r\n");
        assert_eq!(run(AuthCall { amount: 500, ..call(13) }).await, "+OK\r\n");
        let mut get = Vec::new();
        resp_command(&mut get, &[b"GET", b"lg:bal:3"]);
        assert_eq!(ask(&mut stream, &get).await, b"$1\r\n");
        let mut value = Vec::new();
        stream.read_until(b'\n', &mut value).await.unwrap();
        assert_eq!(value, b"0\r\n", "2,500 less 1,000, 1,000 and 500");
        let mut last = Vec::new();
        resp_command(&mut last, &[b"HGET", b"lg:last:3", b"nonce"]);
        ask(&mut stream, &last).await;
        let mut value = Vec::new();
        stream.read_until(b'\n', &mut value).await.unwrap();
        assert_eq!(value, b"13\r\n");

        // NOSCRIPT: the wire asks for the source once, and the digest works again after it.
        let plan = plan(None, 1, 1);
        let wire =
            RespWire { value: String::new(), script: Some(AuthScript::new(sha.clone(), 4, &plan)) };
        let mut slot = wire.slot(0, 0);
        let mut flush = Vec::new();
        resp_command(&mut flush, &[b"SCRIPT", b"FLUSH"]);
        assert_eq!(ask(&mut stream, &flush).await, b"+OK\r\n");
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let mut command = Vec::new();
            wire.command(&mut slot, &mut command);
            outcomes.push(wire.judge(&ask(&mut stream, &command).await));
        }
        assert!(matches!(&outcomes[0], Outcome::Error(kind) if kind.contains("NOSCRIPT")));
        assert_eq!(outcomes[1..], [Outcome::Ok, Outcome::Ok]);
    }

    /// The baseline's `auth` runs against a real Redis, in each loop: every request answered,
    /// none declined (each payer's nonces arrive in order; the balance is ample).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auth_baseline_runs_in_every_loop() {
        let Some(redis) = RedisServer::start().await else { return };
        for (rate, closed_loop) in [
            (None, ClosedLoop::Batch),
            (None, ClosedLoop::Window),
            (Some(2_000.0), ClosedLoop::Batch),
        ] {
            let mut plan = plan(rate, 3, 4);
            if rate.is_none() {
                plan.closed_loop = Some(closed_loop);
            }
            let run = baseline(&redis.addr, RedisOp::Auth, 20, Arc::new(plan), Arc::default());
            let tally = tokio::time::timeout(TEST_TIMEOUT, run).await.unwrap().unwrap();
            let op = &tally.ops[0];
            assert!(op.corrected_us.len() > 100, "{rate:?} {closed_loop:?}");
            assert_eq!(op.errors, Default::default(), "{rate:?} {closed_loop:?}");
            assert_eq!(op.declines, Default::default(), "{rate:?} {closed_loop:?}");
        }
    }
}
