"""The deployment files parse, and agree with the code: probes, commands and environment names."""

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
# How every server start command runs daphne (on uvloop: mcp_project/serve.py).
SERVE = ["python", "-m", "mcp_project.serve"]
K8S = ROOT / "deploy" / "k8s"
# Variables the hub reads that are not settings of ours.
NOT_SETTINGS = {"DJANGO_SETTINGS_MODULE", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}


def settings_env_names() -> set[str]:
    """Return every environment variable mcp_project/settings.py reads, from its source."""
    tree = ast.parse((ROOT / "mcp_project" / "settings.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        func = node.func
        if (isinstance(func, ast.Name) and func.id.startswith("env_")) or (
            isinstance(func, ast.Attribute)
            and func.attr == "get"
            and ast.unparse(func.value) == "os.environ"
        ):
            names.add(first.value)
    return names


SETTINGS_ENV = settings_env_names()


def test_the_settings_reader_finds_the_names_it_should():
    assert {"DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "HUB_SERVER_NAME"} <= SETTINGS_ENV
    assert {"HUB_METRICS_ALLOWED_IPS", "HUB_METRICS_TOKEN", "HUB_LOG_FORMAT"} <= SETTINGS_ENV


def assert_known(names, where):
    unknown = set(names) - SETTINGS_ENV - NOT_SETTINGS
    assert not unknown, f"{where} sets variables settings.py never reads: {sorted(unknown)}"


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_final_stage() -> list[str]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    return lines[starts[-1] :]


def test_the_image_is_slim_runs_as_a_user_and_checks_its_health():
    stage = dockerfile_final_stage()
    assert re.match(r"FROM python:3\.11-slim\b", stage[0])
    [user] = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert user.split(":")[0] not in {"root", "0"}
    text = "\n".join(stage)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert re.search(
        r'CMD \["python", "-m", "mcp_project\.serve".*"mcp_project\.asgi:application"\]', text
    )
    env = dict(re.findall(r"(\w+)=(\S+)", text.split("RUN groupadd")[0]))
    assert env["HUB_PRODUCTION"] == "1" and env["DJANGO_DEBUG"] == "0"
    assert_known(set(env) - {"PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}, "Dockerfile")


def test_the_build_context_leaves_out_local_state():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var/"} <= set(ignored)


# --- docker-compose.yml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


HUB_SERVICES = ["migrate", "web1", "web2", "worker", "beat"]


def test_compose_runs_the_whole_topology_with_health_checks(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "web1", "web2", "lb", "worker", "beat"}
    for name in ["postgres", "redis", "web1", "web2", "lb", "worker", "beat"]:
        assert services[name]["healthcheck"]["test"], name
    for name in ["web1", "web2"]:
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"])
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )
    assert services["web1"]["environment"]["HUB_SERVER_NAME"] == "web1"
    assert services["web2"]["environment"]["HUB_SERVER_NAME"] == "web2"
    assert services["lb"]["depends_on"]["web1"]["condition"] == "service_healthy"
    assert services["worker"]["command"][:4] == ["celery", "-A", "mcp_project", "worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "mcp_project", "beat"]


def test_compose_keeps_data_in_named_volumes(compose):
    services = compose["services"]
    assert set(compose["volumes"]) == {"pgdata", "redisdata", "beatdata"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "redisdata:/data" in services["redis"]["volumes"]


def test_compose_environment_names_are_settings(compose):
    for name in HUB_SERVICES:
        env = compose["services"][name]["environment"]
        assert_known(env, f"docker-compose.yml {name}")
        assert {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL"} <= set(env), name


def test_the_balancer_spreads_websockets_over_both_servers():
    conf = (ROOT / "deploy" / "nginx" / "hub.conf").read_text()
    assert "server web1:8000" in conf and "server web2:8000" in conf
    assert "proxy_set_header Upgrade $http_upgrade" in conf
    assert (
        "./deploy/nginx/hub.conf:/etc/nginx/conf.d/default.conf:ro"
        in (ROOT / "docker-compose.yml").read_text()
    )


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [*kustomization["resources"], "secret.example.yaml"]
    documents = []
    for name in files:
        documents.extend(doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc)
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}


def containers(deployment):
    return deployment["spec"]["template"]["spec"]["containers"]


def test_the_manifests_define_every_part(manifests):
    assert {
        ("Deployment", "hub-web"),
        ("Deployment", "hub-worker"),
        ("Deployment", "hub-beat"),
        ("Service", "hub-web"),
        ("ConfigMap", "hub-config"),
        ("Secret", "hub-secrets"),
        ("Job", "hub-migrate"),
        ("PodDisruptionBudget", "hub-web"),
        ("HorizontalPodAutoscaler", "hub-web"),
    } <= set(manifests)


def test_web_pods_probe_healthz_and_readyz_on_the_served_port(manifests):
    [web] = containers(manifests[("Deployment", "hub-web")])
    ports = {port["name"]: port["containerPort"] for port in web["ports"]}
    assert web["command"][:3] == SERVE and str(ports["http"]) in web["command"]
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert web[probe]["httpGet"]["port"] in ports


def test_the_grace_period_outlasts_the_socket_drain(manifests):
    deployment = manifests[("Deployment", "hub-web")]
    config = manifests[("ConfigMap", "hub-config")]["data"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    [web] = containers(deployment)
    pre_stop = int(web["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert grace > pre_stop + int(config["HUB_SHUTDOWN_GRACE_SECONDS"])


def test_workloads_read_only_settings_names_from_existing_configmaps_and_secrets(manifests):
    config = manifests[("ConfigMap", "hub-config")]["data"]
    secret = manifests[("Secret", "hub-secrets")]["stringData"]
    assert_known(config, "ConfigMap hub-config")
    assert_known(secret, "Secret hub-secrets")
    assert {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL"} <= set(secret)
    workloads = [doc for (kind, _), doc in manifests.items() if kind in ("Deployment", "Job")]
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert_known([env["name"] for env in container.get("env", [])], container["name"])
            for source in container["envFrom"]:
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in manifests
                else:
                    assert ("Secret", source["secretRef"]["name"]) in manifests


def test_selectors_budgets_and_autoscaler_point_at_the_servers(manifests):
    web = manifests[("Deployment", "hub-web")]
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert web["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifests[("Service", "hub-web")]["spec"]["selector"].items() <= labels.items()
    assert (
        manifests[("PodDisruptionBudget", "hub-web")]["spec"]["selector"]["matchLabels"].items()
        <= labels.items()
    )
    hpa = manifests[("HorizontalPodAutoscaler", "hub-web")]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "hub-web",
    }
    assert hpa["minReplicas"] >= 2


def test_there_is_never_more_than_one_beat(manifests):
    beat = manifests[("Deployment", "hub-beat")]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"


# --- Procfile.multi ------------------------------------------------------------------------------


def procfile(name: str) -> dict[str, str]:
    entries = {}
    for line in (ROOT / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            process, command = line.split(":", 1)
            entries[process.strip()] = command.strip()
    return entries


def test_the_multi_process_procfile_runs_two_named_servers_worker_beat_and_redis():
    entries = procfile("Procfile.multi")
    assert set(entries) == {"redis", "web1", "web2", "worker", "beat"}
    ports = set()
    for name in ("web1", "web2"):
        words = shlex.split(entries[name])
        assert words[0] == f"HUB_SERVER_NAME={name}" and words[1:4] == SERVE
        ports.add(words[words.index("-p") + 1])
        assert_known([words[0].split("=")[0]], "Procfile.multi")
    assert len(ports) == 2
    assert "worker" in entries["worker"] and "beat" in entries["beat"]
    assert settings.ASGI_APPLICATION.replace(".application", ":application") in entries["web1"]
