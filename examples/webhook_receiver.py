"""A credvault webhook receiver that verifies Standard Webhooks signatures.

Standard library only. Run it (port 0 takes any free port; the first line
says which), point a sink at it, and it prints each event:

    WEBHOOK_SECRET="$(cat webhook.secret)" python3 examples/webhook_receiver.py 8080

    [[events.webhooks]]
    name = "local"
    url = "http://127.0.0.1:8080/hooks"    # loopback http needs upstream.allow_http_loopback
    secret_file = "webhook.secret"         # e.g. whsec_ + base64 of 24 random bytes

Deliveries are at least once: deduplicate on `webhook-id`.
"""
import base64
import hashlib
import hmac
import json
import os
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_SECONDS = 5 * 60


def signing_key(secret: str) -> bytes:
    secret = secret.strip()
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_"):])
    return secret.encode()


def verify(key: bytes, msg_id: str, timestamp: str, body: bytes, signature_header: str) -> bool:
    """True when one of the header's `v1,` signatures matches and the timestamp is fresh."""
    try:
        if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
            return False  # a replayed delivery
    except ValueError:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(candidate[len("v1,"):], expected)
        for candidate in signature_header.split(" ")
        if candidate.startswith("v1,")
    )


class Server(ThreadingHTTPServer):
    def server_bind(self):
        # HTTPServer's own server_bind also looks up a host name for the bind
        # address: a reverse DNS query, which stalls where no resolver answers.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class Receiver(BaseHTTPRequestHandler):
    key = b""
    seen = set()
    seen_lock = threading.Lock()  # one thread per delivery

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        msg_id = self.headers.get("webhook-id", "")
        ok = verify(
            self.key,
            msg_id,
            self.headers.get("webhook-timestamp", ""),
            body,
            self.headers.get("webhook-signature", ""),
        )
        if not ok:
            self.send_response(401)
            self.end_headers()
            return
        with self.seen_lock:  # at least once: a retry may repeat an event
            first_time = msg_id not in self.seen
            self.seen.add(msg_id)
        if first_time:
            event = json.loads(body)["data"]
            ref = event["credential"]
            print(f"{event['type']} {ref['tenant']}/{ref['subject']}@{ref['provider']} "
                  f"generation={event['generation']} cause={event['cause']!r}", flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    Receiver.key = signing_key(os.environ["WEBHOOK_SECRET"])
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = Server(("127.0.0.1", port), Receiver)
    print(f"listening on http://127.0.0.1:{server.server_port}/hooks", flush=True)
    server.serve_forever()
