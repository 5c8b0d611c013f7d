#!/usr/bin/env bash
# grpcurl for ops: everything through server reflection, no proto files.
#
#   tests/interop/grpcurl_ops.sh DIR HOST:PORT
#
# DIR is a `credvault dev --dir` directory (its certificates are used), HOST:PORT
# the vault's gRPC listener (the server certificate names `localhost`). Lists and
# describes the services, calls each RPC with JSON input, and renders a typed
# error with its google.rpc details as JSON. Checks every answer and exits
# non-zero on the first surprise. Every value sent is a dummy.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 DEV_DIR HOST:PORT" >&2
    exit 2
fi
D=$1
TARGET=$2
ADMIN=(-cacert "$D/ca.pem" -cert "$D/admin.pem" -key "$D/admin-key.pem")
ACME=(-cacert "$D/ca.pem" -cert "$D/acme.pem" -key "$D/acme-key.pem")
# Unique per run: the script can run again against a vault that keeps its data.
SUBJECT="ops-$(date +%s)-$$"
REF='{"credential": {"tenant": "acme", "subject": "'"$SUBJECT"'", "provider": "demo"}}'

step() { printf '\n--- %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
# expect TEXT NEEDLE...: every needle occurs in TEXT.
expect() {
    local text=$1
    shift
    for needle in "$@"; do
        grep -qF -- "$needle" <<<"$text" || fail "expected \`$needle\` in: $text"
    done
}

step "list services (reflection)"
out=$(grpcurl "${ADMIN[@]}" "$TARGET" list)
echo "$out"
expect "$out" credvault.v1.CredentialVault grpc.health.v1.Health grpc.reflection.v1.ServerReflection

step "list methods"
out=$(grpcurl "${ADMIN[@]}" "$TARGET" list credvault.v1.CredentialVault)
echo "$out"
expect "$out" credvault.v1.CredentialVault.Deposit credvault.v1.CredentialVault.GetAccessToken \
    credvault.v1.CredentialVault.Revoke

step "describe the service and a message"
out=$(grpcurl "${ADMIN[@]}" "$TARGET" describe credvault.v1.CredentialVault)
echo "$out"
expect "$out" "rpc Deposit" "rpc GetAccessToken" "rpc Revoke"
out=$(grpcurl "${ADMIN[@]}" "$TARGET" describe credvault.v1.DepositRequest)
echo "$out"
expect "$out" "oneof grant" ".credvault.v1.RefreshTokenGrant refresh_token = 3"

step "describe an error detail type (registered in reflection)"
out=$(grpcurl "${ADMIN[@]}" "$TARGET" describe google.rpc.ErrorInfo)
echo "$out"
expect "$out" "string reason = 1" "string domain = 2"

step "health"
out=$(grpcurl "${ADMIN[@]}" -d '{"service": ""}' "$TARGET" grpc.health.v1.Health/Check)
echo "$out"
expect "$out" '"status": "SERVING"'

step "Deposit (JSON input)"
out=$(grpcurl "${ACME[@]}" -d @ "$TARGET" credvault.v1.CredentialVault/Deposit <<EOF
{
  "credential": {"tenant": "acme", "subject": "$SUBJECT", "provider": "demo"},
  "client": {"token_endpoint": "http://127.0.0.1:9/token",
             "client_id": "demo", "client_secret": "demo-client-secret"},
  "refresh_token": {"refresh_token": "demo-refresh-token",
                    "access_token": "demo-access-token",
                    "access_token_expires_at": "2099-01-01T00:00:00Z"},
  "labels": {"source": "grpcurl-ops"}
}
EOF
)
echo "$out"
expect "$out" '"generation": "1"' '"keyVersion": 1'

step "GetAccessToken (JSON input)"
out=$(grpcurl "${ACME[@]}" -d "$REF" "$TARGET" credvault.v1.CredentialVault/GetAccessToken)
expect "$out" '"accessToken": "demo-access-token"' '"expiresAt": "2099-01-01T00:00:00Z"'
echo "(access token received; not printed)"

step "an error, rendered as JSON with its details"
set +e
out=$(grpcurl "${ACME[@]}" -format-error -format json \
    -d '{"credential": {"tenant": "acme", "subject": "'"$SUBJECT"'", "provider": "demo"}, "min_valid_for": "999999999s"}' \
    "$TARGET" credvault.v1.CredentialVault/GetAccessToken 2>&1)
rc=$?
set -e
echo "$out"
# grpcurl exits with 64 + the status code: INVALID_ARGUMENT is 3.
[ "$rc" -eq 67 ] || fail "expected exit 67 (INVALID_ARGUMENT), got $rc"
expect "$out" '"code": 3' \
    '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' '"domain":"credvault"' '"reason":"INVALID_FIELD"' \
    '"@type":"type.googleapis.com/google.rpc.BadRequest"' '"field":"min_valid_for"'

step "an error from another tenant"
set +e
out=$(grpcurl "${ACME[@]}" -format-error -format json \
    -d '{"credential": {"tenant": "globex", "subject": "'"$SUBJECT"'", "provider": "demo"}}' \
    "$TARGET" credvault.v1.CredentialVault/GetAccessToken 2>&1)
rc=$?
set -e
echo "$out"
[ "$rc" -eq 71 ] || fail "expected exit 71 (PERMISSION_DENIED), got $rc"
expect "$out" '"code": 7' '"reason":"TENANT_NOT_PERMITTED"' '"metadata":{"tenant":"globex"}'

step "Revoke (JSON input)"
out=$(grpcurl "${ACME[@]}" -d "$REF" "$TARGET" credvault.v1.CredentialVault/Revoke)
echo "$out"
expect "$out" '"existed": true' '"upstream": "UPSTREAM_REVOCATION_NOT_CONFIGURED"'

step "after Revoke: CREDENTIAL_NOT_FOUND"
set +e
out=$(grpcurl "${ACME[@]}" -format-error -format json -d "$REF" "$TARGET" \
    credvault.v1.CredentialVault/GetAccessToken 2>&1)
rc=$?
set -e
echo "$out"
[ "$rc" -eq 69 ] || fail "expected exit 69 (NOT_FOUND), got $rc"
expect "$out" '"code": 5' '"reason":"CREDENTIAL_NOT_FOUND"'

echo
echo "grpcurl ops: all checks passed"
