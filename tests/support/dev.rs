//! The real `credvault dev` binary as a child process on free loopback
//! ports, for the tests that drive it the way a newcomer (or an operator's
//! script) does.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// A loopback port free right now and never handed out before by this
/// process. The kernel may give a port it just released to the next
/// `bind(:0)`: two calls in a row once returned the same port for a
/// replica's gRPC and ops listeners, and the replica could not start (a CI
/// run, 2026-12-02).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// A loopback address on a port from [`free_port`]: for a listener that
/// the test starts later, or one nothing will ever listen on.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// All traffic here is on loopback: no proxy from the environment in between
/// (reqwest in the vault, grpc-core in Python and grpcurl all honour one).
pub fn without_proxy(command: &mut Command) -> &mut Command {
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "grpc_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        command.env_remove(var);
    }
    command
}

/// Whether `/readyz` on the ops port answers 200.
pub fn ops_ready(ops: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", ops)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nhost: ops\r\nconnection: close\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// A `credvault dev` process, killed when dropped (also when a test panics).
pub struct DevProcess {
    child: Option<Child>,
    pub port: u16,
    pub ops: u16,
    /// The demo OAuth provider's port.
    pub demo: u16,
}

impl DevProcess {
    /// Starts it on `dir`, its output discarded, and waits until it is ready.
    pub fn start(dir: &Path) -> Self {
        Self::spawn(dir, false, &[])
    }

    /// Like [`DevProcess::start`], with extra environment variables.
    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn(dir, false, env)
    }

    /// Like [`DevProcess::start`], with extra `dev` arguments.
    pub fn start_with_args(dir: &Path, args: &[&str]) -> Self {
        Self::spawn_with(dir, false, &[], args)
    }

    /// Like [`DevProcess::start`], keeping its output for
    /// [`DevProcess::terminate`], with extra environment variables.
    pub fn start_capturing(dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn(dir, true, env)
    }

    fn spawn(dir: &Path, capture: bool, env: &[(&str, &str)]) -> Self {
        Self::spawn_with(dir, capture, env, &[])
    }

    /// Starts it on new free ports, again if a port was taken between
    /// picking it and binding it (another test's process can take it in
    /// that window); any other early exit fails the test with what the
    /// process said.
    fn spawn_with(dir: &Path, capture: bool, env: &[(&str, &str)], args: &[&str]) -> Self {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            match Self::try_spawn(dir, capture, env, args) {
                Ok(dev) => return dev,
                Err(said) if said.contains("Address already in use") && attempt < ATTEMPTS => {
                    eprintln!("credvault dev lost a port to another process; new ports: {said}");
                }
                Err(said) => panic!("credvault dev exited early: {said}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn try_spawn(
        dir: &Path,
        capture: bool,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Self, String> {
        let (port, ops, demo) = (free_port(), free_port(), free_port());
        // Uncaptured, stderr goes to a file, read only if the process dies
        // at start (a pipe nobody reads would fill and stall it).
        let stderr_log = tempfile::NamedTempFile::new().unwrap();
        let piped_or = |otherwise: Stdio| if capture { Stdio::piped() } else { otherwise };
        let child = without_proxy(&mut Command::new(env!("CARGO_BIN_EXE_credvault")))
            .args(["dev", "--dir"])
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--ops-listen", &format!("127.0.0.1:{ops}")])
            .args(["--demo-listen", &format!("127.0.0.1:{demo}")])
            .args(args)
            .envs(env.iter().copied())
            .stdout(piped_or(Stdio::null()))
            .stderr(piped_or(Stdio::from(stderr_log.reopen().unwrap())))
            .spawn()
            .unwrap();
        let mut dev = Self {
            child: Some(child),
            port,
            ops,
            demo,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ops_ready(ops) {
            if let Some(Ok(Some(status))) = dev.child.as_mut().map(Child::try_wait) {
                let said = match dev.child.take() {
                    Some(child) if capture => {
                        let output = child.wait_with_output().unwrap();
                        String::from_utf8_lossy(&output.stderr).into_owned()
                    }
                    _ => std::fs::read_to_string(stderr_log.path()).unwrap_or_default(),
                };
                return Err(format!("{status}: {}", said.trim()));
            }
            assert!(
                Instant::now() < deadline,
                "credvault dev did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(dev)
    }

    /// An mTLS channel to it as the client certificate `name` it wrote
    /// (`admin` or `acme`), on a connection of its own.
    pub fn channel(&self, dir: &Path, name: &str) -> tonic::transport::Channel {
        let read = |file: String| std::fs::read_to_string(dir.join(file)).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(
                "ca.pem".into(),
            )))
            .identity(tonic::transport::Identity::from_pem(
                read(format!("{name}.pem")),
                read(format!("{name}-key.pem")),
            ))
            .domain_name("localhost");
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_lazy()
    }

    /// The process's resident memory, in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// SIGTERM, then the exit status and everything the process printed.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status, text)
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
