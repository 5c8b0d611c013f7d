"""Branching on credvault's typed errors from Python (grpcio + grpcio-status).

Generate the client first:
    python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. proto/credvault/v1/vault.proto
"""
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from credvault.v1 import vault_pb2


class ReauthRequired(Exception):
    """The user must go through consent again; retrying cannot help."""


def access_token(stub, tenant, subject, provider):
    ref = vault_pb2.CredentialRef(tenant=tenant, subject=subject, provider=provider)
    try:
        return stub.GetAccessToken(vault_pb2.GetAccessTokenRequest(credential=ref), timeout=10).access_token
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        for detail in status.details if status else []:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == "credvault":
                if info.reason == "REAUTH_REQUIRED":  # metadata: cause, provider
                    raise ReauthRequired(f"{info.metadata['provider']}: {info.metadata['cause']}") from error
                # UPSTREAM_UNAVAILABLE: retry with backoff (google.rpc.RetryInfo when known)
        raise
