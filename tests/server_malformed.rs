//! Malformed input over raw sockets: each gets its error reply, closes (or not) as the spec
//! says, and never disturbs another connection.

use settlegate_protocol::ops::{Auth, Ping};
use std::time::Duration;

use settlegate_protocol::frame::{self, Frame, BODY_LEN_MAX, HEADER_LEN};
use settlegate_protocol::messages::{status, Request};
use settlegate_protocol::Client;
use tokio::io::AsyncWriteExt;

use crate::support::server::*;

/// Asserts the server answered with one FRAME_ERROR of `kind` and closed.
async fn expect_frame_error(stream: &mut tokio::net::TcpStream, kind: u16) {
    let (bytes, closed) = read_until_close(stream, Duration::from_secs(5)).await;
    assert!(closed, "the server closes after a framing error");
    let frames = frames(&bytes);
    assert_eq!(frames.len(), 1, "exactly one frame: {frames:?}");
    assert_eq!(
        (frames[0].opcode, frames[0].request_id, frames[0].status),
        (0, 0, status::FRAME_ERROR)
    );
    assert_eq!(u16::from_be_bytes([frames[0].body[0], frames[0].body[1]]), kind);
}

/// A second, healthy connection still works.
async fn bystander_still_served(bystander: &Client) {
    let pong = bystander.call_ok(&Request::Ping(Ping { payload: b"ok".to_vec() })).await;
    assert!(pong.is_ok(), "other connections are unaffected: {pong:?}");
}

/// Sends `bytes` on a fresh connection, half-closes it, and decodes every frame that comes back
/// before the server closes (the connection is expected to stay usable until then).
async fn exchange(server: &settlegate::server::RunningServer, bytes: &[u8]) -> Vec<Frame> {
    let mut stream = raw(server, bytes).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.shutdown().await.unwrap();
    let (bytes, _) = read_until_close(&mut stream, Duration::from_secs(5)).await;
    frames(&bytes)
}

fn ping(request_id: u64) -> Vec<u8> {
    Request::Ping(Ping { payload: b"x".to_vec() }).to_frame(request_id).to_bytes()
}

/// Rewrites the header checksum after a test edits header fields.
fn reseal(bytes: &mut [u8]) {
    let crc = frame::crc32(&bytes[..24]);
    bytes[24..28].copy_from_slice(&crc.to_be_bytes());
}

#[tokio::test]
async fn bad_header_checksum_closes_only_that_connection() {
    let server = start().await;
    let bystander = client(&server, ADMIN_KEY).await;
    let mut bytes = ping(1);
    bytes[10] ^= 0xff;
    let mut stream = raw(&server, &bytes).await;
    expect_frame_error(&mut stream, 3).await;
    bystander_still_served(&bystander).await;
    server.shutdown().await;
}

#[tokio::test]
async fn bad_body_checksum() {
    let server = start().await;
    let bystander = client(&server, ADMIN_KEY).await;
    let mut bytes = ping(1);
    *bytes.last_mut().unwrap() ^= 0x01;
    let mut stream = raw(&server, &bytes).await;
    expect_frame_error(&mut stream, 5).await;
    bystander_still_served(&bystander).await;
    server.shutdown().await;
}

#[tokio::test]
async fn oversize_length_is_refused_before_any_body_arrives() {
    let server = start().await;
    let bystander = client(&server, ADMIN_KEY).await;
    let mut header = ping(1)[..HEADER_LEN].to_vec();
    header[16..20].copy_from_slice(&(BODY_LEN_MAX as u32 + 1).to_be_bytes());
    reseal(&mut header);
    // Only the header is sent: the server must answer without waiting for 64 KiB.
    let mut stream = raw(&server, &header).await;
    expect_frame_error(&mut stream, 4).await;
    bystander_still_served(&bystander).await;
    server.shutdown().await;
}

#[tokio::test]
async fn bad_magic_version_and_flags() {
    let server = start().await;
    for (offset, value, kind) in [(0usize, b'X', 1u16), (2, 9, 2), (3, 0x80, 7)] {
        let mut bytes = ping(1);
        bytes[offset] = value;
        reseal(&mut bytes);
        let mut stream = raw(&server, &bytes).await;
        expect_frame_error(&mut stream, kind).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn truncated_header_times_out_with_a_frame_error() {
    let server = start().await;
    let bystander = client(&server, ADMIN_KEY).await;
    let mut stream = raw(&server, &ping(1)[..10]).await;
    // frame_read_timeout_ms is 300 in the test config.
    expect_frame_error(&mut stream, 6).await;
    bystander_still_served(&bystander).await;
    server.shutdown().await;
}

#[tokio::test]
async fn truncated_body_times_out_with_a_frame_error() {
    let server = start().await;
    let bytes = Request::Ping(Ping { payload: vec![7; 40] }).to_frame(1).to_bytes();
    let mut stream = raw(&server, &bytes[..HEADER_LEN + 5]).await;
    expect_frame_error(&mut stream, 6).await;
    server.shutdown().await;
}

#[tokio::test]
async fn random_garbage_is_a_framing_error() {
    let server = start().await;
    let bystander = client(&server, ADMIN_KEY).await;
    let garbage: Vec<u8> =
        (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut stream = raw(&server, &garbage).await;
    let (bytes, closed) = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed);
    let frames = frames(&bytes);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].status, status::FRAME_ERROR);
    bystander_still_served(&bystander).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_opcode_is_answered_and_the_connection_stays_open() {
    let server = start().await;
    let mut bytes = Frame::request(0x7777, 5, vec![1, 2, 3]).to_bytes();
    bytes.extend_from_slice(&ping(6));
    let frames = exchange(&server, &bytes).await;
    let unknown = frames.iter().find(|f| f.request_id == 5).expect("reply to the unknown opcode");
    assert_eq!(unknown.status, status::UNKNOWN_OPCODE);
    let pong = frames.iter().find(|f| f.request_id == 6).expect("the next request is served");
    assert_eq!(pong.status, status::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_body_is_a_bad_request_and_the_connection_stays_open() {
    let server = start().await;
    // AUTH with method 9, then a PING.
    let mut bytes = Frame::request(settlegate_protocol::opcode::AUTH, 5, vec![9, 0]).to_bytes();
    bytes.extend_from_slice(&ping(6));
    // Authenticated (a body is parsed only then), an ENROLL with a truncated body.
    bytes.extend_from_slice(&Request::Auth(Auth { key: ADMIN_KEY.into() }).to_frame(8).to_bytes());
    bytes.extend_from_slice(
        &Frame::request(settlegate_protocol::opcode::ENROLL, 7, vec![0; 5]).to_bytes(),
    );
    let frames = exchange(&server, &bytes).await;
    let status_of = |id| frames.iter().find(|f| f.request_id == id).map(|f| f.status);
    assert_eq!(status_of(5), Some(status::BAD_REQUEST));
    assert_eq!(status_of(6), Some(status::OK));
    assert_eq!(status_of(8), Some(status::OK));
    assert_eq!(status_of(7), Some(status::BAD_REQUEST));
    server.shutdown().await;
}

#[tokio::test]
async fn request_id_zero_a_status_or_the_response_flag_make_a_bad_request() {
    let server = start().await;
    let mut zero_id = Request::Ping(Ping { payload: vec![] }).to_frame(0);
    let mut with_status = Request::Ping(Ping { payload: vec![] }).to_frame(7);
    with_status.status = 3;
    let mut flagged = Request::Ping(Ping { payload: vec![] }).to_frame(8);
    flagged.flags = settlegate_protocol::frame::FLAG_RESPONSE;
    zero_id.body.clear();
    let mut bytes = Vec::new();
    for frame in [&zero_id, &with_status, &flagged] {
        frame.encode(&mut bytes);
    }
    bytes.extend_from_slice(&ping(9));
    let frames = exchange(&server, &bytes).await;
    let status_of =
        |id| frames.iter().find(|f| f.request_id == id && f.opcode != 0).map(|f| f.status);
    assert_eq!(status_of(0), Some(status::BAD_REQUEST));
    assert_eq!(status_of(7), Some(status::BAD_REQUEST));
    assert_eq!(status_of(8), Some(status::BAD_REQUEST));
    assert_eq!(status_of(9), Some(status::OK), "the connection stays open");
    server.shutdown().await;
}

#[tokio::test]
async fn silent_connection_is_closed_at_the_auth_deadline() {
    let mut config = server_config();
    config.server.auth_timeout_ms = 200;
    let server = start_with(config).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (bytes, closed) = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "a connection that never authenticates is closed");
    assert!(bytes.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let mut config = server_config();
    config.server.connections_max = 2;
    let server = start_with(config).await;
    let first = client(&server, ADMIN_KEY).await;
    let _second = client(&server, ADMIN_KEY).await;
    let mut third = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (_, closed) = read_until_close(&mut third, Duration::from_secs(5)).await;
    assert!(closed, "the third connection is closed");
    bystander_still_served(&first).await;
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_void_and_refund_bodies_are_bad_requests_and_the_connection_stays_open() {
    use settlegate_protocol::opcode::{REFUND, VOID};
    let server = start().await;
    let mut bytes = Request::Auth(Auth { key: ADMIN_KEY.into() }).to_frame(1).to_bytes();
    let mut void = vec![0u8; 16];
    void.extend_from_slice(&[2]); // a reserved target
    void.extend_from_slice(&42u64.to_be_bytes());
    void.extend_from_slice(&[1, b'T']);
    bytes.extend_from_slice(&Frame::request(VOID, 2, void.clone()).to_bytes());
    void[16] = 1;
    bytes.extend_from_slice(&Frame::request(VOID, 3, void[..20].to_vec()).to_bytes());
    let mut refund = void.clone();
    refund.splice(25..25, 400u64.to_be_bytes());
    let mut trailing = refund.clone();
    trailing.push(0);
    bytes.extend_from_slice(&Frame::request(REFUND, 4, trailing).to_bytes());
    // Well formed: a code this server never issued is refused (102), not a bad request.
    bytes.extend_from_slice(&Frame::request(REFUND, 5, refund).to_bytes());
    bytes.extend_from_slice(&ping(6));
    let frames = exchange(&server, &bytes).await;
    let status_of = |id| frames.iter().find(|f| f.request_id == id).map(|f| f.status);
    assert_eq!(status_of(1), Some(status::OK));
    for id in [2, 3, 4] {
        assert_eq!(status_of(id), Some(status::BAD_REQUEST), "request {id}");
    }
    assert_eq!(status_of(5), Some(status::REFUSED));
    let refused = frames.iter().find(|f| f.request_id == 5).unwrap();
    assert_eq!(u16::from_be_bytes([refused.body[0], refused.body[1]]), 102);
    assert_eq!(status_of(6), Some(status::OK), "the connection stays open");
    server.shutdown().await;
}
