//! The Helm chart's tests (`tests/helm/test_chart.py`, Python unittest) run
//! under `cargo test`: lint and render with the Helm SDK from PyPI (no helm
//! binary), strict Kubernetes schema validation, the chart's invariants, and
//! the rendered `credvault.toml` started with this crate's real binary.
//!
//! Needs the Python packages in `tests/requirements.txt`.

use std::{path::Path, process::Command};

#[test]
fn helm_chart_lints_renders_validates_and_its_config_serves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("python3")
        .arg(root.join("tests/helm/test_chart.py"))
        .current_dir(root)
        // Not CREDVAULT_*: the server reads every such variable as a setting.
        .env("CHART_TEST_CREDVAULT_BIN", env!("CARGO_BIN_EXE_credvault"))
        .output()
        .expect("run python3 tests/helm/test_chart.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tests/helm/test_chart.py failed ({}); install its dependencies with \
         `python3 -m pip install -r tests/requirements.txt`\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    assert!(
        stderr.contains("\nOK") && !stderr.contains("skipped"),
        "every chart test must run, none skipped\n--- stderr\n{stderr}"
    );
}
