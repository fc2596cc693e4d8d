"""The CLI driver's peak memory on the built-in example, against a driver that imports torch (the baseline).

Runs ``freecustom-pipeline run`` on the example manifest with a tiny model, twice in this one invocation,
each in a fresh process that starts its own local Ray, and prints each driver's peak RSS
(``getrusage(RUSAGE_SELF)``: the driver alone, not its Ray workers) and their ratio:

* ``driver``: the CLI as users run it (only the actors import torch and diffusers);
* ``torch-in-driver``: the same command after ``import torch; torch.cuda.is_available()`` in the driver,
  which is what a driver that counted GPUs through torch did before it started Ray.

    python benchmarks/driver_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import atexit, json, resource, runpy, sys
if sys.argv[1] == "torch-in-driver":
    import torch
    torch.cuda.is_available()
report = sys.argv[2]
atexit.register(lambda: open(report, "w").write(json.dumps(
    {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
     "torch": "torch" in sys.modules})))
sys.argv = ["freecustom-pipeline", *sys.argv[3:]]
runpy.run_module("pipeline.cli", run_name="__main__")
"""


SETUP = """
import sys
from pathlib import Path
from pipeline.examples import write_example_manifest
from pipeline.tiny_model import build_tiny_sd15
build_tiny_sd15(Path(sys.argv[1]) / "model", seed=0)
print(write_example_manifest(Path(sys.argv[1]) / "inputs"))
"""


def main() -> None:
    # the model is built in a process of its own: a child's peak RSS starts at its parent's (Linux keeps
    # ru_maxrss across fork and exec), so this process stays small and never imports torch
    work = Path(tempfile.mkdtemp(prefix="freecustom-driver-memory-"))
    setup = subprocess.run([sys.executable, "-c", SETUP, str(work)], cwd=ROOT, capture_output=True, text=True,
                           check=True)
    model, manifest = work / "model", setup.stdout.split()[-1]
    found = {}
    for case in ("driver", "torch-in-driver"):
        report = work / f"{case}.json"
        cmd = [sys.executable, "-c", DRIVER, case, str(report), "run", str(manifest), "-o", str(work / case),
               "--model", str(model), "--num-inference-steps", "2", "--height", "64", "--width", "64", "-q"]
        done = subprocess.run(cmd, cwd=ROOT, env={"RAY_ADDRESS": "local", **_env()}, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{case}: exit {done.returncode}\n{done.stderr[-3000:]}")
        found[case] = json.loads(report.read_text())
        print(f"{case:16s} peak RSS {found[case]['peak_mib']:7.1f} MiB  torch imported: {found[case]['torch']}")
    ratio = found["driver"]["peak_mib"] / found["torch-in-driver"]["peak_mib"]
    print(f"ratio driver / torch-in-driver: {ratio:.2f}")


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


if __name__ == "__main__":
    main()
