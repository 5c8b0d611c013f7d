//! The README's key-rotation walkthrough ("### Rotating the key on a live
//! vault"), executed as written against the real `credvault dev`, so the
//! operator's instructions cannot rot. Only the dev directory, the target
//! address and the `credvault` binary's location are substituted.

mod support;

use std::{path::Path, process::Command};

use support::dev::DevProcess;

const HEADING: &str = "### Rotating the key on a live vault";

fn block(readme: &str) -> String {
    let section = &readme[readme.find(HEADING).expect("rotation section in README")..];
    let start = section.find("```sh\n").expect("an sh block") + "```sh\n".len();
    let end = section[start..].find("```").expect("end of the sh block");
    section[start..start + end].to_owned()
}

fn run(dir: &Path, script: &str) -> (bool, String) {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_credvault")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn readme_rotation_walkthrough_runs_as_written() {
    let work = tempfile::tempdir().unwrap();
    let dev_dir = work.path().join("dev");
    let dev = DevProcess::start(&dev_dir);
    let port = dev.port;
    let d = dev_dir.display();
    let tls = format!("-cacert {d}/ca.pem -cert {d}/admin.pem -key {d}/admin-key.pem");

    // Some credentials to rewrap.
    let mut prelude = String::new();
    for subject in ["ann", "ben", "cy"] {
        prelude.push_str(&format!(
            "grpcurl {tls} -d '{{\"credential\":{{\"tenant\":\"acme\",\"subject\":\"{subject}\",\"provider\":\"demo\"}},\
             \"client\":{{\"token_endpoint\":\"http://127.0.0.1:8080/token\",\"client_id\":\"demo\",\"client_secret\":\"s\"}},\
             \"refresh_token\":{{\"refresh_token\":\"rt-{subject}\",\"access_token\":\"at-{subject}\",\
             \"access_token_expires_at\":\"2099-01-01T00:00:00Z\"}}}}' localhost:{port} credvault.v1.CredentialVault/Deposit >/dev/null\n"
        ));
    }
    std::fs::write(work.path().join("new.pass"), "a brand new passphrase\n").unwrap();

    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let walkthrough = block(&readme)
        .replace("D=.credvault-dev", &format!("D={d}"))
        .replace(
            "credvault admin --dev-dir",
            &format!("credvault admin --target localhost:{port} --dev-dir"),
        );
    assert!(
        walkthrough.contains("credvault keyring promote"),
        "{walkthrough}"
    );
    let (ok, output) = run(work.path(), &format!("{prelude}{walkthrough}"));
    assert!(ok, "the README rotation walkthrough failed:\n{output}");
    assert!(
        output.contains("rewrap to key version 2 finished: 3 rewrapped"),
        "{output}"
    );

    // Afterwards: v1 destroyed, every record under v2, every token served.
    let (ok, status) = run(
        work.path(),
        &format!("credvault admin --target localhost:{port} --dev-dir {d} key-status"),
    );
    assert!(ok, "{status}");
    let v1 = status
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap();
    let v2 = status
        .lines()
        .find(|l| l.trim_start().starts_with("2 "))
        .unwrap();
    assert!(v1.contains("destroyed"), "{status}");
    assert!(
        v2.contains("yes") && v2.trim_end().ends_with('3'),
        "{status}"
    );
    for subject in ["ann", "ben", "cy"] {
        let (ok, out) = run(
            work.path(),
            &format!(
                "grpcurl {tls} -d '{{\"credential\":{{\"tenant\":\"acme\",\"subject\":\"{subject}\",\"provider\":\"demo\"}}}}' \
                 localhost:{port} credvault.v1.CredentialVault/GetAccessToken"
            ),
        );
        assert!(ok && out.contains(&format!("at-{subject}")), "{out}");
    }
    // The passphrase change described after the block.
    let k = format!("--keyring {d}/keyring.cvk --passphrase-file {d}/keyring.passphrase");
    let (ok, out) = run(
        work.path(),
        &format!("credvault keyring change-passphrase {k} --new-passphrase-file new.pass"),
    );
    assert!(ok, "{out}");
    let (ok, _) = run(
        work.path(),
        &format!("credvault keyring list --keyring {d}/keyring.cvk --passphrase-file new.pass"),
    );
    assert!(ok);
    // The vault still reads the old passphrase: its reload is refused, typed.
    let (ok, out) = run(
        work.path(),
        &format!("credvault admin --target localhost:{port} --dev-dir {d} reload-keyring"),
    );
    assert!(!ok && out.contains("KEYRING_REJECTED"), "{out}");
}
