//! The real binary: graceful shutdown on SIGTERM with requests in flight, and TLS with a
//! client certificate.

use settlegate_protocol::ops::{
    AddMeans, ConfirmTerminal, Enroll, ListMeans, Login, Ping, RotateDeviceKey,
};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use settlegate_engine::{InherentId, MeansKind, UserIdType, UserKey};
use settlegate_protocol::messages::{MeansInput, MeansOrder};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::Client;
use sha2::{Digest, Sha256};

use crate::support::server::*;
use crate::support::*;

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let slow = "{ kind = \"simulated\", latency_us_min = 400000, latency_us_max = 400000 }";
    let config = binary_config(dir.path(), slow, "");
    let (mut child, addr) = spawn_binary(&config);
    let client = Arc::new(Client::connect(addr).await.unwrap());
    client.authenticate(ADMIN_KEY).await.unwrap();
    let user = UserKey::new(UserIdType::Mail, "shutdown@example.com").unwrap();
    let enroll = Request::Enroll(Enroll {
        client_request_id: 1,
        user: user.clone(),
        password: PASSWORD.into(),
        card_idm: [5; 8],
    });
    let Reply::Enroll(credential) = client.call_ok(&enroll).await.unwrap() else { panic!() };
    let card = Request::AddMeans(AddMeans {
        client_request_id: 2,
        user: user.clone(),
        make_default: true,
        means: MeansInput::CreditCard { pan: "4111111111111111".into() },
    });
    client.call_ok(&card).await.unwrap();
    // Ten authorizations that each take 400 ms at the provider.
    let calls: Vec<_> = (0..10u64)
        .map(|i| {
            let bytes = InherentId {
                key_version: credential.key_version,
                amount_minor: 100 + i,
                currency: jpy(),
                means: MeansKind::CreditCard,
                means_id: 0,
                provider_code: 1,
                card_idm: credential.card_idm,
                user: user.clone(),
                terminal_id: "T-1".into(),
                counter: i + 1,
                timestamp_ms: now_ms(),
            }
            .sign(credential.device_key.expose());
            let client = client.clone();
            tokio::spawn(async move { client.authorize(u128::from(100 + i), bytes).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    for call in calls {
        let outcome = call.await.unwrap().expect("in-flight request answered before the close");
        approved(outcome);
    }
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_der: Vec<u8>,
    client_cert_der: Vec<u8>,
    client_key_der: Vec<u8>,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = CertificateParams::new(vec!["terminal-vendor".into()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca_der: ca.der().to_vec(),
        client_cert_der: client_cert.der().to_vec(),
        client_key_der: client_key.serialize_der(),
    }
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    pki: &Pki,
    with_client_cert: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(pki.ca_der.clone())).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if with_client_cert {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.client_key_der.clone()));
        builder
            .with_client_auth_cert(vec![CertificateDer::from(pki.client_cert_der.clone())], key)
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await
}

#[tokio::test]
async fn tls_with_a_client_certificate_authenticates_the_connection() {
    let pki = pki();
    let mut config = server_config();
    config.server.tls = Some(settlegate::config::TlsConfig {
        cert_pem: pki.dir.path().join("server.pem"),
        key_pem: pki.dir.path().join("server.key"),
        client_ca_pem: Some(pki.dir.path().join("ca.pem")),
        client_cert_required: true,
    });
    let mut vendor = identity("vendor-cert", "unused-key", &["accounts"], &[], &[]);
    vendor.api_key_sha256 = None;
    vendor.cert_sha256 = Some(hex::encode(Sha256::digest(&pki.client_cert_der)));
    config.server.identities.push(vendor);
    let server = start_with(config).await;
    assert!(server.tls);

    let stream =
        tls_connect(server.addr, &pki, true).await.expect("TLS handshake with a client cert");
    let client = Client::from_stream(stream);
    // Authenticated by the certificate: an account operation works without AUTH.
    let user = UserKey::new(UserIdType::Mail, "nobody@example.com").unwrap();
    let listing = Request::ListMeans(ListMeans { user, order: MeansOrder::Registration });
    assert_eq!(
        client.call(&listing).await.unwrap(),
        Response::Refused(settlegate_engine::ReasonCode::UnknownUser)
    );
    // The certificate's identity has no authorize permission.
    let confirm = Request::ConfirmTerminal(ConfirmTerminal {
        provider_code: PROVIDER_OK,
        terminal_id: "T-1".into(),
    });
    assert!(matches!(client.call(&confirm).await.unwrap(), Response::Forbidden(_)));

    // Without a client certificate the handshake (or the first exchange) fails.
    let refused = match tls_connect(server.addr, &pki, false).await {
        Err(_) => true,
        Ok(stream) => Client::from_stream(stream)
            .call(&Request::Ping(Ping { payload: vec![] }))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
    // Plain TCP to the TLS port gets nowhere either.
    let plain = Client::connect(server.addr).await.unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        plain.call(&Request::Ping(Ping { payload: vec![] })),
    )
    .await;
    assert!(!matches!(result, Ok(Ok(Response::Ok(_)))));
    server.shutdown().await;
}

#[tokio::test]
async fn no_secret_reaches_a_log_line_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path(), "{ kind = \"simulated\" }", "");
    let log_path = dir.path().join("settlegate.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let (mut child, addr) = spawn_binary_logging(&config, "trace", log_file.into());
    let client = Client::connect(addr).await.unwrap();
    client.authenticate(ADMIN_KEY).await.unwrap();
    let password = "a very secret passphrase";
    let pan = "4012888888881881";
    let user = UserKey::new(UserIdType::Mail, "secrets@example.com").unwrap();
    let enroll = Request::Enroll(Enroll {
        client_request_id: 1,
        user: user.clone(),
        password: password.into(),
        card_idm: [7; 8],
    });
    let Reply::Enroll(credential) = client.call_ok(&enroll).await.unwrap() else { panic!() };
    let card = Request::AddMeans(AddMeans {
        client_request_id: 2,
        user: user.clone(),
        make_default: true,
        means: MeansInput::CreditCard { pan: pan.into() },
    });
    client.call_ok(&card).await.unwrap();
    client
        .call(&Request::Login(Login { user: user.clone(), password: "wrong passphrase!".into() }))
        .await
        .unwrap();
    let record = InherentId {
        key_version: credential.key_version,
        amount_minor: 500,
        currency: jpy(),
        means: MeansKind::CreditCard,
        means_id: 0,
        provider_code: 1,
        card_idm: credential.card_idm,
        user: user.clone(),
        terminal_id: "T-1".into(),
        counter: 1,
        timestamp_ms: now_ms(),
    };
    approved(client.authorize(3, record.sign(credential.device_key.expose())).await.unwrap());
    let rotate = Request::RotateDeviceKey(RotateDeviceKey {
        client_request_id: 4,
        user,
        password: password.into(),
        card_idm: credential.card_idm,
    });
    let Reply::RotateDeviceKey(rotated) = client.call_ok(&rotate).await.unwrap() else { panic!() };
    drop(client);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("listening") && log.contains("authenticated"),
        "the log was captured: {log}"
    );
    let secrets = [
        password.to_owned(),
        "wrong passphrase!".to_owned(),
        pan.to_owned(),
        ADMIN_KEY.to_owned(),
        hex::encode(credential.device_key.expose()),
        hex::encode(rotated.device_key.expose()),
        format!("{:?}", credential.device_key.expose()),
    ];
    for secret in secrets {
        assert!(!log.contains(&secret), "a secret reached the log");
    }
}
