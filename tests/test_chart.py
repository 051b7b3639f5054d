"""The Helm chart in helm/tierproxy: lint, render and schema-check it, all offline.

helm-python-sdk runs Helm's Go SDK in-process (ctypes over a bundled libhelm_c), so no helm
binary, cluster, network or cache directory is involved. Every rendered manifest is checked
against the Kubernetes OpenAPI schemas bundled with kubernetes-validate (strict: unknown
fields fail), for the oldest and the newest Kubernetes each mode supports. Redis URLs the
chart builds are parsed by the sidecar's own parser (proxy.topology), the rendered command
line by its own CLI, and the rendered config.toml by its own settings loader.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from proxy import settings, topology

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tierproxy"
EXAMPLES = ROOT / "helm" / "examples"
RELEASE, NAMESPACE = "demo", "prod"
FULLNAME = "demo-tierproxy"
# The newest schemas kubernetes-validate ships; the oldest release the chart supports (plain
# container mode); the oldest with native sidecars (init containers with restartPolicy).
KUBE_LATEST = kubernetes_validate.latest_version()
KUBE_OLDEST = "1.25.0"
KUBE_OLDEST_NATIVE = "1.29.0"
TLS_DIR = "/etc/tierproxy-tls/redis"

URLS = {
    "redis": {"url": "redis://:r-pass@redis.data:6379/0"},
    "postgres": {"url": "postgresql://tier:p-pass@pg.data:5432/chat"},
    "clickhouse": {"url": "http://tier:c-pass@ch.data:8123/analytics"},
}
REQUIRED: dict[str, Any] = {**URLS, "app": {"image": {"repository": "example/chat-backend"}}}
PLAIN: dict[str, Any] = {"sidecar": {"native": False}}
NO_REDIS_URL: dict[str, Any] = {"redis": {"url": ""}}

# Every tierproxy setting (section.key) with its default: the contract the chart renders to.
KNOWN: dict[str, dict[str, Any]] = {
    f.name: dataclasses.asdict(getattr(settings.Settings(), f.name))
    for f in dataclasses.fields(settings.Settings)
}
# Set by the command line or a Secret, so refused in .Values.config.
RESERVED = {
    "api.host",
    "api.port",
    "api.token",
    "metrics.host",
    "metrics.port",
    "redis.url",
    "postgres.url",
    "clickhouse.url",
}
SECRET_ENV = {
    "TIERPROXY_REDIS_URL": "redis-url",
    "TIERPROXY_POSTGRES_URL": "postgres-url",
    "TIERPROXY_CLICKHOUSE_URL": "clickhouse-url",
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def merged(*overrides: dict[str, Any]) -> dict[str, Any]:
    """REQUIRED deep-merged with each override in turn."""
    out = copy.deepcopy(REQUIRED)
    for override in overrides:
        _deep_merge(out, override)
    return out


def _deep_merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def manifests(out: dict[str, str]) -> list[dict[str, Any]]:
    """Every non-empty manifest of a render (NOTES.txt left out)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    return manifests(chart.render(values, name=RELEASE, namespace=NAMESPACE))


def notes(chart: helm.Chart, values: dict[str, Any]) -> str:
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def render_error(chart: helm.Chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmRenderError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(caught.value)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    doc: dict[str, Any] = found[0]
    return doc


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = pod_spec(docs)
    found: list[dict[str, Any]] = [
        c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == "tierproxy"
    ]
    assert len(found) == 1
    return found[0]


def env_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """env name -> (Secret name, key) of every secretKeyRef env var."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "valueFrom" in e
    }


def secret_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    secret = one(docs, "Secret")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def config_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(one(docs, "ConfigMap")["data"]["config.toml"])


def expand_env(container: dict[str, Any], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The environment the kubelet gives the container: secretKeyRefs resolved from
    `secrets`, and $(VAR) in a value replaced by a variable defined before it ($$ escapes)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            env[e["name"]] = re.sub(
                r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                e["value"])
    return env


def redis_url(docs: list[dict[str, Any]], secrets: dict[tuple[str, str], str]) -> str:
    """The TIERPROXY_REDIS_URL the sidecar gets, with the chart's own Secret known."""
    own = {(FULLNAME, k): v for k, v in secret_data(docs).items()} if any(
        d["kind"] == "Secret" for d in docs) else {}
    env = expand_env(sidecar(docs), {**own, **secrets})
    return env["TIERPROXY_REDIS_URL"]


# --- lint and schema ------------------------------------------------------------------------


def test_lint_passes_strict() -> None:
    for values, version in ((REQUIRED, KUBE_LATEST), (merged(PLAIN), KUBE_OLDEST)):
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}")
        assert report["errors"] == []
        # Severity 2 = warning, 3 = error; 1 (info, e.g. "icon is recommended") is fine.
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_metadata(chart: helm.Chart) -> None:
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.name == "tierproxy"
    assert chart.values["config"]["log"]["format"] == "json"
    assert chart.values["sidecar"]["native"] is True


def test_values_schema_is_valid_and_covers_the_defaults(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    jsonschema.Draft7Validator.check_schema(schema)
    # additionalProperties is false throughout, so every default must be described.
    jsonschema.validate(chart.merge_values(REQUIRED), schema)
    chart.validate_schema(REQUIRED)


@pytest.mark.parametrize(("values", "named"), [
    ({"sidecar": {"workers": 0}}, "/sidecar/workers"),
    ({"sidecar": {"workers": "many"}}, "/sidecar/workers"),
    ({"sidecar": {"native": "yes"}}, "/sidecar/native"),
    ({"redis": {"tls": {"certReqs": "maybe"}}}, "/redis/tls/certReqs"),
    ({"redis": {"port": "6379"}}, "/redis/port"),
    ({"redis": {"sentinel": {"hosts": "a:26379"}}}, "/redis/sentinel/hosts"),
    ({"sidecar": {"nativ": True}}, "nativ"),
    ({"podDisruptionBudget": {"maxUnavailable": "half"}}, "/podDisruptionBudget/maxUnavailable"),
])
def test_schema_rejects_bad_values_naming_them(
        chart: helm.Chart, values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(merged(values))
    assert named in str(caught.value)


# --- the sidecar ----------------------------------------------------------------------------


def test_native_sidecar_by_default(chart: helm.Chart) -> None:
    spec = pod_spec(render(chart, REQUIRED))
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert [c["name"] for c in spec["initContainers"]] == ["tierproxy"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"


def test_plain_container_mode(chart: helm.Chart) -> None:
    spec = pod_spec(render(chart, merged(PLAIN)))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", "tierproxy"]
    assert "restartPolicy" not in spec["containers"][1]


def test_sidecar_command_ports_and_config_mount(chart: helm.Chart) -> None:
    docs = render(chart, REQUIRED)
    c = sidecar(docs)
    assert c["image"] == "tierproxy:0.1.0"
    assert c["command"] == [
        "tierproxy",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "8750",
        "--metrics-port",
        "9750",
        "--workers",
        "1",
        "--config",
        "/etc/tierproxy/config.toml",
    ]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9750, "protocol": "TCP"}]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tierproxy-config")
    assert mount == {"name": "tierproxy-config", "mountPath": "/etc/tierproxy", "readOnly": True}
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "tierproxy-config")
    assert volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]


@pytest.mark.parametrize(("workers", "arg"), [(4, "4"), ("auto", "auto")])
def test_workers_reach_the_command_line(chart: helm.Chart, workers: Any, arg: str) -> None:
    command = sidecar(render(chart, merged({"sidecar": {"workers": workers}})))["command"]
    assert command[command.index("--workers") + 1] == arg


def test_probes_use_the_metrics_port(chart: helm.Chart) -> None:
    # The API listens on 127.0.0.1, which kubelet probes cannot reach.
    c = sidecar(render(chart, REQUIRED))
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_secrets_reach_the_sidecar_as_env_from_the_chart_secret(chart: helm.Chart) -> None:
    docs = render(chart, merged({"api": {"token": "t0ken"}}))
    refs = env_refs(sidecar(docs))
    for env, key in {**SECRET_ENV, "TIERPROXY_API_TOKEN": "api-token"}.items():
        assert refs[env] == (FULLNAME, key)
    assert secret_data(docs) == {
        "redis-url": URLS["redis"]["url"],
        "postgres-url": URLS["postgres"]["url"],
        "clickhouse-url": URLS["clickhouse"]["url"],
        "api-token": "t0ken",
    }
    # The app needs the token too, and learns the sidecar's URL.
    app = next(c for c in pod_spec(docs)["containers"] if c["name"] == "app")
    assert env_refs(app) == {"TIERPROXY_API_TOKEN": (FULLNAME, "api-token")}
    assert {"name": "TIERPROXY_URL", "value": "http://127.0.0.1:8750"} in app["env"]


def test_no_token_means_no_token_env(chart: helm.Chart) -> None:
    docs = render(chart, REQUIRED)
    assert "TIERPROXY_API_TOKEN" not in env_refs(sidecar(docs))
    assert "api-token" not in secret_data(docs)


def test_sidecar_env_and_volumes_from_values(chart: helm.Chart) -> None:
    extra = {"name": "TIERPROXY_FLUSH_MAX_BATCH", "value": "500"}
    mount = {"name": "pg-ca", "mountPath": "/etc/tierproxy-tls/postgres", "readOnly": True}
    volume = {"name": "pg-ca", "secret": {"secretName": "pg-ca"}}
    docs = render(chart, merged({"sidecar": {"env": [extra], "extraVolumeMounts": [mount],
                                             "extraVolumes": [volume]}}))
    assert extra in sidecar(docs)["env"]
    assert mount in sidecar(docs)["volumeMounts"]
    assert volume in pod_spec(docs)["volumes"]


def test_security_resources_and_service_links(chart: helm.Chart) -> None:
    docs = render(chart, REQUIRED)
    spec, c = pod_spec(docs), sidecar(docs)
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's USER
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # Service links would inject e.g. TIERPROXY_METRICS_PORT=tcp://... for a Service named
    # "tierproxy-metrics", which tierproxy would read as its metrics.port setting.
    assert spec["enableServiceLinks"] is False


def test_pod_scrape_and_checksum_annotations(chart: helm.Chart) -> None:
    meta = one(render(chart, REQUIRED), "Deployment")["spec"]["template"]["metadata"]
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert meta["annotations"]["prometheus.io/port"] == "9750"
    assert meta["annotations"]["prometheus.io/path"] == "/metrics"
    off = one(render(chart, merged({"metrics": {"podAnnotations": False}})), "Deployment")
    assert "prometheus.io/scrape" not in off["spec"]["template"]["metadata"]["annotations"]
    # A config or Secret change rolls the pods.
    changed = one(render(chart, merged({"config": {"flush": {"max_batch": 10}}})), "Deployment")
    assert (changed["spec"]["template"]["metadata"]["annotations"]["checksum/tierproxy-config"]
            != meta["annotations"]["checksum/tierproxy-config"])


def test_app_can_be_disabled(chart: helm.Chart) -> None:
    values = merged(PLAIN, {"app": {"enabled": False, "image": {"repository": ""}}})
    assert [c["name"] for c in pod_spec(render(chart, values))["containers"]] == ["tierproxy"]
    native = merged({"app": {"enabled": False}})
    assert "sidecar.native needs app.enabled" in render_error(chart, native)


def test_app_image_is_required_while_enabled(chart: helm.Chart) -> None:
    assert "app.image.repository" in render_error(chart, {**URLS})


def test_rendered_command_is_accepted_by_the_cli(chart: helm.Chart) -> None:
    from proxy.main import parse_args

    command = sidecar(render(chart, merged({"sidecar": {"workers": 3}})))["command"]
    assert command[0] == "tierproxy"
    args = parse_args(command[1:])
    assert (args.command, args.host, args.port, args.metrics_port, args.workers) == (
        "serve", "127.0.0.1", 8750, 9750, "3")
    assert str(args.config) == "/etc/tierproxy/config.toml"


# --- shutdown -------------------------------------------------------------------------------


def test_grace_period_native_covers_app_then_sidecar(chart: helm.Chart) -> None:
    # Native: the sidecar gets SIGTERM after the app exited, so both times add up.
    assert pod_spec(render(chart, REQUIRED))["terminationGracePeriodSeconds"] == 30
    message = render_error(chart, merged({"terminationGracePeriodSeconds": 20}))
    for named in ("terminationGracePeriodSeconds (20)", "app.shutdownSeconds (10)",
                  "config.shutdown.deadline_s (10)", "= 20"):
        assert named in message
    ok = merged({"terminationGracePeriodSeconds": 21})
    assert pod_spec(render(chart, ok))["terminationGracePeriodSeconds"] == 21


def test_grace_period_plain_covers_the_longer_of_the_two(chart: helm.Chart) -> None:
    # Plain: both get SIGTERM at once.
    assert pod_spec(render(chart, merged(PLAIN, {"terminationGracePeriodSeconds": 11})))
    message = render_error(chart, merged(PLAIN, {"config": {"shutdown": {"deadline_s": 45}}}))
    assert "terminationGracePeriodSeconds" in message
    assert "config.shutdown.deadline_s (45)" in message
    ok = merged(PLAIN, {"config": {"shutdown": {"deadline_s": 45}},
                        "terminationGracePeriodSeconds": 60})
    assert pod_spec(render(chart, ok))["terminationGracePeriodSeconds"] == 60


def test_grace_period_sees_a_deadline_set_in_sidecar_env(chart: helm.Chart) -> None:
    env = [{"name": "TIERPROXY_SHUTDOWN_DEADLINE_S", "value": "25"}]
    message = render_error(chart, merged({"sidecar": {"env": env}}))
    assert "config.shutdown.deadline_s (25)" in message


def test_native_needs_kubernetes_1_29(tmp_path: Path) -> None:
    # helm-python-sdk cannot set the cluster version of a render, so a parent chart hands
    # the chart's validation a context whose Capabilities say 1.28 (or 1.29).
    parent = _parent_chart(tmp_path, "check", """\
{{- $tp := .Subcharts.tierproxy }}
{{- range list "v1.28.3" "v1.29.0" }}
{{- $caps := dict "KubeVersion" (dict "Version" .) }}
{{- include "tierproxy.validate" (dict "Values" $tp.Values "Capabilities" $caps) }}
{{- end }}
""")
    with helm.Chart.load(parent) as loaded:
        with pytest.raises(helm.HelmRenderError) as caught:
            loaded.render({"tierproxy": {**copy.deepcopy(REQUIRED)}}, name=RELEASE)
        assert "sidecar.native needs Kubernetes 1.29" in str(caught.value)
        assert "v1.28.3" in str(caught.value)
        assert "set sidecar.native=false" in str(caught.value)
        loaded.render({"tierproxy": merged(PLAIN)}, name=RELEASE)  # plain: any version


# --- Redis topologies -----------------------------------------------------------------------

# (parts, the URL the chart builds, what the sidecar's parser must read from it)
TOPOLOGIES: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    "standalone": (
        {"host": "redis.data", "port": 6380, "db": 2},
        "redis://redis.data:6380/2",
        {"kind": "single", "hosts": (("redis.data", 6380),), "db": 2, "password": None},
    ),
    "standalone-password": (
        {"host": "redis.data", "username": "tier", "password": "p@ss:w/rd %+x"},
        "redis://tier:p%40ss%3Aw%2Frd%20%25%2Bx@redis.data:6379/0",
        {"kind": "single", "username": "tier", "password": "p@ss:w/rd %+x"},
    ),
    "sentinel": (
        {"sentinel": {"hosts": ["s0.data:26379", "s1.data:26379", "s2.data"],
                      "masterName": "mymaster", "password": "s&cret"},
         "db": 1, "password": "r-pass"},
        "redis+sentinel://:r-pass@s0.data:26379,s1.data:26379,s2.data/mymaster/1"
        "?sentinel_password=s%26cret",
        {"kind": "sentinel", "master": "mymaster", "db": 1, "password": "r-pass",
         "sentinel_password": "s&cret",
         "hosts": (("s0.data", 26379), ("s1.data", 26379), ("s2.data", 26379))},
    ),
    "cluster": (
        {"cluster": {"nodes": ["n0.data:7000", "n1.data:7001"]}},
        "redis+cluster://n0.data:7000,n1.data:7001",
        {"kind": "cluster", "hosts": (("n0.data", 7000), ("n1.data", 7001)), "db": 0},
    ),
    "standalone-tls": (
        {"host": "redis.data", "tls": {"enabled": True}},
        "rediss://redis.data:6379/0?ssl_cert_reqs=required&ssl_check_hostname=true",
        {"kind": "single", "tls": topology.Tls("required", None, None, None, True)},
    ),
    "cluster-mtls": (
        {"cluster": {"nodes": ["n0.data:6379"]}, "password": "c",
         "tls": {"enabled": True, "secretName": "redis-tls", "certKey": "tls.crt",
                 "keyKey": "tls.key"}},
        f"rediss+cluster://:c@n0.data:6379?ssl_cert_reqs=required&ssl_check_hostname=true"
        f"&ssl_ca_certs={TLS_DIR}/ca.crt&ssl_certfile={TLS_DIR}/tls.crt"
        f"&ssl_keyfile={TLS_DIR}/tls.key",
        {"kind": "cluster", "password": "c",
         "tls": topology.Tls("required", f"{TLS_DIR}/ca.crt", f"{TLS_DIR}/tls.crt",
                             f"{TLS_DIR}/tls.key", True)},
    ),
    "sentinel-tls-no-verify": (
        {"sentinel": {"hosts": ["s0.data:26379"], "masterName": "m"},
         "tls": {"enabled": True, "secretName": "redis-ca", "certReqs": "none",
                 "checkHostname": False}},
        f"rediss+sentinel://s0.data:26379/m/0?ssl_cert_reqs=none&ssl_check_hostname=false"
        f"&ssl_ca_certs={TLS_DIR}/ca.crt",
        {"kind": "sentinel", "tls": topology.Tls("none", f"{TLS_DIR}/ca.crt", None, None,
                                                 False)},
    ),
}


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_redis_url_built_from_parts(chart: helm.Chart, name: str) -> None:
    parts, url, parsed = TOPOLOGIES[name]
    docs = render(chart, merged(NO_REDIS_URL, {"redis": parts}))
    assert secret_data(docs)["redis-url"] == url  # inline passwords: the URL is a secret
    assert env_refs(sidecar(docs))["TIERPROXY_REDIS_URL"] == (FULLNAME, "redis-url")
    got = topology.parse(redis_url(docs, {}))
    for field, value in parsed.items():
        assert getattr(got, field) == value, field


def test_redis_passwords_from_existing_secrets(chart: helm.Chart) -> None:
    parts = {"sentinel": {"hosts": ["s0.data:26379"], "masterName": "mymaster",
                          "passwordSecret": {"name": "sentinel", "key": "pw"}},
             "passwordSecret": {"name": "redis", "key": "redis-password"}}
    docs = render(chart, merged(NO_REDIS_URL, {"redis": parts}))
    c = sidecar(docs)
    names = [e["name"] for e in c["env"]]
    # $(VAR) sees only variables defined before it.
    assert names.index("REDIS_PASSWORD") < names.index("TIERPROXY_REDIS_URL")
    assert names.index("REDIS_SENTINEL_PASSWORD") < names.index("TIERPROXY_REDIS_URL")
    assert env_refs(c)["REDIS_PASSWORD"] == ("redis", "redis-password")
    assert env_refs(c)["REDIS_SENTINEL_PASSWORD"] == ("sentinel", "pw")
    assert "redis-url" not in secret_data(docs)  # no password in it: a plain value
    url = redis_url(docs, {("redis", "redis-password"): "Rpw1", ("sentinel", "pw"): "Spw2"})
    got = topology.parse(url)
    assert (got.kind, got.master, got.password, got.sentinel_password) == (
        "sentinel", "mymaster", "Rpw1", "Spw2")


def test_redis_tls_secret_is_mounted_where_the_url_points(chart: helm.Chart) -> None:
    parts = TOPOLOGIES["cluster-mtls"][0]
    docs = render(chart, merged(NO_REDIS_URL, {"redis": {**parts, "tls": {
        **parts["tls"], "caKey": "root.pem", "certKey": "client.pem", "keyKey": "client.key"}}}))
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "redis-tls")
    assert volume["secret"] == {
        "secretName": "redis-tls", "defaultMode": 0o440,
        "items": [{"key": "root.pem", "path": "ca.crt"}, {"key": "client.pem", "path": "tls.crt"},
                  {"key": "client.key", "path": "tls.key"}]}
    mount = next(m for m in sidecar(docs)["volumeMounts"] if m["name"] == "redis-tls")
    assert mount == {"name": "redis-tls", "mountPath": TLS_DIR, "readOnly": True}
    tls = topology.parse(redis_url(docs, {})).tls
    assert tls is not None
    for path in (tls.ca_certs, tls.certfile, tls.keyfile):
        assert path is not None
        assert Path(path).parent == Path(mount["mountPath"])
        assert Path(path).name in {i["path"] for i in volume["secret"]["items"]}


def test_redis_tls_mount_with_a_full_url(chart: helm.Chart) -> None:
    url = f"rediss://redis.data:6380/0?ssl_ca_certs={TLS_DIR}/ca.crt"
    docs = render(chart, merged({"redis": {"url": url, "tls": {"enabled": True,
                                                               "secretName": "ca"}}}))
    assert secret_data(docs)["redis-url"] == url  # used as given
    assert any(m["name"] == "redis-tls" for m in sidecar(docs)["volumeMounts"])


@pytest.mark.parametrize("url", [
    "unix:///var/run/redis/redis.sock?db=1",
    "redis+sentinel://:pw@s0:26379,s1:26379/mymaster/0",
    "rediss+cluster://n0:6379,n1:6379",
])
def test_any_topology_as_a_full_url(chart: helm.Chart, url: str) -> None:
    docs = render(chart, merged({"redis": {"url": url}}))
    assert secret_data(docs)["redis-url"] == url
    topology.parse(redis_url(docs, {}))


@pytest.mark.parametrize(("redis", "named"), [
    ({"host": "r"}, "set only one of redis.url, redis.existingSecret"),
    ({"url": "", "host": "r", "cluster": {"nodes": ["n:1"]}},
     "(got redis.cluster.nodes, redis.host)"),
    ({"url": "", "sentinel": {"hosts": ["s:26379"]}}, "redis.sentinel.masterName"),
    ({"url": "", "cluster": {"nodes": ["n:1"]}, "db": 3}, "redis.db must be 0"),
    ({"url": "", "host": "r", "password": "a", "passwordSecret": {"name": "s"}},
     "redis.password or redis.passwordSecret.name"),
    ({"url": "", "host": "r", "sentinel": {"password": "x"}},
     "redis.sentinel.password and redis.sentinel.passwordSecret need redis.sentinel.hosts"),
    ({"url": "", "sentinel": {"hosts": ["s:1"], "masterName": "m", "password": "in"},
      "passwordSecret": {"name": "s"}}, "give the other password from a Secret too"),
    ({"password": "pw"}, "the URL carries its own credentials"),
    ({"url": "redis://r:6379", "tls": {"enabled": True}}, "redis.tls.enabled needs a rediss://"),
    ({"url": "", "host": "r", "tls": {"secretName": "ca"}}, "redis.tls.enabled is false"),
    ({"url": "", "host": "r", "tls": {"enabled": True, "secretName": "c", "certKey": "t"}},
     "redis.tls.certKey and redis.tls.keyKey go together"),
    ({"url": "", "host": "r", "tls": {"enabled": True, "certKey": "t", "keyKey": "k"}},
     "redis.tls.certKey needs redis.tls.secretName"),
    ({"url": "", "host": "r", "tls": {"enabled": True, "certReqs": "none"}},
     "redis.tls.checkHostname false"),
    ({"url": "http://redis:6379"}, "redis.url must start with one of"),
])
def test_bad_redis_values_fail_naming_them(
        chart: helm.Chart, redis: dict[str, Any], named: str) -> None:
    assert named in render_error(chart, merged({"redis": redis}))


# --- service, monitors, budget --------------------------------------------------------------


def test_service_exposes_metrics_by_port_number(chart: helm.Chart) -> None:
    docs = render(chart, REQUIRED)
    service = one(docs, "Service")
    # A number, not "metrics": Services resolve named ports of native sidecars only from
    # Kubernetes 1.32 on.
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9750, "targetPort": 9750, "protocol": "TCP"}
    ]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == {"tierproxy/sidecar": FULLNAME}
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")] == []


def test_service_monitor(chart: helm.Chart) -> None:
    values = merged({"metrics": {"serviceMonitor": {
        "enabled": True, "labels": {"release": "kube-prometheus-stack"}}}})
    docs = render(chart, values)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service_labels = one(docs, "Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    no_service = merged(values, {"metrics": {"service": {"enabled": False}}})
    assert "needs metrics.service.enabled" in render_error(chart, no_service)


def test_pod_monitor(chart: helm.Chart) -> None:
    docs = render(chart, merged({"metrics": {"podMonitor": {"enabled": True, "interval": "15s"},
                                             "service": {"enabled": False}}}))
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == (
        "metrics", "/metrics", "15s")
    assert endpoint["port"] in {p["name"] for p in sidecar(docs)["ports"]}
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_pod_disruption_budget(chart: helm.Chart) -> None:
    docs = render(chart, REQUIRED)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    budget = {"maxUnavailable": "", "minAvailable": "50%",
              "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    pdb = one(render(chart, merged({"podDisruptionBudget": budget})), "PodDisruptionBudget")
    assert pdb["spec"] == {"selector": pdb["spec"]["selector"], "minAvailable": "50%",
                           "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    both = merged({"podDisruptionBudget": {"minAvailable": 1}})
    assert "minAvailable or podDisruptionBudget.maxUnavailable" in render_error(chart, both)
    off = render(chart, merged({"podDisruptionBudget": {"enabled": False}}))
    assert "PodDisruptionBudget" not in kinds(off)


def test_deployment_disabled_keeps_what_a_workload_of_yours_needs(chart: helm.Chart) -> None:
    values = merged({"deployment": {"enabled": False}, "app": {"image": {"repository": ""}}})
    assert kinds(render(chart, values)) == ["ConfigMap", "Secret", "Service"]
    assert "no Deployment of its own" in notes(chart, values)
    # Its rules still hold: validation runs with the ConfigMap.
    assert "redis.url" in render_error(chart, {**values, "redis": {"url": ""}})


# --- the Grafana dashboard ------------------------------------------------------------------


def test_dashboard_configmap(chart: helm.Chart) -> None:
    assert "tierproxy-dashboard" not in str(render(chart, REQUIRED))
    values = merged({"dashboard": {"enabled": True, "namespace": "monitoring",
                                   "annotations": {"grafana_folder": "Storage"}}})
    maps = [d for d in render(chart, values) if d["metadata"]["name"].endswith("-dashboard")]
    assert len(maps) == 1
    dashboard = maps[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Storage"}
    shipped = json.loads((CHART / "dashboards" / "tierproxy.json").read_text())
    assert json.loads(dashboard["data"]["tierproxy.json"]) == shipped


# --- the sidecar in a workload of yours -----------------------------------------------------


def _parent_chart(tmp_path: Path, name: str, template: str | None = None) -> Path:
    """A parent chart with this chart under charts/ (what `helm dependency build` does):
    the example chat-backend chart, or a minimal one with the given template."""
    parent = tmp_path / name
    if template is None:
        shutil.copytree(EXAMPLES / name, parent)
    else:
        (parent / "templates").mkdir(parents=True)
        (parent / "Chart.yaml").write_text(
            f"apiVersion: v2\nname: {name}\nversion: 0.1.0\n"
            "dependencies:\n  - name: tierproxy\n    version: '>=0.1.0'\n")
        (parent / "templates" / "check.yaml").write_text(template)
    shutil.copytree(CHART, parent / "charts" / "tierproxy")
    return parent


def test_example_chart_includes_the_sidecar(chart: helm.Chart, tmp_path: Path) -> None:
    parent = _parent_chart(tmp_path, "chat-backend")
    with helm.Chart.load(parent) as loaded:
        docs = manifests(loaded.render({}, name="chat", namespace=NAMESPACE))
        tp_values = loaded.values["tierproxy"]
    report = helm.lint(parent, {}, strict=True, kube_version=f"v{KUBE_LATEST}")
    assert report["errors"] == []
    assert kinds(docs) == ["ConfigMap", "Deployment", "Service"]  # its own, no example one
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "chat-chat-backend"
    spec = deployment["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False
    assert spec["terminationGracePeriodSeconds"] == 40
    # The very container the chart's own Deployment renders from the same values.
    same = merged(tp_values, {"deployment": {"enabled": True}, "app": REQUIRED["app"]})
    own = sidecar(manifests(chart.render(same, name="chat", namespace=NAMESPACE)))
    assert spec["initContainers"] == [own]
    assert {v["name"] for v in spec["volumes"]} == {"tierproxy-config", "tierproxy-tmp"}
    backend = spec["containers"][0]
    assert {"name": "TIERPROXY_URL", "value": "http://127.0.0.1:8750"} in backend["env"]
    # The metrics Service finds the backend's pods.
    service = one(docs, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    config_map = one(docs, "ConfigMap")["metadata"]["name"]
    assert next(v for v in spec["volumes"] if v["name"] == "tierproxy-config")[
        "configMap"]["name"] == config_map
    for doc in docs:
        for version in (KUBE_OLDEST_NATIVE, KUBE_LATEST):
            kubernetes_validate.validate(doc, version, strict=True)


def test_example_chart_in_plain_mode(tmp_path: Path) -> None:
    parent = _parent_chart(tmp_path, "chat-backend")
    with helm.Chart.load(parent) as loaded:
        docs = manifests(loaded.render({"tierproxy": PLAIN}, name="chat", namespace=NAMESPACE))
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["backend", "tierproxy"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_OLDEST, strict=True)


# --- config.toml ----------------------------------------------------------------------------


def test_chart_knows_exactly_the_sidecar_settings(tmp_path: Path) -> None:
    # The chart's table of settings and types (tierproxy.configKeys) is proxy/settings.py's:
    # a key tierproxy dropped must fail at render time, not at the sidecar's start.
    parent = _parent_chart(tmp_path, "keys", '{{ include "tierproxy.configKeys" . }}\n')
    with helm.Chart.load(parent) as loaded:
        out = loaded.render({"tierproxy": REQUIRED}, name=RELEASE)
    table = yaml.safe_load(out["keys/templates/check.yaml"])
    kind = {str: "str", int: "int", float: "float", bool: "bool"}
    assert table == {s: {k: kind[type(v)] for k, v in keys.items()} for s, keys in KNOWN.items()}


def test_config_toml_has_only_known_keys(chart: helm.Chart) -> None:
    config = config_toml(render(chart, REQUIRED))
    assert config == {"log": {"format": "json"}}
    for section, keys in config.items():
        assert section in KNOWN
        for key, value in keys.items():
            assert key in KNOWN[section]
            assert type(value) is type(KNOWN[section][key])


def test_every_key_renders_with_its_type(chart: helm.Chart) -> None:
    # Helm turns every number into a float64; the chart renders each key by its type, so
    # 1048576 stays an integer and 10.0 a float.
    allowed = {
        s: {k: v for k, v in keys.items() if f"{s}.{k}" not in RESERVED}
        for s, keys in KNOWN.items()
    }
    allowed = {s: keys for s, keys in allowed.items() if keys}
    config = config_toml(render(chart, merged({"config": allowed})))
    assert config == allowed
    for section, keys in config.items():
        for key, value in keys.items():
            assert type(value) is type(KNOWN[section][key]), f"{section}.{key}"


def test_string_values_are_escaped(chart: helm.Chart) -> None:
    tricky = 'a "quoted" \\ <value>\n'
    config = config_toml(render(chart, merged({"config": {"data": {"dir": tricky}}})))
    assert config["data"]["dir"] == tricky


def test_rendered_config_loads_in_tierproxy(chart: helm.Chart, tmp_path: Path) -> None:
    # The sidecar's own loader accepts what the chart renders (plus the Secret's env vars).
    file = tmp_path / "config.toml"
    overrides = {"flush": {"max_backlog": 1048576}, "shutdown": {"deadline_s": 12.5}}
    docs = render(chart, merged({"config": overrides}))
    file.write_text(one(docs, "ConfigMap")["data"]["config.toml"])
    env = expand_env(sidecar(docs), {(FULLNAME, k): v for k, v in secret_data(docs).items()})
    loaded = settings.load(file, env)
    assert loaded.log.format == "json"
    assert loaded.flush.max_backlog == 1048576
    assert loaded.shutdown.deadline_s == 12.5
    assert loaded.redis.url == URLS["redis"]["url"]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"flsh": {"max_batch": 1}}, "config.flsh"),
        ({"flush": {"max_btach": 1}}, "config.flush.max_btach"),
        ({"flush": {"max_batch": 1.5}}, "config.flush.max_batch"),
        ({"flush": {"max_batch": "many"}}, "config.flush.max_batch"),
        ({"clickhouse": {"store_content": "yes"}}, "config.clickhouse.store_content"),
        ({"log": {"level": 3}}, "config.log.level"),
        ({"redis": {"url": "redis://r:6379"}}, "redis.existingSecret"),
        ({"api": {"token": "t"}}, "api.existingSecret"),
        ({"api": {"port": 9000}}, "sidecar.apiPort"),
        ({"metrics": {"port": 9000}}, "sidecar.metricsPort"),
    ],
)
def test_bad_config_fails_naming_the_key(
    chart: helm.Chart, config: dict[str, Any], named: str
) -> None:
    assert named in render_error(chart, merged({"config": config}))


# --- required external URLs -----------------------------------------------------------------


def test_defaults_fail_naming_every_missing_url(chart: helm.Chart) -> None:
    message = render_error(chart, {})
    for name in ("redis.url", "redis.sentinel.hosts", "postgres.url", "clickhouse.url"):
        assert name in message
    assert "development only" in message


@pytest.mark.parametrize("section", ["redis", "postgres", "clickhouse"])
def test_missing_url_fails_naming_it(chart: helm.Chart, section: str) -> None:
    values = merged()
    del values[section]
    message = render_error(chart, values)
    assert f"{section}.url" in message
    others = {"redis", "postgres", "clickhouse"} - {section}
    assert not any(f"{other}.url" in message for other in others)


@pytest.mark.parametrize(
    ("section", "url"),
    [("redis", "http://redis:6379"), ("postgres", "mysql://db"), ("clickhouse", "chdb:///data")],
)
def test_wrong_url_scheme_fails(chart: helm.Chart, section: str, url: str) -> None:
    assert f"{section}.url must start with" in render_error(chart, merged({section: {"url": url}}))


def test_existing_secrets(chart: helm.Chart) -> None:
    values = merged(
        {
            s: {"url": "", "existingSecret": "db-creds", "existingSecretKey": f"{s}-dsn"}
            for s in ("redis", "postgres", "clickhouse")
        },
        {"api": {"existingSecret": "api-creds"}},
    )
    docs = render(chart, values)
    assert [d for d in docs if d["kind"] == "Secret"] == []
    assert env_refs(sidecar(docs)) == {
        "TIERPROXY_REDIS_URL": ("db-creds", "redis-dsn"),
        "TIERPROXY_POSTGRES_URL": ("db-creds", "postgres-dsn"),
        "TIERPROXY_CLICKHOUSE_URL": ("db-creds", "clickhouse-dsn"),
        "TIERPROXY_API_TOKEN": ("api-creds", "api-token"),
    }


def test_existing_secret_mixed_with_inline_urls(chart: helm.Chart) -> None:
    docs = render(chart, merged({"postgres": {"url": "", "existingSecret": "pg"}}))
    assert set(secret_data(docs)) == {"redis-url", "clickhouse-url"}
    refs = env_refs(sidecar(docs))
    assert refs["TIERPROXY_POSTGRES_URL"] == ("pg", "postgres-url")
    assert refs["TIERPROXY_REDIS_URL"] == (FULLNAME, "redis-url")


def test_url_and_existing_secret_together_fail(chart: helm.Chart) -> None:
    assert "redis.url, redis.existingSecret" in render_error(
        chart, merged({"redis": {"existingSecret": "r"}}))
    assert "postgres.url or postgres.existingSecret" in render_error(
        chart, merged({"postgres": {"existingSecret": "p"}}))


# --- every documented value set, against the Kubernetes schemas ------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "plain": PLAIN,
    "token+monitors+dashboard": {
        "api": {"token": "t"}, "dashboard": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
    "existing-secrets": {
        s: {"url": "", "existingSecret": "creds"} for s in ("redis", "postgres", "clickhouse")},
    "no-app": {**PLAIN, "app": {"enabled": False}},
    "deployment-disabled": {"deployment": {"enabled": False}},
    **{f"redis-{name}": merged(NO_REDIS_URL, {"redis": parts}) | {"app": REQUIRED["app"]}
       for name, (parts, _, _) in TOPOLOGIES.items()},
}
VALUE_FILES = sorted((EXAMPLES / "values").glob("*.yaml"))


def versions_for(values: dict[str, Any], chart: helm.Chart) -> tuple[str, ...]:
    native = chart.merge_values(values)["sidecar"]["native"]
    return (KUBE_OLDEST_NATIVE if native else KUBE_OLDEST, KUBE_LATEST)


def validate_all(docs: list[dict[str, Any]], versions: tuple[str, ...]) -> None:
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # prometheus-operator CRDs: kubernetes-validate has no schema for them
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_validate_against_kubernetes_schemas(chart: helm.Chart, variant: str) -> None:
    values = merged(VARIANTS[variant])
    validate_all(render(chart, values), versions_for(values, chart))


def test_every_example_values_file_is_tested() -> None:
    assert [p.name for p in VALUE_FILES] == [
        "cluster-tls.yaml", "monitoring.yaml", "plain-sidecar.yaml", "sentinel.yaml",
        "standalone.yaml"]


@pytest.mark.parametrize("path", VALUE_FILES, ids=[p.stem for p in VALUE_FILES])
def test_example_values_files(chart: helm.Chart, path: Path) -> None:
    # Each file alone is a complete install (helm install -f FILE).
    values = yaml.safe_load(path.read_text())
    chart.validate_schema(values)
    versions = versions_for(values, chart)
    for version in versions:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}")
        assert report["errors"] == [], version
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], version
    validate_all(render(chart, values), versions)


def test_sentinel_example_renders_a_sentinel_sidecar(chart: helm.Chart) -> None:
    values = yaml.safe_load((EXAMPLES / "values" / "sentinel.yaml").read_text())
    docs = render(chart, values)
    assert kinds(docs) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    env = expand_env(sidecar(docs), {("redis", "redis-password"): "pw",
                                     ("chat-db", "postgres-url"): "postgresql://pg/chat",
                                     ("chat-db", "clickhouse-url"): "http://ch:8123/a",
                                     ("chat-api", "api-token"): "tok"})
    got = topology.parse(env["TIERPROXY_REDIS_URL"])
    assert (got.kind, got.master, got.password, len(got.hosts)) == ("sentinel", "mymaster",
                                                                    "pw", 3)
    assert 'Sentinel master "mymaster"' in notes(chart, values)
