"""deploy/: the files an operator installs are checked offline, against the schemas and tools
they are meant for, and against Floki's own config loader and command line.

  - Kubernetes manifests: validated with kubernetes-validate (JSON schemas of the Kubernetes API
    shipped inside the package, strict: unknown fields are errors), then cross-checked: the
    ConfigMap's floki.toml loads, its [[shard]] endpoints name the StatefulSet's pods through
    the headless Service, every container's args parse with `floki`'s own parser.
  - Dockerfile: parsed here (there is no Docker engine to build it): slim base, non-root USER,
    HEALTHCHECK, VOLUME at the config's data_dir, the project installed with pip.
  - systemd units: hardening keys present; `systemd-analyze security --offline` scores them
    where systemd-analyze exists.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import tomli

from floki.cli import build_parser, resolve_config
from floki.config import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"        # validated against this Kubernetes API version's schemas

try:
    import yaml
except ImportError:      # the test extra installs it; the Dockerfile and systemd checks still run
    yaml = None


# --- Kubernetes ---------------------------------------------------------------------------------

def k8s_documents() -> list[tuple[str, dict]]:
    if yaml is None:
        return []
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def k8s_object(kind: str, name: str) -> dict:
    if yaml is None:
        pytest.skip("PyYAML is not installed (pip install -e '.[test]')")
    found = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def configmap_toml() -> str:
    return k8s_object("ConfigMap", "floki-config")["data"]["floki.toml"]


def test_the_manifests_hold_every_piece():
    if yaml is None:
        pytest.skip("PyYAML is not installed (pip install -e '.[test]')")
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in k8s_documents())
    assert kinds == [("ConfigMap", "floki-config"), ("Deployment", "floki-frontend"),
                     ("PodDisruptionBudget", "floki-frontend"),
                     ("PodDisruptionBudget", "floki-shard"), ("Service", "floki"),
                     ("Service", "floki-shard"), ("StatefulSet", "floki-shard")]


@pytest.mark.parametrize("name,doc", k8s_documents(),
                         ids=[f"{d['kind']}/{d['metadata']['name']}" for _, d in k8s_documents()])
def test_each_manifest_is_valid_against_the_kubernetes_schema(name, doc):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate comes with the test extra")
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_the_schema_check_catches_a_broken_manifest():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = json.loads(json.dumps(k8s_object("StatefulSet", "floki-shard")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["tcpSocket"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = json.loads(json.dumps(k8s_object("Service", "floki")))
    broken["spec"]["ports"][0]["port"] = "many"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_configmap_carries_a_floki_toml_that_floki_loads(tmp_path):
    text = configmap_toml()
    config = config_from_dict(tomli.loads(text))
    path = tmp_path / "floki.toml"
    path.write_text(text)
    assert load_config(path) == config
    assert config.bind.endswith(":9797") and config.data_dir == "/var/lib/floki"
    assert config.log_format == "json"


def test_shard_endpoints_name_the_statefulset_pods_through_the_headless_service():
    config = config_from_dict(tomli.loads(configmap_toml()))
    shards = k8s_object("StatefulSet", "floki-shard")
    service = k8s_object("Service", "floki-shard")
    assert service["spec"]["clusterIP"] == "None"
    assert shards["spec"]["serviceName"] == service["metadata"]["name"]
    assert shards["spec"]["replicas"] == config.shard_count
    (zmq_port,) = [p for p in containers(shards)[0]["ports"] if p["name"] == "zmq"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == zmq_port["containerPort"] and service_port["targetPort"] == "zmq"
    assert list(config.shard_endpoints) == [
        f"tcp://{shards['metadata']['name']}-{i}.{service['metadata']['name']}:"
        f"{zmq_port['containerPort']}" for i in range(config.shard_count)]


def test_each_shard_pod_gets_its_own_volume_at_the_data_dir():
    config = config_from_dict(tomli.loads(configmap_toml()))
    shards = k8s_object("StatefulSet", "floki-shard")
    (claim,) = shards["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in containers(shards)[0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config.data_dir


@pytest.mark.parametrize("kind,name", [("StatefulSet", "floki-shard"),
                                       ("Deployment", "floki-frontend")])
def test_containers_run_floki_with_the_mounted_config_as_non_root_with_probes(kind, name,
                                                                             tmp_path):
    workload = k8s_object(kind, name)
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    (container,) = containers(workload)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"] and container["livenessProbe"]
    args = build_parser().parse_args(container["args"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == "floki-config"
    assert args.config == f"{mounts[config_volume['name']]}/floki.toml"
    # The args resolve against the ConfigMap's file (written where they point, here in tmp).
    (tmp_path / "floki.toml").write_text(configmap_toml())
    args.config = str(tmp_path / "floki.toml")
    resolve_config(args)
    if args.command == "shard":
        assert args.index_from_hostname and args.shard_bind.startswith("tcp://0.0.0.0:")
        assert args.shard_bind.endswith(f":{container['ports'][0]['containerPort']}")
    else:
        assert args.command == "frontend"
        for probe in ("readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["floki", "health"]
            build_parser().parse_args(command[1:])


def test_selectors_match_their_pods():
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for _, d in k8s_documents() if d["kind"] in ("StatefulSet", "Deployment")}
    selectors = [(d["kind"], d["metadata"]["name"], d["spec"]["selector"])
                 for _, d in k8s_documents() if d["kind"] != "ConfigMap"]
    for kind, name, selector in selectors:
        selector = selector.get("matchLabels", selector)
        matched = [pod for pod, labels in pods.items()
                   if all(labels.get(k) == v for k, v in selector.items())]
        assert len(matched) == 1, f"{kind}/{name} selects {matched}"


def test_the_client_service_reaches_the_frontends_on_the_configured_port():
    config = config_from_dict(tomli.loads(configmap_toml()))
    service = k8s_object("Service", "floki")
    (port,) = service["spec"]["ports"]
    (container,) = containers(k8s_object("Deployment", "floki-frontend"))
    (resp,) = container["ports"]
    assert port["port"] == 9797 == resp["containerPort"] == int(config.bind.rpartition(":")[2])
    assert port["targetPort"] == resp["name"]


def test_disruption_budgets_cover_shards_and_frontends():
    shard_pdb = k8s_object("PodDisruptionBudget", "floki-shard")
    frontend_pdb = k8s_object("PodDisruptionBudget", "floki-frontend")
    assert shard_pdb["spec"]["maxUnavailable"] == 1
    assert frontend_pdb["spec"]["minAvailable"] >= 1


# --- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Returns (INSTRUCTION, arguments) pairs: comments dropped, `\\` continuations joined."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "a continuation runs off the end of the file"
    return instructions


def final_stage(instructions):
    start = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[start:]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), arguments
    return value


DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def test_dockerfile_parses_and_every_copied_source_exists():
    instructions = dockerfile_instructions(DOCKERFILE)
    known = {"ARG", "FROM", "RUN", "COPY", "ENV", "USER", "WORKDIR", "VOLUME", "EXPOSE",
             "STOPSIGNAL", "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL"}
    assert {k for k, _ in instructions} <= known
    for keyword, arguments in instructions:
        if keyword == "COPY" and not arguments.startswith("--from="):
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), source


def test_dockerfile_builds_from_a_slim_image_and_installs_the_project_with_pip():
    instructions = dockerfile_instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0])
             for k, a in instructions if k == "FROM"]
    assert all("slim" in base for base in bases), bases
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert re.search(r"pip install\s+(\S+\s+)*/src\b", runs)
    copies = [a for k, a in instructions if k == "COPY"]
    assert any("pyproject.toml" in c for c in copies)
    assert any(c.startswith("floki ") for c in copies)


def test_dockerfile_runs_as_non_root_with_a_data_volume_and_a_health_check(tmp_path):
    stage = final_stage(dockerfile_instructions(DOCKERFILE))
    users = [a for k, a in stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the config the image carries: data_dir is the volume, bind the exposed port
    config_copy = next(a for k, a in stage if k == "COPY" and a.endswith("/etc/floki/floki.toml"))
    config = load_config(REPO / config_copy.split()[0])
    volumes = [v for k, a in stage if k == "VOLUME" for v in exec_form(a)]
    assert config.data_dir in volumes
    assert [a for k, a in stage if k == "EXPOSE"] == [config.bind.rpartition(":")[2]]
    (health,) = [a for k, a in stage if k == "HEALTHCHECK"]
    options, _, command = health.partition("CMD ")
    assert "--interval=" in options
    entrypoint = exec_form(next(a for k, a in stage if k == "ENTRYPOINT"))
    assert entrypoint == ["floki"]
    health_argv = exec_form(command)
    assert health_argv[:2] == ["floki", "health"]
    assert build_parser().parse_args(health_argv[1:]).config == "/etc/floki/floki.toml"
    cmd = exec_form(next(a for k, a in stage if k == "CMD"))
    assert build_parser().parse_args(cmd).command == "start"


def test_dockerignore_sends_only_what_the_image_needs():
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("**") + 1:].count("!floki/") == 1 and "!pyproject.toml" in ignore


# --- systemd --------------------------------------------------------------------------------------

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """Returns section -> key -> values (a key may repeat in a unit file)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_there_are_units_for_one_machine_and_for_separate_hosts():
    assert [u.name for u in UNITS] == ["floki-frontend.service", "floki-shard@.service",
                                       "floki.service"]


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_units_are_hardened_and_restart_on_failure(unit):
    service = unit_settings(unit)["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["User"] not in ("root", "0") and one["Group"] not in ("root", "0")
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] in ("strict", "full")
    assert one["ProtectHome"] == "yes" and one["PrivateTmp"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert one["Restart"] == "on-failure"
    assert "3" in one["RestartPreventExitStatus"].split()    # a boot error: no restart loop
    assert int(one["LimitNOFILE"]) >= 65536
    assert one["KillSignal"] == "SIGTERM" and one["KillMode"] == "mixed"
    assert "floki" in one["StateDirectory"].split()


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_units_run_a_floki_command_line_that_parses(unit, tmp_path):
    service = unit_settings(unit)["Service"]
    (exec_start,) = [v for v in service["ExecStart"] if v]
    argv = shlex.split(exec_start.replace("%i", "0"))
    assert argv[0].endswith("/bin/floki")
    args = build_parser().parse_args(argv[1:])
    assert args.config == "/etc/floki/floki.toml"
    expected = {"floki.service": "start", "floki-shard@.service": "shard",
                "floki-frontend.service": "frontend"}[unit.name]
    assert args.command == expected
    if expected == "shard":
        assert args.index == 0


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_rates_the_units_well_hardened(unit, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # systemd-analyze reads a template's instance from the file name
    copy = tmp_path / unit.name.replace("@.", "@0.")
    copy.write_text(unit.read_text())
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                           "--no-pager", copy.name], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    if "Unknown option" in proc.stderr or "unrecognized option" in proc.stderr:
        pytest.skip(f"this systemd-analyze cannot check offline: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert exposure and float(exposure.group(1)) <= 2.0, proc.stdout[-2000:]
