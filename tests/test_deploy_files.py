"""Deployment files (Grafana, Dockerfile, compose, Kubernetes) checked against the code they deploy.

No Docker engine or Kubernetes cluster is needed: every file is parsed, every `qrec` command line goes
through the real CLI parser, every QREC_* variable and TOML key is loaded by the real config classes,
and the cross-references between files (ports, labels, mounts, listeners) are followed.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from services.actor.service import ActorMetrics
from services.cli import build_parser
from services.config import _REGISTRY, ENV_PREFIX, NON_SETTING_ENV, BusConfig, load_config
from services.learner.service import LearnerMetrics
from services.metrics import ConsumerLag
from services.state_builder.service import StateBuilderMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S_DIR = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "qrec.json"
QREC_IMAGE = "qrec:latest"
# The Kafka settings a KRaft node cannot start without (apache/kafka image environment names).
KRAFT_ENV = (
    "KAFKA_NODE_ID",
    "KAFKA_PROCESS_ROLES",
    "KAFKA_LISTENERS",
    "KAFKA_ADVERTISED_LISTENERS",
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
    "KAFKA_CONTROLLER_LISTENER_NAMES",
    "KAFKA_CONTROLLER_QUORUM_VOTERS",
    "CLUSTER_ID",
)


# -- reading the files ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append((path.name, document))
    return found


def k8s_by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for _, obj in k8s_objects() if obj.get("kind") == kind}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in rest.split()))
    return env


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the qrec parser has no subcommands")


def config_class(command: str) -> type:
    """The config dataclass a `qrec COMMAND` loads (registered under the command's TOML table name)."""
    build_parser()  # imports every command's config module, which registers its class
    section = command.replace("-", "_")
    assert section in _REGISTRY, (
        f"qrec {command} has no registered config class (sections: {sorted(_REGISTRY)})"
    )
    return _REGISTRY[section]


@dataclasses.dataclass
class CommandLine:
    """One `qrec` process a deployment file starts: its arguments, environment and TOML settings.

    ``env`` is what the file sets; the image's own ENV (deploy/Dockerfile) comes on top when loading.
    """

    where: str
    argv: list[str]
    env: dict[str, str]
    toml: str | None = None

    @property
    def command(self) -> str:
        return self.argv[0]


def configmap_toml() -> str:
    configmap = k8s_by_kind("ConfigMap")["qrec-config"]
    text: str = configmap["data"]["qrec.toml"]
    return text


def command_lines() -> list[CommandLine]:
    """Every qrec process started by the Dockerfile, the compose file and the Kubernetes manifests."""
    lines: list[CommandLine] = []
    for name, service in compose()["services"].items():
        if service.get("image") == QREC_IMAGE:
            env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
            lines.append(CommandLine(f"compose:{name}", list(service["command"]), env))
    for file, obj in k8s_objects():
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            assert "command" not in container, f"{file}: keep the image's entrypoint (qrec); use args"
            env = {e["name"]: str(e.get("value", "from-a-secret")) for e in container.get("env", [])}
            lines.append(
                CommandLine(f"k8s:{obj['metadata']['name']}", list(container["args"]), env, configmap_toml())
            )
    return lines


def load(line: CommandLine, tmp_path: Path) -> Any:
    """Parse a command line with the real parser and load its config as the process would."""
    args = build_parser().parse_args(line.argv)
    cls = config_class(line.command)
    fields = {f.name for f in dataclasses.fields(cls)}
    cli = {k: v for k, v in vars(args).items() if k in fields}
    env = {**dockerfile_env(), **line.env}
    if line.toml is not None:
        toml_file = tmp_path / "qrec.toml"
        toml_file.write_text(line.toml)
        env["QREC_CONFIG"] = str(toml_file)
    return load_config(cls, cli, env=env)


def exported_metric_names() -> set[str]:
    """Sample names the long-running services export, from their metric classes."""
    names: set[str] = set()
    for metrics_class in (StateBuilderMetrics, LearnerMetrics, ActorMetrics):
        registry = CollectorRegistry()
        metrics_class(registry)
        ConsumerLag(registry, "g")
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "counter":  # a labelled counter has no samples until first used
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


# -- every file parses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_file_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents), f"{path}: no YAML mapping"


# -- Grafana --------------------------------------------------------------------------------------------


def test_dashboard_panels_each_query_prometheus_through_the_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert "qrec_" in target["expr"], f"panel {panel['title']!r}: {target['expr']!r}"
            assert target["datasource"] == panel["datasource"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_covers_the_operations_views() -> None:
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "qrec_state_builder_events_total",
        "qrec_state_builder_state_updates_total",
        "qrec_state_builder_transitions_total",
        "qrec_learner_updates_total",
        "qrec_actor_recommendations_total",
        "qrec_consumer_lag_records",
        "histogram_quantile(0.99, sum by (le) (rate(qrec_actor_end_to_end_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(qrec_state_builder_latency_seconds_bucket",
        "qrec_learner_loss",
        "qrec_learner_td_error",
        "qrec_learner_q_mean",
        "qrec_learner_q_max",
        "qrec_learner_model_version",
        "qrec_actor_model_version",
        "qrec_actor_model_age_seconds",
        'qrec_state_builder_attribution_total{outcome="clicked"}',
        "sum by (policy) (rate(qrec_state_builder_reward_total",
        "qrec_actor_explored_slots_total",
        "sum by (service, reason) (rate(qrec_dead_letters_total",
    ):
        assert needle in exprs, f"no dashboard query contains {needle!r}"
    assert "qrec_supervisor_" not in exprs


def test_dashboard_reads_only_metrics_that_the_services_define() -> None:
    used = set(re.findall(r"\b(qrec_[a-z0-9_]+)", "\n".join(dashboard_exprs())))
    missing = sorted(used - exported_metric_names())
    assert not missing, f"dashboard queries read metrics no qrec service defines: {missing}"


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/qrec.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in compose()["services"], f"the datasource points at {host}, not a compose service"
    assert f"{port}:{port}" in compose()["services"]["prometheus"]["ports"]


# -- Dockerfile -----------------------------------------------------------------------------------------


def test_dockerfile_builds_one_non_root_image_with_qrec_as_entrypoint() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["qrec"]') in instructions
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the image must run as a non-root user"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert 'pip install ".[' in runs, "the project is installed with pip from the repository"
    copied = {rest.split()[0] for word, rest in instructions if word == "COPY"}
    assert {"rl", "schemas", "services"} <= copied, "every package the project ships is copied"
    for variable in dockerfile_env():
        if variable.startswith(ENV_PREFIX):
            # The image's environment reaches every command: only settings every process has.
            assert variable[len(ENV_PREFIX) :].lower() in {f.name for f in dataclasses.fields(BusConfig)}
    (cmd,) = [json.loads(rest) for word, rest in instructions if word == "CMD"]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(cmd)
    assert exit_info.value.code == 0, "the image's default command is qrec --help"


# -- qrec command lines and settings --------------------------------------------------------------------

COMMAND_LINES = command_lines()


def test_the_deployments_start_every_service() -> None:
    started = {(line.where.split(":")[0], line.command) for line in COMMAND_LINES}
    for where in ("compose", "k8s"):
        for command in ("topics", "state-builder", "learner", "actor"):
            assert (where, command) in started, f"{where} does not run qrec {command}"
    assert ("compose", "simulate") in started


@pytest.mark.parametrize("line", COMMAND_LINES, ids=lambda line: line.where)
def test_command_line_parses_and_its_settings_load(line: CommandLine, tmp_path: Path) -> None:
    assert line.command in subcommands(), f"{line.where}: qrec has no command {line.command!r}"
    cls = config_class(line.command)
    settings = {f.name for f in dataclasses.fields(cls)}
    for variable in line.env:
        if variable.startswith(ENV_PREFIX) and variable not in NON_SETTING_ENV:
            key = variable[len(ENV_PREFIX) :].lower()
            assert key in settings, f"{line.where}: {variable} is not a setting of qrec {line.command}"
    if line.toml is not None:
        assert line.env.get("QREC_CONFIG") == "/etc/qrec/qrec.toml", line.where
    config = load(line, tmp_path)  # the real parser and loader: unknown keys and bad values raise
    if line.command != "topics":  # the long-running services
        assert config.bootstrap_servers != "embedded", f"{line.where} must point at Kafka"
        assert config.metrics_port == 9100 and config.metrics_host == "0.0.0.0", line.where


# -- compose --------------------------------------------------------------------------------------------


def listeners(text: str) -> dict[str, tuple[str, int]]:
    """'NAME://host:port,...' -> {NAME: (host, port)}."""
    found = {}
    for item in text.split(","):
        name, _, address = item.partition("://")
        host, _, port = address.rpartition(":")
        found[name] = (host, int(port))
    return found


def test_compose_kafka_is_a_complete_single_node_kraft_setup() -> None:
    services = compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = {k: str(v) for k, v in kafka["environment"].items()}
    missing = [k for k in KRAFT_ENV if k not in env]
    assert not missing, f"KRaft settings missing: {missing}"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert set(bound) <= set(protocols) and controller in bound
    assert controller not in advertised and set(advertised) <= set(bound)
    node, _, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    voter_host, _, voter_port = voter.rpartition(":")
    assert node == env["KAFKA_NODE_ID"] and voter_host == "kafka"
    assert int(voter_port) == bound[controller][1]
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "CLUSTER_ID is a base64url UUID"
    # The qrec containers reach Kafka through an advertised listener.
    reachable = {f"{host}:{port}" for host, port in advertised.values()}
    for line in COMMAND_LINES:
        if line.where.startswith("compose:") and "QREC_BOOTSTRAP_SERVERS" in line.env:
            assert line.env["QREC_BOOTSTRAP_SERVERS"] in reachable, line.where
    published = {p.split(":")[0] for p in kafka["ports"]}
    assert any(str(port) in published for host, port in advertised.values() if host == "localhost")


def test_compose_starts_services_after_the_topics_and_keeps_learner_checkpoints(tmp_path: Path) -> None:
    services = compose()["services"]
    assert services["topics"]["command"][:2] == ["topics", "create"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("state-builder", "learner", "actor", "simulator"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["state-builder"]["deploy"]["replicas"] >= 2
    (learner,) = [line for line in COMMAND_LINES if line.where == "compose:learner"]
    checkpoint_dir = Path(load(learner, tmp_path).checkpoint_dir)
    volumes = dict(v.split(":")[:2] for v in services["learner"]["volumes"])
    # Checkpoints are written beside the folder and renamed over it: the volume must be its parent.
    assert str(checkpoint_dir.parent) in volumes.values(), volumes
    assert volumes.keys() <= compose()["volumes"].keys()


def test_compose_prometheus_scrapes_every_service_and_promtool_accepts_it(tmp_path: Path) -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    # Rebuild the container's view of its files, so rule_files resolve as they will there.
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            destination = tmp_path / target.lstrip("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(COMPOSE_DIR / source, destination)
    config_file = tmp_path / "etc/prometheus/prometheus.yml"
    assert f"--config.file=/{config_file.relative_to(tmp_path)}" in prometheus["command"]
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make test` installs the Debian package prometheus"
    result = subprocess.run(
        [tool, "check", "config", str(config_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr

    scraped: dict[str, int] = {}
    for job in yaml.safe_load(config_file.read_text())["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped.update({name: sd["port"] for name in sd["names"]})
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                scraped[host] = int(port)
    serving = {
        line.where.removeprefix("compose:"): int(line.env["QREC_METRICS_PORT"])
        for line in COMMAND_LINES
        if line.where.startswith("compose:") and "QREC_METRICS_PORT" in line.env
    }
    assert serving and scraped == serving, "Prometheus scrapes exactly the services serving /metrics"


# -- Kubernetes -----------------------------------------------------------------------------------------


def pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = obj["spec"]["template"]["spec"]["containers"]
    return containers


def test_k8s_objects_are_complete_and_namespace_agnostic() -> None:
    objects = k8s_objects()
    kinds = {obj["kind"] for _, obj in objects}
    assert {"ConfigMap", "Job", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    for file, obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), file
        assert obj["metadata"].get("name"), file
        assert "namespace" not in obj["metadata"], f"{file}: leave the namespace to kubectl -n"
        if obj["kind"] in ("Deployment", "Job"):
            template_labels = obj["spec"]["template"]["metadata"]["labels"]
            if obj["kind"] == "Deployment":
                selector = obj["spec"]["selector"]["matchLabels"]
                assert selector.items() <= template_labels.items(), f"{file}: selector misses the pods"
            spec = obj["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, file
            for container in pod_containers(obj):
                resources = container["resources"]
                assert resources["requests"]["cpu"] and resources["requests"]["memory"], file
                assert resources["limits"]["memory"], file
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in {v["name"] for v in spec["volumes"]}, file


def test_k8s_config_volumes_and_claims_exist() -> None:
    configmaps = k8s_by_kind("ConfigMap")
    claims = k8s_by_kind("PersistentVolumeClaim")
    for kind in ("Deployment", "Job"):
        for name, obj in k8s_by_kind(kind).items():
            for volume in obj["spec"]["template"]["spec"]["volumes"]:
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps, name
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, name


def test_k8s_services_probes_and_scrape_annotations_reach_the_metrics_port(tmp_path: Path) -> None:
    deployments = k8s_by_kind("Deployment")
    services = k8s_by_kind("Service")
    lines = {line.where.removeprefix("k8s:"): line for line in COMMAND_LINES if line.where.startswith("k8s:")}
    assert set(deployments) == set(services), "one Service per Deployment"
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        (container,) = pod_containers(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        metrics_port = load(lines[name], tmp_path).metrics_port
        assert ports["metrics"] == metrics_port, f"{name}: the container port is the one qrec serves"
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == metrics_port
        assert annotations["prometheus.io/path"] == "/metrics"
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/metrics" and ports.get(get["port"], get["port"]) == metrics_port, name
        service = services[name]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), name
        (service_port,) = service["spec"]["ports"]
        target = service_port["targetPort"]
        assert ports.get(target, target) == metrics_port, f"{name}: the Service reaches the metrics port"
        assert int(service["metadata"]["annotations"]["prometheus.io/port"]) == service_port["port"]


def test_k8s_learner_is_a_single_recreated_pod_with_checkpoints_on_its_claim(tmp_path: Path) -> None:
    deployments = k8s_by_kind("Deployment")
    learner = deployments["qrec-learner"]
    assert learner["spec"]["replicas"] == 1 and learner["spec"]["strategy"]["type"] == "Recreate"
    assert deployments["qrec-state-builder"]["spec"]["replicas"] >= 2
    assert deployments["qrec-actor"]["spec"]["replicas"] >= 2
    (line,) = [line for line in COMMAND_LINES if line.where == "k8s:qrec-learner"]
    checkpoint_dir = Path(load(line, tmp_path).checkpoint_dir)
    spec = learner["spec"]["template"]["spec"]
    claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    (container,) = spec["containers"]
    mounted = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
    assert mounted == {str(checkpoint_dir.parent)}, "the claim holds the checkpoint folder's parent"
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]
