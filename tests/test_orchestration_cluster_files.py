"""The cluster files of orchestration/cluster/, each checked by the real tool's own schema:

- aws.yaml: Ray's cluster-launcher schema and validator from the pinned ray wheel
  (`prepare_config` + `validate_config`, as `ray up` runs them), and every node_config
  against the EC2 RunInstances request model in botocore (the call Ray's AWS provider makes
  with it), so an unknown key fails; broken copies show that both checks catch typos.
- rayjob.yaml: structure (kinds, GPU limits, /dev/shm, token auth, the Secrets), its
  entrypoint through train.py's own argument parser and config loader, and, where KubeRay's
  CRD is at hand (KUBERAY_CRD=path to ray.io_rayjobs.yaml), its OpenAPI schema with unknown
  fields refused (kubectl's strict field validation).
- grafana-dashboard.json: loads, a panel per metric of the contract, every expression parses
  as PromQL (promql-parser where installed, a structural check always).
- The `ray job submit` lines of aws.yaml and docs/SCALING.md parse the same way.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "orchestration" / "cluster"
METRICS = ("ray_alexnet_train_images_per_s", "ray_alexnet_train_data_wait", "ray_alexnet_train_step_s",
           "ray_alexnet_train_samples_total", "ray_alexnet_val_top1", "ray_alexnet_val_top5",
           "ray_alexnet_loader_dali_cpu_util", "ray_alexnet_loader_mem_anon_mb", "ray_alexnet_loader_mem_file_mb",
           "ray_alexnet_loader_nvjpg_util",
           "ray_alexnet_loader_device_mb")


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def submit_commands(text: str) -> list[list[str]]:
    """Every `ray job submit ...` command line in `text` (YAML comments or Markdown code:
    lines that start with it), continuation lines joined, as argv lists."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    out = []
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("ray job submit"):
            continue
        cmd = line.strip()
        while cmd.rstrip().endswith("\\"):
            i += 1
            cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
        out.append(shlex.split(cmd, comments=True))
    return out


def train_argv(argv: list[str]) -> list[str]:
    """The arguments of orchestration/train.py in a `python orchestration/train.py ...` argv."""
    assert argv[:2] == ["python", "orchestration/train.py"], argv
    return argv[2:]


def load_entrypoint(args: list[str], monkeypatch):
    """train.py's own parser and config loader on these arguments (run from the project root,
    as the job does in its working directory): the config exists, every --set key is valid."""
    from orchestration.config import load_config
    from orchestration.train import parse_args

    monkeypatch.chdir(ROOT)
    parsed = parse_args(args)
    return load_config(parsed.config, parsed.set)


# ---------------------------------------------------------------- aws.yaml
def ray_validate(config: dict) -> dict:
    """What `ray up` does with the file before it touches AWS: defaults, then the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ec2_validate(node_config: dict) -> None:
    """node_config as the RunInstances request Ray's AWS provider sends (botocore's model)."""
    import botocore.session
    from botocore.validate import validate_parameters

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    validate_parameters({**node_config, "MinCount": 1, "MaxCount": 1}, shape)


def test_aws_passes_ray_schema_and_ec2_model():
    config = load_yaml("aws.yaml")
    prepared = ray_validate(config)
    for node_type in prepared["available_node_types"].values():
        ec2_validate(node_type["node_config"])
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.update(max_worker=8), "max_worker"),                                  # top level
    (lambda c: c["available_node_types"]["gpu"].update(min_worker=0), "min_worker"),  # node type
    (lambda c: c["available_node_types"]["gpu"].update(resources={"GPU": "8"}), "'8'"),  # a type
])
def test_aws_broken_copy_fails_ray_schema(break_it, error):
    import jsonschema

    config = load_yaml("aws.yaml")
    break_it(config)
    with pytest.raises(jsonschema.ValidationError, match=error):
        ray_validate(config)


@pytest.mark.parametrize("break_it, error", [
    (lambda n: n.update(InstanceTyp=n.pop("InstanceType")), "InstanceTyp"),
    (lambda n: n["BlockDeviceMappings"][0]["Ebs"].update(VolumeSise=200), "VolumeSise"),
    (lambda n: n["BlockDeviceMappings"][0]["Ebs"].update(VolumeSize="200"), "VolumeSize"),
])
def test_aws_broken_node_config_fails_ec2_model(break_it, error):
    from botocore.exceptions import ParamValidationError

    config = load_yaml("aws.yaml")
    node_config = config["available_node_types"]["gpu"]["node_config"]
    break_it(node_config)
    ray_validate(config)  # Ray's schema leaves node_config to the provider...
    with pytest.raises(ParamValidationError, match=error):  # ...EC2's request model does not
        ec2_validate(node_config)


def test_aws_contract():
    config = load_yaml("aws.yaml")
    types = config["available_node_types"]
    head, gpu = types[config["head_node_type"]], types["gpu"]
    assert head["resources"].get("GPU", 0) == 0
    assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    # installed exactly as `make setup`, from the synced checkout; the token copied to every node
    assert config["setup_commands"] == ["cd ~/alexnet-dali-ray && make setup"]
    assert config["file_mounts"]["~/alexnet-dali-ray"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in config["rsync_filter"]
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start and ".venv/bin:$PATH" in start
    # S3 credentials by instance profile, none in the file
    assert gpu["node_config"]["IamInstanceProfile"]["Name"]
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws.yaml").read_text()


def test_aws_submit_line_parses(monkeypatch):
    config = load_yaml("aws.yaml")
    commands = submit_commands((CLUSTER / "aws.yaml").read_text())
    assert len(commands) == 1
    argv = commands[0]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"  # the `ray dashboard` tunnel
    assert "--working-dir" in argv
    cfg = load_entrypoint(train_argv(argv[argv.index("--") + 1:]), monkeypatch)
    gpus = config["available_node_types"]["gpu"]
    assert cfg.use_gpu and cfg.workers <= gpus["max_workers"] * gpus["resources"]["GPU"]
    assert cfg.shards_dir.startswith("s3://") and cfg.storage_path.startswith("s3://")


# ---------------------------------------------------------------- rayjob.yaml
def test_rayjob_structure():
    job = load_yaml("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "alexnet-ray-token"}
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # the dashboard stays inside the cluster
    pods = [("head", head["template"]["spec"])] + [(g["groupName"], g["template"]["spec"])
                                                   for g in cluster["workerGroupSpecs"]]
    for name, pod in pods:
        container = pod["containers"][0]
        assert container["image"], name
        shm = {v["name"]: v for v in pod["volumes"]}
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory" and shm[mount["name"]]["emptyDir"]["sizeLimit"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "alexnet-ray-token", "key": "auth_token"}
        assert {"secretRef": {"name": "alexnet-aws"}} in container["envFrom"]  # the AWS variables
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(container)  # ...never inline
    [gpu] = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 8
    assert "nvidia.com/gpu" not in json.dumps(head["template"])


def test_rayjob_entrypoint_parses(monkeypatch):
    job = load_yaml("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    cfg = load_entrypoint(train_argv(argv), monkeypatch)
    [gpu] = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.use_gpu and cfg.workers == gpu["replicas"] * per_pod == gpu["maxReplicas"] * per_pod
    assert cfg.shards_dir.startswith("s3://") and cfg.storage_path.startswith("s3://")
    # the cache the entrypoint names is a volume of the GPU pods
    mounts = [m["mountPath"] for m in gpu["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert any(cfg.cache_dir.startswith(m + "/") for m in mounts)


def test_rayjob_entrypoint_with_a_bad_key_is_refused(monkeypatch):
    argv = shlex.split(load_yaml("rayjob.yaml")["spec"]["entrypoint"]) + ["--set", "worker=32"]
    with pytest.raises(ValueError, match="unknown key"):
        load_entrypoint(train_argv(argv), monkeypatch)


def strict(schema):
    """A CRD's OpenAPI schema as kubectl's strict field validation reads it: an object with
    declared properties takes no other field (unless marked to keep unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


def kuberay_crd_schema() -> dict:
    path = os.environ.get("KUBERAY_CRD")
    if not path:
        pytest.skip("KubeRay's CRD is not on PyPI and not vendored here: set KUBERAY_CRD to "
                    "ray-operator/config/crd/bases/ray.io_rayjobs.yaml of a KubeRay release (>= v1.6.0)")
    return _crd_schema(path)


@functools.cache
def _crd_schema(path: str) -> dict:
    crd = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB
    assert crd["spec"]["names"]["kind"] == "RayJob"
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


def test_rayjob_matches_kuberay_crd():
    import jsonschema

    jsonschema.validate(load_yaml("rayjob.yaml"), kuberay_crd_schema())


@pytest.mark.parametrize("break_it, error", [
    (lambda j: j["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     .update(volumeMount=[]), "volumeMount"),
    (lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"), "tokens"),
])
def test_rayjob_broken_copy_fails_kuberay_crd(break_it, error):
    import jsonschema

    schema = kuberay_crd_schema()
    job = load_yaml("rayjob.yaml")
    break_it(job)
    with pytest.raises(jsonschema.ValidationError, match=error):
        jsonschema.validate(job, schema)


# ---------------------------------------------------------------- grafana-dashboard.json
def grafana_expr(expr: str) -> str:
    """The expression as Grafana sends it to Prometheus: template variables filled in."""
    return expr.replace("$SessionName", ".*").replace("$instance", ".*").replace("$window", "1m")


SELECTOR = re.compile(r"\b(ray_[a-z0-9_]+)\s*(\{[^{}]*\})?")
MATCHER = re.compile(r'^\s*[A-Za-z_][A-Za-z0-9_]*\s*(=~|!~|!=|=)\s*"[^"]*"\s*$')
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "by", "without", "topk",
             "bottomk", "histogram_quantile", "avg_over_time", "max_over_time", "last_over_time", "on", "or", "and"}


def promql_problems(expr: str) -> list[str]:
    """A structural PromQL check needing no parser: brackets balance, every label matcher is
    `label op "value"`, range selectors follow a selector, only known function names."""
    problems, stack = [], []
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if not stack or "([{"[")]}".index(ch)] != stack.pop():
                problems.append(f"unbalanced {ch!r}")
    problems += [f"unclosed {c!r}" for c in stack]
    for _name, labels in SELECTOR.findall(expr):
        for matcher in filter(None, (labels[1:-1].split(",") if labels else [])):
            if not MATCHER.match(matcher):
                problems.append(f"bad label matcher {matcher!r}")
    for word in re.findall(r"\b([a-z_]+)\s*\(", re.sub(r'"[^"]*"', '""', expr)):
        if word not in FUNCTIONS:
            problems.append(f"unknown function {word!r}")
    for rng in re.findall(r"(\S)\s*\[([^\]]*)\]", expr):
        if not re.fullmatch(r"[}\w]", rng[0]) or not re.fullmatch(r"\d+[smhd]|\$\w+", rng[1]):
            problems.append(f"bad range {rng!r}")
    return problems


def metric_names(expr: str) -> set[str]:
    try:
        import promql_parser
    except ImportError:  # the structural check above stands in for the parser
        return {name for name, _ in SELECTOR.findall(expr)}
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(grafana_expr(expr)), visit)  # raises on a syntax error
    return names


def dashboard() -> dict:
    return json.loads((CLUSTER / "grafana-dashboard.json").read_text())


def test_grafana_dashboard_loads_and_covers_every_metric():
    dash = dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    assert dash["title"] and dash["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "SessionName", "instance"} <= variables
    per_metric = {m: [] for m in METRICS}
    for panel in dash["panels"]:
        assert panel["type"] in ("timeseries", "stat") and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert not promql_problems(expr), (panel["title"], expr, promql_problems(expr))
            names = metric_names(expr)
            assert names and names <= set(METRICS), (panel["title"], names)
            for name in names:
                per_metric[name].append(panel["title"])
    assert all(per_metric.values()), {m: t for m, t in per_metric.items() if not t}
    # the counter is read as a rate, the gauges as they are; the rank and node tags are shown
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert "rate(ray_alexnet_train_samples_total" in exprs
    assert "{{rank}}" in json.dumps(dash) and "instance" in exprs


@pytest.mark.parametrize("bad", [
    'sum(rate(ray_alexnet_train_samples_total{SessionName=~".*"}[1m])',   # a parenthesis short
    'sum(ray_alexnet_train_images_per_s{SessionName=~.*})',               # an unquoted value
    'summ(ray_alexnet_train_images_per_s)',                               # no such function
])
def test_promql_check_catches_broken_expressions(bad):
    assert promql_problems(bad)
    try:
        import promql_parser
    except ImportError:
        return
    with pytest.raises(ValueError):
        promql_parser.parse(bad)


# ---------------------------------------------------------------- docs/SCALING.md
def test_scaling_doc_submit_lines_parse(monkeypatch):
    text = (ROOT / "docs" / "SCALING.md").read_text()
    commands = submit_commands(text)
    assert commands, "docs/SCALING.md shows the submit line"
    aws = submit_commands((CLUSTER / "aws.yaml").read_text())[0]
    assert aws in commands  # the doc's line is the cluster file's line
    for argv in commands:
        cfg = load_entrypoint(train_argv(argv[argv.index("--") + 1:]), monkeypatch)
        assert cfg.shards_dir.startswith("s3://")
    assert "orchestration/cluster/rayjob.yaml" in text and "grafana-dashboard.json" in text
