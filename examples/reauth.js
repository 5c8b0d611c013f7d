// Branching on credvault's typed errors from Node (@grpc/grpc-js, @grpc/proto-loader, protobufjs).
const protobuf = require("protobufjs");
// The google.rpc.Status trailer (grpc-status-details-bin), wire-compatible subset.
const rpc = protobuf.parse(`syntax = "proto3"; package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }`,
  { keepCase: true }).root;

class ReauthRequired extends Error {} // the user must go through consent again

function errorInfo(err) {
  const [bin] = err.metadata?.get("grpc-status-details-bin") ?? [];
  const status = bin && rpc.lookupType("google.rpc.Status").decode(bin);
  const any = status?.details.find((d) => d.type_url.endsWith("/google.rpc.ErrorInfo"));
  return any && rpc.lookupType("google.rpc.ErrorInfo").decode(any.value);
}

// `vault` is a credvault.v1.CredentialVault client loaded with @grpc/proto-loader from proto/.
async function accessToken(vault, credential) {
  try {
    const res = await new Promise((ok, fail) =>
      vault.GetAccessToken({ credential }, { deadline: Date.now() + 10000 }, (e, r) => (e ? fail(e) : ok(r))));
    return res.accessToken; // proto-loader default options: camelCase fields
  } catch (err) {
    const info = errorInfo(err);
    if (info?.domain === "credvault" && info.reason === "REAUTH_REQUIRED") // metadata: cause, provider
      throw new ReauthRequired(`${info.metadata.provider}: ${info.metadata.cause}`);
    throw err; // UPSTREAM_UNAVAILABLE etc.: retry with backoff where it makes sense
  }
}
module.exports = { accessToken, ReauthRequired };
