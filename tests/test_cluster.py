"""Static checks of ``cluster/``: the launcher config, the KubeRay manifests, the Dockerfile and
the commands in ``cluster/README.md``.

Every ``freecustom-pipeline`` command found in those files is checked twice: against the
option contract of issue 4 (an allow-list, below), and, once ``pipeline/cli.py`` exists,
against the real typer CLI (its click command, introspected). Nothing here needs Docker,
Kubernetes, AWS or a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
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
    },
    "validate": {"--root": True},
    "inspect": {"--sample": True},
    "manifest from-config": {"--root": True, "-o": True},
}
# positional arguments each subcommand takes: (min, max)
POSITIONALS = {"run": (1, 1), "validate": (1, 1), "inspect": (1, 1), "manifest from-config": (1, None)}
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
        if self.argv[:2] == ("manifest", "from-config"):
            return "manifest from-config"
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


def _argvs_in_shell(text: str) -> Iterator[list[str]]:
    """The argument lists following each ``freecustom-pipeline`` in a shell snippet."""
    for line in text.replace("\\\n", " ").splitlines():
        if EXECUTABLE in line:
            for command in _shell_commands(line):
                if EXECUTABLE in command:
                    yield command[command.index(EXECUTABLE) + 1 :]


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
    for path in (LAUNCHER, RAYCLUSTER, RAYJOB, DOCKERFILE, README):
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


def test_cluster_entrypoints_run_on_the_cluster():
    """Every command in a YAML file is a `run` joining the cluster (--address auto) that requests GPUs
    whatever the cluster has at start (--device cuda: an autoscaler adds GPU nodes from zero)."""
    invocations = [inv for path in _yaml_files() for inv in _yaml_invocations(path)]
    for inv in invocations:
        assert inv.subcommand == "run", f"{inv.source}: cluster entrypoints run `run`, got {inv.argv}"
        assert inv.options().get("--device") == "cuda", f"{inv.source}: pass --device cuda on a cluster"
        assert inv.options().get("--address") == "auto", f"{inv.source}: add --address auto"


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


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in (RAYCLUSTER, RAYJOB) for doc in _load_all(path)]


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
    kinds = {path.name: [doc["kind"] for doc in _load_all(path)] for path in (RAYCLUSTER, RAYJOB)}
    assert kinds == {"raycluster.yaml": ["RayCluster"], "rayjob.yaml": ["RayJob"]}
    for path, doc in _kuberay_docs():
        assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: KubeRay's stable API is ray.io/v1"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
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


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_gpu_workers_scale_from_zero(path: Path):
    (doc,) = _load_all(path)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec.get("enableInTreeAutoscaling") is True, f"{path.name}: enable the in-tree autoscaler"
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1, f"{path.name}: the GPU group scales from zero"
