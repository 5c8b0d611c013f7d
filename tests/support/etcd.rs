//! A real etcd cluster on 127.0.0.1 (Debian's etcd-server 3.4.x, put in
//! `target/etcd` by `tests/etcd/install.sh`, which the README's test command
//! runs). Members are real processes: they can be killed, frozen and
//! restarted. A missing binary fails the test loudly; nothing is mocked.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use super::dev::free_port;

/// Where `tests/etcd/install.sh` puts the server.
fn etcd_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/etcd/usr/bin/etcd");
    assert!(
        path.is_file(),
        "{} is missing: run tests/etcd/install.sh (the README's test command does)",
        path.display()
    );
    path
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running cluster; every member is stopped on drop.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    token: String,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one of them answers.
    ///
    /// Ports are picked free and bound by etcd a moment later; another test
    /// in this process (a vault, another cluster) can take one in between,
    /// and then that member exits at once. Such a start is abandoned and
    /// tried again on new ports. Waiting for every member, not the first:
    /// a vault started while one member was not answering (not listening
    /// yet, or just exited) failed its first store call with a connect
    /// error (a CI run, 2026-12-02).
    pub fn start(size: usize) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(size) {
                Ok(cluster) => return cluster,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("the etcd cluster did not start: {failures:?}");
    }

    fn try_start(size: usize) -> Result<Self, String> {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let dir = tempfile::tempdir().unwrap();
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            dir,
            members,
            // One token per cluster: concurrent clusters never merge.
            token: format!(
                "credvault-test-{}-{}",
                std::process::id(),
                STARTS.fetch_add(1, Ordering::SeqCst)
            ),
        };
        for i in 0..size {
            cluster.spawn(i, "new");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(name) = cluster.exited() {
                return Err(format!("member {name} exited while starting"));
            }
            if cluster.members.iter().all(|m| health(m.client_port)) {
                return Ok(cluster);
            }
            if Instant::now() >= deadline {
                return Err("not every member healthy within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The name of a member whose process has ended, if any.
    fn exited(&mut self) -> Option<String> {
        self.members.iter_mut().find_map(|m| {
            let ended = m
                .child
                .as_mut()
                .is_some_and(|child| !matches!(child.try_wait(), Ok(None)));
            ended.then(|| m.name.clone())
        })
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let data = self.dir.path().join(&self.members[i].name);
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(etcd_binary())
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            // Fast elections on loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        m.child = Some(child);
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The `[storage]` section for a vault on this cluster.
    pub fn storage_config(&self, prefix: &str, extra: &str) -> String {
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!(
            "[storage]\nbackend = \"etcd\"\n[storage.etcd]\nendpoints = [{}]\nprefix = \"{prefix}\"\n{extra}\n",
            endpoints.join(", ")
        )
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The index of the member that is the raft leader now, from its
    /// `/metrics` (`etcd_server_is_leader 1`).
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.child.is_some() && get(m.client_port, "/metrics").contains("etcd_server_is_leader 1")
        })
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) member `i`: a member that
    /// holds its connections open but answers nothing.
    pub fn freeze(&self, i: usize, frozen: bool) {
        if let Some(child) = &self.members[i].child {
            let signal = if frozen { "-STOP" } else { "-CONT" };
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "kill {signal} failed");
        }
    }

    /// Restarts a killed member on its data dir.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i, "existing");
    }

    /// Waits until a quorum answers a read through some member.
    pub fn wait_healthy(&self, within: Duration) {
        wait_until(within, "the etcd cluster did not become healthy", || {
            self.members.iter().any(|m| health(m.client_port))
        });
    }

    /// Waits until member `i` itself answers `/health`: it has a leader
    /// and a quorum read through it answers. A member just thawed can take
    /// seconds to get there on a loaded host, and until it has, the cluster
    /// has one working member fewer than it seems.
    pub fn wait_member_healthy(&self, i: usize, within: Duration) {
        wait_until(
            within,
            &format!("etcd member {i} did not become healthy"),
            || health(self.members[i].client_port),
        );
    }
}

/// Polls `done` every 50 ms; fails the test with `failure` after `within`.
fn wait_until(within: Duration, failure: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{failure}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /health` says the member is part of a working cluster.
fn health(port: u16) -> bool {
    get(port, "/health").contains("\"health\":\"true\"")
}

/// A plain HTTP GET on a member's client port; empty on any failure.
fn get(port: u16, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nhost: etcd\r\nconnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // A frozen process ignores nothing but SIGKILL; thaw it anyway.
            self.freeze(i, false);
            self.kill(i);
        }
    }
}
