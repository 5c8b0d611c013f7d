#!/usr/bin/env python3
"""Tests for the Helm chart in helm/credvault, without a helm binary.

- Lint and render: `helm-python-sdk` (PyPI), ctypes bindings to libhelm_c, a C
  ABI over Helm's own Go SDK (v4), bundled in the wheel. Same engine as
  `helm lint` / `helm template`, values.schema.json validation included.
- Kubernetes schemas: `kubernetes-validate` with strict=True (unknown fields
  are errors), against explicit Kubernetes versions (KUBE_VERSIONS).
- Then what matters for this service: one replica, no secret in the
  environment or in a ConfigMap, probes, the security context, read-only and
  distinct keyring/passphrase mounts, and a credvault.toml whose keys are the
  ones src/config.rs accepts (it denies unknown fields: a wrong key would stop
  the server at start-up).

With CHART_TEST_CREDVAULT_BIN naming a credvault binary (`cargo test --test helm_chart`
sets it), the rendered credvault.toml is also handed to the real `credvault
serve`, its mounted paths mapped onto files made by `credvault dev`, and the
server must become ready and stop cleanly on SIGTERM.

Run: python3 tests/helm/test_chart.py   (unittest; `cargo test --test helm_chart` runs it too)
Needs: python3 -m pip install -r tests/requirements.txt
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import unittest
import urllib.request
from pathlib import Path

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
    from helm_python import _native
except ImportError as missing:  # pragma: no cover - environment problem, not a test failure mode
    sys.exit(
        f"missing Python test dependency ({missing}); run: "
        "python3 -m pip install -r tests/requirements.txt"
    )

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "credvault"
VALUES_DIR = Path(__file__).resolve().parent / "values"
CONFIG_RS = ROOT / "src" / "config.rs"

RELEASE = "vault"
NAMESPACE = "security"
# The chart's minimum (Chart.yaml kubeVersion) and a recent release; both have
# schemas in kubernetes-validate 1.37.0 (which covers 1.25.0 to 1.37.0).
KUBE_VERSIONS = ("1.27.0", "1.34.0")
# Custom resources kubernetes-validate has no schema for; checked by hand below.
CRD_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
PROMETHEUS_API = ["monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor"]

VALID_VALUES = [
    "defaults",  # the chart's own values.yaml only
    "existing-tls.yaml",
    "cert-manager.yaml",
    "pdb-networkpolicy.yaml",
    "no-networkpolicy.yaml",
    "monitoring.yaml",
    "etcd-replicas.yaml",
]


def load_values(name: str) -> dict:
    if name == "defaults":
        return {}
    return helm.values_from_yaml((VALUES_DIR / name).read_text())


def render(values: dict, api_versions: list[str] | None = None) -> dict[str, str]:
    """Render the chart offline; returns template path -> manifest text.

    Chart.render() does not expose capabilities; the native call it wraps
    takes `api_versions` (like `helm template --api-versions`), which is how
    the ServiceMonitor's `.Capabilities.APIVersions.Has` branch is exercised.
    """
    opts = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    if api_versions:
        opts["api_versions"] = api_versions
    with helm.Chart.load(CHART) as chart:
        if not api_versions:
            return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return json.loads(
            _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts))
        )


def manifests(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def notes(rendered: dict[str, str]) -> str:
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def duration_seconds(text: str) -> float:
    """humantime subset used in values: '10s', '1m', '1h 30m', '250ms'."""
    units = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)\s*([a-z]+)", text)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == text.replace(" ", ""), text
    return sum(int(n) * units[u] for n, u in parts)


# --- src/config.rs: the schema credvault.toml must follow -----------------------------


def config_schema() -> dict[str, dict[str, dict]]:
    """Struct name -> {field: {"type": str, "required": bool}} from src/config.rs.

    Every struct there is `#[serde(deny_unknown_fields)]`; a field is required
    when it is neither `Option<…>` nor `#[serde(default…)]` and its struct is
    not `#[serde(default)]` as a whole.
    """
    source = CONFIG_RS.read_text()
    structs: dict[str, dict[str, dict]] = {}
    pattern = re.compile(r"((?:#\[[^\]]*\]\s*)*)pub struct (\w+) \{(.*?)\n\}", re.S)
    for attrs, name, body in pattern.findall(source):
        assert "deny_unknown_fields" in attrs, f"{name} no longer denies unknown fields?"
        struct_default = re.search(r"serde\([^)]*\bdefault\b", attrs) is not None
        fields: dict[str, dict] = {}
        pending: list[str] = []
        for line in body.splitlines():
            line = line.strip()
            if line.startswith("#["):
                pending.append(line)
            elif m := re.match(r"pub (\w+): (.+),$", line):
                field, ty = m.groups()
                has_default = any(re.search(r"serde\((.*\b)?default\b", a) for a in pending)
                optional = struct_default or has_default or ty.startswith("Option<")
                fields[field] = {"type": ty, "required": not optional}
                pending = []
            elif line and not line.startswith("//"):
                pending = []
        structs[name] = fields
    assert "Config" in structs and "TlsConfig" in structs, "src/config.rs changed shape"
    return structs


def check_table(test: unittest.TestCase, table: dict, struct: str, schema: dict, where: str):
    fields = schema[struct]
    unknown = set(table) - set(fields)
    test.assertFalse(unknown, f"{where}: keys unknown to {struct} in src/config.rs: {unknown}")
    missing = {f for f, spec in fields.items() if spec["required"] and f not in table}
    test.assertFalse(missing, f"{where}: required keys of {struct} missing: {missing}")
    for key, value in table.items():
        ty = fields[key]["type"]
        inner = re.fullmatch(r"Option<(.+)>", ty)
        ty = inner.group(1) if inner else ty
        if ty in schema:
            test.assertIsInstance(value, dict, f"{where}.{key}")
            check_table(test, value, ty, schema, f"{where}.{key}")
        elif m := re.fullmatch(r"BTreeMap<String, (\w+)>", ty):
            test.assertIsInstance(value, dict, f"{where}.{key}")
            for entry, sub in value.items():
                check_table(test, sub, m.group(1), schema, f"{where}.{key}.{entry}")
        elif ty in ("bool",):
            test.assertIsInstance(value, bool, f"{where}.{key}")
        elif ty in ("usize", "u64", "u32"):
            test.assertIsInstance(value, int, f"{where}.{key}")
            test.assertNotIsInstance(value, bool, f"{where}.{key}")
        elif ty == "Duration":
            test.assertIsInstance(value, str, f"{where}.{key}")
            duration_seconds(value)
        elif ty == "Vec<String>":
            test.assertTrue(all(isinstance(v, str) for v in value), f"{where}.{key}")
        elif ty == "LogFormat":
            test.assertIn(value, ("text", "json"), f"{where}.{key}")
        elif ty == "StorageBackend":
            test.assertIn(value, ("sled", "etcd"), f"{where}.{key}")
        elif ty == "PresetAuthMethod":
            test.assertIn(value, ("client_secret_basic", "client_secret_post", "none"), f"{where}.{key}")
        else:  # SocketAddr, PathBuf, String, SecretString
            test.assertIsInstance(value, str, f"{where}.{key}")


# --- the tests ---------------------------------------------------------------------------


class ChartTest(unittest.TestCase):
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        cls.schema = config_schema()
        cls.rendered = {name: render(load_values(name)) for name in VALID_VALUES}
        cls.docs = {name: manifests(r) for name, r in cls.rendered.items()}

    # lint, schema, kubernetes validation

    def test_lint_is_clean_with_every_values_file(self):
        for name in VALID_VALUES:
            with self.subTest(values=name):
                report = helm.lint(CHART, load_values(name), strict=True, namespace=NAMESPACE,
                                   kube_version="v" + KUBE_VERSIONS[0])
                self.assertEqual(report["errors"], [], report)
                problems = [m for m in report["messages"] if m["severity"] >= 2]
                self.assertEqual(problems, [], report)

    def test_every_manifest_validates_strictly_against_kubernetes(self):
        for name in VALID_VALUES:
            rendered = [self.docs[name]]
            if name == "monitoring.yaml":
                rendered.append(manifests(render(load_values(name), PROMETHEUS_API)))
            for docs in rendered:
                for doc in docs:
                    kind = (doc["apiVersion"], doc["kind"])
                    for version in KUBE_VERSIONS:
                        with self.subTest(values=name, kind=kind, k8s=version):
                            if kind in CRD_KINDS:
                                with self.assertRaises(kubernetes_validate.SchemaNotFoundError):
                                    kubernetes_validate.validate(doc, version, strict=True)
                                continue
                            kubernetes_validate.validate(doc, version, strict=True)

    def test_replica_count_two_is_rejected_by_the_schema(self):
        bad = load_values("invalid-replicas.yaml")
        with helm.Chart.load(CHART) as chart:
            with self.assertRaisesRegex(helm.HelmValuesError, "replicaCount"):
                chart.validate_schema(bad)
            with self.assertRaises(helm.HelmValuesError):
                chart.render(bad, name=RELEASE, namespace=NAMESPACE)
            chart.validate_schema({"replicaCount": 1})
            self.assertNotIn("replicaCount", chart.schema.get("required", []))
        report = helm.lint(CHART, bad)
        self.assertTrue(any("replicaCount" in e for e in report["errors"]), report)

    def test_the_sled_page_cache_fits_well_inside_the_memory_limit(self):
        docs = self.docs["defaults"]
        cache = credvault_toml(docs)["storage"]["sled"]["cache_capacity_mib"]
        limit = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        self.assertRegex(limit, r"^[0-9]+Mi$")
        # sled's own default (1024 MiB) would be twice the limit; the token
        # cache and the runtime need the rest.
        self.assertLessEqual(cache * 4, int(limit[:-2]))
        self.assertEqual(credvault_toml(self.docs["cert-manager.yaml"])["storage"]["sled"]["cache_capacity_mib"], 96)
        with helm.Chart.load(CHART) as chart:
            for bad in (0, 1048577, "128"):
                with self.subTest(cacheCapacityMiB=bad):
                    with self.assertRaises(helm.HelmValuesError):
                        chart.validate_schema({"storage": {"sled": {"cacheCapacityMiB": bad}}})

    def test_etcd_needs_endpoints(self):
        with helm.Chart.load(CHART) as chart:
            with self.assertRaises(helm.HelmValuesError):
                chart.validate_schema(load_values("invalid-etcd-no-endpoints.yaml"))
            # Several replicas are fine on etcd.
            chart.validate_schema(load_values("etcd-replicas.yaml"))

    def test_a_client_secret_in_values_is_rejected_by_the_schema(self):
        with helm.Chart.load(CHART) as chart:
            with self.assertRaisesRegex(helm.HelmValuesError, "client_secret"):
                chart.validate_schema(load_values("invalid-client-secret.yaml"))

    def test_grace_period_shorter_than_shutdown_grace_fails_to_render(self):
        with self.assertRaisesRegex(helm.HelmError, "terminationGracePeriodSeconds"):
            render(load_values("invalid-grace.yaml"))

    # the workload

    def test_exactly_one_replica_statefulset_with_a_pvc(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                sts = one(docs, "StatefulSet")
                # One on sled; the etcd values ask for three.
                self.assertEqual(sts["spec"]["replicas"], 3 if name == "etcd-replicas.yaml" else 1)
                self.assertEqual([d for d in docs if d["kind"] in ("Deployment", "DaemonSet")], [])
                (claim,) = sts["spec"]["volumeClaimTemplates"]
                self.assertEqual(claim["metadata"]["name"], "data")
                self.assertEqual(claim["spec"]["accessModes"], ["ReadWriteOnce"])
                mounts = {m["name"]: m for m in container(sts)["volumeMounts"]}
                self.assertEqual(mounts["data"]["mountPath"], "/var/lib/credvault")
                self.assertFalse(mounts["data"].get("readOnly", False))
                headless = one(docs, "Service", sts["spec"]["serviceName"])
                self.assertEqual(headless["spec"]["clusterIP"], "None")

    def test_the_container_runs_serve_with_the_mounted_config(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                c = container(one(docs, "StatefulSet"))
                self.assertEqual(c["command"] + c["args"],
                                 ["credvault", "serve", "--config", "/etc/credvault/credvault.toml"])
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                self.assertEqual(ports, {"grpc": 50051, "ops": 9090})

    def test_probes_use_livez_and_readyz_on_the_ops_port(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                c = container(one(docs, "StatefulSet"))
                for probe, path in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz"),
                                    ("startupProbe", "/livez")]:
                    self.assertEqual(c[probe]["httpGet"], {"path": path, "port": "ops"}, probe)

    def test_restricted_security_context(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
                psc = pod["securityContext"]
                self.assertIs(psc["runAsNonRoot"], True)
                self.assertEqual(psc["runAsUser"], 65532)
                self.assertEqual(psc["fsGroup"], 65532)
                self.assertEqual(psc["seccompProfile"], {"type": "RuntimeDefault"})
                sc = container(one(docs, "StatefulSet"))["securityContext"]
                self.assertIs(sc["runAsNonRoot"], True)
                self.assertEqual(sc["runAsUser"], 65532)
                self.assertIs(sc["readOnlyRootFilesystem"], True)
                self.assertIs(sc["allowPrivilegeEscalation"], False)
                self.assertEqual(sc["capabilities"], {"drop": ["ALL"]})
                self.assertEqual(sc["seccompProfile"], {"type": "RuntimeDefault"})
                self.assertIs(pod["automountServiceAccountToken"], False)
                for kind in ("hostNetwork", "hostPID", "hostIPC"):
                    self.assertFalse(pod.get(kind, False))

    def test_resources_and_termination_grace_beyond_shutdown_grace(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
                resources = pod["containers"][0]["resources"]
                self.assertIn("memory", resources["limits"])
                self.assertIn("cpu", resources["requests"])
                config = credvault_toml(docs)
                grace = duration_seconds(config.get("server", {}).get("shutdown_grace", "10s"))
                self.assertGreater(pod["terminationGracePeriodSeconds"], grace)

    # secrets

    def test_no_secret_in_the_environment(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                self.assertNotIn("Secret", {d["kind"] for d in docs}, "the chart never renders a Secret")
                pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
                self.assertIs(pod["enableServiceLinks"], False)
                for c in pod["containers"] + pod.get("initContainers", []):
                    for env in c.get("env", []):
                        self.assertNotIn("secretKeyRef", env.get("valueFrom", {}), env)
                        self.assertIsNone(
                            re.search(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL", env["name"], re.I), env)
                    for source in c.get("envFrom", []):
                        self.assertNotIn("secretRef", source, source)

    def test_no_configmap_holds_a_passphrase_or_secret(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                for cm in (d for d in docs if d["kind"] == "ConfigMap"):
                    for key, text in cm.get("data", {}).items():
                        for line in text.splitlines():
                            if line.lstrip().startswith("#"):
                                continue
                            m = re.search(r"(?i)([\w.-]*passphrase[\w.-]*)\s*[=:]\s*(\S.*)", line)
                            if m:
                                # Only the *path* of the mounted passphrase file may appear.
                                self.assertEqual(m.group(1), "passphrase_file", line)
                                self.assertEqual(m.group(2),
                                                 '"/var/run/secrets/credvault/passphrase/passphrase"')
                            self.assertIsNone(re.search(r"(?i)client_secret\s*=", line), line)
                config = credvault_toml(docs)
                self.assertNotIn("passphrase", config["keyring"])
                for preset in config.get("providers", {}).values():
                    self.assertNotIn("client_secret", preset)

    def test_keyring_and_passphrase_are_read_only_files_in_distinct_mounts(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                sts = one(docs, "StatefulSet")
                pod = sts["spec"]["template"]["spec"]
                mounts = {m["name"]: m for m in container(sts)["volumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                keyring, passphrase = mounts["keyring"], mounts["passphrase"]
                self.assertIs(keyring["readOnly"], True)
                self.assertIs(passphrase["readOnly"], True)
                self.assertNotIn("subPath", keyring)
                self.assertNotIn("subPath", passphrase)
                k, p = keyring["mountPath"].rstrip("/") + "/", passphrase["mountPath"].rstrip("/") + "/"
                self.assertFalse(k.startswith(p) or p.startswith(k), (k, p))
                ks, ps = volumes["keyring"]["secret"], volumes["passphrase"]["secret"]
                self.assertNotEqual(ks["secretName"], ps["secretName"])
                self.assertEqual([i["path"] for i in ks["items"]], ["keyring.cvk"])
                self.assertEqual([i["path"] for i in ps["items"]], ["passphrase"])
                for volume in (ks, ps, volumes["tls"]["secret"]):
                    self.assertEqual(volume["defaultMode"] & 0o007, 0, "not world-readable")
                for m in mounts.values():
                    if m["name"] not in ("data", "tmp"):
                        self.assertIs(m.get("readOnly"), True, m)
        existing = one(self.docs["existing-tls.yaml"], "StatefulSet")["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in existing["volumes"] if "secret" in v}
        self.assertEqual(secrets["keyring"], "vault-keyring")
        self.assertEqual(secrets["passphrase"], "vault-keyring-passphrase")
        self.assertEqual(secrets["tls"], "vault-server-tls")
        self.assertEqual(secrets["provider-google"], "vault-provider-google")
        self.assertNotIn("provider-linear", secrets)

    # the config

    def test_config_parses_as_toml_and_matches_src_config_rs(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                config = credvault_toml(docs)
                check_table(self, config, "Config", self.schema, "credvault.toml")
                self.assertEqual(config["listen"], "0.0.0.0:50051")
                self.assertEqual(config["ops_listen"], "0.0.0.0:9090")
                self.assertEqual(config["data_dir"], "/var/lib/credvault/data")
                policy = one(docs, "ConfigMap", f"{fullname(docs)}-policy")["data"]["policy.toml"]
                tomllib.loads(policy)

    def test_every_path_in_the_config_is_a_mounted_file(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                config = credvault_toml(docs)
                files = mounted_files(docs)
                paths = [config["tls"]["cert"], config["tls"]["key"], config["tls"]["client_ca"],
                         config["keyring"]["path"], config["keyring"]["passphrase_file"],
                         config["auth"]["policy"]]
                paths += [p["client_secret_file"] for p in config.get("providers", {}).values()
                          if "client_secret_file" in p]
                for path in paths:
                    self.assertIn(path, files, f"{path} is not mounted")
                self.assertEqual(files["/etc/credvault/credvault.toml"], "config")
                self.assertTrue(config["data_dir"].startswith("/var/lib/credvault/"))
                tls_dir = {p.rsplit("/", 1)[0] for p in paths[:3]}
                self.assertEqual(len(tls_dir), 1, "tls.crt, tls.key and ca.crt share one directory")

    def test_values_reach_the_config(self):
        config = credvault_toml(self.docs["cert-manager.yaml"])
        self.assertEqual(config["auth"]["trust_domain"], "mesh.example.com")
        self.assertIs(config["auth"]["allow_common_name"], True)
        self.assertEqual(config["tokens"]["refresh_skew"], "90s")
        self.assertEqual(config["tokens"]["refresh_ahead_concurrency"], 8)
        self.assertEqual(config["upstream"]["allowed_hosts"], ["login.example.com", "*.okta.com"])
        self.assertEqual(config["upstream"]["max_response_bytes"], 131072)
        self.assertEqual(config["log"], {"filter": "info,credvault=debug", "format": "text"})
        presets = credvault_toml(self.docs["existing-tls.yaml"])["providers"]
        self.assertEqual(presets["google"]["client_secret_file"],
                         "/var/run/secrets/credvault/providers/google/client_secret")
        self.assertEqual(presets["google"]["scopes"], ["openid", "email"])
        self.assertEqual(presets["linear"]["auth_method"], "none")

    def test_default_policy_grants_nothing(self):
        docs = self.docs["defaults"]
        policy = tomllib.loads(one(docs, "ConfigMap", f"{fullname(docs)}-policy")["data"]["policy.toml"])
        self.assertEqual(policy, {})
        self.assertIn("[[rule]]", one(docs, "ConfigMap", f"{fullname(docs)}-policy")["data"]["policy.toml"],
                      "a commented example")
        rules = tomllib.loads(one(self.docs["existing-tls.yaml"], "ConfigMap",
                                  f"{RELEASE}-credvault-policy")["data"]["policy.toml"])["rule"]
        self.assertEqual(len(rules), 2)

    # TLS

    def test_tls_from_an_existing_secret_mounted_as_a_directory(self):
        docs = self.docs["existing-tls.yaml"]
        self.assertEqual([d for d in docs if d["kind"] == "Certificate"], [])
        sts = one(docs, "StatefulSet")
        mount = next(m for m in container(sts)["volumeMounts"] if m["name"] == "tls")
        self.assertNotIn("subPath", mount)
        volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
        self.assertEqual(sorted(i["path"] for i in volume["secret"]["items"]),
                         ["ca.crt", "tls.crt", "tls.key"])

    def test_cert_manager_certificate_with_spiffe_uri(self):
        docs = self.docs["cert-manager.yaml"]
        cert = one(docs, "Certificate")
        spec = cert["spec"]
        self.assertEqual(spec["issuerRef"], {"name": "mesh-ca", "kind": "ClusterIssuer",
                                             "group": "cert-manager.io"})
        self.assertEqual(spec["uris"],
                         [f"spiffe://mesh.example.com/ns/{NAMESPACE}/sa/{RELEASE}-credvault"])
        service = f"{RELEASE}-credvault"
        self.assertIn(f"{service}.{NAMESPACE}.svc", spec["dnsNames"])
        self.assertIn("vault.example.internal", spec["dnsNames"])
        self.assertIn("server auth", spec["usages"])
        tls = next(v for v in one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
                   if v["name"] == "tls")
        self.assertEqual(tls["secret"]["secretName"], spec["secretName"])
        with self.assertRaisesRegex(helm.HelmError, "issuerRef.name"):
            render({"tls": {"certManager": {"enabled": True}}})

    # networking, disruption, monitoring

    def test_service_ports(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                svc = one(docs, "Service", fullname(docs))
                ports = {p["name"]: p for p in svc["spec"]["ports"]}
                self.assertEqual(ports["grpc"]["port"], 50051)
                self.assertEqual(ports["grpc"]["appProtocol"], "grpc")
                self.assertEqual(ports["grpc"]["targetPort"], "grpc")
                self.assertEqual(ports["ops"]["port"], 9090)
                self.assertEqual(ports["ops"]["targetPort"], "ops")

    def test_network_policy(self):
        default = one(self.docs["defaults"], "NetworkPolicy")["spec"]
        self.assertEqual(default["policyTypes"], ["Ingress", "Egress"])
        ingress = {r["ports"][0]["port"]: r for r in default["ingress"]}
        self.assertEqual(ingress["grpc"]["from"], [{"podSelector": {}}])
        self.assertIn("namespaceSelector", ingress["ops"]["from"][0])
        egress_ports = [p["port"] for r in default["egress"] for p in r["ports"]]
        self.assertEqual(sorted(egress_ports), [53, 53, 443])

        custom = one(self.docs["pdb-networkpolicy.yaml"], "NetworkPolicy")["spec"]
        ingress = {r["ports"][0]["port"]: r for r in custom["ingress"]}
        self.assertEqual(ingress["grpc"]["from"][0]["namespaceSelector"]["matchLabels"],
                         {"credvault.io/client": "true"})
        self.assertEqual(ingress["ops"]["from"][0]["podSelector"]["matchLabels"],
                         {"app.kubernetes.io/name": "prometheus"})
        egress_ports = sorted(p["port"] for r in custom["egress"] for p in r["ports"])
        self.assertEqual(egress_ports, [53, 53, 443, 3128, 8443])

        self.assertEqual([d for d in self.docs["no-networkpolicy.yaml"] if d["kind"] == "NetworkPolicy"], [])

    def test_replicas_on_etcd_spread_out_behind_a_budget(self):
        docs = self.docs["etcd-replicas.yaml"]
        config = credvault_toml(docs)
        self.assertEqual(config["storage"]["backend"], "etcd")
        etcd = config["storage"]["etcd"]
        self.assertEqual(len(etcd["endpoints"]), 3)
        files = mounted_files(docs)
        for key in ("ca", "cert", "key"):
            self.assertIn(etcd[key], files, f"{etcd[key]} is not mounted")
        sts = one(docs, "StatefulSet")
        anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        self.assertEqual(term["topologyKey"], "kubernetes.io/hostname")
        self.assertEqual(term["labelSelector"]["matchLabels"], sts["spec"]["selector"]["matchLabels"])
        pdb = one(docs, "PodDisruptionBudget")["spec"]
        self.assertEqual(pdb["maxUnavailable"], 1)
        self.assertNotIn("sled", config["storage"])
        # The single-replica defaults stay on sled.
        self.assertNotIn("backend", credvault_toml(self.docs["defaults"])["storage"])
        self.assertNotIn("affinity", one(self.docs["defaults"], "StatefulSet")["spec"]["template"]["spec"])

    def test_pod_disruption_budget_off_by_default(self):
        self.assertEqual([d for d in self.docs["defaults"] if d["kind"] == "PodDisruptionBudget"], [])
        pdb = one(self.docs["pdb-networkpolicy.yaml"], "PodDisruptionBudget")["spec"]
        self.assertEqual(pdb["minAvailable"], 1)
        self.assertNotIn("maxUnavailable", pdb)
        pdb = one(self.docs["no-networkpolicy.yaml"], "PodDisruptionBudget")["spec"]
        self.assertEqual(pdb["maxUnavailable"], 0)
        self.assertNotIn("minAvailable", pdb)
        sts = one(self.docs["no-networkpolicy.yaml"], "StatefulSet")
        self.assertEqual(pdb["selector"]["matchLabels"], sts["spec"]["selector"]["matchLabels"])

    def test_service_monitor_only_when_enabled_and_the_crd_is_served(self):
        # Enabled, but the cluster has no monitoring.coreos.com/v1: nothing.
        self.assertEqual([d for d in self.docs["monitoring.yaml"] if d["kind"] == "ServiceMonitor"], [])
        # Served but not enabled: nothing.
        docs = manifests(render({}, PROMETHEUS_API))
        self.assertEqual([d for d in docs if d["kind"] == "ServiceMonitor"], [])
        # Both: scrapes /metrics on the ops port of the chart's Service.
        docs = manifests(render(load_values("monitoring.yaml"), PROMETHEUS_API))
        monitor = one(docs, "ServiceMonitor")
        (endpoint,) = monitor["spec"]["endpoints"]
        self.assertEqual((endpoint["port"], endpoint["path"], endpoint["interval"]),
                         ("ops", "/metrics", "15s"))
        self.assertEqual(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack")
        svc = one(docs, "Service", fullname(docs))
        for k, v in monitor["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(svc["metadata"]["labels"][k], v)

    def test_notes_have_grpcurl_commands_for_the_service(self):
        for name, rendered in self.rendered.items():
            with self.subTest(values=name):
                text = notes(rendered)
                host = f"{fullname(self.docs[name])}.{NAMESPACE}.svc:50051"
                self.assertIn(f"grpcurl -cacert ca.crt -cert client.crt -key client.key {host} list",
                              text)
                self.assertIn("credvault.v1.CredentialVault/GetAccessToken", text)
                self.assertIn("port-forward svc/" + fullname(self.docs[name]), text)

    def test_helpers_and_labels(self):
        for name, docs in self.docs.items():
            with self.subTest(values=name):
                for d in docs:
                    labels = d["metadata"]["labels"]
                    self.assertEqual(labels["app.kubernetes.io/managed-by"], "Helm")
                    self.assertEqual(labels["app.kubernetes.io/instance"], RELEASE)
                    self.assertEqual(d["metadata"].get("namespace"), NAMESPACE)
        self.assertEqual(fullname(self.docs["no-networkpolicy.yaml"]), "vault")
        sts = one(self.docs["no-networkpolicy.yaml"], "StatefulSet")
        self.assertEqual(container(sts)["image"], "registry.example.com/platform/credvault:0.1.0")
        self.assertEqual(sts["spec"]["template"]["spec"]["serviceAccountName"], "credvault-sa")
        with helm.Chart.load(CHART) as chart:
            self.assertEqual(chart.metadata["apiVersion"], "v2")
            self.assertEqual(chart.metadata["appVersion"], "0.1.0")


class RealServerTest(unittest.TestCase):
    """The rendered credvault.toml is accepted by the real server."""

    BIN = os.environ.get("CHART_TEST_CREDVAULT_BIN", "")

    @classmethod
    def setUpClass(cls):
        if not cls.BIN:
            raise unittest.SkipTest("set CHART_TEST_CREDVAULT_BIN to a credvault binary (cargo test does)")
        cls.tmp = tempfile.TemporaryDirectory(prefix="credvault-helm-")
        cls.dev = Path(cls.tmp.name) / "dev"
        # `credvault dev` writes a CA, server certificate, keyring and passphrase;
        # stop it once they exist.
        grpc, ops = free_port(), free_port()
        # Not CREDVAULT_*: the server reads every such variable as a setting.
        cls.env = {k: v for k, v in os.environ.items() if not k.startswith("CREDVAULT_")}
        log = Path(cls.tmp.name) / "dev.log"
        with log.open("w") as out:
            dev = subprocess.Popen(
                [cls.BIN, "dev", "--dir", str(cls.dev), "--listen", f"127.0.0.1:{grpc}",
                 "--ops-listen", f"127.0.0.1:{ops}"],
                env=cls.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(ops, dev, "credvault dev", log)
        finally:
            dev.send_signal(signal.SIGTERM)
            dev.wait(timeout=30)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def serve_rendered(self, values_name: str):
        docs = manifests(render(load_values(values_name)))
        work = Path(self.tmp.name) / values_name.removesuffix(".yaml")
        work.mkdir()
        config_text = one(docs, "ConfigMap", f"{fullname(docs)}-config")["data"]["credvault.toml"]
        policy = one(docs, "ConfigMap", f"{fullname(docs)}-policy")["data"]["policy.toml"]
        (work / "policy.toml").write_text(policy)
        # Where each file the pod would see comes from here.
        mapping = {
            "/var/run/secrets/credvault/tls/tls.crt": self.dev / "server.pem",
            "/var/run/secrets/credvault/tls/tls.key": self.dev / "server-key.pem",
            "/var/run/secrets/credvault/tls/ca.crt": self.dev / "ca.pem",
            "/var/run/secrets/credvault/keyring/keyring.cvk": self.dev / "keyring.cvk",
            "/var/run/secrets/credvault/passphrase/passphrase": self.dev / "keyring.passphrase",
            "/etc/credvault/policy.toml": work / "policy.toml",
            "/var/lib/credvault/data": work / "data",
        }
        for preset, spec in tomllib.loads(config_text).get("providers", {}).items():
            if "client_secret_file" in spec:
                secret = work / f"{preset}-client-secret"
                secret.write_text("s3cret\n")
                mapping[spec["client_secret_file"]] = secret
        for pod_path, local in mapping.items():
            config_text = config_text.replace(json.dumps(pod_path), json.dumps(str(local)))
        leftover = re.findall(r'"(/(?:etc|var)/[^"]*)"', config_text)
        self.assertEqual(leftover, [], "a path in credvault.toml that this test does not map")
        config = work / "credvault.toml"
        config.write_text(config_text)

        grpc, ops = free_port(), free_port()
        env = dict(self.env)
        # The chart listens on 0.0.0.0; here only loopback, via the env overrides.
        env.update(CREDVAULT_LISTEN=f"127.0.0.1:{grpc}", CREDVAULT_OPS_LISTEN=f"127.0.0.1:{ops}")
        log = work / "serve.log"
        with log.open("w") as out:
            server = subprocess.Popen([self.BIN, "serve", "--config", str(config)], env=env,
                                      stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(ops, server, f"credvault serve with {values_name}", log)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
                raise
        self.assertEqual(server.returncode, 0, log.read_text()[-2000:])

    def test_defaults_config_serves(self):
        self.serve_rendered("defaults")

    def test_existing_tls_config_with_provider_presets_serves(self):
        self.serve_rendered("existing-tls.yaml")

    def test_cert_manager_config_with_every_section_serves(self):
        self.serve_rendered("cert-manager.yaml")


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process:
    the kernel may give a just-released port to the next bind (as
    tests/support/dev.rs's free_port explains)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_ready(ops_port: int, process: subprocess.Popen, what: str, log: Path, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not ready on /readyz within {timeout}s: {log.read_text()[-2000:]}")


# --- small accessors ---------------------------------------------------------------------


def container(sts: dict) -> dict:
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    return c


def fullname(docs: list[dict]) -> str:
    return one(docs, "StatefulSet")["metadata"]["name"]


def credvault_toml(docs: list[dict]) -> dict:
    cm = one(docs, "ConfigMap", f"{fullname(docs)}-config")
    return tomllib.loads(cm["data"]["credvault.toml"])


def mounted_files(docs: list[dict]) -> dict[str, str]:
    """Every file path the container sees from a ConfigMap or Secret -> volume name."""
    sts = one(docs, "StatefulSet")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    files = {}
    for mount in container(sts)["volumeMounts"]:
        volume = volumes.get(mount["name"], {})
        sources = [volume["secret"]] if "secret" in volume else []
        sources += [s.get("configMap") or s.get("secret") for s in volume.get("projected", {}).get("sources", [])]
        for source in sources:
            for item in source.get("items", []):
                files[f"{mount['mountPath']}/{item['path']}"] = mount["name"]
    return files


if __name__ == "__main__":
    unittest.main(verbosity=2)
