#!/usr/bin/env python3
"""Instructions per call for each side of scenario 1, from callgrind profiles.

Under valgrind every thread runs on one core in turn, so an instruction count
is free of the machine's noise and of contention: it says what a call costs
the whole process (client, TLS, HTTP/2, server, handler), nothing else.

Profile each side alone, and once with no side at all (start-up only):

    B=target/release/deps/vault-<hash>     # cargo bench --bench vault --no-run
    for side in none echo health vault; do
      CREDVAULT_TEST_READY_SECS=900 valgrind --tool=callgrind \\
        --callgrind-out-file=/tmp/cg/side-$side.out \\
        $B --bench --quick --only hits --hits-side $side
    done
    python3 benches/vault/callgrind_sides.py /tmp/cg

(`--hits-side none` stops after start-up, with the vault up and its 64
credentials deposited. A profiled side measures ten times as long as in the
report, so its calls outnumber the connections it opens, 33 of them, whose
set-up is otherwise counted into each call: about 16 M instructions a run,
some 1 000-1 400 a call at the 12 000-17 000 calls a side makes.) Each side's calls are counted from the profile itself
(its server handler's calls, warm-up included), and what the start-up run
spent is taken off each function first.

Two things are left out of the totals because they are not a call's cost:
the TLS handshakes' cryptography (every side opens the same 33 connections,
which at the few thousand calls a valgrind run makes would otherwise be half
of the figure) and sled's `Lazy` spin-wait, which busy-waits for a thread
valgrind has not scheduled yet.
"""

import collections
import re
import sys

# Handshake cryptography and certificate handling (see above).
HANDSHAKE = re.compile(
    r"nistz256|x25519|sha512|sha256|fe_|ge_|table_select|ecdsa|bn_|limbs|scalar|"
    r"mont|p256|p384|ed25519|handshake|key_schedule|hkdf|base64|pki_types|"
    r"webpki|der::|untrusted|x509|sign|verify|_nohw|blake2|argon2",
    re.IGNORECASE,
)
SPIN = "sled::lazy::Lazy"
# A side's calls: its server handler, entered once per call.
CALLS = {
    "echo": re.compile(r"HealthService as .*Health>::check$"),
    "health": re.compile(r"HealthService as .*Health>::check$"),
    "vault": re.compile(r"VaultService as .*CredentialVault>::get_access_token$"),
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
    """A function's name without generic arguments: monomorphs add up."""
    out, depth = [], 0
    for char in name:
        if char == "<":
            depth += 1
        elif char == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(char)
    return "".join(out)


# Where a difference between two sides sits, by function name (first match).
CATEGORIES = [
    ("the vault's own code (credvault::)", re.compile(r"^credvault::(?!api::pb::)|^<credvault::(?!api::pb::)")),
    ("generated client and server code (credvault::api::pb)", re.compile(r"credvault::api::pb::")),
    ("protobuf encoding and decoding (prost, bytes, UTF-8 checks)", re.compile(r"prost|bytes::|put_slice|from_utf8|varint|::merge|replace_with|advance")),
    ("allocation (malloc, free)", re.compile(r"malloc|free|realloc|unlink_chunk|raw_vec|finish_grow|do_reserve")),
    ("copies (memcpy, memmove)", re.compile(r"memcpy|memmove")),
    ("HTTP/2 and TLS (h2, hyper, rustls, ring)", re.compile(r"h2::|hyper|rustls|ring_core|ring::|hpack|huffman")),
]


def by_category(more, less):
    """The per-call difference `more - less`, summed by category."""
    sums = collections.Counter()
    for name in set(more) | set(less):
        gap = more[name] - less[name]
        label = next((label for label, test in CATEGORIES if test.search(name)), "the rest")
        sums[label] += gap
    return sums


def main(folder):
    start_up, _ = read(f"{folder}/side-none.out")
    per_call = {}
    for side, handler in CALLS.items():
        own, calls = read(f"{folder}/side-{side}.out")
        count = sum(n for name, n in calls.items() if name and handler.search(name))
        costs = collections.Counter()
        for name, cost in own.items():
            if name is None or SPIN in name or HANDSHAKE.search(name):
                continue
            costs[name] += (cost - start_up.get(name, 0)) / count
        per_call[side] = costs
        print(f"{side:>7}: {count} calls, {sum(costs.values()):,.0f} instructions per call")
    for more, less in (("health", "echo"), ("vault", "health")):
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
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cg")
