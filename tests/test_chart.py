"""The Helm chart in helm/tierproxy: lint, render and schema-check it, all offline.

helm-python-sdk runs Helm's Go SDK in-process (ctypes over a bundled libhelm_c), so no helm
binary, cluster, network or cache directory is involved. Every rendered manifest is checked
against the Kubernetes OpenAPI schemas bundled with kubernetes-validate (strict: unknown
fields fail).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from proxy import settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tierproxy"
RELEASE, NAMESPACE = "demo", "prod"
FULLNAME = "demo-tierproxy"
# Newest schemas kubernetes-validate ships, and the oldest release the chart claims to support
# (native sidecars need 1.29, so that variant is checked against the newest only).
KUBE_LATEST = kubernetes_validate.latest_version()
KUBE_OLDEST = "1.25.0"

URLS = {
    "redis": {"url": "redis://:r-pass@redis.data:6379/0"},
    "postgres": {"url": "postgresql://tier:p-pass@pg.data:5432/chat"},
    "clickhouse": {"url": "http://tier:c-pass@ch.data:8123/analytics"},
}
REQUIRED: dict[str, Any] = {**URLS, "app": {"image": {"repository": "example/chat-backend"}}}

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


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-empty manifest the chart renders (NOTES.txt left out)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def render_error(chart: helm.Chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmRenderError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(caught.value)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    doc: dict[str, Any] = found[0]
    return doc


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


def config_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(one(docs, "ConfigMap")["data"]["config.toml"])


# --- lint -----------------------------------------------------------------------------------


def test_lint_passes_strict() -> None:
    report = helm.lint(CHART, REQUIRED, strict=True, kube_version=f"v{KUBE_LATEST}")
    assert report["errors"] == []
    # Severity 2 = warning, 3 = error; 1 (info, e.g. "icon is recommended") is fine.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_metadata(chart: helm.Chart) -> None:
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.name == "tierproxy"
    assert chart.values["config"]["log"]["format"] == "json"


# --- the sidecar ----------------------------------------------------------------------------


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
        "--config",
        "/etc/tierproxy/config.toml",
    ]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9750, "protocol": "TCP"}]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert mount == {"name": "config", "mountPath": "/etc/tierproxy", "readOnly": True}
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]


def test_probes_use_the_metrics_port(chart: helm.Chart) -> None:
    # The API listens on 127.0.0.1, which kubelet probes cannot reach.
    c = sidecar(render(chart, REQUIRED))
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_secrets_reach_the_sidecar_as_env_from_the_chart_secret(chart: helm.Chart) -> None:
    docs = render(chart, merged({"api": {"token": "t0ken"}}))
    secret = one(docs, "Secret")
    refs = env_refs(sidecar(docs))
    for env, key in {**SECRET_ENV, "TIERPROXY_API_TOKEN": "api-token"}.items():
        assert refs[env] == (secret["metadata"]["name"], key)
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "redis-url": URLS["redis"]["url"],
        "postgres-url": URLS["postgres"]["url"],
        "clickhouse-url": URLS["clickhouse"]["url"],
        "api-token": "t0ken",
    }
    # The app needs the token too, and learns the sidecar's URL.
    app = next(c for c in pod_spec(docs)["containers"] if c["name"] == "app")
    assert env_refs(app) == {"TIERPROXY_API_TOKEN": (secret["metadata"]["name"], "api-token")}
    assert {"name": "TIERPROXY_URL", "value": "http://127.0.0.1:8750"} in app["env"]


def test_no_token_means_no_token_env(chart: helm.Chart) -> None:
    docs = render(chart, REQUIRED)
    assert "TIERPROXY_API_TOKEN" not in env_refs(sidecar(docs))
    assert "api-token" not in one(docs, "Secret")["data"]


def test_sidecar_env_from_values(chart: helm.Chart) -> None:
    extra = {"name": "TIERPROXY_FLUSH_MAX_BATCH", "value": "500"}
    c = sidecar(render(chart, merged({"sidecar": {"env": [extra]}})))
    assert extra in c["env"]


def test_security_resources_and_shutdown(chart: helm.Chart) -> None:
    docs = render(chart, REQUIRED)
    spec, c = pod_spec(docs), sidecar(docs)
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert spec["terminationGracePeriodSeconds"] > KNOWN["shutdown"]["deadline_s"]
    # Service links would inject e.g. TIERPROXY_METRICS_PORT=tcp://... for a Service named
    # "tierproxy-metrics", which tierproxy would read as its metrics.port setting.
    assert spec["enableServiceLinks"] is False


def test_pod_scrape_annotations(chart: helm.Chart) -> None:
    meta = one(render(chart, REQUIRED), "Deployment")["spec"]["template"]["metadata"]
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert meta["annotations"]["prometheus.io/port"] == "9750"
    assert meta["annotations"]["prometheus.io/path"] == "/metrics"
    off = one(render(chart, merged({"metrics": {"podAnnotations": False}})), "Deployment")
    assert "prometheus.io/scrape" not in off["spec"]["template"]["metadata"]["annotations"]


def test_grace_period_must_exceed_the_shutdown_deadline(chart: helm.Chart) -> None:
    message = render_error(chart, merged({"config": {"shutdown": {"deadline_s": 45}}}))
    assert "terminationGracePeriodSeconds" in message
    assert "config.shutdown.deadline_s" in message
    ok = merged({"config": {"shutdown": {"deadline_s": 45}}, "terminationGracePeriodSeconds": 60})
    assert pod_spec(render(chart, ok))["terminationGracePeriodSeconds"] == 60


def test_native_sidecar(chart: helm.Chart) -> None:
    spec = pod_spec(render(chart, merged({"sidecar": {"native": True}})))
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert [c["name"] for c in spec["initContainers"]] == ["tierproxy"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"


def test_app_can_be_disabled(chart: helm.Chart) -> None:
    values = merged({"app": {"enabled": False, "image": {"repository": ""}}})
    assert [c["name"] for c in pod_spec(render(chart, values))["containers"]] == ["tierproxy"]


def test_app_image_is_required_while_enabled(chart: helm.Chart) -> None:
    assert "app.image.repository" in render_error(chart, {**URLS})


# --- service and ServiceMonitor -------------------------------------------------------------


def test_service_exposes_metrics(chart: helm.Chart) -> None:
    docs = render(chart, REQUIRED)
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9750, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [d for d in docs if d["kind"] == "ServiceMonitor"] == []


def test_service_monitor(chart: helm.Chart) -> None:
    docs = render(
        chart,
        merged(
            {
                "metrics": {
                    "serviceMonitor": {
                        "enabled": True,
                        "labels": {"release": "kube-prometheus-stack"},
                    }
                }
            }
        ),
    )
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service_labels = one(docs, "Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()


# --- config.toml ----------------------------------------------------------------------------


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
    from proxy import settings

    file = tmp_path / "config.toml"
    overrides = {"flush": {"max_backlog": 1048576}, "shutdown": {"deadline_s": 12.5}}
    file.write_text(
        one(render(chart, merged({"config": overrides})), "ConfigMap")["data"]["config.toml"]
    )
    env = {
        "TIERPROXY_REDIS_URL": URLS["redis"]["url"],
        "TIERPROXY_POSTGRES_URL": URLS["postgres"]["url"],
        "TIERPROXY_CLICKHOUSE_URL": URLS["clickhouse"]["url"],
    }
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
    for name in ("redis.url", "postgres.url", "clickhouse.url"):
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
    assert set(one(docs, "Secret")["data"]) == {"redis-url", "clickhouse-url"}
    refs = env_refs(sidecar(docs))
    assert refs["TIERPROXY_POSTGRES_URL"] == ("pg", "postgres-url")
    assert refs["TIERPROXY_REDIS_URL"] == (FULLNAME, "redis-url")


def test_url_and_existing_secret_together_fail(chart: helm.Chart) -> None:
    message = render_error(chart, merged({"redis": {"existingSecret": "r"}}))
    assert "redis.url or redis.existingSecret" in message


# --- schema validation ----------------------------------------------------------------------

VARIANTS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "defaults": ({}, (KUBE_OLDEST, KUBE_LATEST)),
    "token+monitor": (
        {"api": {"token": "t"}, "metrics": {"serviceMonitor": {"enabled": True}}},
        (KUBE_OLDEST, KUBE_LATEST),
    ),
    "existing-secrets": (
        {s: {"url": "", "existingSecret": "creds"} for s in ("redis", "postgres", "clickhouse")},
        (KUBE_OLDEST, KUBE_LATEST),
    ),
    "native-sidecar": ({"sidecar": {"native": True}}, (KUBE_LATEST,)),
    "no-app": ({"app": {"enabled": False}}, (KUBE_OLDEST, KUBE_LATEST)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_manifests_validate_against_kubernetes_schemas(chart: helm.Chart, variant: str) -> None:
    overrides, versions = VARIANTS[variant]
    docs = render(chart, merged(overrides))
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a prometheus-operator CRD: kubernetes-validate has no schema for it
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)
