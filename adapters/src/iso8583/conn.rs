//! The connection task: one TCP connection to the host, many requests in flight on it.
//!
//! ```text
//!  authorize() --Submission--> Session (select loop) --frames--> writer task --> socket
//!                               ^  in-flight map: STAN -> entry (RRN, expected MTI)
//!                               |  deadlines: FIFO (one timeout for all, so ordered)
//!  socket --> reader task --Inbound (decoded Message | Closed)--+
//! ```
//!
//! The session owns all state, so nothing is locked: it allocates STANs, writes requests,
//! matches replies by STAN and RRN, times requests out and reverses them, signs on, echoes,
//! and drives the breaker. While the link is down it keeps answering submissions (unavailable)
//! between reconnection attempts. Dropping every adapter handle closes the submission channel,
//! which ends the session.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use super::breaker::{Breaker, Transition};
use super::codec::{self, Message};
use super::config::{Iso8583Config, STAN_MAX};
use super::dialect::Dialect;
use super::io::{read_loop, write_loop, Inbound};
use super::mapping::{self, Network, Original};
use super::{bump, link_unavailable, pan_valid, LinkStatus, Shared, Submission};
use crate::{
    AdapterError, AuthReference, Detokenizer, LifecycleReply, LifecycleRequest, ProviderReply,
};

/// Decoded messages queued from the reader to the session (back-pressure onto the socket).
const INBOUND_QUEUE: usize = 1024;

type Reply = oneshot::Sender<Result<ProviderReply, AdapterError>>;
type LifecycleTx = oneshot::Sender<Result<LifecycleReply, AdapterError>>;

/// A connection to the host: plain TCP, or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The TLS connector and the name the host's certificate must carry.
pub(crate) type Tls = (TlsConnector, ServerName<'static>);

/// Why a connection ended.
enum Flow {
    Stop,
    Reconnect(String),
}

/// What an in-flight STAN is waiting for.
enum Pending {
    /// An authorization; `reference` is its approval's, but for the code.
    Auth {
        original: Original,
        reference: AuthReference,
        reply: Reply,
    },
    /// A capture, void, refund or reversal asked for, sent as `sent`.
    Lifecycle {
        request: LifecycleRequest,
        sent: crate::NetworkReference,
        reply: LifecycleTx,
    },
    Reversal {
        original: Original,
        attempt: u32,
    },
    Network(Network),
}

struct Entry {
    /// Distinguishes this use of the STAN from earlier ones in the deadline queue.
    seq: u64,
    expect_mti: [u8; 4],
    rrn: Option<[u8; 12]>,
    pending: Pending,
}

/// The live connection's half of the state.
struct Link {
    out: mpsc::UnboundedSender<Zeroizing<Vec<u8>>>,
    signed_on: bool,
    echo_pending: bool,
    next_echo: Instant,
    close: Option<String>,
}

/// Exponential reconnection delay with jitter; zero right after a signed-on link is lost.
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Option<Duration>,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let delay = self.current.unwrap_or(Duration::ZERO);
        self.current = Some(match self.current {
            None => self.initial,
            Some(d) => (d * 2).min(self.max),
        });
        delay.mul_f64(rand::thread_rng().gen_range(0.8..=1.0))
    }

    fn reset(&mut self) {
        self.current = None;
    }
}

/// The next STAN after `last` that `taken` does not hold: 1..=999999, wrapping, never 0.
pub(crate) fn next_free_stan(last: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    let mut stan = last;
    for _ in 0..STAN_MAX {
        stan = if stan >= STAN_MAX { 1 } else { stan + 1 };
        if !taken(stan) {
            return Some(stan);
        }
    }
    None
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 86_400)
}

/// The connection task's state.
pub(crate) struct Session {
    config: Iso8583Config,
    dialect: Arc<Dialect>,
    tls: Option<Tls>,
    detokenizer: Arc<dyn Detokenizer>,
    shared: Arc<Shared>,
    breaker: Breaker,
    backoff: Backoff,
    in_flight: HashMap<u32, Entry>,
    deadlines: VecDeque<(Instant, u32, u64)>,
    requests_in_flight: u32,
    reversals_in_flight: u32,
    stan_last: u32,
    seq: u64,
    reversals_queued: VecDeque<(Original, u32)>,
    link: Option<Link>,
}

impl Session {
    pub(crate) fn new(
        config: Iso8583Config,
        dialect: Arc<Dialect>,
        tls: Option<Tls>,
        detokenizer: Arc<dyn Detokenizer>,
        shared: Arc<Shared>,
    ) -> Session {
        Session {
            dialect,
            tls,
            detokenizer,
            shared,
            breaker: Breaker::new(config.breaker_failures_to_open, config.breaker_echoes_to_close),
            backoff: Backoff {
                initial: Duration::from_millis(config.backoff_initial_ms),
                max: Duration::from_millis(config.backoff_max_ms),
                current: None,
            },
            in_flight: HashMap::new(),
            deadlines: VecDeque::new(),
            requests_in_flight: 0,
            reversals_in_flight: 0,
            stan_last: 0,
            seq: 0,
            reversals_queued: VecDeque::new(),
            link: None,
            config,
        }
    }

    /// Runs until every adapter handle is dropped.
    pub(crate) async fn run(mut self, mut submissions: mpsc::Receiver<Submission>) {
        loop {
            let Some(stream) = self.connect(&mut submissions).await else { return };
            match self.serve(stream, &mut submissions).await {
                Flow::Stop => return,
                Flow::Reconnect(reason) => {
                    tracing::warn!(host = %self.config.host_addr, %reason, "iso8583: link lost");
                    self.link_lost();
                }
            }
        }
    }

    fn status(&self) -> LinkStatus {
        if self.breaker.is_open() {
            LinkStatus::BreakerOpen
        } else if self.link.as_ref().is_some_and(|l| l.signed_on) {
            LinkStatus::Ready
        } else {
            LinkStatus::Connecting
        }
    }

    fn publish_status(&self) {
        let status = self.status().as_u8();
        self.shared.status.store(status, std::sync::atomic::Ordering::Release);
    }

    fn reject(&self, submission: Submission) {
        let error = link_unavailable(self.status(), &self.config.host_addr)
            .unwrap_or_else(|| AdapterError::Unavailable("iso8583: link not ready".into()));
        submission.fail(error);
    }

    /// Runs `work` while answering submissions as unavailable; `None` once the adapter is gone.
    async fn while_down<F: Future>(
        &mut self,
        submissions: &mut mpsc::Receiver<Submission>,
        work: F,
    ) -> Option<F::Output> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Some(output),
                submission = submissions.recv() => self.reject(submission?),
            }
        }
    }

    async fn connect(&mut self, submissions: &mut mpsc::Receiver<Submission>) -> Option<Stream> {
        loop {
            let delay = self.backoff.next_delay();
            if !delay.is_zero() {
                self.while_down(submissions, tokio::time::sleep(delay)).await?;
            }
            let timeout = Duration::from_millis(self.config.connect_timeout_ms);
            let attempt =
                tokio::time::timeout(timeout, TcpStream::connect(self.config.host_addr.clone()));
            match self.while_down(submissions, attempt).await? {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let Some((connector, name)) = self.tls.clone() else {
                        return Some(Stream::Plain(stream));
                    };
                    let handshake = tokio::time::timeout(timeout, connector.connect(name, stream));
                    match self.while_down(submissions, handshake).await? {
                        Ok(Ok(stream)) => return Some(Stream::Tls(Box::new(stream))),
                        Ok(Err(error)) => tracing::warn!(
                            host = %self.config.host_addr, %error, "iso8583: TLS handshake failed"
                        ),
                        Err(_) => tracing::warn!(
                            host = %self.config.host_addr, "iso8583: TLS handshake timed out"
                        ),
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(host = %self.config.host_addr, %error, "iso8583: connect failed");
                }
                Err(_) => {
                    tracing::warn!(host = %self.config.host_addr, "iso8583: connect timed out")
                }
            }
            self.failure();
        }
    }

    async fn serve(
        &mut self,
        stream: Stream,
        submissions: &mut mpsc::Receiver<Submission>,
    ) -> Flow {
        let (out, out_rx) = mpsc::unbounded_channel();
        let (inbound_tx, mut inbound) = mpsc::channel(INBOUND_QUEUE);
        let shared = Arc::clone(&self.shared);
        let (reader, writer) = match stream {
            Stream::Plain(stream) => {
                let (read, write) = stream.into_split();
                (
                    tokio::spawn(read_loop(read, inbound_tx.clone(), shared)),
                    tokio::spawn(write_loop(write, out_rx, inbound_tx)),
                )
            }
            Stream::Tls(stream) => {
                let (read, write) = tokio::io::split(*stream);
                (
                    tokio::spawn(read_loop(read, inbound_tx.clone(), shared)),
                    tokio::spawn(write_loop(write, out_rx, inbound_tx)),
                )
            }
        };
        self.link = Some(Link {
            out,
            signed_on: false,
            echo_pending: false,
            next_echo: far_future(),
            close: None,
        });
        self.send_network(Network::SignOn);
        let flow = loop {
            let deadline = self.deadlines.front().map(|d| d.0);
            let next_echo = self.link.as_ref().map_or_else(far_future, |l| l.next_echo);
            tokio::select! {
                biased;
                message = inbound.recv() => match message {
                    Some(Inbound::Message(message)) => self.on_message(message),
                    Some(Inbound::Closed(reason)) => break Flow::Reconnect(reason),
                    None => break Flow::Reconnect("link tasks ended".into()),
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    self.on_deadlines();
                }
                _ = tokio::time::sleep_until(next_echo) => self.on_echo_due(),
                submission = submissions.recv() => match submission {
                    Some(submission) => self.submit(submission),
                    None => break Flow::Stop,
                },
            }
            self.publish_reversals();
            if let Some(reason) = self.link.as_mut().and_then(|l| l.close.take()) {
                break Flow::Reconnect(reason);
            }
        };
        reader.abort();
        writer.abort();
        flow
    }

    /// Everything in flight on a lost link has an unknown outcome: authorizations time out
    /// and are reversed once a link is back; unacknowledged reversals wait for it too.
    fn link_lost(&mut self) {
        self.link = None;
        self.deadlines.clear();
        self.requests_in_flight = 0;
        self.reversals_in_flight = 0;
        let entries: Vec<Entry> = self.in_flight.drain().map(|(_, entry)| entry).collect();
        for entry in entries {
            match entry.pending {
                Pending::Auth { original, reply, .. } => {
                    bump(&self.shared.counters.timeouts);
                    let _ = reply.send(Err(AdapterError::Timeout));
                    self.queue_reversal(original, 0);
                }
                Pending::Lifecycle { reply, .. } => {
                    bump(&self.shared.counters.timeouts);
                    let _ = reply.send(Err(AdapterError::Timeout));
                }
                Pending::Reversal { original, attempt } => self.queue_reversal(original, attempt),
                Pending::Network(_) => {}
            }
        }
        self.publish_reversals();
        self.failure();
    }

    /// Reversals owed to the host (in flight or queued), for `/metrics`.
    fn publish_reversals(&self) {
        let pending = self.reversals_queued.len() as u64 + u64::from(self.reversals_in_flight);
        self.shared.reversals_pending.store(pending, std::sync::atomic::Ordering::Relaxed);
    }

    fn failure(&mut self) {
        if self.breaker.failure() == Transition::Opened {
            bump(&self.shared.counters.breaker_opened);
            tracing::warn!(host = %self.config.host_addr, "iso8583: circuit breaker open");
            let probe = Duration::from_millis(self.config.breaker_probe_interval_ms);
            if let Some(link) = self.link.as_mut() {
                link.next_echo = link.next_echo.min(Instant::now() + probe);
            }
        }
        self.publish_status();
    }

    fn close_link(&mut self, reason: &str) {
        if let Some(link) = self.link.as_mut() {
            link.close = Some(reason.to_owned());
        }
    }

    fn echo_interval(&self) -> Duration {
        let ms = if self.breaker.is_open() {
            self.config.breaker_probe_interval_ms
        } else {
            self.config.echo_interval_ms
        };
        Duration::from_millis(ms)
    }

    /// Encodes `message` and hands it to the writer; the frame is zeroized once written.
    fn write(&self, message: &Message) -> bool {
        let Some(link) = self.link.as_ref() else { return false };
        let mut frame = Zeroizing::new(Vec::with_capacity(256));
        if let Err(error) = codec::encode(message, &mut frame) {
            tracing::error!(mti = message.mti_str(), %error, "iso8583: cannot encode");
            return false;
        }
        link.out.send(frame).is_ok()
    }

    fn stan_alloc(&mut self) -> Option<u32> {
        let in_flight = &self.in_flight;
        let stan = next_free_stan(self.stan_last, |s| in_flight.contains_key(&s))?;
        self.stan_last = stan;
        Some(stan)
    }

    fn insert(&mut self, stan: u32, expect_mti: [u8; 4], rrn: Option<[u8; 12]>, pending: Pending) {
        self.seq += 1;
        match pending {
            Pending::Auth { .. } | Pending::Lifecycle { .. } => self.requests_in_flight += 1,
            Pending::Reversal { .. } => self.reversals_in_flight += 1,
            Pending::Network(_) => {}
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.response_timeout_ms);
        self.deadlines.push_back((deadline, stan, self.seq));
        let previous =
            self.in_flight.insert(stan, Entry { seq: self.seq, expect_mti, rrn, pending });
        assert!(previous.is_none(), "a STAN in flight was reused");
    }

    fn remove(&mut self, stan: u32) -> Option<Entry> {
        let entry = self.in_flight.remove(&stan)?;
        match entry.pending {
            Pending::Auth { .. } | Pending::Lifecycle { .. } => self.requests_in_flight -= 1,
            Pending::Reversal { .. } => self.reversals_in_flight -= 1,
            Pending::Network(_) => {}
        }
        Some(entry)
    }

    fn submit(&mut self, submission: Submission) {
        if self.status() != LinkStatus::Ready {
            return self.reject(submission);
        }
        if self.requests_in_flight >= self.config.in_flight_max {
            let error = AdapterError::Unavailable("iso8583: in-flight limit reached".into());
            return submission.fail(error);
        }
        match submission {
            Submission::Authorize { request, pan, reply } => self.submit_auth(request, pan, reply),
            Submission::Lifecycle { request, original, pan, reply } => {
                self.submit_lifecycle(request, original, pan, reply)
            }
        }
    }

    fn submit_lifecycle(
        &mut self,
        request: LifecycleRequest,
        original: Original,
        pan: Option<Zeroizing<String>>,
        reply: LifecycleTx,
    ) {
        let Some(stan) = self.stan_alloc() else {
            let _ = reply.send(Err(AdapterError::Unavailable("iso8583: no free STAN".into())));
            return;
        };
        let authorization = &request.authorization;
        let acquirer = authorization.network.map_or(self.dialect.acquirer(), |n| n.acquirer);
        let built = mapping::lifecycle_message(
            &self.dialect,
            request.operation,
            &original,
            authorization.auth_code,
            acquirer,
            stan,
            pan.as_ref().map(|pan| pan.as_str()),
            SystemTime::now(),
        );
        drop(pan);
        let (message, expect, sent) = match built {
            Ok(built) => built,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        self.write(&message);
        let rrn = Some(original.rrn);
        self.insert(stan, expect, rrn, Pending::Lifecycle { request, sent, reply });
    }

    fn submit_auth(
        &mut self,
        request: crate::AuthorizationRequest,
        pan: Zeroizing<String>,
        reply: Reply,
    ) {
        let refuse = |reply: Reply, message: &str| {
            let _ = reply.send(Err(AdapterError::Unavailable(format!("iso8583: {message}"))));
        };
        let Some(currency) = mapping::currency_numeric(request.currency) else {
            return refuse(reply, "currency has no numeric code");
        };
        let terminal = match self.dialect.terminal(&request.terminal_id) {
            Ok(terminal) => terminal,
            Err(error) => {
                let _ = reply.send(Err(AdapterError::Config(error)));
                return;
            }
        };
        // Identifiers derived from the dispatch, so that the engine can rebuild them from its
        // log (`Dialect::assigned`).
        let network = self.dialect.assigned(request.dispatch_id, request.at_ms);
        if self.in_flight.contains_key(&network.stan) {
            return refuse(reply, "the dispatch's STAN is in flight");
        }
        let reference = AuthReference::of(&request, None, None);
        let original = Original {
            mti: network.mti,
            stan: network.stan,
            rrn: network.rrn,
            transmitted: network.transmitted,
            local: network.local,
            amount: mapping::digits(request.amount_minor),
            currency: mapping::pad(currency.as_bytes()),
            terminal,
            terminal_full: request.terminal_id,
            token: request.card_token,
        };
        let message = match mapping::request_message(&self.dialect, &original, &pan) {
            Ok(message) => message,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        drop(pan);
        self.write(&message);
        let (rrn, expect) = (original.rrn, self.dialect.class.response_mti());
        let reference = AuthReference { network: Some(network), ..reference };
        self.insert(network.stan, expect, Some(rrn), Pending::Auth { original, reference, reply });
    }

    fn send_network(&mut self, purpose: Network) {
        let Some(stan) = self.stan_alloc() else {
            self.close_link("no free STAN for a network message");
            return;
        };
        match mapping::network_message(purpose, stan, SystemTime::now()) {
            Ok(message) => {
                self.write(&message);
                self.insert(stan, *b"0810", None, Pending::Network(purpose));
            }
            Err(error) => tracing::error!(%error, "iso8583: cannot build network message"),
        }
    }

    fn on_echo_due(&mut self) {
        let interval = self.echo_interval();
        let Some(link) = self.link.as_mut() else { return };
        link.next_echo = Instant::now() + interval;
        if !link.signed_on || link.echo_pending {
            return;
        }
        link.echo_pending = true;
        self.send_network(Network::Echo);
    }

    fn on_message(&mut self, message: Message) {
        let mti = message.mti();
        if &mti == b"0800" {
            match mapping::network_answer(&message) {
                Ok(answer) => {
                    self.write(&answer);
                }
                Err(error) => self.malformed(&message, &error.to_string()),
            }
            return;
        }
        let Some(stan) = mapping::parse_stan(message.get(11)) else {
            return self.malformed(&message, "no valid STAN (field 11)");
        };
        let Some(entry) = self.in_flight.get(&stan) else {
            return self.unmatched(&message, stan);
        };
        let rrn_ok = match &entry.rrn {
            Some(rrn) => message.get(37) == Some(&rrn[..]),
            None => true,
        };
        if entry.expect_mti != mti || !rrn_ok {
            return self.unmatched(&message, stan);
        }
        match &entry.pending {
            Pending::Auth { .. } => {
                let outcome = match mapping::reply_outcome(&self.dialect, &message) {
                    Ok(outcome) => outcome,
                    // Left in flight: it times out and is reversed, as if never answered.
                    Err(error) => return self.malformed(&message, &error.to_string()),
                };
                if let Some(Entry {
                    pending: Pending::Auth { original, reference, reply }, ..
                }) = self.remove(stan)
                {
                    let outcome = outcome.map(|answer| match answer {
                        mapping::AuthAnswer::Approved(auth_code) => {
                            let network = reference.network.map(Box::new);
                            ProviderReply::Approved { auth_code, network }
                        }
                        mapping::AuthAnswer::Declined(reason) => ProviderReply::Declined { reason },
                    });
                    self.on_auth_reply(original, reply, outcome);
                }
            }
            Pending::Lifecycle { sent, .. } => {
                let outcome = match mapping::lifecycle_outcome(&self.dialect, &message, *sent) {
                    Ok(outcome) => outcome,
                    // Left in flight: it times out, as if never answered.
                    Err(error) => return self.malformed(&message, &error.to_string()),
                };
                if let Some(Entry { pending: Pending::Lifecycle { request, reply, .. }, .. }) =
                    self.remove(stan)
                {
                    self.on_lifecycle_reply(request, reply, outcome);
                }
            }
            Pending::Reversal { .. } => {
                self.remove(stan);
                bump(&self.shared.counters.reversals_acked);
                if message.get_str(39) != Some("00") {
                    tracing::warn!(stan, "iso8583: reversal acknowledged with a non-00 code");
                }
            }
            Pending::Network(purpose) => {
                let purpose = *purpose;
                self.remove(stan);
                self.on_network_reply(purpose, message.get_str(39) == Some("00"));
            }
        }
    }

    fn on_auth_reply(
        &mut self,
        original: Original,
        reply: Reply,
        outcome: Result<ProviderReply, AdapterError>,
    ) {
        let approved = matches!(outcome, Ok(ProviderReply::Approved { .. }));
        match outcome {
            Ok(ProviderReply::Approved { .. }) => bump(&self.shared.counters.approved),
            Ok(ProviderReply::Declined { .. }) => bump(&self.shared.counters.declined),
            Err(_) => {}
        }
        self.breaker.success();
        if reply.send(outcome).is_err() && approved {
            // The engine gave up on this request (its deadline dropped the future) and
            // recorded a timeout: the host's approval must not stand.
            tracing::warn!(
                stan = original.stan,
                "iso8583: approval after the caller gave up; reversing"
            );
            self.reverse(original, 0);
        }
    }

    fn on_lifecycle_reply(
        &mut self,
        request: LifecycleRequest,
        reply: LifecycleTx,
        outcome: Result<LifecycleReply, AdapterError>,
    ) {
        match &outcome {
            Ok(LifecycleReply::Accepted { .. }) => bump(&self.shared.counters.operations_accepted),
            Ok(LifecycleReply::Refused { reason }) => {
                bump(&self.shared.counters.operations_refused);
                tracing::info!(
                    operation = request.operation.name(),
                    operation_id = request.operation_id,
                    ?reason,
                    "iso8583: operation refused by the host"
                );
            }
            Err(_) => {}
        }
        self.breaker.success();
        let _ = reply.send(outcome);
    }

    fn on_network_reply(&mut self, purpose: Network, ok: bool) {
        match (purpose, ok) {
            (Network::SignOn, true) => {
                bump(&self.shared.counters.sign_ons);
                tracing::info!(host = %self.config.host_addr, "iso8583: signed on");
                self.backoff.reset();
                self.breaker.success();
                let interval = self.echo_interval();
                if let Some(link) = self.link.as_mut() {
                    link.signed_on = true;
                    link.next_echo = Instant::now() + interval;
                }
                self.publish_status();
                let queued = std::mem::take(&mut self.reversals_queued);
                for (original, attempt) in queued {
                    self.reverse(original, attempt);
                }
            }
            (Network::SignOn, false) => {
                self.failure();
                self.close_link("sign-on refused");
            }
            (Network::Echo, ok) => {
                if let Some(link) = self.link.as_mut() {
                    link.echo_pending = false;
                }
                if !ok {
                    return self.failure();
                }
                bump(&self.shared.counters.echoes_ok);
                if self.breaker.echo_ok() == Transition::Closed {
                    bump(&self.shared.counters.breaker_closed);
                    tracing::info!(host = %self.config.host_addr, "iso8583: circuit breaker closed");
                    self.publish_status();
                }
            }
        }
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, stan, seq)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if self.in_flight.get(&stan).map(|e| e.seq) != Some(seq) {
                continue;
            }
            let Some(entry) = self.remove(stan) else { continue };
            match entry.pending {
                Pending::Auth { original, reply, .. } => {
                    bump(&self.shared.counters.timeouts);
                    tracing::warn!(stan, "iso8583: no reply in time; reversing");
                    let _ = reply.send(Err(AdapterError::Timeout));
                    self.failure();
                    self.reverse(original, 0);
                }
                Pending::Lifecycle { request, reply, .. } => {
                    bump(&self.shared.counters.timeouts);
                    tracing::warn!(
                        stan,
                        operation = request.operation.name(),
                        "iso8583: no reply in time to an operation"
                    );
                    let _ = reply.send(Err(AdapterError::Timeout));
                    self.failure();
                }
                Pending::Reversal { original, attempt } => self.reverse(original, attempt + 1),
                Pending::Network(purpose) => {
                    if let Some(link) = self.link.as_mut() {
                        link.echo_pending = false;
                    }
                    self.failure();
                    self.close_link(match purpose {
                        Network::SignOn => "sign-on unanswered",
                        Network::Echo => "echo test unanswered",
                    });
                }
            }
        }
    }

    /// Sends reversal attempt `attempt` (0: the 0400, then 0401 repeats) of `original`, or
    /// holds it until the link is back.
    fn reverse(&mut self, original: Original, attempt: u32) {
        if attempt >= self.config.reversal_attempts_max {
            bump(&self.shared.counters.reversals_failed);
            tracing::error!(
                stan = original.stan,
                attempts = attempt,
                "iso8583: reversal never acknowledged; giving up"
            );
            return;
        }
        if !self.link.as_ref().is_some_and(|l| l.signed_on) {
            return self.queue_reversal(original, attempt);
        }
        let Some(stan) = self.stan_alloc() else { return self.queue_reversal(original, attempt) };
        let pan = original.token.as_ref().and_then(|token| self.detokenizer.reveal(token));
        let pan = pan.as_ref().map(|pan| pan.as_str()).filter(|pan| pan_valid(pan));
        let built = mapping::reversal_message(
            &self.dialect,
            &original,
            stan,
            attempt > 0,
            pan,
            SystemTime::now(),
        );
        let message = match built {
            Ok(message) => message,
            Err(error) => {
                bump(&self.shared.counters.reversals_failed);
                tracing::error!(stan = original.stan, %error, "iso8583: cannot build reversal");
                return;
            }
        };
        if self.write(&message) {
            bump(&self.shared.counters.reversals_sent);
        }
        let (rrn, expect) = (original.rrn, self.dialect.reversal_response_mti());
        self.insert(stan, expect, Some(rrn), Pending::Reversal { original, attempt });
    }

    fn queue_reversal(&mut self, original: Original, attempt: u32) {
        if self.reversals_queued.len() >= self.config.reversal_queue_max as usize {
            bump(&self.shared.counters.reversals_failed);
            tracing::error!(stan = original.stan, "iso8583: reversal queue full; reversal dropped");
            return;
        }
        self.reversals_queued.push_back((original, attempt));
    }

    fn unmatched(&self, message: &Message, stan: u32) {
        bump(&self.shared.counters.unmatched_replies);
        tracing::warn!(
            mti = message.mti_str(),
            stan,
            "iso8583: reply matches nothing in flight (late?); dropped"
        );
    }

    fn malformed(&self, message: &Message, reason: &str) {
        bump(&self.shared.counters.malformed_replies);
        tracing::warn!(mti = message.mti_str(), reason, "iso8583: malformed message dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stan_wraps_from_999999_to_1_never_0() {
        assert_eq!(next_free_stan(0, |_| false), Some(1));
        assert_eq!(next_free_stan(999_998, |_| false), Some(999_999));
        assert_eq!(next_free_stan(999_999, |_| false), Some(1));
    }

    #[test]
    fn stan_skips_those_in_flight() {
        let taken = |s: u32| s == 999_999 || s == 1 || s == 2;
        assert_eq!(next_free_stan(999_998, taken), Some(3));
        assert_eq!(next_free_stan(5, |s| s != 4), Some(4), "wraps all the way round");
        assert_eq!(next_free_stan(5, |_| true), None);
    }

    #[test]
    fn backoff_doubles_to_its_max_and_resets() {
        let mut backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            current: None,
        };
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays[0], 0);
        assert!((80..=100).contains(&delays[1]), "{delays:?}");
        assert!((160..=200).contains(&delays[2]), "{delays:?}");
        assert!((280..=350).contains(&delays[3]) && (280..=350).contains(&delays[4]), "{delays:?}");
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::ZERO);
    }
}
