//! The HTML report in a real browser: a short embedded run writes the report, headless
//! Chromium loads it, and the page's own script must have run without an error and found every
//! plot drawn (it marks `<body data-check="ok">`; read back with `--dump-dom`). A screenshot
//! is kept in `target/browser-test/report.png`.
//!
//! Needs Chromium (`apt-get install -y chromium`; `scripts/test.sh` installs it), or its path
//! in `CHROMIUM`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Chromium: `$CHROMIUM`, else the first of the usual names on `PATH`.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return path.into();
    }
    let names = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"];
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the HTML report's browser test needs headless Chromium, and none was found on \
                 PATH ({names:?}): install it (Debian: `apt-get install -y chromium`; \
                 scripts/test.sh does) or set CHROMIUM to its path"
            )
        })
}

/// Runs Chromium headless on `page` with `flags`; returns its stdout.
fn headless(page: &Path, profile: &Path, flags: &[&str]) -> String {
    let output = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(flags)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("running chromium");
    assert!(output.status.success(), "chromium {flags:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_html_report_renders_in_a_browser_without_script_errors() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("browser-test");
    std::fs::create_dir_all(&out).unwrap();
    let page = out.join("report.html");
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--embedded", "--users", "8", "--stores", "3", "--connections", "2"])
        .args(["--pipeline", "2", "--warmup", "100ms", "--duration", "2s", "--no-progress"])
        .args(["--rate", "2000", "--mix", "authorize=3,list_means=1,ping=1"])
        .args(["--slo", "authorize:p99=1us,max=10s", "--html"])
        .arg(&page)
        .status()
        .expect("running loadgen");
    assert_eq!(status.code(), Some(1), "one objective missed (no authorization takes 1 us)");
    let profile = out.join("profile");
    let dom = headless(&page, &profile, &["--dump-dom"]);
    assert!(
        dom.contains("data-check=\"ok\""),
        "the page's script reported a problem (or did not run): {}",
        dom.split("data-check=").nth(1).map_or("no data-check", |s| &s[..s.len().min(300)])
    );
    assert!(dom.contains("<title>OK loadgen: mix</title>"), "the script set the title");
    assert!(dom.contains("SLO MISSED: 1 of 2 objectives"));
    let screenshot = out.join("report.png");
    std::fs::remove_file(&screenshot).ok();
    let flag = format!("--screenshot={}", screenshot.display());
    headless(&page, &profile, &[&flag, "--window-size=1100,2400"]);
    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a PNG of the page");
    std::fs::remove_dir_all(&profile).ok();
}
