//! The ISO 8583 adapter's dialect keys (`docs/ADAPTERS.md`, "Dialect") against the Python host
//! simulator over real loopback sockets: the host's ledger shows what it received (fields 12,
//! 13, 18, 22, 25, 32, 41, 42, 43, 48; the RRN; 0420 instead of 0400; TLS and the client
//! certificate's name). The defaults are pinned byte for byte by the adapter's `golden` unit
//! test; these check each option changes what reaches the host, and that without it nothing
//! does.
//!
//! These tests fail, rather than skip, when python3 or pyiso8583 is missing.

mod iso_support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use iso_support::{card, config, eventually, ready_adapter, Host, TestVault};
use settlegate_adapters::iso8583::{
    FieldConfig, FieldSource, Iso8583Adapter, Iso8583Config, LinkStatus, LongTerminalIds, Padding,
    ResponseOutcome, ReversalMti, RrnFormat, TlsConfig,
};
use settlegate_adapters::{AdapterError, DeclineReason, ProviderAdapter};

fn ledger_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn field(field: u8, source: FieldSource, value: Option<&str>, pad: Option<Padding>) -> FieldConfig {
    FieldConfig { field, source, value: value.map(str::to_owned), pad }
}

/// The requests (0100) the host received, in order.
fn requests(host: &Host) -> Vec<iso_support::Entry> {
    host.ledger_lines().into_iter().filter(|e| e.is("dir", "in") && e.is("mti", "0100")).collect()
}

#[tokio::test]
async fn the_field_table_and_terminal_mapping_reach_the_host() {
    let dir = ledger_dir();
    let host = Host::spawn(0, Some(&dir.path().join("ledger.jsonl")));
    let mut tuned = Iso8583Config {
        response_timeout_ms: 1_000,
        fields: vec![
            field(12, FieldSource::LocalTime, None, None),
            field(13, FieldSource::LocalDate, None, None),
            field(18, FieldSource::Constant, Some("5411"), None),
            field(22, FieldSource::Constant, Some("51"), Some(Padding::ZerosLeft)),
            field(25, FieldSource::Constant, Some("00"), None),
            field(32, FieldSource::Constant, Some("00012345"), None),
            field(
                43,
                FieldSource::Constant,
                Some("SETTLEGATE SHOP 42       TOKYO        JP"),
                None,
            ),
            field(48, FieldSource::TerminalIdFull, None, None),
        ],
        long_terminal_ids: LongTerminalIds::Derive,
        ..config(host.port)
    };
    tuned.terminal_ids.insert("STORE-0001-TILL1".into(), "S1T1".into());
    let adapter = ready_adapter(tuned).await;

    let at = |i: u64, terminal: &str, amount: u64| {
        let mut request = card(i, amount);
        request.terminal_id = terminal.into();
        request
    };
    let approved = |amount: u64| {
        let code = format!("{amount:06}");
        iso_support::approved(code.as_bytes().try_into().unwrap())
    };
    assert_eq!(adapter.authorize(at(1, "STORE-0001-TILL1", 101)).await, approved(101));
    assert_eq!(adapter.authorize(at(2, "STORE-0042-TILL3", 102)).await, approved(102));
    assert_eq!(adapter.authorize(at(3, "TERM01", 103)).await, approved(103));
    // A timeout: the reversal carries the same fields as its original.
    assert_eq!(
        adapter.authorize(at(4, "STORE-0042-TILL3", 8_000)).await,
        Err(AdapterError::Timeout)
    );
    eventually("reversal acknowledged", || adapter.stats().reversals_acked == 1).await;

    let seen = requests(&host);
    assert_eq!(seen.len(), 4, "{seen:?}");
    let expected_41 = ["S1T1    ", "CVGX8JBM", "TERM01  ", "CVGX8JBM"];
    let expected_48 = ["STORE-0001-TILL1", "STORE-0042-TILL3", "TERM01", "STORE-0042-TILL3"];
    for ((entry, f41), f48) in seen.iter().zip(expected_41).zip(expected_48) {
        assert!(entry.is("f41", f41), "field 41 {f41:?}: {entry:?}");
        assert!(entry.is("f48", f48), "field 48 {f48:?}: {entry:?}");
        assert!(entry.is("f18", "5411") && entry.is("f22", "051") && entry.is("f25", "00"));
        assert!(entry.is("f32", "00012345"), "{entry:?}");
        assert!(entry.is("f43", "SETTLEGATE SHOP 42       TOKYO        JP"), "{entry:?}");
        assert!(entry.is("f42", "SETTLEGATE01   ") && entry.is("f3", "000000"), "{entry:?}");
        let (time, date) = (entry.get("f12").unwrap(), entry.get("f13").unwrap());
        assert!(time.len() == 6 && date.len() == 4, "{entry:?}");
    }
    let reversal = host
        .ledger_lines()
        .into_iter()
        .find(|e| e.is("dir", "in") && e.is("mti", "0400"))
        .expect("the reversal");
    assert!(reversal.is("f41", "CVGX8JBM") && reversal.is("f48", "STORE-0042-TILL3"));
    assert_eq!(reversal.get("f12"), seen[3].get("f12"), "the original's local time");
}

#[tokio::test]
async fn without_dialect_keys_long_terminal_ids_are_refused_and_no_extra_field_is_sent() {
    let dir = ledger_dir();
    let host = Host::spawn(0, Some(&dir.path().join("ledger.jsonl")));
    let adapter = ready_adapter(config(host.port)).await;

    let mut long = card(1, 100);
    long.terminal_id = "STORE-0042-TILL3".into();
    let refused = adapter.authorize(long).await;
    assert!(
        matches!(&refused, Err(AdapterError::Config(m)) if m.contains("field 41")),
        "{refused:?}"
    );
    assert!(adapter.authorize(card(2, 100)).await.is_ok());
    let seen = requests(&host);
    assert_eq!(seen.len(), 1, "the long ID never reached the host: {seen:?}");
    for key in ["f12", "f13", "f18", "f22", "f25", "f32", "f43", "f48"] {
        assert_eq!(seen[0].get(key), None, "{key} not sent by default: {:?}", seen[0]);
    }
    assert!(seen[0].is("f41", "TERM0001") && seen[0].is("f42", "SETTLEGATE01   "));
    let rrn = seen[0].get("rrn").unwrap();
    assert_ne!(rrn[6..], seen[0].get("stan").unwrap(), "the counter RRN by default");
}

/// `%Y%j%H` (then reduced to `YDDDhh`) at UTC+9, from Python's clock: an independent reckoning.
fn ydddhh_tokyo() -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import datetime as d; t = d.datetime.now(d.timezone.utc) + d.timedelta(minutes=540); \
             print(t.strftime('%Y%j%H')[3:])",
        ])
        .output()
        .expect("python3");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn rrn_ydddhh_stan_reaches_the_host() {
    let dir = ledger_dir();
    let host = Host::spawn(0, Some(&dir.path().join("ledger.jsonl")));
    let tuned = Iso8583Config {
        rrn_format: RrnFormat::YdddhhStan,
        local_time_offset_minutes: 540,
        ..config(host.port)
    };
    let adapter = ready_adapter(tuned).await;
    let before = ydddhh_tokyo();
    assert!(adapter.authorize(card(1, 100)).await.is_ok());
    let after = ydddhh_tokyo();
    let seen = requests(&host);
    let (rrn, stan) = (seen[0].get("rrn").unwrap(), seen[0].get("stan").unwrap());
    assert_eq!(rrn.len(), 12);
    assert_eq!(rrn[6..], stan, "{rrn}");
    assert!(rrn[..6] == before || rrn[..6] == after, "{rrn} vs {before}..{after}");
}

#[tokio::test]
async fn response_code_overrides_change_the_outcome_and_the_default_table_stays() {
    let host = Host::spawn(0, None);
    let default = ready_adapter(config(host.port)).await;
    let mut tuned = config(host.port);
    for (code, outcome) in [
        ("85", ResponseOutcome::Approve),
        ("55", ResponseOutcome::InvalidAccount),
        ("94", ResponseOutcome::Unavailable),
        ("12", ResponseOutcome::Timeout),
        ("51", ResponseOutcome::LimitExceeded),
    ] {
        tuned.response_codes.insert(code.into(), outcome);
    }
    let tuned = ready_adapter(tuned).await;
    let declined = iso_support::declined;

    // The host answers 30xx with response code xx (and a field 38).
    for amount in [3_010, 3_085, 3_055, 3_094, 3_012, 3_030] {
        let outcome = default.authorize(card(amount, amount)).await;
        assert_eq!(outcome, declined(DeclineReason::DoNotHonor), "default, {amount}");
    }
    let approved = iso_support::approved(b"003085");
    assert_eq!(tuned.authorize(card(1, 3_085)).await, approved);
    assert_eq!(tuned.authorize(card(2, 3_055)).await, declined(DeclineReason::InvalidAccount));
    let unavailable = tuned.authorize(card(3, 3_094)).await;
    assert!(matches!(&unavailable, Err(AdapterError::Unavailable(m)) if m.contains("94")));
    assert_eq!(tuned.authorize(card(4, 3_012)).await, Err(AdapterError::Timeout));
    assert_eq!(tuned.authorize(card(5, 3_010)).await, declined(DeclineReason::DoNotHonor));
    // 51 over the amount rule: overridden here, the default elsewhere.
    assert_eq!(tuned.authorize(card(6, 2_000_000)).await, declined(DeclineReason::LimitExceeded));
    assert_eq!(
        default.authorize(card(7, 2_000_000)).await,
        declined(DeclineReason::InsufficientFunds)
    );
}

#[tokio::test]
async fn reversal_advice_0420_is_sent_and_its_0430_matched() {
    let dir = ledger_dir();
    let host = Host::spawn(0, Some(&dir.path().join("ledger.jsonl")));
    let tuned = Iso8583Config {
        response_timeout_ms: 1_000,
        reversal_mti: ReversalMti::Advice,
        ..config(host.port)
    };
    let adapter = ready_adapter(tuned).await;
    assert_eq!(adapter.authorize(card(1, 8_000)).await, Err(AdapterError::Timeout));
    eventually("0430 matched", || adapter.stats().reversals_acked == 1).await;
    let lines = host.ledger_lines();
    let dropped = lines.iter().find(|e| e.is("dir", "drop")).expect("dropped");
    let advice = lines
        .iter()
        .find(|e| e.is("dir", "in") && e.is("mti", "0420"))
        .unwrap_or_else(|| panic!("no 0420: {lines:?}"));
    assert!(advice.is("orig_stan", &dropped.get("stan").unwrap()), "{advice:?}");
    assert!(advice.is("rrn", &dropped.get("rrn").unwrap()), "{advice:?}");
    assert!(!lines.iter().any(|e| e.is("mti", "0400")), "no 0400 with reversal_mti = 0420");
    assert!(lines.iter().any(|e| e.is("dir", "out") && e.is("mti", "0430")));
    assert_eq!(adapter.reversals_pending(), 0);
}

#[tokio::test]
async fn a_reversal_waiting_for_the_link_is_pending_until_acknowledged() {
    let dir = ledger_dir();
    let mut host = Host::spawn(0, Some(&dir.path().join("first.jsonl")));
    let port = host.port;
    let adapter = ready_adapter(config(port)).await;
    let health = |adapter: &Iso8583Adapter| adapter.health().expect("a linked adapter");

    let call = {
        let adapter = std::sync::Arc::clone(&adapter);
        tokio::spawn(async move { adapter.authorize(card(1, 8_000)).await })
    };
    eventually("the host holds the request", || {
        host.ledger_lines().iter().any(|e| e.is("dir", "drop"))
    })
    .await;
    host.kill();
    assert_eq!(call.await.unwrap(), Err(AdapterError::Timeout));
    eventually("one reversal pending, link down", || {
        let h = health(&adapter);
        h.reversals_pending == 1 && !h.link_up
    })
    .await;
    assert_eq!(adapter.stats().reversals_sent, 0, "queued, not sent");

    let restarted = Host::spawn(port, Some(&dir.path().join("second.jsonl")));
    eventually("acknowledged after the sign-on", || adapter.stats().reversals_acked == 1).await;
    assert_eq!(health(&adapter).reversals_pending, 0);
    assert!(restarted.ledger_lines().iter().any(|e| e.is("dir", "in") && e.is("mti", "0400")));
}

/// A CA, a server certificate for `localhost` and 127.0.0.1 and a client certificate, as PEM
/// files in `dir`.
fn certificates(dir: &Path, ca_name: &str) -> [std::path::PathBuf; 5] {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, ca_name);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "iso-host");
    let server = server.signed_by(&server_key, &ca, &ca_key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::new()).unwrap();
    client.distinguished_name.push(DnType::CommonName, "settlegate-acquirer-link");
    let client = client.signed_by(&client_key, &ca, &ca_key).unwrap();
    let files = [
        ("ca.pem", ca.pem()),
        ("server.pem", server.pem()),
        ("server.key", server_key.serialize_pem()),
        ("client.pem", client.pem()),
        ("client.key", client_key.serialize_pem()),
    ];
    files.map(|(name, pem)| {
        let path = dir.join(format!("{ca_name}-{name}"));
        std::fs::write(&path, pem).unwrap();
        path
    })
}

#[tokio::test]
async fn tls_with_a_client_certificate_to_a_python_ssl_host() {
    let dir = ledger_dir();
    let [ca, server, server_key, client, client_key] = certificates(dir.path(), "test-ca");
    let args: Vec<&OsStr> = vec![
        "--tls-cert".as_ref(),
        server.as_os_str(),
        "--tls-key".as_ref(),
        server_key.as_os_str(),
        "--tls-client-ca".as_ref(),
        ca.as_os_str(),
    ];
    let host = Host::spawn_with(0, Some(&dir.path().join("ledger.jsonl")), &args);
    let tls = TlsConfig {
        ca_file: ca.clone(),
        server_name: Some("localhost".into()),
        client_cert_file: Some(client.clone()),
        client_key_file: Some(client_key.clone()),
    };
    let adapter =
        ready_adapter(Iso8583Config { tls: Some(tls.clone()), ..config(host.port) }).await;
    let approved = iso_support::approved(b"000777");
    assert_eq!(adapter.authorize(card(1, 777)).await, approved);
    let seen = requests(&host);
    assert!(seen[0].is("tls", "true"), "{seen:?}");
    assert!(seen[0].is("client_cn", "settlegate-acquirer-link"), "{seen:?}");
    assert!(seen[0].is("pan_last4", "1111"), "{seen:?}");
    // Many in flight at once on the one TLS connection, all matched.
    let calls = (0..200u64).map(|i| {
        let adapter = std::sync::Arc::clone(&adapter);
        tokio::spawn(async move { (i, adapter.authorize(card(10 + i, 100_000 + i)).await) })
    });
    for call in futures::future::join_all(calls).await {
        let (i, result) = call.unwrap();
        let code = format!("{:06}", 100_000 + i);
        assert_eq!(
            result,
            iso_support::approved(code.as_bytes().try_into().unwrap()),
            "request {i}"
        );
    }

    // The server name defaults to host_addr's host: 127.0.0.1, in the certificate too.
    let by_ip = TlsConfig { server_name: None, ..tls.clone() };
    let by_ip = ready_adapter(Iso8583Config { tls: Some(by_ip), ..config(host.port) }).await;
    assert!(by_ip.authorize(card(2, 100)).await.is_ok());

    // Never signed on: a host certificate from another CA, a name the certificate lacks, or
    // no client certificate for a host that requires one.
    let [other_ca, ..] = certificates(dir.path(), "other-ca");
    let refused = [
        TlsConfig { ca_file: other_ca, ..tls.clone() },
        TlsConfig { server_name: Some("acquirer.example".into()), ..tls.clone() },
        TlsConfig { client_cert_file: None, client_key_file: None, ..tls.clone() },
    ];
    let adapters: Vec<Iso8583Adapter> = refused
        .into_iter()
        .map(|tls| {
            let config = Iso8583Config { tls: Some(tls), ..config(host.port) };
            Iso8583Adapter::start(config, TestVault::shared()).expect("a valid config")
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, refused) in adapters.iter().enumerate() {
        assert_ne!(refused.status(), LinkStatus::Ready, "case {i}");
        assert_eq!(refused.stats().sign_ons, 0, "case {i}");
    }

    // Plain TCP to a TLS host does not sign on either.
    let plain = Iso8583Adapter::start(config(host.port), TestVault::shared()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(plain.stats().sign_ons, 0);
}

#[test]
fn tls_files_are_checked_when_the_config_is() {
    let dir = ledger_dir();
    let [ca, _, _, client, client_key] = certificates(dir.path(), "check-ca");
    let with = |tls: TlsConfig| Iso8583Config { tls: Some(tls), ..config(1) }.validate();
    let good = TlsConfig {
        ca_file: ca.clone(),
        server_name: None,
        client_cert_file: Some(client.clone()),
        client_key_file: Some(client_key.clone()),
    };
    assert!(with(good.clone()).is_ok());
    let cases = [
        (TlsConfig { ca_file: dir.path().join("missing.pem"), ..good.clone() }, "tls.ca_file"),
        (TlsConfig { ca_file: client_key.clone(), ..good.clone() }, "no certificate"),
        (TlsConfig { client_key_file: None, ..good.clone() }, "set both or neither"),
        (TlsConfig { client_key_file: Some(ca.clone()), ..good.clone() }, "client_key_file"),
        (TlsConfig { server_name: Some("not a name!".into()), ..good.clone() }, "server_name"),
    ];
    for (tls, wanted) in cases {
        let error = with(tls).expect_err(wanted).to_string();
        assert!(error.contains(wanted), "{wanted:?} in {error}");
    }
    let parsed: Iso8583Config = toml::from_str(&format!(
        "host_addr = \"h:1\"\nmerchant_id = \"M\"\ntls = {{ ca_file = {:?} }}",
        ca.display().to_string()
    ))
    .unwrap();
    assert_eq!(parsed.tls.unwrap().ca_file, ca);
}

/// The full example of `docs/ADAPTERS.md` ("Dialect") parses and, its TLS files aside, is valid.
#[test]
fn the_documented_dialect_example_is_a_valid_config() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ADAPTERS.md"))
            .unwrap();
    let start = doc.find("A full example:").expect("the example") + "A full example:".len();
    let block = &doc[start..];
    let block = &block[block.find("```toml").unwrap() + 7..];
    let block = &block[..block.find("```").unwrap()];
    let mut value: toml::Value = toml::from_str(block).expect("the example is TOML");
    let adapter = value["engine"]["providers"][0]["adapter"].as_table_mut().unwrap();
    assert!(adapter.remove("tls").is_some(), "the example shows tls");
    let config: settlegate_adapters::AdapterConfig =
        toml::Value::Table(adapter.clone()).try_into().expect("an adapter config");
    config.validate().expect("valid");
    let settlegate_adapters::AdapterConfig::Iso8583(iso) = config else { panic!("iso8583") };
    assert_eq!((iso.fields.len(), iso.rrn_format), (8, RrnFormat::YdddhhStan));
    assert_eq!(iso.reversal_mti, ReversalMti::Advice);
}
