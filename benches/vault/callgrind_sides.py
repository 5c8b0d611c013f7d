#!/usr/bin/env python3
"""Instructions per call for each side of scenario 1, from callgrind profiles.

Under valgrind every thread runs on one core in turn, so an instruction count
is free of the machine's noise and of contention: it says what a call costs
the whole process (client, TLS, HTTP/2, server, handler), nothing else.

    python3 benches/vault/callgrind_sides.py profile /tmp/cg   # ~10 minutes
    python3 benches/vault/callgrind_sides.py report /tmp/cg

`profile DIR --audit PATH` profiles with the vault's audit lines written to
PATH (the bench's `--audit`), as a served vault writes them.

`profile` builds the bench and runs it under callgrind five times:
`--quick --hits-side SIDE` for each side alone, and `none` (start-up only: the
vault up, its 64 credentials deposited, and the contract echo started with
the vault's answer), whose cost `report` takes off
each function before dividing by the side's calls (its server handler's
calls, warm-up included).

What a call does not pay for is kept out of the counts:

- TLS handshakes. Every side opens the same 34 connections, and a handshake
  costs about 5.6 M instructions (both ends): some 10 000 a call, 7 %, at
  the 17 000-19 500 calls a side makes, and unevenly, since sides make
  different numbers of calls. Callgrind stops counting on entry to
  the handshake's outermost steps (`HANDSHAKE_STEPS`, none of which runs
  inside another) and starts again on their exit.
- A profiled side measures ten times as long as in the report, so what is
  left of a connection's set-up (accepting it, the peer identity) is spread
  over many calls.
- sled's `Lazy` spin-wait, which busy-waits for a thread valgrind has not
  scheduled yet (`report` drops it).
"""

import collections
import json
import os
import re
import subprocess
import sys

# The outermost steps of a TLS 1.3 handshake (rustls 0.23), both ends; none
# runs inside another, which `--toggle-collect` needs (it toggles on every
# entry and exit).
HANDSHAKE_STEPS = [
    "<rustls::server::hs::ExpectClientHello as *>::handle",
    "<rustls::server::tls13::ExpectCertificate as *>::handle",
    "<rustls::server::tls13::ExpectCertificateVerify as *>::handle",
    "<rustls::server::tls13::ExpectFinished as *>::handle",
    "rustls::client::client_conn::connection::ClientConnection::new_with_alpn",
    "<rustls::client::hs::ExpectServerHelloOrHelloRetryRequest as *>::handle",
    "<rustls::client::tls13::ExpectCertificateVerify as *>::handle",
    "<rustls::client::tls13::ExpectFinished as *>::handle",
]
SIDES = ["none", "echo", "health", "contract", "vault"]
SPIN = "sled::lazy::Lazy"
# A side's calls: its server handler, entered once per call.
CALLS = {
    "echo": re.compile(r"HealthService as .*Health>::check$"),
    "health": re.compile(r"HealthService as .*Health>::check$"),
    "vault": re.compile(r"VaultService as .*CredentialVault>::get_access_token$"),
    "contract": re.compile(r"ContractEcho as .*CredentialVault>::get_access_token(::\{\{closure\}\})?$"),
}


def read(path):
    """Self cost and call count per function of one callgrind profile."""
    names, own, calls = {}, collections.Counter(), collections.Counter()
    function, callee, after_calls = None, None, False

    def named(ref):
        found = re.match(r"\((\d+)\)(?: (.*))?", ref)
        if not found:
            return ref
        if found.group(2):
            names[found.group(1)] = found.group(2)
        return names.get(found.group(1), ref)

    with open(path, errors="replace") as profile:
        for line in profile:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                function = named(line[3:])
            elif line.startswith("cfn="):
                callee = named(line[4:])
            elif line.startswith("calls="):
                calls[callee] += int(line[6:].split()[0])
                after_calls = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                fields = line.split()
                if len(fields) >= 2:
                    # The cost line after `calls=` is the callee's, not ours.
                    if after_calls:
                        after_calls = False
                    else:
                        own[function] += int(fields[1])
    return own, calls


def generic_free(name):
    """A function's name without generic arguments, so that monomorphs add up;
    a qualified path's `<Type as Trait>` stays (without its arguments)."""
    out, skipping = [], []
    for char in name:
        if char == "<":
            # Right after an identifier it opens arguments; else a path.
            arguments = bool(out) and (out[-1].isalnum() or out[-1] == "_")
            skipping.append(arguments or any(skipping))
            if not skipping[-1]:
                out.append(char)
        elif char == ">" and skipping:
            if not skipping.pop():
                out.append(char)
        elif not any(skipping):
            out.append(char)
    return "".join(out)


# Where a difference between two sides sits, by function name (first match).
CATEGORIES = [
    ("the vault's own code (credvault::)",
     re.compile(r"^<?credvault::(?!api::pb::)")),
    ("generated client and server code (credvault::api::pb)",
     re.compile(r"credvault::api::pb::")),
    ("protobuf encoding and decoding (prost, bytes, UTF-8 checks)",
     re.compile(r"prost|bytes::|put_slice|from_utf8|varint|::merge|replace_with")),
    ("allocation (malloc, free)",
     re.compile(r"malloc|free|realloc|unlink_chunk|raw_vec|finish_grow|do_reserve")),
    ("copies (memcpy, memmove)", re.compile(r"memcpy|memmove")),
    ("HTTP/2, headers and TLS (h2, hyper, http, rustls, ring)",
     re.compile(r"h2::|hyper|http::|rustls|ring_core|ring::|hpack|huffman")),
]


def by_category(more, less):
    """The per-call difference `more - less`, summed by category."""
    sums = collections.Counter()
    for name in set(more) | set(less):
        gap = more[name] - less[name]
        label = next(
            (label for label, test in CATEGORIES if test.search(name)), "the rest"
        )
        sums[label] += gap
    return sums


def bench_binary():
    """Builds the bench (release) and returns its executable."""
    built = subprocess.run(
        ["cargo", "bench", "--bench", "vault", "--no-run", "--message-format=json"],
        check=True,
        capture_output=True,
        text=True,
    )
    for line in built.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable"):
            if message["target"]["name"] == "vault":
                return message["executable"]
    sys.exit("cargo built no `vault` bench executable")


def profile(folder, extra):
    """One callgrind profile per side, handshakes not counted; `extra`
    are more bench arguments (`--audit PATH`)."""
    os.makedirs(folder, exist_ok=True)
    binary = bench_binary()
    toggles = [f"--toggle-collect={step}" for step in HANDSHAKE_STEPS]
    for side in SIDES:
        print(f"profiling {side} ...", flush=True)
        with open(f"{folder}/side-{side}.log", "w") as log:
            subprocess.run(
                # Each toggle turns counting off at the start; after them,
                # --collect-atstart turns it back on.
                ["valgrind", "--tool=callgrind", *toggles, "--collect-atstart=yes",
                 f"--callgrind-out-file={folder}/side-{side}.out",
                 binary, "--bench", "--quick", "--hits-side", side, *extra],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Start-up under valgrind takes minutes.
                env={**os.environ, "CREDVAULT_TEST_READY_SECS": "900"},
            )


def report(folder):
    start_up, _ = read(f"{folder}/side-none.out")
    per_call = {}
    for side, handler in CALLS.items():
        own, calls = read(f"{folder}/side-{side}.out")
        count = sum(n for name, n in calls.items() if name and handler.search(name))
        costs = collections.Counter()
        for name, cost in own.items():
            if name is None or SPIN in name:
                continue
            costs[name] += (cost - start_up.get(name, 0)) / count
        per_call[side] = costs
        print(f"{side:>7}: {count} calls, {sum(costs.values()):,.0f} instructions per call")
    # The vault's Health/Check splits the vault's gap to the echo into the
    # server's part and the call's; the contract echo splits it into the
    # contract's messages and the vault's own work.
    pairs = (("health", "echo"), ("vault", "health"), ("contract", "echo"), ("vault", "contract"))
    for more, less in pairs:
        print(f"\n{more} - {less}, per call, largest differences:")
        merged = {side: collections.Counter() for side in (more, less)}
        for side, costs in merged.items():
            for name, cost in per_call[side].items():
                costs[generic_free(name)] += cost
        names = set(merged[more]) | set(merged[less])
        gaps = sorted(
            ((merged[more][n] - merged[less][n], n) for n in names), reverse=True
        )
        for gap, name in gaps[:25]:
            print(f"{gap:>8,.0f}  {name[:120]}")
        print(f"{more} - {less}, per call, by category:")
        for label, gap in by_category(per_call[more], per_call[less]).most_common():
            print(f"{gap:>8,.0f}  {label}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "report":
        report(args[1])
    elif args[:1] == ["profile"] and (len(args) == 2 or (len(args) == 4 and args[2] == "--audit")):
        profile(args[1], args[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} profile DIR [--audit PATH] | report DIR")
