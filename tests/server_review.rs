//! Hardening issue #19 (independent hostile review), over real sockets: what an identity can
//! learn or do that it should not, and what a retry may not repeat.

use std::time::Duration;

use settlegate_engine::{MeansInput, ReasonCode, UserIdType, UserKey};
use settlegate_protocol::frame::{self, Frame};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::server::*;
use crate::support::*;

/// A raw connection, authenticated with `key`, that sends frames as given and reads the
/// response frames as they come (bytes and all).
struct Raw {
    stream: TcpStream,
    input: Vec<u8>,
    next_id: u64,
}

impl Raw {
    async fn connect(server: &settlegate::server::RunningServer, key: &str) -> Raw {
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let mut raw = Raw { stream, input: Vec::new(), next_id: 1 };
        let auth = raw.request(&Request::Auth { key: key.into() }).await;
        assert_eq!(auth.status, 0, "authenticated");
        raw
    }

    /// Sends `opcode` with `body`; returns the response frame.
    async fn send(&mut self, opcode: u16, body: Vec<u8>) -> Frame {
        let request_id = self.next_id;
        self.next_id += 1;
        let bytes = Frame::request(opcode, request_id, body).to_bytes();
        self.stream.write_all(&bytes).await.unwrap();
        loop {
            if let Some((frame, used)) = frame::decode(&self.input).unwrap() {
                self.input.drain(..used);
                assert_eq!(frame.request_id, request_id);
                return frame;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("answered within 10 s")
                .unwrap();
            assert!(n > 0, "connection closed");
            self.input.extend_from_slice(&chunk[..n]);
        }
    }

    async fn request(&mut self, request: &Request) -> Frame {
        let frame = request.to_frame(0);
        self.send(frame.opcode, frame.body).await
    }
}

/// What a client sees of a response: opcode, status, flags and body (the request ID aside).
fn seen(frame: &Frame) -> (u16, u16, u8, Vec<u8>) {
    (frame.opcode, frame.status, frame.flags, frame.body.clone())
}

async fn enroll(client: &Client, name: &str) -> (UserKey, settlegate_engine::DeviceCredential) {
    let user = UserKey::new(UserIdType::Mail, format!("{name}@example.com")).unwrap();
    let request = Request::Enroll {
        client_request_id: request_id(),
        user: user.clone(),
        password: PASSWORD.into(),
        card_idm: fresh_idm(),
    };
    let Reply::Credential(credential) = client.call_ok(&request).await.unwrap() else { panic!() };
    let card = Request::AddMeans {
        client_request_id: request_id(),
        user: user.clone(),
        make_default: true,
        means: MeansInput::CreditCard { pan: "4111111111111111".into() },
    };
    client.call_ok(&card).await.unwrap();
    (user, credential)
}

// ---- 7: operations that take a password do not tell who exists --------------------------

/// Every password-taking request, for `user` with `password`.
fn password_requests(user: &UserKey, password: &str, card_idm: [u8; 8]) -> Vec<Request> {
    vec![
        Request::Login { user: user.clone(), password: password.into() },
        Request::ProvisionDevice {
            client_request_id: 77,
            user: user.clone(),
            password: password.into(),
            card_idm,
        },
        Request::RotateDeviceKey {
            client_request_id: 78,
            user: user.clone(),
            password: password.into(),
            card_idm,
        },
        Request::SubscribeNotices { user: user.clone(), password: password.into() },
        Request::SubscribeDevice { user: user.clone(), password: password.into(), card_idm },
    ]
}

/// LOGIN (and every other operation taking a password) answers an unknown user with the very
/// bytes it answers a wrong password with: `REFUSED` 53.
#[tokio::test]
async fn an_unknown_user_is_answered_as_a_wrong_password() {
    let server = start().await;
    let admin = client(&server, ADMIN_KEY).await;
    let (known, credential) = enroll(&admin, "review-login").await;
    let ghost = UserKey::new(UserIdType::Mail, "nobody-here@example.com").unwrap();
    let mut raw = Raw::connect(&server, ADMIN_KEY).await;
    let wrong = password_requests(&known, "wrong password", credential.card_idm);
    let unknown = password_requests(&ghost, "wrong password", credential.card_idm);
    for (wrong, unknown) in wrong.iter().zip(&unknown) {
        let wrong_answer = raw.request(wrong).await;
        let unknown_answer = raw.request(unknown).await;
        assert_eq!(
            Response::decode(wrong_answer.opcode, wrong_answer.status, &wrong_answer.body),
            Ok(Response::Refused(ReasonCode::WrongPassword)),
            "opcode {:#06x}",
            wrong.opcode()
        );
        assert_eq!(seen(&unknown_answer), seen(&wrong_answer), "opcode {:#06x}", unknown.opcode());
    }
    server.shutdown().await;
}

/// And after the same work, so in the same time: an unknown user's login verifies against a
/// dummy hash and sends its failed attempt through the user's shard, logged (and, with
/// `fsync = always`, synced before the answer) as a known user's failed attempt is. Measured by
/// what it writes rather than by the clock, which other work on the machine disturbs: each
/// failed login, known user or not, appends one record of the same size to the shard logs.
#[tokio::test]
async fn an_unknown_user_costs_the_work_of_a_wrong_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config();
    config.engine.durability.data_dir = Some(dir.path().to_owned());
    config.engine.durability.fsync = settlegate_engine::wal::FsyncPolicy::Always;
    config.engine.login_failures_max = 1_000;
    let server = start_with(config).await;
    let admin = client(&server, ADMIN_KEY).await;
    // IDs of the same length, so that their records are too.
    let (known, _) = enroll(&admin, "known-user1").await;
    let ghost = UserKey::new(UserIdType::Mail, "ghost-user1@example.com").unwrap();
    assert_eq!(known.id().len(), ghost.id().len());
    let logged = || -> u64 {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".wal"))
            .map(|entry| entry.metadata().unwrap().len())
            .sum()
    };
    let mut raw = Raw::connect(&server, ADMIN_KEY).await;
    let login =
        |user: &UserKey| Request::Login { user: user.clone(), password: "wrong!!!!".into() };
    let mut grew = Vec::new();
    for user in [&known, &ghost, &known, &ghost] {
        let before = logged();
        let answer = raw.request(&login(user)).await;
        assert_eq!(answer.status, settlegate_protocol::status::REFUSED);
        grew.push(logged() - before);
    }
    assert!(grew[0] > 0, "a failed login is logged");
    assert_eq!(grew, vec![grew[0]; 4], "bytes logged by: known, unknown, known, unknown");
    server.shutdown().await;
}
