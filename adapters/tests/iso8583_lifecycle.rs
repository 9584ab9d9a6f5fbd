//! Captures, voids, refunds and reversals through the ISO 8583 adapter to the Python host
//! simulator (`tests/iso_host/iso_host.py`) over real sockets, checked three ways: the
//! adapter's answer, the messages the host received (its ledger) and the host's own account
//! of each authorization (its tally, `--tally-file`).
//!
//! These tests fail, rather than skip, when python3 or pyiso8583 is missing.

mod iso_support;

use std::sync::Arc;

use iso_support::{card, config, eventually, ready_adapter, Host};
use settlegate_adapters::iso8583::{
    CaptureMti, FieldConfig, FieldSource, Iso8583Adapter, Iso8583Config,
};
use settlegate_adapters::{
    AdapterError, AuthReference, LifecycleReply, LifecycleRequest, NetworkReference,
    ProviderAdapter, ProviderReply, RefusalReason,
};

/// A tallying host in its own directory (removed when `_dir` is dropped: bind it), and an
/// adapter (`tune`d) signed on to it.
struct Setup {
    host: Host,
    adapter: Arc<Iso8583Adapter>,
    _dir: tempfile::TempDir,
}

async fn setup(tune: impl FnOnce(Iso8583Config) -> Iso8583Config) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = Host::spawn_tallying(dir.path());
    let adapter = ready_adapter(tune(config(host.port))).await;
    Setup { host, adapter, _dir: dir }
}

/// Authorizes `amount` (approved by the host) and hands back the reference.
async fn approve(adapter: &dyn ProviderAdapter, dispatch_id: u64, amount: u64) -> AuthReference {
    let request = card(dispatch_id, amount);
    match adapter.authorize(request.clone()).await {
        Ok(reply @ ProviderReply::Approved { .. }) => reply.reference(&request).expect("approved"),
        other => panic!("authorization of {amount}: {other:?}"),
    }
}

fn rrn(reference: &AuthReference) -> String {
    let network = reference.network.expect("the ISO adapter sets the network identifiers");
    String::from_utf8(network.rrn.to_vec()).unwrap()
}

fn refused(reason: RefusalReason) -> Result<LifecycleReply, AdapterError> {
    Ok(LifecycleReply::Refused { reason })
}

fn accepted(answer: &Result<LifecycleReply, AdapterError>) -> NetworkReference {
    match answer {
        Ok(LifecycleReply::Accepted { network: Some(network) }) => *network,
        other => panic!("not accepted: {other:?}"),
    }
}

/// The host's account of the authorization `reference` names: (state, authorized, captured,
/// refunded, voided, reversed).
fn account(host: &Host, reference: &AuthReference) -> (String, u64, u64, u64, u64, u64) {
    let held = host.held(&rrn(reference)).expect("the host holds the authorization");
    let amount = |key: &str| held[key].as_u64().unwrap();
    let state = held["state"].as_str().unwrap().to_owned();
    let amounts = ["authorized", "captured", "refunded", "voided", "reversed"].map(amount);
    (state, amounts[0], amounts[1], amounts[2], amounts[3], amounts[4])
}

/// The ledger's lines of lifecycle messages the host received, as (op, its answer code).
fn operations(host: &Host) -> Vec<(String, String)> {
    host.ledger_lines()
        .iter()
        .filter(|e| e.is("dir", "op"))
        .map(|e| (e.get("op").unwrap(), e.get("code").unwrap()))
        .collect()
}

#[tokio::test]
async fn capture_below_the_hold_is_a_0220_naming_the_original_and_the_rest_is_released() {
    let acquirer = FieldConfig {
        field: 32,
        source: FieldSource::Constant,
        value: Some("12345".into()),
        pad: None,
    };
    let Setup { host, adapter, _dir } =
        setup(|config| Iso8583Config { fields: vec![acquirer], ..config }).await;
    let auth = approve(adapter.as_ref(), 1, 10_000).await;
    let network = auth.network.unwrap();
    assert_eq!(&network.mti, b"0100");
    assert_eq!(&network.acquirer, b"00000012345", "field 32, as field 90 carries it");
    assert_eq!(account(&host, &auth), ("authorized".into(), 10_000, 0, 0, 0, 0));

    let answer = adapter.lifecycle(LifecycleRequest::capture(100, auth.clone(), 6_000)).await;
    let sent = accepted(&answer);
    assert_eq!((&sent.mti, sent.rrn), (b"0220", network.rrn));
    assert_ne!(sent.stan, network.stan, "its own STAN");
    assert_eq!(account(&host, &auth), ("captured".into(), 10_000, 6_000, 0, 0, 0));

    let lines = host.ledger_lines();
    let advice = lines.iter().find(|e| e.is("dir", "in") && e.is("mti", "0220")).unwrap();
    let stan = format!("{:06}", network.stan);
    let transmitted = String::from_utf8(network.transmitted.to_vec()).unwrap();
    let f90 = format!("0100{stan}{transmitted}0000001234500000000000");
    assert!(advice.is("f90", &f90), "{advice:?}");
    assert!(advice.is("amount", "6000") && advice.is("rrn", &rrn(&auth)), "{advice:?}");
    assert!(advice.is("f38", &format!("{:06}", 10_000)), "the approval code: {advice:?}");
    assert!(advice.is("pan_last4", "1111") && advice.is("f32", "12345"), "{advice:?}");
    assert!(lines.iter().any(|e| e.is("dir", "out") && e.is("mti", "0230")));

    // One capture per authorization.
    let again = adapter.lifecycle(LifecycleRequest::capture(101, auth.clone(), 1_000)).await;
    assert_eq!(again, refused(RefusalReason::InvalidState));
    assert_eq!(
        operations(&host),
        [("capture".into(), "00".into()), ("capture".into(), "12".into())]
    );
    assert_eq!((adapter.stats().operations_accepted, adapter.stats().operations_refused), (1, 1));
}

#[tokio::test]
async fn a_full_capture_goes_as_0200_when_configured() {
    let Setup { host, adapter, _dir } =
        setup(|config| Iso8583Config { capture_mti: CaptureMti::Request, ..config }).await;
    let auth = approve(adapter.as_ref(), 1, 5_000).await;
    let answer = adapter.lifecycle(LifecycleRequest::capture(7, auth.clone(), 5_000)).await;
    assert_eq!(&accepted(&answer).mti, b"0200");
    assert_eq!(account(&host, &auth), ("captured".into(), 5_000, 5_000, 0, 0, 0));
    let lines = host.ledger_lines();
    let capture = lines.iter().find(|e| e.is("dir", "in") && e.get("f90").is_some()).unwrap();
    assert!(capture.is("mti", "0200") && capture.is("f3", "000000"), "{capture:?}");
    assert!(lines.iter().any(|e| e.is("dir", "out") && e.is("mti", "0210") && e.is("code", "00")));
}

#[tokio::test]
async fn void_before_capture_releases_the_hold_and_a_void_after_capture_is_refused() {
    let Setup { host, adapter, _dir } = setup(|config| config).await;

    let held = approve(adapter.as_ref(), 1, 2_500).await;
    let answer = adapter.lifecycle(LifecycleRequest::void(10, held.clone())).await;
    assert_eq!(&accepted(&answer).mti, b"0400");
    assert_eq!(account(&host, &held), ("voided".into(), 2_500, 0, 0, 2_500, 0));
    let void = host.ledger_lines().into_iter().find(|e| e.is("mti", "0400")).unwrap();
    assert!(void.is("code", "17") && void.is("amount", "2500"), "customer cancellation: {void:?}");
    // Nothing left to release: accepted again; a capture now is refused.
    assert!(adapter.lifecycle(LifecycleRequest::void(11, held.clone())).await.is_ok());
    let late = adapter.lifecycle(LifecycleRequest::capture(12, held.clone(), 100)).await;
    assert_eq!(late, refused(RefusalReason::InvalidState));

    let captured = approve(adapter.as_ref(), 2, 3_000).await;
    accepted(&adapter.lifecycle(LifecycleRequest::capture(13, captured.clone(), 3_000)).await);
    let void = adapter.lifecycle(LifecycleRequest::void(14, captured.clone())).await;
    assert_eq!(void, refused(RefusalReason::InvalidState));
    assert_eq!(account(&host, &captured), ("captured".into(), 3_000, 3_000, 0, 0, 0));
}

#[tokio::test]
async fn a_partial_refund_then_one_past_the_captured_total_is_refused() {
    let Setup { host, adapter, _dir } = setup(|config| config).await;
    let auth = approve(adapter.as_ref(), 1, 10_000).await;

    // A refund before the capture.
    let early = adapter.lifecycle(LifecycleRequest::refund(20, auth.clone(), 100)).await;
    assert_eq!(early, refused(RefusalReason::InvalidState));
    accepted(&adapter.lifecycle(LifecycleRequest::capture(21, auth.clone(), 8_000)).await);
    let first = adapter.lifecycle(LifecycleRequest::refund(22, auth.clone(), 5_000)).await;
    assert_eq!(&accepted(&first).mti, b"0200");
    let past = adapter.lifecycle(LifecycleRequest::refund(23, auth.clone(), 3_001)).await;
    assert_eq!(past, refused(RefusalReason::AmountInvalid));
    assert_eq!(account(&host, &auth), ("captured".into(), 10_000, 8_000, 5_000, 0, 0));
    accepted(&adapter.lifecycle(LifecycleRequest::refund(24, auth.clone(), 3_000)).await);
    assert_eq!(account(&host, &auth), ("captured".into(), 10_000, 8_000, 8_000, 0, 0));

    let refunds: Vec<_> = host
        .ledger_lines()
        .into_iter()
        .filter(|e| e.is("dir", "in") && e.is("mti", "0200") && e.get("f90").is_some())
        .collect();
    assert_eq!(refunds.len(), 4, "{refunds:?}");
    assert!(refunds.iter().all(|e| e.is("f3", "200000") && e.is("rrn", &rrn(&auth))));
    let codes: Vec<_> = operations(&host).into_iter().map(|(op, code)| op + ":" + &code).collect();
    assert_eq!(codes, ["refund:12", "capture:00", "refund:00", "refund:13", "refund:00"]);
    let tally = host.tally();
    assert_eq!(tally["totals"]["refunded"], 8_000);
    assert_eq!(tally["totals"]["captured"], 8_000);
}

#[tokio::test]
async fn a_capture_above_the_authorization_is_refused_and_changes_nothing() {
    let Setup { host, adapter, _dir } = setup(|config| config).await;
    let auth = approve(adapter.as_ref(), 1, 1_000).await;
    let over = adapter.lifecycle(LifecycleRequest::capture(30, auth.clone(), 1_001)).await;
    assert_eq!(over, refused(RefusalReason::AmountInvalid));
    assert_eq!(account(&host, &auth), ("authorized".into(), 1_000, 0, 0, 0, 0));
    accepted(&adapter.lifecycle(LifecycleRequest::capture(31, auth.clone(), 1_000)).await);
    assert_eq!(
        operations(&host),
        [("capture".into(), "13".into()), ("capture".into(), "00".into())]
    );
}

#[tokio::test]
async fn reversal_after_a_timeout_and_on_request() {
    let Setup { host, adapter, _dir } =
        setup(|config| Iso8583Config { response_timeout_ms: 1_000, ..config }).await;

    // 8000: the host holds the authorization but its answer never comes; the adapter times
    // out and reverses it on its own.
    assert_eq!(adapter.authorize(card(1, 8_000)).await, Err(AdapterError::Timeout));
    let dropped = host.ledger_lines().into_iter().find(|e| e.is("dir", "drop")).unwrap();
    let dropped_rrn = dropped.get("rrn").unwrap();
    eventually("the host reversed the unanswered authorization", || {
        host.held(&dropped_rrn).is_some_and(|h| h["state"] == "reversed" && h["reversed"] == 8_000)
    })
    .await;

    // Asked for: an approved authorization the engine could not record.
    let auth = approve(adapter.as_ref(), 2, 4_000).await;
    let answer = adapter.lifecycle(LifecycleRequest::reversal(40, auth.clone())).await;
    let sent = accepted(&answer);
    assert_eq!(account(&host, &auth), ("reversed".into(), 4_000, 0, 0, 0, 4_000));
    let reversal = host
        .ledger_lines()
        .into_iter()
        .find(|e| {
            e.is("dir", "in") && e.is("mti", "0400") && e.is("stan", &format!("{:06}", sent.stan))
        })
        .unwrap();
    assert!(reversal.get("code").is_none(), "no field 39, as a timeout's: {reversal:?}");
    assert!(reversal.get("f38").is_none(), "{reversal:?}");
    // Again: nothing to undo, accepted. A captured authorization cannot be reversed.
    accepted(&adapter.lifecycle(LifecycleRequest::reversal(41, auth.clone())).await);
    let captured = approve(adapter.as_ref(), 3, 500_000).await;
    accepted(&adapter.lifecycle(LifecycleRequest::capture(42, captured.clone(), 1)).await);
    let refused_reversal = adapter.lifecycle(LifecycleRequest::reversal(43, captured)).await;
    assert_eq!(refused_reversal, refused(RefusalReason::InvalidState));
}

#[tokio::test]
async fn unknown_authorizations_are_refused_by_the_host_or_before_it() {
    let Setup { host, adapter, _dir } = setup(|config| config).await;
    let auth = approve(adapter.as_ref(), 1, 1_000).await;

    // Field 90's STAN does not match what the host holds under that RRN: 25.
    let mut forged = auth.clone();
    forged.network.as_mut().unwrap().stan = auth.network.unwrap().stan % 999_999 + 1;
    let capture = adapter.lifecycle(LifecycleRequest::capture(50, forged.clone(), 10)).await;
    assert_eq!(capture, refused(RefusalReason::UnknownAuthorization));
    // A reversal of something the host does not hold: nothing to undo.
    accepted(&adapter.lifecycle(LifecycleRequest::reversal(51, forged)).await);
    assert_eq!(account(&host, &auth), ("authorized".into(), 1_000, 0, 0, 0, 0));

    // No code: the host could not match it; refused unsent.
    let sent_before = host.ledger_lines().len();
    let no_code = AuthReference { auth_code: None, ..auth.clone() };
    let answer = adapter.lifecycle(LifecycleRequest::capture(53, no_code, 10)).await;
    assert_eq!(answer, refused(RefusalReason::UnknownAuthorization));
    let too_big =
        adapter.lifecycle(LifecycleRequest::capture(54, auth.clone(), 1_000_000_000_000)).await;
    assert_eq!(too_big, refused(RefusalReason::AmountInvalid));
    assert_eq!(host.ledger_lines().len(), sent_before, "nothing sent");

    // No network identifiers (a reference the engine rebuilt from its log): the adapter
    // derives them from the dispatch ID and time again, and the host finds the original.
    let bare = AuthReference { network: None, ..auth.clone() };
    accepted(&adapter.lifecycle(LifecycleRequest::void(52, bare)).await);
    assert_eq!(account(&host, &auth), ("voided".into(), 1_000, 0, 0, 1_000, 0));
}
