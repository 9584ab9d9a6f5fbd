//! The config as an operator meets it (issue #23): `settlegate check-config FILE`; errors that
//! name the key and its value; a warning for a config no client can authenticate with; the
//! fatal error in the (JSON) log; no colours when stderr is not a terminal.

use std::process::{Command, Output};

use crate::support::server::binary_config;

fn settlegate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_settlegate")).args(args).output().expect("runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The test config with `from` replaced by `to` (which must be there).
fn edited(dir: &std::path::Path, from: &str, to: &str) -> std::path::PathBuf {
    let path = binary_config(dir, "{ kind = \"simulated\" }", "");
    let config = std::fs::read_to_string(&path).unwrap();
    assert!(config.contains(from), "{from:?} in {config}");
    std::fs::write(&path, config.replacen(from, to, 1)).unwrap();
    path
}

#[test]
fn check_config_accepts_a_good_file_and_warns_of_one_without_identities() {
    let dir = tempfile::tempdir().unwrap();
    let good = binary_config(dir.path(), "{ kind = \"simulated\" }", "");
    let out = settlegate(&["check-config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok: "), "{}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("warning"));

    let config = std::fs::read_to_string(&good).unwrap();
    let start = config.find("[[server.identities]]").unwrap();
    let end = config.find("[engine]").unwrap();
    let lonely = dir.path().join("lonely.toml");
    std::fs::write(&lonely, format!("{}{}", &config[..start], &config[end..])).unwrap();
    let out = settlegate(&["check-config", lonely.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("warning: server.identities is empty"), "{stdout}");
}

#[test]
fn errors_name_the_key_and_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "listen = \"127.0.0.1:0\"",
            "listen = \"localhost:7878\"",
            &["\"localhost:7878\" is not an IP address and port", "listen"][..],
        ),
        (
            "adapter = { kind = \"simulated\" }",
            "adapter = { kind = \"simulated\" }\nterminals = [{ terminal_id = \"T-1\", service = { discount = { kind = \"percent\", bps = 50000 }, valid_from_ms = 0, valid_until_ms = 1, description = \"x\" } }]",
            &["engine.providers[code 1].terminals[0].service.discount.bps = 50000", "1..=10000"][..],
        ),
    ];
    for (from, to, wanted) in cases {
        let path = edited(dir.path(), from, to);
        let out = settlegate(&["check-config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{to}");
        let stderr = text(&out.stderr);
        for want in wanted {
            assert!(stderr.contains(want), "{want:?} in {stderr}");
        }
    }
}

/// An ISO 8583 provider's dialect is checked with the rest of the config: an unknown field, a
/// padding, an RRN format or an outcome that does not exist, a missing CA file, each named.
#[test]
fn check_config_names_a_wrong_iso8583_dialect_key() {
    let dir = tempfile::tempdir().unwrap();
    let iso = |keys: &str| {
        format!(
            "adapter = {{ kind = \"iso8583\", host_addr = \"127.0.0.1:8583\", merchant_id = \"M1\", {keys} }}"
        )
    };
    let cases = [
        ("fields = [{ field = 18, source = \"constant\", value = \"5411\" }]", &[][..]),
        (
            "fields = [{ field = 129, source = \"constant\", value = \"1\" }]",
            &["engine.providers[code 1].adapter", "field 129", "not a data element"][..],
        ),
        (
            "fields = [{ field = 18, source = \"constant\", value = \"5411\", pad = \"left\" }]",
            &["unknown variant `left`", "spaces_right"][..],
        ),
        ("rrn_format = \"yyddd\"", &["unknown variant `yyddd`", "ydddhh_stan"][..]),
        ("response_codes = { \"55\" = \"declined\" }", &["unknown variant `declined`"][..]),
        ("tls = { ca_file = \"/nonexistent/ca.pem\" }", &["tls.ca_file /nonexistent/ca.pem"][..]),
    ];
    for (keys, wanted) in cases {
        let path = edited(dir.path(), "adapter = { kind = \"simulated\" }", &iso(keys));
        let out = settlegate(&["check-config", path.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        if wanted.is_empty() {
            assert!(out.status.success(), "{keys}: {stderr}");
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{keys}");
        for want in wanted {
            assert!(stderr.contains(want), "{keys}: {want:?} in {stderr}");
        }
    }
}

/// A start that fails (here: the protocol port is taken) logs its fatal error as a JSON line
/// when the log is JSON; with stderr a pipe, the text log has no colour codes.
#[test]
fn a_fatal_error_is_in_the_json_log_and_pipes_get_no_colours() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for (format, json) in [("json", true), ("text", false)] {
        let path = edited(
            dir.path(),
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\"\nlog_format = \"{format}\""),
        );
        let out = settlegate(&["serve", "--config", path.to_str().unwrap()]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(!stderr.contains('\u{1b}'), "no ANSI codes in a pipe: {stderr:?}");
        let fatal =
            stderr.lines().find(|l| l.contains("fatal")).unwrap_or_else(|| panic!("{stderr}"));
        assert!(fatal.contains(&format!("127.0.0.1:{port}")), "{fatal}");
        if json {
            let line: serde_json::Value = serde_json::from_str(fatal).expect("a JSON log line");
            assert_eq!(line["level"], "ERROR", "{fatal}");
        }
    }
    drop(taken);
}
