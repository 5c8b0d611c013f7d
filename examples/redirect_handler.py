"""A web back end's OAuth redirect handler that lets credvault finish the consent.

The back end called BeginAuthorization and sent the user's browser to the
authorization URL; the provider redirects the browser here with
`?code=...&state=...&iss=...` (or `?error=...&state=...`). The handler hands
those to CompleteAuthorization; it never sees a verifier or a token.

Generate the client first:
    python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. proto/credvault/v1/vault.proto
Run (dev certificates from `credvault dev`):
    python3 examples/redirect_handler.py 127.0.0.1:50051 .credvault-dev 8000
"""
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from credvault.v1 import vault_pb2, vault_pb2_grpc


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == "credvault":
            return info.reason
    return ""


def complete(stub, query: dict) -> tuple[int, str]:
    """Finishes the authorization; answers an HTTP status and a page for the user."""
    first = lambda name: query.get(name, [""])[0]
    try:
        done = stub.CompleteAuthorization(
            vault_pb2.CompleteAuthorizationRequest(
                state=first("state"), code=first("code"), error=first("error"), iss=first("iss")),
            timeout=15,
        )
        return 200, f"Connected {done.credential.provider} (generation {done.generation})."
    except grpc.RpcError as error:
        reason = reason_of(error)
        if reason == "AUTHORIZATION_DENIED":
            return 200, "You declined; nothing was connected."
        if reason == "AUTHORIZATION_NOT_FOUND":  # used, expired, or not ours
            return 400, "This link has expired. Please start again."
        return 502, "Could not finish connecting; please try again."


def main(target: str, dev_dir: str, port: int) -> None:
    read = lambda name: open(f"{dev_dir}/{name}", "rb").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"), private_key=read("acme-key.pem"), certificate_chain=read("acme.pem"))
    stub = vault_pb2_grpc.CredentialVaultStub(grpc.secure_channel(target, credentials))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            if url.path != "/callback":
                self.send_response(404)
                self.end_headers()
                return
            status, page = complete(stub, parse_qs(url.query))
            self.send_response(status)
            self.send_header("content-type", "text/plain; charset=utf-8")
            self.end_headers()
            self.wfile.write(page.encode())

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
