//! Upstream faults: a provider that hangs, resets connections, talks garbage,
//! sends huge bodies or drips bytes. For each, the vault (upstream
//! `request_timeout` 3 s in the test config) must:
//! - answer the credential behind the faulty endpoint with UNAVAILABLE /
//!   `UPSTREAM_UNAVAILABLE` within its timeout (plus slack for a loaded CI
//!   machine), every waiting caller of that credential included;
//! - keep serving other credentials meanwhile: a refresh of a healthy
//!   credential, started while the faulty call is stuck upstream, is fast;
//! - never mark a reauth: once the endpoint behaves again the same grant
//!   refreshes fine and its state is ACTIVE.
//!
//! The faulty endpoint is a raw TCP server in this test ([`FaultyFront`]): in
//! `Proxy` mode it forwards bytes to the real provider double, in the other
//! modes it misbehaves at the socket level, which an HTTP framework cannot.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use credvault::api::pb::{self, vault_admin_client::VaultAdminClient};
use support::{provider::ProviderDouble, vault::*};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tonic::Code;

const CLIENT_ID: &str = "fault-client";
const CLIENT_SECRET: &str = "fault-client-secret-41c2";
/// `upstream.request_timeout` of `VaultDir::new()`.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Scheduling slack on a shared 2-core machine.
const SLACK: Duration = Duration::from_secs(3);
/// A healthy refresh (loopback provider, one fsync) takes milliseconds.
const HEALTHY_BOUND: Duration = Duration::from_secs(2);

/// How the faulty endpoint treats the next connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Forward to the real provider double.
    Proxy,
    /// Read the request, then never answer (and never close).
    Hang,
    /// Read the request, then reset the connection (RST, SO_LINGER 0).
    Reset,
    /// Reset the connection as soon as it is accepted, before any request.
    ResetOnAccept,
    /// Read the request, then close cleanly without a byte of response.
    Close,
    /// Answer with bytes that are not HTTP at all.
    GarbageBytes,
    /// A well-formed `200 OK` whose body is an HTML page, not JSON.
    GarbageBody,
    /// `200 OK` announcing and streaming 100 MiB.
    HugeBody,
    /// `200 OK`, chunked, streaming without end and without a length.
    HugeChunked,
    /// The status line and headers one byte every 200 ms.
    DripHeaders,
    /// Headers at once, then the body one byte every 200 ms.
    DripBody,
}

/// A raw TCP token endpoint with a switchable fault.
struct FaultyFront {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FaultyFront {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Proxy));
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = {
            let (mode, accepted) = (Arc::clone(&mode), Arc::clone(&accepted));
            tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mode = *mode.lock().unwrap();
                    connections.spawn(serve(stream, mode, upstream));
                }
            })
        };
        Self {
            addr,
            mode,
            accepted,
            task,
        }
    }

    fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyFront {
    fn drop(&mut self) {
        // Aborting the accept loop drops the JoinSet, which aborts every
        // connection task (hung ones included).
        self.task.abort();
    }
}

/// Reads until the end of the request headers (or 2 s, or EOF).
async fn read_head(stream: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}

async fn drip(stream: &mut TcpStream, bytes: &[u8]) {
    for b in bytes.iter().cycle() {
        if stream.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stream_forever(stream: &mut TcpStream, head: &[u8], chunk: &[u8]) {
    if stream.write_all(head).await.is_err() {
        return;
    }
    while stream.write_all(chunk).await.is_ok() {}
}

async fn serve(mut stream: TcpStream, mode: Mode, upstream: SocketAddr) {
    if mode == Mode::ResetOnAccept {
        let _ = stream.set_zero_linger();
        return;
    }
    if mode == Mode::Proxy {
        if let Ok(mut provider) = TcpStream::connect(upstream).await {
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut provider).await;
        }
        return;
    }
    read_head(&mut stream).await;
    match mode {
        Mode::Proxy | Mode::ResetOnAccept => unreachable!(),
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Reset => {
            let _ = stream.set_zero_linger();
        }
        Mode::Close => {
            let _ = stream.shutdown().await;
        }
        Mode::GarbageBytes => {
            let _ = stream
                .write_all(b"\x16\x03\x01\x00\xff\xfe garbage \x00\x01\x02\r\n\r\n\xc3\x28")
                .await;
            let _ = stream.shutdown().await;
        }
        Mode::GarbageBody => {
            let body = "<html><body><h1>502 Bad Gateway</h1></body></html>";
            let _ = stream
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
        Mode::HugeBody => {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"access_token\":\"",
                100 * 1024 * 1024
            );
            stream_forever(&mut stream, head.as_bytes(), &[b'a'; 16 * 1024]).await;
        }
        Mode::HugeChunked => {
            let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            let mut chunk = format!("{:x}\r\n", 16 * 1024).into_bytes();
            chunk.extend_from_slice(&[b'a'; 16 * 1024]);
            chunk.extend_from_slice(b"\r\n");
            stream_forever(&mut stream, head, &chunk).await;
        }
        Mode::DripHeaders => {
            drip(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            )
            .await;
        }
        Mode::DripBody => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n")
                .await;
            drip(
                &mut stream,
                b"{\"access_token\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            )
            .await;
        }
    }
}

struct Setup {
    provider: ProviderDouble,
    front: FaultyFront,
    dir: VaultDir,
    vault: TestVault,
}

impl Setup {
    async fn start() -> Self {
        let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
        let front = FaultyFront::start(provider.addr()).await;
        // One failure starts a short cool-down: a caller that arrives just
        // after the shared refresh failed (a loaded machine) is answered
        // from it instead of opening another connection.
        let dir = VaultDir::custom(
            "allow_http_loopback = true\nfailure_backoff_after = 1\nfailure_backoff = \"200ms\"",
            "",
        );
        let vault = TestVault::start(&dir).await;
        Self {
            provider,
            front,
            dir,
            vault,
        }
    }

    async fn deposit(&self, subject: &str, token_url: &str) {
        let mut client = self.vault.client(&self.dir, "admin").await;
        let refresh_token = self.provider.issue_refresh_token(CLIENT_ID);
        client
            .deposit(pb::DepositRequest {
                credential: reference("acme", subject, "idp"),
                client: oauth_client(token_url, CLIENT_ID, CLIENT_SECRET),
                grant: refresh_grant(&refresh_token, None),
                labels: Default::default(),
            })
            .await
            .unwrap();
    }

    /// A GetAccessToken that needs a refresh (provider tokens live 1 h).
    async fn refresh(&self, subject: &str) -> (Result<(), tonic::Status>, Duration) {
        let mut client = self.vault.client(&self.dir, "admin").await;
        let mut request = get_request("acme", subject, "idp");
        request.min_valid_for = Some(prost_types::Duration {
            seconds: 2 * 3600,
            nanos: 0,
        });
        let started = Instant::now();
        let answer = client.get_access_token(request).await;
        (answer.map(|_| ()), started.elapsed())
    }

    async fn state(&self, subject: &str) -> pb::CredentialMetadata {
        let channel = self
            .vault
            .channel(
                Some(&self.dir.pki.clients["admin"]),
                self.dir.pki.ca.ca_cert_pem(),
            )
            .await;
        VaultAdminClient::new(channel)
            .describe_credential(pb::DescribeCredentialRequest {
                credential: reference("acme", subject, "idp"),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

/// The whole contract for one fault.
async fn survives(mode: Mode) {
    let setup = Setup::start().await;
    setup.deposit("faulty", &setup.front.token_url()).await;
    setup.deposit("healthy", &setup.provider.token_url()).await;
    // No warm-up call through the front: the vault would keep that proxied
    // connection in its pool and the fault, which applies to new
    // connections, would never be seen.
    setup.front.set(mode);
    let before = setup.front.accepted();
    // Three callers of the faulty credential share one refresh.
    let faulty: Vec<_> = (0..3)
        .map(|_| {
            let setup = &setup;
            async move { setup.refresh("faulty").await }
        })
        .collect();
    let faulty = futures::future::join_all(faulty);
    let healthy = async {
        // Start once the faulty refresh is at the endpoint.
        let deadline = Instant::now() + Duration::from_secs(5);
        while setup.front.accepted() == before {
            assert!(
                Instant::now() < deadline,
                "{mode:?}: the vault never called the endpoint"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        setup.refresh("healthy").await
    };
    let (faulty, (healthy, healthy_took)) = tokio::join!(faulty, healthy);

    healthy.unwrap_or_else(|s| panic!("{mode:?}: healthy credential failed: {s:?}"));
    assert!(
        healthy_took < HEALTHY_BOUND,
        "{mode:?}: a healthy credential waited {healthy_took:?} behind a faulty one"
    );
    let slowest = faulty
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    println!("{mode:?}: UPSTREAM_UNAVAILABLE after {slowest:?}; healthy refresh meanwhile {healthy_took:?}");
    for (answer, took) in faulty {
        let status = answer.expect_err("a faulty endpoint cannot produce a token");
        assert_eq!(status.code(), Code::Unavailable, "{mode:?}: {status:?}");
        let (reason, domain, _) = error_info(&status);
        assert_eq!(
            (reason.as_str(), domain.as_str()),
            ("UPSTREAM_UNAVAILABLE", "credvault"),
            "{mode:?}"
        );
        assert!(
            took < UPSTREAM_TIMEOUT + SLACK,
            "{mode:?}: answered after {took:?}, the upstream timeout is {UPSTREAM_TIMEOUT:?}"
        );
    }
    let calls = setup.front.accepted() - before;
    assert!(
        (1..=2).contains(&calls),
        "{mode:?}: {calls} upstream connections for one single-flight refresh"
    );

    // No reauth was marked: the same grant refreshes once the endpoint heals.
    let meta = setup.state("faulty").await;
    assert_eq!(
        (meta.state, meta.reauth_cause.as_str()),
        (pb::CredentialState::Active as i32, ""),
        "{mode:?}"
    );
    setup.front.set(Mode::Proxy);
    // Past the cool-down.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (after, _) = setup.refresh("faulty").await;
    after.unwrap_or_else(|s| panic!("{mode:?}: grant did not survive the fault: {s:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_provider_times_out_without_blocking_others() {
    survives(Mode::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_after_request_is_unavailable() {
    survives(Mode::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_on_accept_is_unavailable() {
    survives(Mode::ResetOnAccept).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_without_response_is_unavailable() {
    survives(Mode::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_http_garbage_is_unavailable() {
    survives(Mode::GarbageBytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_body_on_200_is_unavailable() {
    survives(Mode::GarbageBody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_announced_body_is_refused() {
    survives(Mode::HugeBody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_chunked_body_is_cut_off() {
    survives(Mode::HugeChunked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_dripping_slowly_time_out() {
    survives(Mode::DripHeaders).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_dripping_slowly_times_out() {
    survives(Mode::DripBody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_unavailable() {
    let setup = Setup::start().await;
    let closed = support::dev::free_addr();
    setup
        .deposit("refused", &format!("http://{closed}/token"))
        .await;
    let (answer, took) = setup.refresh("refused").await;
    let status = answer.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).0, "UPSTREAM_UNAVAILABLE");
    assert!(took < UPSTREAM_TIMEOUT + SLACK, "{took:?}");
    let meta = setup.state("refused").await;
    assert_eq!(meta.state, pb::CredentialState::Active as i32);
}
