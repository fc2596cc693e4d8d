"""Checks of ``cluster/``: the launcher config, the KubeRay manifests, the Dockerfile, the nightly
script and the commands in ``cluster/README.md``.

Every ``freecustom-pipeline`` command found in those files is checked twice: against the
option contract of issue 4 (an allow-list, below), and, once ``pipeline/cli.py`` exists,
against the real typer CLI (its click command, introspected). A ``nightly.sh`` command counts as
the ``run`` command it prints with ``--dry-run``. ``nightly.sh``'s choice of earlier nights is tested
on folders the real ``inspect --json`` reads, and end to end on real tiny runs. Nothing here needs
Docker, Kubernetes, AWS or a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
RAYCRONJOB = CLUSTER / "kuberay" / "raycronjob.yaml"
NIGHTLY = CLUSTER / "nightly.sh"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"
EXECUTABLE = "freecustom-pipeline"

# --- the contract (issue 4): subcommand -> option -> takes a value? -----------------------
CONTRACT: dict[str, dict[str, bool]] = {
    "run": {
        "-o": True,
        "--model": True,
        "--num-inference-steps": True,
        "--height": True,
        "--width": True,
        "--guidance-scale": True,
        "--root": True,
        "--kv-cache": True,
        "--samples-per-shard": True,
        "--image-format": True,
        "--address": True,
        "--gpus-per-worker": True,
        "--batch-size": True,
        "--overwrite": False,
        # issue 11: the cluster examples request GPUs whatever the cluster has at start
        "--device": True,
        "--gpu-wait": True,
        # issue 12: incremental runs (nightly.sh passes the earlier nights)
        "--reuse": True,
        # issue 25: the night's settings in a config file (cluster/nightly.yaml)
        "--config": True,
    },
    "validate": {"--root": True, "--json": False},  # --json: issue 12
    "inspect": {"--sample": True, "--json": False},
    "manifest from-config": {"--root": True, "-o": True},
    # issue 23: nightly.sh --spec builds the manifest before the run
    "manifest build": {"-o": True, "--dry-run": False, "--json": False, "--seconds-per-image": True,
                       "--check-images": False},
}
# positional arguments each subcommand takes: (min, max)
POSITIONALS = {"run": (1, 1), "validate": (1, 1), "inspect": (1, 1), "manifest from-config": (1, None),
               "manifest build": (1, 1)}
REQUIRED = {"run": {"-o"}, "manifest from-config": {"--root", "-o"}}
POSITIVE_INTS = {"--num-inference-steps", "--height", "--width", "--samples-per-shard", "--batch-size"}
POSITIVE_FLOATS = {"--gpus-per-worker", "--guidance-scale"}
IMAGE_FORMATS = {"png", "jpg", "webp"}
DEVICES = {"auto", "cuda", "cpu"}


@dataclass(frozen=True)
class Invocation:
    """One ``freecustom-pipeline`` command line found in a file."""

    source: str  # file and where in it
    argv: tuple[str, ...]  # the arguments after the executable

    @property
    def subcommand(self) -> str:
        if self.argv[:1] == ("manifest",) and len(self.argv) > 1:
            return f"manifest {self.argv[1]}"
        return self.argv[0] if self.argv else ""

    @property
    def rest(self) -> list[str]:
        return list(self.argv[len(self.subcommand.split()) :])

    def options(self) -> dict[str, str | None]:
        """Option -> value (None for a flag), by the contract; positionals under ''."""
        spec = CONTRACT[self.subcommand]
        found: dict[str, Any] = {"": []}
        tokens = self.rest
        i = 0
        while i < len(tokens):
            token = tokens[i]
            name, eq, inline = token.partition("=")
            if not token.startswith("-") or token == "-":
                found[""].append(token)
            elif name not in spec:
                raise AssertionError(
                    f"{self.source}: option {name!r} is not a `{self.subcommand}` option of the "
                    f"contract; allowed: {sorted(spec)}"
                )
            elif not spec[name]:
                assert not eq, f"{self.source}: {name} is a flag and takes no value"
                found[name] = None
            elif eq:
                found[name] = inline
            else:
                assert i + 1 < len(tokens), f"{self.source}: {name} needs a value"
                found[name] = tokens[i + 1]
                i += 1
            i += 1
        return found


# --- finding commands ----------------------------------------------------------------------


def _load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))


def _is_command_key(key: str) -> bool:
    """Keys whose values are commands: KubeRay `entrypoint`, pod `command`/`args`, launcher `*_commands`."""
    return key in ("entrypoint", "command", "args") or key.endswith("commands")


def _walk(node: Any, where: str, key: str = "") -> Iterator[tuple[str, str, Any]]:
    yield where, key, node
    if isinstance(node, dict):
        for k, value in node.items():
            yield from _walk(value, f"{where}.{k}", str(k))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{where}[{i}]", key)


def _shell_commands(line: str) -> Iterator[list[str]]:
    """Split one shell line into simple commands (at ; && || | and the like), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    command: list[str] = []
    for token in lexer:
        if token and set(token) <= set(";&|()<>"):
            yield command
            command = []
        else:
            command.append(token)
    yield command


NIGHT = "2026-01-02"  # the night nightly.sh commands found in files are expanded for


def _nightly_env() -> dict[str, str]:
    """The environment for nightly.sh: this Python's bin folder (freecustom-pipeline, python3) first."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _nightly(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(NIGHTLY), *args], capture_output=True, text=True, env=_nightly_env(),
                          timeout=300)


def _nightly_dry_run(args: list[str], night: str = NIGHT) -> list[str]:
    """The ``run`` argument list nightly.sh would execute for these arguments on ``night``."""
    done = _nightly("--dry-run", "--night", night, *args)
    assert done.returncode == 0, f"nightly.sh {' '.join(args)}: exit {done.returncode}: {done.stderr}"
    command = shlex.split(done.stdout)
    assert command[0] == EXECUTABLE and command[1] == "run", done.stdout
    return command[1:]


def _argvs_in_shell(text: str) -> Iterator[list[str]]:
    """The argument lists following each ``freecustom-pipeline`` in a shell snippet; a ``nightly.sh``
    command gives the ``run`` arguments it prints with ``--dry-run``."""
    for line in text.replace("\\\n", " ").splitlines():
        if EXECUTABLE in line or NIGHTLY.name in line:
            for command in _shell_commands(line):
                if EXECUTABLE in command:
                    yield command[command.index(EXECUTABLE) + 1 :]
                    continue
                script = [i for i, token in enumerate(command) if Path(token).name == NIGHTLY.name]
                if script:
                    yield _nightly_dry_run(command[script[0] + 1 :])


def _yaml_invocations(path: Path) -> list[Invocation]:
    found = []
    for d, doc in enumerate(_load_all(path)):
        for where, key, node in _walk(doc, f"{path.relative_to(REPO)}#doc{d}"):
            if not _is_command_key(key):
                continue
            if isinstance(node, str) and EXECUTABLE in node:
                found += [Invocation(where, tuple(argv)) for argv in _argvs_in_shell(node)]
            elif isinstance(node, list) and EXECUTABLE in node and all(isinstance(x, str) for x in node):
                found.append(Invocation(where, tuple(node[node.index(EXECUTABLE) + 1 :])))
    return found


def _readme_invocations() -> list[Invocation]:
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.S):
        found += [Invocation("cluster/README.md (code block)", tuple(a)) for a in _argvs_in_shell(block)]
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text):
        if span.startswith(EXECUTABLE + " "):
            found += [Invocation(f"cluster/README.md `{span}`", tuple(a)) for a in _argvs_in_shell(span)]
    return found


def _all_invocations() -> list[Invocation]:
    found = [inv for path in _yaml_files() for inv in _yaml_invocations(path)]
    return found + _readme_invocations()


# --- files parse ---------------------------------------------------------------------------


def test_cluster_files_exist():
    for path in (LAUNCHER, RAYCLUSTER, RAYJOB, RAYCRONJOB, NIGHTLY, DOCKERFILE, README):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses_with_the_safe_loader(path: Path):
    docs = _load_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs)


# --- commands against the contract ---------------------------------------------------------


def test_commands_are_found():
    assert _yaml_invocations(RAYJOB), "the RayJob has no freecustom-pipeline entrypoint"
    readme = _readme_invocations()
    assert any(inv.subcommand == "run" for inv in readme), "README shows no `run` command"


@pytest.mark.parametrize("inv", _all_invocations(), ids=lambda inv: f"{inv.source}:{' '.join(inv.argv[:1])}")
def test_command_matches_the_contract(inv: Invocation):
    assert inv.subcommand in CONTRACT, f"{inv.source}: unknown subcommand in {inv.argv}"
    opts = inv.options()
    low, high = POSITIONALS[inv.subcommand]
    positionals = opts.pop("")
    assert len(positionals) >= low and (high is None or len(positionals) <= high), (
        f"{inv.source}: `{inv.subcommand}` takes {low}..{high or 'n'} positional arguments, got {positionals}"
    )
    missing = REQUIRED.get(inv.subcommand, set()) - set(opts)
    assert not missing, f"{inv.source}: `{inv.subcommand}` needs {sorted(missing)}"
    for name, value in opts.items():
        if name in POSITIVE_INTS:
            assert value.isdigit() and int(value) > 0, (
                f"{inv.source}: {name} {value!r} is not a positive integer"
            )
        elif name in POSITIVE_FLOATS:
            assert float(value) > 0, f"{inv.source}: {name} {value!r} must be > 0"
        elif name == "--image-format":
            assert value in IMAGE_FORMATS, f"{inv.source}: --image-format {value!r}"
        elif name == "--device":
            assert value in DEVICES, f"{inv.source}: --device {value!r}"
        elif value is not None:
            assert value and not value.startswith("-"), f"{inv.source}: {name} has no value"


IMAGE_REPO = "/home/ray/freecustom-pipeline/"  # where cluster/Dockerfile puts the repository


def _effective_settings(inv: Invocation) -> dict[str, Any]:
    """What the real ``run --print-config`` says the command runs with (its --config read from this
    checkout where it names the image's copy), without this machine's FREECUSTOM_* variables."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    argv = [str(REPO / a.removeprefix(IMAGE_REPO)) if a.startswith(IMAGE_REPO) else a for a in inv.argv]
    env = {name: None for name in os.environ if name.startswith("FREECUSTOM_")}
    result = CliRunner().invoke(app, [*argv, "--print-config"], env=env)
    assert result.exit_code == 0, f"{inv.source}: {result.output}"
    return yaml.safe_load(result.stdout)


def test_cluster_entrypoints_run_on_the_cluster():
    """Every command in a YAML file is a `run` joining the cluster (--address auto) that requests GPUs
    whatever the cluster has at start (--device cuda: an autoscaler adds GPU nodes from zero), on the
    command line or in its --config file (cluster/nightly.yaml)."""
    invocations = [inv for path in _yaml_files() for inv in _yaml_invocations(path)]
    assert invocations
    for inv in invocations:
        assert inv.subcommand == "run", f"{inv.source}: cluster entrypoints run `run`, got {inv.argv}"
        settings = _effective_settings(inv)
        assert settings["device"] == "cuda", f"{inv.source}: pass --device cuda on a cluster"
        assert settings["address"] == "auto", f"{inv.source}: add --address auto"
        assert settings["kv_cache"] and settings["out"].startswith("/mnt/data/renders/"), settings


def test_the_nightly_settings_are_a_config_file_the_entrypoints_use():
    """The KubeRay nights keep their settings in cluster/nightly.yaml, not on the command line."""
    for path in (RAYJOB, RAYCRONJOB):
        (inv,) = _yaml_invocations(path)
        assert inv.options()["--config"] == IMAGE_REPO + "cluster/nightly.yaml", inv.source
        assert "--device" not in inv.options(), f"{inv.source}: settings belong in cluster/nightly.yaml"


# --- commands against the real CLI ---------------------------------------------------------


def _real_cli():
    try:
        spec = importlib.util.find_spec("pipeline.cli")
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        pytest.skip("pipeline/cli.py is not written yet: the real-CLI check runs once it exists")
    typer = pytest.importorskip("typer")
    module = importlib.import_module("pipeline.cli")
    assert hasattr(module, "app"), (
        "pipeline/cli.py must expose the typer `app` ([project.scripts] points at it)"
    )
    return typer.main.get_command(module.app)


def _subcommand(root, words: list[str]):
    command = root
    for word in words:
        commands = getattr(command, "commands", None)
        assert commands is not None and word in commands, (
            f"the CLI has no subcommand {' '.join(words)!r} (available: {sorted(commands or [])})"
        )
        command = commands[word]
    return command


def _is_option(param) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _is_path(param) -> bool:
    descriptor = getattr(param, "type_descriptor", None)
    return (
        bool(getattr(descriptor, "is_path", False)) or type(getattr(param, "type", None)).__name__ == "Path"
    )


def _check_against_cli(root, inv: Invocation) -> None:
    command = _subcommand(root, inv.subcommand.split())
    options = {name: p for p in command.params if _is_option(p) for name in (*p.opts, *p.secondary_opts)}
    arguments = [p for p in command.params if getattr(p, "param_type_name", "") == "argument"]
    ctx = command.make_context(inv.subcommand, inv.rest, resilient_parsing=True)

    tokens, positionals, given, i = inv.rest, [], set(), 0
    while i < len(tokens):
        name, eq, inline = tokens[i].partition("=")
        if not name.startswith("-") or name == "-":
            positionals.append(tokens[i])
            i += 1
            continue
        assert name in options, f"{inv.source}: the real CLI has no option {name!r} for `{inv.subcommand}`"
        param = options[name]
        given.add(param.name)
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            i += 1
            continue
        assert eq or i + 1 < len(tokens), f"{inv.source}: {name} needs a value"
        value = inline if eq else tokens[i + 1]
        i += 1 if eq else 2
        if not _is_path(param):  # paths name places on the cluster, not on this machine
            try:
                param.process_value(ctx, value)
            except Exception as e:  # the CLI's own conversion error, e.g. not an integer
                raise AssertionError(f"{inv.source}: {name} {value!r} is refused by the CLI: {e}") from e
    most = None if any(a.nargs == -1 for a in arguments) else sum(a.nargs for a in arguments)
    least = sum(max(a.nargs, 1) for a in arguments if a.required)
    assert least <= len(positionals) and (most is None or len(positionals) <= most), (
        f"{inv.source}: `{inv.subcommand}` takes {least}..{most or 'n'} positional arguments, got {positionals}"
    )
    required = {p.name for p in command.params if _is_option(p) and p.required}
    assert required <= given, f"{inv.source}: `{inv.subcommand}` requires {sorted(required - given)}"


@pytest.mark.parametrize("inv", _all_invocations(), ids=lambda inv: f"{inv.source}:{' '.join(inv.argv[:1])}")
def test_command_parses_with_the_real_cli(inv: Invocation):
    _check_against_cli(_real_cli(), inv)


def test_real_cli_offers_every_contract_option():
    root = _real_cli()
    for subcommand, spec in CONTRACT.items():
        command = _subcommand(root, subcommand.split())
        offered = {name for p in command.params if _is_option(p) for name in (*p.opts, *p.secondary_opts)}
        missing = set(spec) - offered
        assert not missing, f"`{subcommand}` lacks contract options {sorted(missing)}"


# --- KubeRay -------------------------------------------------------------------------------


KUBERAY = (RAYCLUSTER, RAYJOB, RAYCRONJOB)


def _cluster_spec(doc: dict) -> dict:
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]["rayClusterSpec"]
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in KUBERAY for doc in _load_all(path)]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict, kind: str) -> int:
    return int(container.get("resources", {}).get(kind, {}).get("nvidia.com/gpu", 0))


def _dockerfile_ray_version() -> str:
    base = _dockerfile_instructions("FROM")[-1].split()[0]
    match = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)\b.*", base)
    assert match, f"FROM {base}: expected a rayproject/ray image with an explicit version"
    return match.group(1)


def test_kuberay_kinds_and_api_versions():
    kinds = {path.name: [doc["kind"] for doc in _load_all(path)] for path in KUBERAY}
    assert kinds == {"raycluster.yaml": ["RayCluster"], "rayjob.yaml": ["RayJob"], "raycronjob.yaml": ["RayCronJob"]}
    for path, doc in _kuberay_docs():
        assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: KubeRay's stable API is ray.io/v1"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_cluster_has_a_gpu_worker_group(path: Path):
    (doc,) = _load_all(path)
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _dockerfile_ray_version(), "rayVersion must be the image's Ray version"

    head = spec["headGroupSpec"]
    for container in _containers(head):
        assert _gpus(container, "limits") == 0, "the head runs the driver; it needs no GPU"

    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any(_gpus(c, "limits") >= 1 for c in _containers(g))]
    assert gpu_groups, f"{path.name}: no worker group with nvidia.com/gpu limits"
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        for container in _containers(group):
            requested = container.get("resources", {}).get("requests", {}).get("nvidia.com/gpu")
            if requested is not None:  # Kubernetes requires requests == limits for extended resources
                assert int(requested) == _gpus(container, "limits"), group["groupName"]

    for group in [head, *groups]:
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{path.name}: volumeMount {mount['name']} has no volume"


def test_rayjob_paths_are_on_storage_every_node_mounts():
    (doc,) = _load_all(RAYJOB)
    spec = doc["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    (inv,) = _yaml_invocations(RAYJOB)
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    mounts_per_pod = [
        {m["mountPath"] for c in _containers(g) for m in c.get("volumeMounts", [])} for g in pods
    ]
    opts = inv.options()
    for label, path in [
        ("MANIFEST", opts[""][0]),
        ("OUT", opts["-o"]),
        ("--kv-cache", opts.get("--kv-cache")),
    ]:
        if path is None or "://" in path:
            continue  # an object store URI
        for mounts in mounts_per_pod:
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"rayjob.yaml: {label} {path} is not on a volume mounted in every pod"
            )


def test_all_images_are_the_same():
    images = {c["image"] for _, doc in _kuberay_docs() for g in _groups(doc) for c in _containers(g)}
    (launcher,) = _load_all(LAUNCHER)
    images.add(launcher["docker"]["image"])
    assert len(images) == 1, f"the launcher and KubeRay files name different images: {sorted(images)}"


def _groups(doc: dict) -> list[dict]:
    spec = _cluster_spec(doc)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


# --- Ray cluster launcher ------------------------------------------------------------------

GPU_INSTANCE = re.compile(r"(g4dn|g5|g5g|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.\w+")


def test_launcher_config_is_valid_for_ray():
    (config,) = _load_all(LAUNCHER)
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("ray's autoscaler is not importable here")
    validate_config(prepare_config(config))  # what `ray up` runs before launching anything


def test_launcher_config_has_a_gpu_worker_group_and_our_image():
    (config,) = _load_all(LAUNCHER)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    assert not GPU_INSTANCE.fullmatch(head["node_config"]["InstanceType"]), "the head is a CPU node"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(
        GPU_INSTANCE.fullmatch(t["node_config"]["InstanceType"]) or t.get("resources", {}).get("GPU", 0) > 0
        for t in workers
    ), "no GPU worker node type"
    assert config["docker"]["image"].split(":")[0].endswith("freecustom-pipeline")
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not config.get(key), f"{key}: the image carries everything, nothing is installed at setup"


# --- Dockerfile ----------------------------------------------------------------------------


def _dockerfile_instructions(keyword: str) -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [ln.split(None, 1)[1] for ln in lines if ln.split(None, 1)[0].upper() == keyword]


def _pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN instruction."""
    installs = []
    for run in _dockerfile_instructions("RUN"):
        for tokens in _shell_commands(run):
            for i in range(len(tokens) - 1):
                if tokens[i].endswith("pip") and tokens[i + 1] == "install":
                    installs.append(tokens[i + 2 :])
    return installs


def test_dockerfile_is_cuda_capable_and_installs_the_package():
    base = _dockerfile_instructions("FROM")[-1].split()[0]
    assert re.search(r"gpu|cuda", base), f"FROM {base}: use a CUDA-capable base image"
    installs = _pip_installs()
    assert any("." in args for args in installs), "the Dockerfile must `pip install .` this repository"
    pins = {arg for args in installs for arg in args}
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= pins or any(
        "torch==2.14.1" in run and "torchvision==0.29.1" in run for run in _dockerfile_instructions("RUN")
    ), "pin torch==2.14.1 and torchvision==0.29.1"
    assert (REPO / "pyproject.toml").is_file(), "`pip install .` needs pyproject.toml at the repository root"


def test_dockerfile_bakes_no_weights():
    body = " ".join(
        _dockerfile_instructions("RUN") + _dockerfile_instructions("COPY") + _dockerfile_instructions("ADD")
    )
    forbidden = (
        r"snapshot_download|from_pretrained|hf download|huggingface-cli download|\.safetensors|\.ckpt|\.bin\b"
    )
    assert not re.search(forbidden, body), "model weights come from a mounted cache, not the image"
    env = " ".join(_dockerfile_instructions("ENV"))
    assert "HF_HOME=" in env, "point HF_HOME at the mounted model cache"


def test_the_entrypoint_executable_is_the_package_script():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})
    assert scripts.get(EXECUTABLE) == "pipeline.cli:app", scripts


def test_dockerfile_installs_dependencies_before_copying_the_code():
    """A code change rebuilds only the layers after `COPY . .`: the dependencies are installed before it."""
    steps = []  # (instruction, arguments), continuation lines joined
    for line in re.sub(r"\\\n", " ", (REPO / "cluster" / "Dockerfile").read_text()).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            steps.append((instruction.upper(), args))
    copy_all = next(i for i, (ins, args) in enumerate(steps) if ins == "COPY" and re.search(r"\s\.\s+\.$", " " + args))
    dependency_install = next(i for i, (ins, args) in enumerate(steps)
                              if ins == "RUN" and "pip install" in args and "--no-deps" not in args and " . " in f"{args} ")
    assert dependency_install < copy_all, "install the dependencies before `COPY . .`"
    earlier_copies = [args for ins, args in steps[:copy_all] if ins == "COPY"]
    assert earlier_copies and all("pyproject.toml" in a and " . " not in f" {a} " for a in earlier_copies)
    assert any(ins == "RUN" and "--no-deps" in args for ins, args in steps[copy_all:]), "then the code alone"


@pytest.mark.slow
def test_the_image_installs_the_code_not_the_dependency_layers_stand_ins(tmp_path):
    """The Dockerfile's two install layers, played here outside Docker: its RUN commands as written, each
    `pip install ... .` a wheel build (the same in-place setuptools build, without the network), `COPY . .`
    a copy that keeps the checkout's older file times, as COPY does. The code layer's wheel must carry the
    real packages: a build/ left by the first layer made setuptools keep its empty stand-in __init__.py."""
    import tarfile
    import zipfile

    steps = []
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            steps.append((instruction.upper(), args.strip()))
    copy_all = next(i for i, (ins, args) in enumerate(steps) if ins == "COPY" and args.split()[-2:] == [".", "."])
    first = next(i for i, (ins, args) in enumerate(steps) if ins == "COPY" and "pyproject.toml" in args)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(checkout, filter="data")
    for path in [checkout, *checkout.rglob("*")]:
        os.utime(path, (1.7e9, 1.7e9))  # a checkout older than anything the build writes
    context = tmp_path / "image"
    context.mkdir()
    for name in steps[first][1].split()[1:-1]:  # COPY [--chown=...] pyproject.toml README.md ./
        if not name.startswith("--"):
            shutil.copy2(checkout / name, context / name)
    wheels = []

    def play(run: str) -> None:
        for command in (c.strip() for c in run.split("&&")):
            words = command.split()
            if words[:2] == ["pip", "install"] and "." in words:
                wheels.append(tmp_path / f"wheels{len(wheels)}")
                subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                "-w", str(wheels[-1]), "."], cwd=context, check=True, capture_output=True)
            elif words[0] in ("mkdir", "touch", "rm"):
                subprocess.run(["bash", "-c", command], cwd=context, check=True)

    for instruction, args in steps[first + 1 : copy_all]:
        if instruction == "RUN":
            play(args)
    shutil.copytree(checkout, context, dirs_exist_ok=True)  # COPY . . (file times kept)
    for instruction, args in steps[copy_all + 1 :]:
        if instruction == "RUN":
            play(args)
    assert len(wheels) == 2, "a dependency layer and a code layer, each `pip install ... .`"
    (wheel,) = wheels[-1].glob("*.whl")
    with zipfile.ZipFile(wheel) as built:
        for package in ("freecustom_core", "stages", "pipeline"):
            assert built.read(f"{package}/__init__.py") == (checkout / package / "__init__.py").read_bytes(), package


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_gpu_workers_scale_from_zero(path: Path):
    (doc,) = _load_all(path)
    spec = _cluster_spec(doc)
    assert spec.get("enableInTreeAutoscaling") is True, f"{path.name}: enable the in-tree autoscaler"
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1, f"{path.name}: the GPU group scales from zero"


# --- the nightly render: RayCronJob, offline pods, /dev/shm ----------------------------------

# RayCronJobSpec of KubeRay 1.6 (ray-operator/apis/ray/v1/raycronjob_types.go): jobTemplate, schedule,
# suspend; timeZone only from 1.7, so a file that sets it is refused by a 1.6 API server
RAYCRONJOB_FIELDS_1_6 = {"jobTemplate", "schedule", "suspend"}
DAY_S = 24 * 3600


def _quantity_bytes(value: str | int) -> int:
    """A Kubernetes quantity (``5Gi``, ``512Mi``, ``4294967296``) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    assert match, f"quantity {value!r}"
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9,
             "T": 10**12}
    return int(match.group(1)) * scale[match.group(2)]


def test_raycronjob_runs_the_rayjob_every_night():
    """The RayCronJob creates the RayJob of rayjob.yaml (one place to edit), with fields KubeRay 1.6 knows."""
    (cron,) = _load_all(RAYCRONJOB)
    (job,) = _load_all(RAYJOB)
    assert set(cron["spec"]) <= RAYCRONJOB_FIELDS_1_6, sorted(cron["spec"])
    assert cron["spec"]["jobTemplate"] == job["spec"], "raycronjob.yaml's jobTemplate must be rayjob.yaml's spec"
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and fields[2:] == ["*", "*", "*"], f"a daily schedule: {cron['spec']['schedule']!r}"
    assert fields[0].isdigit() and fields[1].isdigit(), "one start time a day (minute hour * * *)"


def test_a_night_ends_within_its_utc_day():
    """Every attempt of a night (KubeRay restarts activeDeadlineSeconds on each retry) ends before
    midnight UTC, an hour to spare: retries write the same dated folder and nights never overlap."""
    (cron,) = _load_all(RAYCRONJOB)
    minute, hour = (int(f) for f in cron["spec"]["schedule"].split()[:2])
    template = cron["spec"]["jobTemplate"]
    deadline = template.get("activeDeadlineSeconds")
    assert isinstance(deadline, int) and deadline > 0, "set activeDeadlineSeconds"
    attempts = template.get("backoffLimit", 0) + 1
    assert hour * 3600 + minute * 60 + attempts * deadline <= DAY_S - 3600, (
        f"{hour:02d}:{minute:02d} + {attempts} x {deadline} s runs past 23:00 UTC"
    )


def test_rayjob_runs_the_nightly_script_from_the_image():
    (job,) = _load_all(RAYJOB)
    tokens = shlex.split(job["spec"]["entrypoint"])
    (script,) = [t for t in tokens if Path(t).name == NIGHTLY.name]
    steps = [ln.strip().split(None, 1) for ln in DOCKERFILE.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    copy_all = next(i for i, s in enumerate(steps) if s[0] == "COPY" and s[1].split()[-2:] == [".", "."])
    workdir = [s[1] for s in steps[:copy_all] if s[0] == "WORKDIR"][-1]
    assert script == f"{workdir}/cluster/nightly.sh", f"the image has the repository at {workdir}"
    (inv,) = _yaml_invocations(RAYJOB)
    assert inv.options()["-o"] == f"/mnt/data/renders/{NIGHT}", "each night writes its own dated folder"
    assert _effective_settings(inv)["kv_cache"], "the nights share a --kv-cache"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_pod_is_offline_and_has_shm_for_its_object_store(path: Path):
    (doc,) = _load_all(path)
    spec = _cluster_spec(doc)
    for name, group in [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]:
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("HF_HUB_OFFLINE") == "1", f"{path.name} {name}: set HF_HUB_OFFLINE=1"
        shm = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{path.name} {name}: mount a memory emptyDir at /dev/shm (Ray's object store)"
        (volume,) = [v for v in pod["volumes"] if v["name"] == shm[0]["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        store = group["rayStartParams"].get("object-store-memory")
        assert store, f"{path.name} {name}: size the object store (rayStartParams object-store-memory)"
        assert _quantity_bytes(store) <= _quantity_bytes(volume["emptyDir"]["sizeLimit"]), (
            f"{path.name} {name}: object store {store} does not fit /dev/shm {volume['emptyDir']['sizeLimit']}"
        )
        memory = _quantity_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
        assert _quantity_bytes(volume["emptyDir"]["sizeLimit"]) <= memory // 2, f"{path.name} {name}: shm vs memory"


def test_launcher_nodes_are_offline():
    (config,) = _load_all(LAUNCHER)
    assert "-e HF_HUB_OFFLINE=1" in config["docker"]["run_options"]


# --- nightly.sh: which earlier nights a night reuses ----------------------------------------


@pytest.fixture
def renders(tmp_path: Path) -> Path:
    if shutil.which(EXECUTABLE, path=_nightly_env()["PATH"]) is None:
        pytest.skip(f"{EXECUTABLE} is not installed next to {sys.executable}")
    return tmp_path / "renders"


def _night_folder(renders: Path, night: str, *, started: bool = True, finished: bool = True) -> Path:
    """What a night leaves: _run.json once its run started, _stats.json once it reached its report."""
    folder = renders / night
    folder.mkdir(parents=True)
    if started:
        (folder / "_run.json").write_text(json.dumps({"model": "m", "image_format": "png"}))
    if finished:
        (folder / "_stats.json").write_text(json.dumps({"complete": True, "samples_written": 4}))
    return folder


def _reused(run_argv: list[str]) -> list[str]:
    return [run_argv[i + 1] for i, a in enumerate(run_argv) if a == "--reuse"]


def test_nightly_first_night_renders_everything(renders: Path):
    argv = _nightly_dry_run([str(renders), "m.parquet", "--kv-cache", "/kv"], night="2026-03-01")
    assert argv == ["run", "m.parquet", "-o", f"{renders}/2026-03-01", "--kv-cache", "/kv"]
    renders.mkdir()  # an empty RENDERS, and one with only tonight's folder (a retry): the same
    _night_folder(renders, "2026-03-01", finished=False)
    assert _reused(_nightly_dry_run([str(renders), "m.parquet"], night="2026-03-01")) == []


def test_nightly_reuses_the_newest_finished_night(renders: Path):
    for night in ("2026-03-01", "2026-03-02"):
        _night_folder(renders, night)
    _night_folder(renders, "2026-03-04", finished=False)  # tonight's, from an earlier attempt: resumed, not reused
    _night_folder(renders, "2026-03-05")  # a later night (a --night rerun of an old night): not earlier
    (renders / "notes").mkdir()
    argv = _nightly_dry_run([str(renders), "m.parquet", "--device", "cuda"], night="2026-03-04")
    assert _reused(argv) == [f"{renders}/2026-03-02"]
    assert argv[argv.index("-o") + 1] == f"{renders}/2026-03-04" and argv[-2:] == ["--device", "cuda"]


def test_nightly_chain_survives_failed_nights(renders: Path):
    """An unfinished night (killed, deadline: no _stats.json) gives its finished shards and the chain goes on
    to the newest finished night; a night that never started (no _run.json) or is damaged is skipped."""
    _night_folder(renders, "2026-03-01")
    _night_folder(renders, "2026-03-02")
    _night_folder(renders, "2026-03-03", finished=False)
    _night_folder(renders, "2026-03-04", started=False, finished=False)
    (_night_folder(renders, "2026-03-05", finished=False) / "_run.json").write_text("{")  # damaged: skipped
    done = _nightly("--dry-run", "--night", "2026-03-06", str(renders), "m.parquet")
    assert done.returncode == 0, done.stderr
    assert _reused(shlex.split(done.stdout)[1:]) == [f"{renders}/2026-03-03", f"{renders}/2026-03-02"]
    assert "2026-03-04: no output folder" in done.stderr and "2026-03-03: unfinished" in done.stderr
    assert "2026-03-05: unreadable" in done.stderr


@pytest.mark.parametrize("args, reason", [
    (["-o", "/elsewhere"], "the output folder is RENDERS/"),
    (["--out=/elsewhere"], "the output folder is RENDERS/"),
    (["--night", "2026-3-1"], "expected a date"),
])
def test_nightly_refuses_bad_arguments(renders: Path, args: list[str], reason: str):
    night, rest = (args[:2], []) if args[0] == "--night" else ([], args)
    done = _nightly("--dry-run", *night, str(renders), "m.parquet", *rest)
    assert done.returncode == 2 and reason in done.stderr, done.stderr


def test_nightly_spec_prints_the_build_before_the_run(renders: Path):
    done = _nightly("--dry-run", "--night", "2026-03-01", "--spec", "feed spec.yaml", str(renders), "m")
    assert done.returncode == 0, done.stderr
    assert shlex.split(done.stdout) == [EXECUTABLE, "run", "m", "-o", f"{renders}/2026-03-01"]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("nightly: would build: ")]
    assert shlex.split(line.removeprefix("nightly: would build: ")) == [
        EXECUTABLE, "manifest", "build", "feed spec.yaml", "-o", "m"]


def test_nightly_spec_builds_tonights_manifest_or_stops_the_night(renders: Path, tmp_path: Path):
    """A spec that does not build stops the night before anything runs (exit 2, no night folder); one that
    builds writes the manifest the run then reads (here the run refuses a bad option: exit 2 after the build)."""
    import pyarrow.parquet as pq

    from manifests.examples.catalog import write_catalog

    spec = write_catalog(tmp_path / "cat")
    manifest = tmp_path / "manifest"
    spec.write_text(spec.read_text().replace("attributes: [title,", "attributes: [titel,"))
    done = _nightly("--night", "2026-03-01", "--spec", str(spec), str(renders), str(manifest))
    assert done.returncode == 2 and "unknown slot {title}" in done.stderr, done.stderr
    assert not manifest.exists() and not (renders / "2026-03-01").exists()
    spec.write_text(spec.read_text().replace("attributes: [titel,", "attributes: [title,"))
    done = _nightly("--night", "2026-03-01", "--spec", str(spec), str(renders), str(manifest),
                    "--samples-per-shard", "0")
    assert done.returncode == 2 and "samples-per-shard" in done.stderr, done.stderr
    assert len(pq.read_table(manifest)) == 50


def test_nightly_refuses_a_uri_for_renders():
    done = _nightly("--dry-run", "s3://bucket/renders", "m.parquet")
    assert done.returncode == 2 and "a local folder" in done.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_nightly_chain_end_to_end(tmp_path: Path, renders: Path, tiny_model_dir, ray_session):
    """Three real nights: the first renders everything; the second (a new row) is killed after its shards
    were written but one marker; the third (another new row) renders only its new row: the second night's
    new row and its marked shards come from it, the shard it lost from the first night."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.examples import write_example_manifest

    inputs = tmp_path / "inputs"
    manifests = [write_example_manifest(inputs, seeds_per_row=1)]  # 4 rows, one sample each
    rows = pq.read_table(manifests[0]).to_pylist()
    for night, new_id in ((2, "hat_studio"), (3, "hat_garden")):
        rows.append(dict(rows[3], id=new_id, prompt=f"a red hat, {new_id}", seeds=[7 + night]))
        manifests.append(inputs / f"night{night}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(manifests[0])), manifests[-1])
    options = ["--model", str(tiny_model_dir), "--num-inference-steps", "2", "--height", "64", "--width", "64",
               "--samples-per-shard", "2", "--kv-cache", str(tmp_path / "kv"), "--device", "cpu", "-q"]

    def night(n: int) -> tuple[list[str], dict]:
        argv = _nightly_dry_run([str(renders), str(manifests[n - 1]), *options], night=f"2026-03-0{n}")
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        return _reused(argv), json.loads((renders / f"2026-03-0{n}" / "_stats.json").read_text())

    reused, stats = night(1)
    assert reused == [] and stats["samples_rendered"] == 4
    reused, stats = night(2)
    assert reused == [f"{renders}/2026-03-01"] and (stats["samples_reused"], stats["samples_rendered"]) == (4, 1)
    killed = renders / "2026-03-02"
    (killed / "_stats.json").unlink()
    (killed / "_progress" / "00000.json").unlink()  # shard 0 was being written when the pod went

    reused, stats = night(3)
    assert reused == [f"{renders}/2026-03-02", f"{renders}/2026-03-01"]
    assert stats["complete"] and (stats["samples_reused"], stats["samples_rendered"]) == (5, 1)
    sources = {}
    for table in sorted((renders / "2026-03-03" / "shards").glob("*.parquet")):
        for meta in pq.read_table(table, columns=["metadata"])["metadata"].to_pylist():
            meta = json.loads(meta)
            sources[meta["id"]] = meta.get("reused_from", "")
    assert "2026-03-02" in sources["hat_studio"] and sources["hat_garden"] == ""
    first_shard = pq.read_table(killed / "shards" / "00000.parquet", columns=["id"])["id"].to_pylist()
    assert first_shard and all("2026-03-01" in sources[i] for i in first_shard)
