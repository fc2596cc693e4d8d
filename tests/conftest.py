"""Shared fixtures: tiny random-weight SD1.5-topology models built, saved and loaded back for real."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# Tests never reach the Hugging Face Hub (their models are built locally): a hub id is looked up in the
# local cache only, here and in the Ray workers and CLI subprocesses that inherit the environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _threads_per_worker() -> int | None:
    """Under pytest-xdist (``-n auto``), each worker's share of the cores as its thread count; None alone.

    Every worker (and each Ray it starts) would otherwise run torch and OpenMP with one thread per core:
    n workers x n threads on n cores, and OpenMP threads that spin while they wait for one another. On 2
    cores that made the unit tests 2.7x slower than one thread per worker (tests/test_core_*.py, 106 s
    against 39 s). Set before torch is imported, so every process the tests start inherits it; an
    explicit OMP_NUM_THREADS is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


if (_THREADS := _threads_per_worker()) is not None:
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(_THREADS))
    if "torch" in __import__("sys").modules:  # imported by a plugin before this file: set it directly too
        __import__("torch").set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Every Ray the tests start (the session's, each ray.cluster_utils.Cluster node, each CLI subprocess's:
# Ray reads RAY_<setting> from the environment) keeps up to 8 idle worker processes instead of one per
# CPU. A run's planning and write tasks ask for fractions of a CPU, so on 2 CPUs it uses more task
# workers than 2; Ray killed the extra ones a second after they went idle, and the next run started new
# ones and imported Ray Data and the pipeline in each again (tests/test_reuse.py: 23 % of its CPU time).
os.environ.setdefault("RAY_num_workers_soft_limit", "8")

_REPO = Path(__file__).resolve().parents[1]
# The real sample cases: ../shared beside the checkout (or shared/ inside it, where a copy of the
# tree carries it). Tests read them through sample_root(), which falls back to a synthetic copy.
SHARED_DATA = _REPO.parent / "shared" / "data" / "freecustom-samples"
# FREECUSTOM_SAMPLES=<folder> reads the sample cases from there; a path that is no folder (e.g. /nonexistent) forces the synthetic copy.
SAMPLES_ENV = "FREECUSTOM_SAMPLES"


def real_samples() -> Path | None:
    """The folder of the real sample cases, or None when there is none (or the override hides it)."""
    override = os.environ.get(SAMPLES_ENV)
    if override:
        return Path(override) if Path(override).is_dir() else None
    return next((p for p in (SHARED_DATA, _REPO / "shared" / "data" / "freecustom-samples") if p.is_dir()), None)


def _remove_in(path: Path, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the handler
        shutil.rmtree(path, ignore_errors=True)


@functools.cache
def sample_root() -> Path:
    """The sample cases: the real ones when present, else a synthetic copy made once per process.

    A plain function (not only a fixture) because some tests parametrize over the files at
    collection time. The synthetic copy lives in a temporary folder removed at exit.
    """
    real = real_samples()
    if real is not None:
        return real
    from tests.samples import synthetic_samples

    tmp = Path(tempfile.mkdtemp(prefix="freecustom-samples-"))
    atexit.register(_remove_in, tmp, os.getpid())
    return synthetic_samples(tmp / "freecustom-samples")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """``sample_root()`` as a fixture."""
    return sample_root()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from pipeline.tiny_model import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"), seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    from pipeline.tiny_model import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15-other"), seed=1)


@pytest.fixture(scope="session")
def generator(tiny_model_dir):
    import torch

    from freecustom_core import FreeCustomGenerator

    return FreeCustomGenerator.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def release_pipe(tiny_model_dir):
    """The tiny model loaded the way the authors' release loads a model (``tests.oracle.release_pipeline``):
    its scheduler is the release's sampler as diffusers' pipeline leaves it, the oracle's for the default."""
    from tests.oracle import release_pipeline

    return release_pipeline(tiny_model_dir)


def draw_concept(color: str, box: tuple[int, int, int, int], prompt: str, *, size=(96, 96), mask_size=(48, 48),
                 weight: float = 3.0, ellipse: bool = False):
    """A synthetic concept: a coloured image with a textured shape and a grey-edged mask of another size."""
    from freecustom_core import ConceptRef

    rng = np.random.default_rng(abs(hash((color, box))) % 2**32)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 80).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    sx, sy = size[0] / mask_size[0], size[1] / mask_size[1]
    big = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    (draw.ellipse if ellipse else draw.rectangle)(big, fill=color)
    mask = Image.new("L", mask_size, 0)
    mdraw = ImageDraw.Draw(mask)
    mdraw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=100)  # a grey edge below 50 %
    (mdraw.ellipse if ellipse else mdraw.rectangle)(box, fill=255)
    return ConceptRef(image=image, mask=mask, prompt=prompt, weight=weight)


@pytest.fixture
def offline(monkeypatch):
    """No hub access, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"test: network connection to {address} refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == [], f"loading tried to connect to {attempts}"


@pytest.fixture
def concepts():
    return [
        draw_concept("red", (6, 6, 30, 30), "a red cube"),
        draw_concept("blue", (20, 4, 44, 20), "a blue hat", ellipse=True, weight=2.0),
        draw_concept("green", (0, 30, 47, 47), "green grass", weight=3.5),
    ]


RAY_INIT = dict(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
                logging_level="ERROR")


@contextlib.contextmanager
def ray_worker_hook(hook):
    """The test session's Ray restarted with ``hook`` run in every worker process as it starts (what a
    monkeypatch in the test process cannot reach: the pipeline's tasks and actors), then restarted plain."""
    import ray

    ray.shutdown()
    # the hook is unpickled as a worker starts, before Ray gives it the driver's sys.path: the repository
    # root (where ``tests`` is; an editable install maps only the project's packages) on its PYTHONPATH
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(**RAY_INIT, runtime_env={"worker_process_setup_hook": hook, "env_vars": {"PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()
        ray.init(**RAY_INIT)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (per pytest-xdist worker: each starts its own); a fake
    GPU so GPU actors schedule on the CPU. ``address="local"``: always a new Ray of its own, never the
    cluster named in /tmp/ray/ray_current_cluster (which a ``ray.cluster_utils.Cluster`` of another
    worker, or another session on the machine, writes)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(**RAY_INIT)
    yield ray


def pytest_configure(config):
    """Compile the project's modules to bytecode once, before any test (in the controller only, not in
    each xdist worker): every process the suite starts (each Ray worker and actor, each CLI subprocess)
    imports the project from source, and where ``PYTHONDONTWRITEBYTECODE`` is set (as on our CI
    machines) none of them writes the bytecode it compiled, so each compiled the modules it imports
    again (the generation stage's, run's and the CLI's: 0.20 CPU-s against 0.07 from bytecode, in each
    of a run's processes). Up to date, this is 0.04 s; a module changed since is compiled again."""
    if hasattr(config, "workerinput"):
        return
    import compileall

    for package in ("freecustom_core", "stages", "pipeline", "tests"):
        compileall.compile_dir(str(_REPO / package), quiet=2)


def pytest_collection_modifyitems(config, items):
    """A test that starts Ray runs the pipeline end to end (tens of seconds at least): ``ray`` implies
    ``slow``, so ``-m "not slow"`` is the unit tests (see docs/development.md)."""
    for item in items:
        if item.get_closest_marker("ray") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (``-n auto``), a module's tests go to one worker, so the module fixtures that
    many test files share (one real run read by many tests) are built once, not once per worker. An
    explicit ``--dist`` other than the default ``load`` is kept."""
    if config.getvalue("dist") == "load":
        from xdist.scheduler import LoadScopeScheduling

        return LoadScopeScheduling(config, log)
    return None


def authors_layout(tmp_path: Path, cases=None) -> tuple[Path, list[Path]]:
    """Recreate the FreeCustom authors' repository layout over the sample cases (symlinks)."""
    root = tmp_path / "FreeCustom"
    base = root / "dataset" / "freecustom" / "multi_concept"
    base.mkdir(parents=True)
    configs = []
    for case in sorted(sample_root().iterdir()):
        if not case.is_dir() or (cases and case.name not in cases):
            continue
        (base / case.name).symlink_to(case)
        configs.append(base / case.name / "config_stable_diffusion.yaml")
    return root, configs
