//! The wire codec alone (no sockets): frames encoded and decoded, and the AUTHORIZE request
//! and its approval as the server and the client handle them, one frame and a pipelined burst.
//!
//! `cargo bench -p settlegate-protocol --bench codec`. `cargo test --all-targets` runs each
//! benchmark once (criterion's test mode), so the parameters stay small: a burst of 16 is the
//! pipeline depth of docs/BENCHMARKS.md's TCP runs; bodies of 0, 113 (a signed inherent ID)
//! and 4,096 bytes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use settlegate_engine::{
    Approval, AuthCode, AuthOutcome, Currency, InherentId, MeansKind, UserIdType, UserKey,
};
use settlegate_protocol::frame::{self, Frame};
use settlegate_protocol::messages::{opcode, Reply, Request, Response};
use settlegate_protocol::ops::Authorize;

/// Frame body sizes.
const BODY_SIZES: [usize; 3] = [0, 113, 4_096];
/// Frames per burst: what one read of a pipelined connection holds.
const BURSTS: [usize; 2] = [1, 16];

/// A signed inherent ID as a phone would send it (the key is a fixed test key).
fn inherent_id() -> Vec<u8> {
    InherentId {
        key_version: 1,
        amount_minor: 1_000,
        currency: Currency::try_from("JPY").expect("JPY"),
        means: MeansKind::CreditCard,
        means_id: 0,
        provider_code: 1,
        card_idm: *b"IDM00001",
        user: UserKey::new(UserIdType::Mail, "bench@example.com").expect("a valid user"),
        terminal_id: "LOADGEN-1".into(),
        counter: 1,
        timestamp_ms: 1_795_305_600_000,
    }
    .sign(&[7; 32])
}

fn authorize_request(request_id: u64) -> Frame {
    let request = Request::Authorize(Authorize {
        client_request_id: u128::from(request_id),
        inherent_id: inherent_id(),
    });
    request.to_frame(request_id)
}

fn approval_response(request_id: u64) -> Frame {
    let approval = AuthOutcome::Approved(Approval {
        auth_code: AuthCode(*b"A1B2C3"),
        provider_code: 1,
        amount_requested_minor: 1_000,
        discount_minor: 0,
        amount_final_minor: 1_000,
        currency: Currency::try_from("JPY").expect("JPY"),
    });
    Response::Ok(Reply::Authorize(approval)).to_frame(opcode::AUTHORIZE, request_id)
}

/// Raw frames: header, checksums and body copy, each way.
fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for size in BODY_SIZES {
        let frame = Frame::request(opcode::PING, 7, vec![0x5a; size]);
        let bytes = frame.to_bytes();
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("encode", size), &frame, |b, frame| {
            let mut out = Vec::with_capacity(bytes.len());
            b.iter(|| {
                out.clear();
                frame.encode(&mut out);
                out.len()
            })
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &bytes, |b, bytes| {
            b.iter(|| frame::decode(bytes).expect("valid").expect("complete").1)
        });
    }
    group.finish();
}

/// The AUTHORIZE exchange, typed: what the client encodes and the server decodes, then the
/// approval the server encodes and the client decodes; in bursts as a pipelined read sees them.
fn authorize(c: &mut Criterion) {
    let mut group = c.benchmark_group("authorize");
    for burst in BURSTS {
        let requests: Vec<Request> = (0..burst as u64)
            .map(|id| {
                Request::Authorize(Authorize {
                    client_request_id: u128::from(id),
                    inherent_id: inherent_id(),
                })
            })
            .collect();
        let request_bytes: Vec<u8> =
            (0..burst as u64).flat_map(|id| authorize_request(id).to_bytes()).collect();
        let response_bytes: Vec<u8> =
            (0..burst as u64).flat_map(|id| approval_response(id).to_bytes()).collect();
        group.throughput(Throughput::Elements(burst as u64));
        group.bench_with_input(
            BenchmarkId::new("encode_request", burst),
            &requests,
            |b, requests| {
                let mut out = Vec::with_capacity(request_bytes.len());
                b.iter(|| {
                    out.clear();
                    for (id, request) in requests.iter().enumerate() {
                        request.to_frame(id as u64).encode(&mut out);
                    }
                    out.len()
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("decode_request", burst),
            &request_bytes,
            |b, bytes| {
                b.iter(|| {
                    decode_all(bytes, |frame| Request::decode(frame.opcode, &frame.body).is_ok())
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("decode_response", burst),
            &response_bytes,
            |b, bytes| {
                b.iter(|| {
                    decode_all(bytes, |frame| {
                        Response::decode(opcode::AUTHORIZE, frame.status, &frame.body).is_ok()
                    })
                })
            },
        );
    }
    group.finish();
}

/// Decodes every frame in `bytes` and its body with `body`, as a connection's read loop does;
/// returns how many decoded.
fn decode_all(mut bytes: &[u8], body: impl Fn(&Frame) -> bool) -> usize {
    let mut decoded = 0;
    while let Some((frame, used)) = frame::decode(bytes).expect("valid frames") {
        assert!(body(&frame), "a valid body");
        decoded += 1;
        bytes = &bytes[used..];
    }
    decoded
}

criterion_group!(benches, frames, authorize);
criterion_main!(benches);
