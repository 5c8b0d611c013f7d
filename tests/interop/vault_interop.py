#!/usr/bin/env python3
"""credvault's contract, proven from Python: a client that knows nothing of Rust.

The gRPC client is generated at test time with grpcio-tools from the proto files
(into a temporary directory; nothing generated is committed). It speaks mTLS with
the certificates `credvault dev --dir DIR` writes, runs Deposit ->
GetAccessToken -> Revoke, and reads every error reason a client can provoke
through grpcio-status: the google.rpc.ErrorInfo (reason, domain "credvault",
metadata), google.rpc.BadRequest and google.rpc.RetryInfo details.

Upstream refreshes are real: the test runs a tiny OAuth token endpoint with
http.server on 127.0.0.1 (dev mode allows plain http on loopback) that rotates
refresh tokens, answers invalid_grant, invalid_client or 503 depending on the
path, and records what the vault sent it.

    python3 tests/interop/vault_interop.py --dir .credvault-dev \
        --target localhost:50051 --proto-dir proto

Needs grpcio, grpcio-tools, grpcio-status (tests/requirements.txt) and a running
`credvault dev` on TARGET using DIR. Every value sent is a dummy made up here.
"""

import argparse
import base64
import hashlib
import http.server
import importlib.resources
import json
import pathlib
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import uuid

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "credvault"
RPC_TIMEOUT = 20  # seconds; upstream calls to the loopback double are fast
ARGS = None  # parsed command line, set in main()
pb = None  # generated credvault.v1.vault_pb2, set in setUpModule()
pb_grpc = None  # generated credvault.v1.vault_pb2_grpc


# --------------------------------------------------------------------------
# Code generation: the proto is the only thing this client knows.
# --------------------------------------------------------------------------


def generate_client(proto_dir: pathlib.Path, out_dir: pathlib.Path):
    """Runs protoc (from grpcio-tools) over every .proto under proto_dir."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(p.relative_to(proto_dir).as_posix() for p in proto_dir.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_dir}")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *protos,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed ({rc}) on {protos}")
    sys.path.insert(0, str(out_dir))
    from credvault.v1 import vault_pb2, vault_pb2_grpc  # noqa: E402  (generated)

    return vault_pb2, vault_pb2_grpc


def channel_for(cert: str) -> grpc.Channel:
    """An mTLS channel to the vault as the dev certificate `cert` (admin, acme)."""
    d = pathlib.Path(ARGS.dir)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(d / "ca.pem").read_bytes(),
        private_key=(d / f"{cert}-key.pem").read_bytes(),
        certificate_chain=(d / f"{cert}.pem").read_bytes(),
    )
    channel = grpc.secure_channel(
        ARGS.target,
        credentials,
        options=[
            ("grpc.ssl_target_name_override", ARGS.server_name),
            # The vault is local: never route it through an http_proxy from the environment.
            ("grpc.enable_http_proxy", 0),
        ],
    )
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
    return channel


# --------------------------------------------------------------------------
# A tiny OAuth provider on 127.0.0.1.
#
#   /ok/NAME/token         refresh_token grant with rotation and reuse detection
#   /ok/NAME/revoke        RFC 7009 revocation: 200
#   /invalid-grant/NAME/token   400 {"error": "invalid_grant"}
#   /reject/NAME/token     401 {"error": "invalid_client"}
#   /down/NAME/token       503 with Retry-After: 7
# --------------------------------------------------------------------------


class Provider:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []  # (path, form, authorization header)
        self.current = {}  # NAME -> the refresh token the provider accepts next
        self.issued = {}  # NAME -> how many token pairs were issued
        self.codes = {}  # NAME -> (authorization code, PKCE S256 challenge)
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                with provider.lock:
                    provider.requests.append((self.path, form, self.headers.get("Authorization")))
                    status, body, headers = provider.answer(self.path, form)
                payload = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def expect_code(self, name: str, code: str, challenge: str):
        """The code /ok/NAME/token exchanges next, for this PKCE challenge."""
        with self.lock:
            self.codes[name] = (code, challenge)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def grant(self, name: str, refresh_token: str):
        """The refresh token /ok/NAME/token accepts next (what a consent produced)."""
        with self.lock:
            self.current[name] = refresh_token
            self.issued[name] = 0

    def calls(self, path: str):
        with self.lock:
            return [(form, auth) for (p, form, auth) in self.requests if p == path]

    def answer(self, path: str, form: dict):
        parts = path.strip("/").split("/")
        if len(parts) != 3:
            return 404, {"error": "not_found"}, {}
        kind, name, endpoint = parts
        if kind == "invalid-grant" and endpoint == "token":
            return 400, {"error": "invalid_grant", "error_description": "grant revoked"}, {}
        if kind == "reject" and endpoint == "token":
            return 401, {"error": "invalid_client"}, {}
        if kind == "down" and endpoint == "token":
            return 503, {"error": "temporarily_unavailable"}, {"Retry-After": "7"}
        if kind == "ok" and endpoint == "revoke":
            return 200, None, {}
        if kind == "ok" and endpoint == "token" and form.get("grant_type") == "authorization_code":
            code, challenge = self.codes.pop(name, (None, None))
            verifier = form.get("code_verifier", "")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if code is None or form.get("code") != code or digest != challenge:
                return 400, {"error": "invalid_grant"}, {}
            self.current[name] = f"{name}-refresh-0"
            self.issued[name] = 0
            return 200, {"access_token": f"{name}-access-0", "token_type": "Bearer",
                         "expires_in": 3600, "refresh_token": f"{name}-refresh-0"}, {}
        if kind == "ok" and endpoint == "token":
            if form.get("grant_type") != "refresh_token":
                return 400, {"error": "unsupported_grant_type"}, {}
            if name not in self.current or form.get("refresh_token") != self.current[name]:
                return 400, {"error": "invalid_grant"}, {}  # reuse of a rotated token
            self.issued[name] += 1
            n = self.issued[name]
            self.current[name] = f"{name}-refresh-{n}"
            return (
                200,
                {
                    "access_token": f"{name}-access-{n}",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                    "refresh_token": f"{name}-refresh-{n}",
                },
                {},
            )
        return 404, {"error": "not_found"}, {}


PROVIDER = None


def setUpModule():
    global pb, pb_grpc, PROVIDER, _generated
    _generated = tempfile.TemporaryDirectory(prefix="credvault-py-")
    pb, pb_grpc = generate_client(pathlib.Path(ARGS.proto_dir).resolve(), pathlib.Path(_generated.name))
    PROVIDER = Provider()


def tearDownModule():
    PROVIDER.stop()
    _generated.cleanup()


# --------------------------------------------------------------------------
# Reading rich errors the way any grpcio client does.
# --------------------------------------------------------------------------


class Failure:
    """A failed call, decoded through grpcio-status."""

    def __init__(self, error: grpc.RpcError):
        self.code = error.code()
        self.message = error.details()
        status = rpc_status.from_call(error)
        if status is None:
            raise AssertionError(f"{self.code}: no google.rpc.Status in the trailers ({self.message})")
        if status.code != self.code.value[0] or status.message != self.message:
            raise AssertionError("google.rpc.Status disagrees with the gRPC status")
        self.error_info = []
        self.bad_request = []
        self.retry_info = []
        for detail in status.details:
            for kind, into in (
                (error_details_pb2.ErrorInfo, self.error_info),
                (error_details_pb2.BadRequest, self.bad_request),
                (error_details_pb2.RetryInfo, self.retry_info),
            ):
                if detail.Is(kind.DESCRIPTOR):
                    message = kind()
                    detail.Unpack(message)
                    into.append(message)
        if len(self.error_info) != 1:
            raise AssertionError(f"expected one ErrorInfo, got {len(self.error_info)}: {status}")
        self.info = self.error_info[0]
        self.reason = self.info.reason
        self.metadata = dict(self.info.metadata)

    def violations(self):
        return {v.field: v.description for br in self.bad_request for v in br.field_violations}


# Subjects are unique per run, so the script can run again against a vault that
# keeps its data (`credvault dev` reuses its directory).
RUN = uuid.uuid4().hex[:8]


def ref(subject, provider="demo", tenant="acme"):
    return pb.CredentialRef(tenant=tenant, subject=f"{subject}-{RUN}", provider=provider)


def timestamp(unix_seconds):
    return timestamp_pb2.Timestamp(seconds=int(unix_seconds))


class ContractTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.channels = {name: channel_for(name) for name in ("admin", "acme")}
        cls.acme = pb_grpc.CredentialVaultStub(cls.channels["acme"])
        cls.admin = pb_grpc.CredentialVaultStub(cls.channels["admin"])

    @classmethod
    def tearDownClass(cls):
        for channel in cls.channels.values():
            channel.close()

    def fails(self, rpc, request, code, reason) -> Failure:
        """Calls rpc, expects `code` with ErrorInfo `reason` in domain credvault."""
        with self.assertRaises(grpc.RpcError) as raised:
            rpc(request, timeout=RPC_TIMEOUT)
        failure = Failure(raised.exception)
        self.assertEqual(failure.code, code, failure.message)
        self.assertEqual(failure.reason, reason, failure.message)
        self.assertEqual(failure.info.domain, DOMAIN)
        return failure

    def deposit_refresh_grant(self, subject, provider, endpoint, refresh_token, **client):
        return self.acme.Deposit(
            pb.DepositRequest(
                credential=ref(subject, provider),
                client=pb.OAuthClient(
                    token_endpoint=endpoint,
                    client_id="interop-client",
                    client_secret="interop-client-secret",
                    **client,
                ),
                # No access token: the first GetAccessToken refreshes upstream.
                refresh_token=pb.RefreshTokenGrant(refresh_token=refresh_token),
            ),
            timeout=RPC_TIMEOUT,
        )

    # ---- the happy path -------------------------------------------------

    def test_deposit_get_revoke(self):
        expires = time.time() + 7200
        reference = ref("py-alice")
        deposit = pb.DepositRequest(
            credential=reference,
            client=pb.OAuthClient(
                token_endpoint="http://127.0.0.1:9/token",  # never called: the token is fresh
                client_id="demo",
                client_secret="demo-client-secret",
                auth_method=pb.CLIENT_AUTH_METHOD_CLIENT_SECRET_POST,
                scopes=["read"],
            ),
            refresh_token=pb.RefreshTokenGrant(
                refresh_token="demo-refresh-token",
                access_token="demo-access-token",
                access_token_expires_at=timestamp(expires),
            ),
            labels={"source": "python-interop"},
        )
        first = self.acme.Deposit(deposit, timeout=RPC_TIMEOUT)
        self.assertEqual(first.generation, 1)
        self.assertGreaterEqual(first.key_version, 1)
        second = self.acme.Deposit(deposit, timeout=RPC_TIMEOUT)
        self.assertEqual(second.generation, 2, "generation bumps on every Deposit")

        token = self.acme.GetAccessToken(pb.GetAccessTokenRequest(credential=reference), timeout=RPC_TIMEOUT)
        self.assertEqual(token.access_token, "demo-access-token")
        self.assertEqual(token.expires_at.seconds, int(expires))
        # acme's claims name exactly one tenant, so the tenant may be left empty.
        same = self.acme.GetAccessToken(
            pb.GetAccessTokenRequest(credential=ref("py-alice", tenant="")), timeout=RPC_TIMEOUT
        )
        self.assertEqual(same.access_token, "demo-access-token")
        # The admin certificate may read every tenant.
        admin = self.admin.GetAccessToken(pb.GetAccessTokenRequest(credential=reference), timeout=RPC_TIMEOUT)
        self.assertEqual(admin.access_token, "demo-access-token")

        revoked = self.acme.Revoke(pb.RevokeRequest(credential=reference), timeout=RPC_TIMEOUT)
        self.assertTrue(revoked.existed)
        self.assertEqual(revoked.upstream, pb.UPSTREAM_REVOCATION_NOT_CONFIGURED)
        self.fails(
            self.acme.GetAccessToken,
            pb.GetAccessTokenRequest(credential=reference),
            grpc.StatusCode.NOT_FOUND,
            "CREDENTIAL_NOT_FOUND",
        )
        again = self.acme.Revoke(pb.RevokeRequest(credential=reference), timeout=RPC_TIMEOUT)
        self.assertFalse(again.existed)

    def test_refresh_rotation_and_upstream_revocation(self):
        name = "rotate"
        PROVIDER.grant(name, "rotate-refresh-0")
        token_path, revoke_path = f"/ok/{name}/token", f"/ok/{name}/revoke"
        reference = ref("py-bob", "rotating")
        self.acme.Deposit(
            pb.DepositRequest(
                credential=reference,
                client=pb.OAuthClient(
                    token_endpoint=PROVIDER.url(token_path),
                    client_id="interop-client",
                    client_secret="interop-client-secret",
                    revocation_endpoint=PROVIDER.url(revoke_path),
                ),
                refresh_token=pb.RefreshTokenGrant(
                    refresh_token="rotate-refresh-0",
                    access_token="rotate-deposited-access",
                    access_token_expires_at=timestamp(time.time() + 7200),
                ),
            ),
            timeout=RPC_TIMEOUT,
        )

        # The deposited access token is served until it expires: no upstream call.
        token = self.acme.GetAccessToken(pb.GetAccessTokenRequest(credential=reference), timeout=RPC_TIMEOUT)
        self.assertEqual(token.access_token, "rotate-deposited-access")
        self.assertEqual(PROVIDER.calls(token_path), [])

        # force_refresh (the caller got a 401 upstream with that token) refreshes.
        before = time.time()
        token = self.acme.GetAccessToken(
            pb.GetAccessTokenRequest(credential=reference, force_refresh=True), timeout=RPC_TIMEOUT
        )
        self.assertEqual(token.access_token, "rotate-access-1")
        self.assertEqual(token.token_type, "Bearer")
        self.assertLessEqual(abs(token.expires_at.seconds - (before + 3600)), 60)
        calls = PROVIDER.calls(token_path)
        self.assertEqual(len(calls), 1)
        form, authorization = calls[0]
        self.assertEqual(form.get("grant_type"), "refresh_token")
        self.assertEqual(form.get("refresh_token"), "rotate-refresh-0")
        expected = base64.b64encode(b"interop-client:interop-client-secret").decode()
        self.assertEqual(authorization, f"Basic {expected}", "client_secret_basic by default")

        # Valid for an hour, so it comes from the cache: no second upstream call.
        cached = self.acme.GetAccessToken(pb.GetAccessTokenRequest(credential=reference), timeout=RPC_TIMEOUT)
        self.assertEqual(cached.access_token, "rotate-access-1")
        self.assertEqual(len(PROVIDER.calls(token_path)), 1)

        # min_valid_for beyond the token's remaining life refreshes again, with
        # the ROTATED refresh token: the vault persisted it (the double rejects
        # a reused one with invalid_grant).
        longer = self.acme.GetAccessToken(
            pb.GetAccessTokenRequest(credential=reference, min_valid_for=duration_pb2.Duration(seconds=7200)),
            timeout=RPC_TIMEOUT,
        )
        self.assertEqual(longer.access_token, "rotate-access-2")
        calls = PROVIDER.calls(token_path)
        self.assertEqual(len(calls), 2)
        self.assertEqual(calls[1][0].get("refresh_token"), "rotate-refresh-1")

        revoked = self.acme.Revoke(pb.RevokeRequest(credential=reference), timeout=RPC_TIMEOUT)
        self.assertTrue(revoked.existed)
        self.assertEqual(revoked.upstream, pb.UPSTREAM_REVOCATION_REVOKED)
        revocations = PROVIDER.calls(revoke_path)
        self.assertEqual(len(revocations), 1)
        self.assertEqual(revocations[0][0].get("token"), "rotate-refresh-2", "revokes the latest refresh token")
        self.assertEqual(revocations[0][0].get("token_type_hint"), "refresh_token")

    # ---- every reason a client can provoke ------------------------------

    def test_credential_not_found(self):
        failure = self.fails(
            self.acme.GetAccessToken,
            pb.GetAccessTokenRequest(credential=ref("py-nobody")),
            grpc.StatusCode.NOT_FOUND,
            "CREDENTIAL_NOT_FOUND",
        )
        self.assertNotIn(f"py-nobody-{RUN}", failure.message, "subjects are personal data")

    def test_invalid_field_lists_every_violation(self):
        failure = self.fails(
            self.acme.Deposit,
            pb.DepositRequest(credential=pb.CredentialRef(tenant="acme")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        )
        violations = failure.violations()
        for field in ("credential.subject", "credential.provider", "grant"):
            self.assertIn(field, violations, violations)
            self.assertTrue(violations[field], f"{field} has a description")

        failure = self.fails(
            self.acme.GetAccessToken,
            pb.GetAccessTokenRequest(credential=ref("py-alice"), min_valid_for=duration_pb2.Duration(seconds=10**7)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        )
        self.assertIn("min_valid_for", failure.violations())

        # admin may act for several tenants, so it must name one.
        failure = self.fails(
            self.admin.GetAccessToken,
            pb.GetAccessTokenRequest(credential=ref("py-alice", tenant="")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        )
        self.assertIn("credential.tenant", failure.violations())

    def test_tenant_not_permitted(self):
        for rpc, request in (
            (self.acme.GetAccessToken, pb.GetAccessTokenRequest(credential=ref("py-alice", tenant="globex"))),
            (self.acme.Revoke, pb.RevokeRequest(credential=ref("py-alice", tenant="globex"))),
        ):
            failure = self.fails(rpc, request, grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_PERMITTED")
            self.assertEqual(failure.metadata.get("tenant"), "globex")

    def test_endpoint_not_allowed(self):
        # Link-local metadata address: refused by the endpoint policy before any
        # connection is attempted.
        failure = self.fails(
            self.acme.Deposit,
            pb.DepositRequest(
                credential=ref("py-carol", "metadata"),
                client=pb.OAuthClient(
                    token_endpoint="https://169.254.169.254/token",
                    client_id="demo",
                    client_secret="demo-client-secret",
                ),
                refresh_token=pb.RefreshTokenGrant(refresh_token="demo-refresh-token"),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ENDPOINT_NOT_ALLOWED",
        )
        self.assertNotIn("demo-client-secret", failure.message)
        # Nothing was stored.
        self.fails(
            self.acme.GetAccessToken,
            pb.GetAccessTokenRequest(credential=ref("py-carol", "metadata")),
            grpc.StatusCode.NOT_FOUND,
            "CREDENTIAL_NOT_FOUND",
        )

    def test_reauth_required_is_persisted_until_a_new_deposit(self):
        path = "/invalid-grant/dead/token"
        first = self.deposit_refresh_grant("py-dave", "dead", PROVIDER.url(path), "dead-refresh-token")
        reference = ref("py-dave", "dead")
        request = pb.GetAccessTokenRequest(credential=reference)
        failure = self.fails(
            self.acme.GetAccessToken, request, grpc.StatusCode.FAILED_PRECONDITION, "REAUTH_REQUIRED"
        )
        self.assertEqual(failure.metadata.get("cause"), "invalid_grant")
        self.assertEqual(failure.metadata.get("provider"), "dead")
        self.assertNotIn("dead-refresh-token", failure.message)
        upstream_calls = len(PROVIDER.calls(path))
        self.assertGreaterEqual(upstream_calls, 1)

        # The dead grant fails fast with the same status, without calling the provider.
        again = self.fails(self.acme.GetAccessToken, request, grpc.StatusCode.FAILED_PRECONDITION, "REAUTH_REQUIRED")
        self.assertEqual(again.metadata.get("cause"), "invalid_grant")
        forced = self.fails(
            self.acme.GetAccessToken,
            pb.GetAccessTokenRequest(credential=reference, force_refresh=True),
            grpc.StatusCode.FAILED_PRECONDITION,
            "REAUTH_REQUIRED",
        )
        self.assertEqual(forced.metadata.get("cause"), "invalid_grant")
        self.assertEqual(len(PROVIDER.calls(path)), upstream_calls, "no upstream call for a dead grant")

        # The user re-consented: a new Deposit replaces the dead grant.
        PROVIDER.grant("revived", "revived-refresh-0")
        replaced = self.deposit_refresh_grant(
            "py-dave", "dead", PROVIDER.url("/ok/revived/token"), "revived-refresh-0"
        )
        self.assertEqual(replaced.generation, first.generation + 1)
        token = self.acme.GetAccessToken(request, timeout=RPC_TIMEOUT)
        self.assertEqual(token.access_token, "revived-access-1")

    def test_upstream_unavailable_carries_retry_info(self):
        path = "/down/flaky/token"
        self.deposit_refresh_grant("py-erin", "flaky", PROVIDER.url(path), "flaky-refresh-token")
        request = pb.GetAccessTokenRequest(credential=ref("py-erin", "flaky"))
        failure = self.fails(
            self.acme.GetAccessToken, request, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"
        )
        self.assertEqual(len(failure.retry_info), 1, "RetryInfo from Retry-After")
        self.assertEqual(failure.retry_info[0].retry_delay.seconds, 7)
        self.assertGreaterEqual(len(PROVIDER.calls(path)), 1)
        # An outage is not a reauth: the grant stays alive, the next call is
        # still "try again later", never "send the user through consent".
        self.fails(self.acme.GetAccessToken, request, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")

    def test_provider_rejected_client(self):
        path = "/reject/badclient/token"
        self.deposit_refresh_grant("py-frank", "badclient", PROVIDER.url(path), "badclient-refresh-token")
        failure = self.fails(
            self.acme.GetAccessToken,
            pb.GetAccessTokenRequest(credential=ref("py-frank", "badclient")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "PROVIDER_REJECTED_CLIENT",
        )
        self.assertEqual(failure.metadata.get("oauth_error"), "invalid_client")
        self.assertNotIn("interop-client-secret", failure.message)


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="the `credvault dev --dir` directory (certificates)")
    parser.add_argument("--target", required=True, help="host:port of the vault's gRPC listener")
    parser.add_argument("--proto-dir", required=True, help="the directory holding credvault/v1/*.proto")
    parser.add_argument("--server-name", default="localhost", help="name to verify in the server certificate")
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0], *rest], verbosity=2)


class ConsentExampleTest(unittest.TestCase):
    """examples/redirect_handler.py finishing authorizations the vault began."""

    @classmethod
    def setUpClass(cls):
        cls.channel = channel_for("acme")
        cls.acme = pb_grpc.CredentialVaultStub(cls.channel)
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples"))
        import redirect_handler  # noqa: E402 (needs the generated modules first)

        cls.handler = redirect_handler

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()

    def begin(self, subject):
        begun = self.acme.BeginAuthorization(
            pb.BeginAuthorizationRequest(
                credential=ref(subject, "consent"),
                client=pb.OAuthClient(
                    token_endpoint=PROVIDER.url("/ok/consent/token"),
                    authorization_endpoint=PROVIDER.url("/ok/consent/authorize"),
                    client_id="interop-client",
                    client_secret="interop-client-secret",
                ),
                redirect_uri="https://app.example/callback",
            ),
            timeout=RPC_TIMEOUT,
        )
        query = urllib.parse.parse_qs(urllib.parse.urlparse(begun.authorization_url).query)
        self.assertEqual(query["code_challenge_method"], ["S256"])
        return begun, query["code_challenge"][0]

    def test_the_redirect_handler_completes_once_and_reports_a_decline(self):
        begun, challenge = self.begin("carol")
        PROVIDER.expect_code("consent", "code-carol", challenge)
        redirect = {"state": [begun.state], "code": ["code-carol"]}
        status, page = self.handler.complete(self.acme, redirect)
        self.assertEqual((status, page), (200, "Connected consent (generation 1)."))
        token = self.acme.GetAccessToken(
            pb.GetAccessTokenRequest(credential=ref("carol", "consent")), timeout=RPC_TIMEOUT)
        self.assertEqual(token.access_token, "consent-access-0")
        # The same redirect again (a reload, a replay): refused.
        self.assertEqual(self.handler.complete(self.acme, redirect)[0], 400)
        declined, _ = self.begin("dave")
        status, page = self.handler.complete(self.acme, {"state": [declined.state], "error": ["access_denied"]})
        self.assertEqual((status, page), (200, "You declined; nothing was connected."))


if __name__ == "__main__":
    main()
