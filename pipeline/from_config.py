"""Import the FreeCustom authors' run configs (``config_stable_diffusion.yaml``) as a manifest.

One config becomes one manifest row:

=====================  ===========================================================
config key             manifest column
=====================  ===========================================================
(the config's folder)  ``id``
``target_prompt``      ``prompt``
``seeds``              ``seeds``
``ref_image_infos``    ``concepts[i].image`` / ``.prompt`` (in the config's order)
(image path)           ``concepts[i].mask``: the same path with ``/image/`` -> ``/mask/``
``mask_weights``       ``concepts[i].weight`` (in order; one per reference image)
``negative_prompt``    ``negative_prompt``
``style_fidelity``     ``style_fidelity``
``use_null_ref_...``   ``null_ref_prompts``
``start_step``         ``start_step``
``end_step``           ``end_step`` (50, the authors' full schedule, becomes null: all steps)
``layer_idx``          ``mrsa_blocks`` ([10..15] -> [5, 6]) or ``mrsa_layers`` (names)
=====================  ===========================================================

``target_prompt``, ``seeds``, ``ref_image_infos`` and ``mask_weights`` are required; the other
keys are optional (a missing one is a null, i.e. the run's default). ``model_path`` and ``gpu``
are ignored: the model is a run option (``--model``), and so are GPUs.

Image paths in the configs are relative to the authors' repository root
(``dataset/freecustom/multi_concept/<case>/image/<name>.jpg``); they are resolved against
``root`` and written into the manifest as absolute paths, so the manifest can live anywhere.

Configs are read with ``yaml.safe_load`` only: a config is data, and a tag such as
``!!python/object/apply:os.system`` is refused, never run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.manifest import ID_PATTERN, MANIFEST_SCHEMA

__all__ = [
    "FROM_CONFIG_COLUMNS",
    "FROM_CONFIG_SCHEMA",
    "ConfigImportError",
    "SD15_TRANSFORMER_BLOCKS",
    "layer_idx_to_mrsa",
    "manifest_from_configs",
    "write_manifest",
]

# SD1.5's 16 transformer blocks in execution order; the authors' ``layer_idx`` indexes this.
SD15_TRANSFORMER_BLOCKS: tuple[str, ...] = (
    "down_blocks.0.attentions.0",  # 0
    "down_blocks.0.attentions.1",  # 1
    "down_blocks.1.attentions.0",  # 2
    "down_blocks.1.attentions.1",  # 3
    "down_blocks.2.attentions.0",  # 4
    "down_blocks.2.attentions.1",  # 5
    "mid_block.attentions.0",  # 6
    "up_blocks.1.attentions.0",  # 7
    "up_blocks.1.attentions.1",  # 8
    "up_blocks.1.attentions.2",  # 9
    "up_blocks.2.attentions.0",  # 10
    "up_blocks.2.attentions.1",  # 11
    "up_blocks.2.attentions.2",  # 12
    "up_blocks.3.attentions.0",  # 13
    "up_blocks.3.attentions.1",  # 14
    "up_blocks.3.attentions.2",  # 15
)
# The paper's default: the last two attention-bearing up blocks. Its block numbering counts
# attention-bearing blocks: down 0..2, mid 3, up 4..6 (SD1.5's up_blocks.0 has no attention).
_PAPER_LAYER_IDX = tuple(range(10, 16))
_PAPER_BLOCKS = (5, 6)

# The columns an import writes; their types are the manifest's (pipeline/manifest.py).
FROM_CONFIG_COLUMNS = (
    "id",
    "prompt",
    "seeds",
    "concepts",
    "negative_prompt",
    "style_fidelity",
    "null_ref_prompts",
    "start_step",
    "end_step",
    "mrsa_blocks",
    "mrsa_layers",
)
FROM_CONFIG_SCHEMA = pa.schema([MANIFEST_SCHEMA.field(name) for name in FROM_CONFIG_COLUMNS])

_REQUIRED_KEYS = ("target_prompt", "seeds", "ref_image_infos", "mask_weights")
_MAX_CONCEPTS = 8
_MAX_SEED = 2**63


class ConfigImportError(ValueError):
    """A config could not be imported; the message names the file and the key at fault."""


AUTHORS_NUM_STEPS = 50  # the release's pipeline default; its configs' end_step is relative to it


def manifest_from_configs(
    config_paths: Sequence[str | os.PathLike[str]],
    *,
    root: str | os.PathLike[str],
    check_files: bool = True,
    relative_to: str | os.PathLike[str] | None = None,
) -> pa.Table:
    """Build a manifest table (``FROM_CONFIG_SCHEMA``), one row per config, in the given order.

    ``root`` is the authors' repository root that the configs' image paths are relative to.
    With ``check_files`` (the default) every reference image and mask must exist. Image and mask
    paths are absolute, or relative to ``relative_to`` when given: the manifest's folder, against
    which a run resolves them, so the folder can move (or be uploaded) with its images.
    Raises ``ConfigImportError`` naming the file and key of the first problem.
    """
    if not config_paths:
        raise ConfigImportError("no config files given")
    root_dir = Path(root)
    if check_files and not root_dir.is_dir():
        raise ConfigImportError(f"--root {str(root)!r} is not a folder")

    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for config_path in config_paths:
        row = _row_from_config(Path(config_path), root_dir, check_files=check_files)
        if row["id"] in seen:
            raise ConfigImportError(
                f"{config_path}: row id {row['id']!r} (the config's folder name) is already used by "
                f"{seen[row['id']]}; ids must be unique, so keep each config in its own folder"
            )
        seen[row["id"]] = str(config_path)
        if relative_to is not None:
            for concept in row["concepts"]:
                for key in ("image", "mask"):
                    concept[key] = _relative(concept[key], Path(relative_to))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=FROM_CONFIG_SCHEMA)


def write_manifest(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as Parquet at ``path``: to a temporary file beside it, then rename.

    A reader never sees a half-written manifest. Returns the final path.
    """
    import pyarrow.parquet as pq

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; cluster nodes may read as another user
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def layer_idx_to_mrsa(
    layer_idx: Any, *, source: str = "layer_idx"
) -> tuple[list[int] | None, list[str] | None]:
    """Map the authors' ``layer_idx`` to ``(mrsa_blocks, mrsa_layers)``; exactly one is not None.

    [10..15] (any order) is the paper's default and maps to blocks [5, 6]; any other set maps
    to the self-attention layer names of those transformer blocks, in the order given.
    ``source`` prefixes error messages (e.g. the config file).
    """
    if not isinstance(layer_idx, list) or not layer_idx:
        raise ConfigImportError(
            f"{source}: layer_idx must be a non-empty list of integers in 0..15, got {layer_idx!r}"
        )
    indices: list[int] = []
    for value in layer_idx:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigImportError(f"{source}: layer_idx holds {value!r}, which is not an integer")
        if not 0 <= value < len(SD15_TRANSFORMER_BLOCKS):
            raise ConfigImportError(
                f"{source}: layer_idx holds {value}, outside 0..15 (SD1.5 has 16 transformer "
                "blocks, counted in execution order from down_blocks.0.attentions.0)"
            )
        if value not in indices:
            indices.append(value)
    if sorted(indices) == list(_PAPER_LAYER_IDX):
        return list(_PAPER_BLOCKS), None
    return None, [f"{SD15_TRANSFORMER_BLOCKS[i]}.transformer_blocks.0.attn1" for i in indices]


# --- one config -> one row ---------------------------------------------------------------


def _row_from_config(config_path: Path, root: Path, *, check_files: bool) -> dict[str, Any]:
    config = _load_config(config_path)
    src = str(config_path)
    for key in _REQUIRED_KEYS:
        if key not in config:
            raise ConfigImportError(f"{src}: missing required key {key!r}")

    row_id = config_path.absolute().parent.name
    if not ID_PATTERN.fullmatch(row_id):
        raise ConfigImportError(
            f"{src}: the config's folder name {row_id!r} is the row id and must match [A-Za-z0-9_-]{{1,128}}"
        )

    mrsa_blocks = mrsa_layers = None
    if config.get("layer_idx") is not None:
        mrsa_blocks, mrsa_layers = layer_idx_to_mrsa(config["layer_idx"], source=src)

    start_step = _optional_int(config, "start_step", src)
    end_step = _optional_int(config, "end_step", src)
    if start_step is not None and end_step is not None and start_step >= end_step:
        raise ConfigImportError(f"{src}: start_step ({start_step}) must be below end_step ({end_step})")

    return {
        "id": row_id,
        "prompt": _text(config["target_prompt"], "target_prompt", src),
        "seeds": _seeds(config["seeds"], src),
        "concepts": _concepts(config, root, src, check_files=check_files),
        "negative_prompt": (
            None
            if config.get("negative_prompt") is None
            else _text(config["negative_prompt"], "negative_prompt", src, allow_empty=True)
        ),
        "style_fidelity": _style_fidelity(config.get("style_fidelity"), src),
        "null_ref_prompts": _optional_bool(config, "use_null_ref_prompts", src),
        "start_step": start_step,
        # the authors always ran 50 steps, so their end_step 50 means "through the last step":
        # import it as null, which keeps that meaning at any --num-inference-steps
        "end_step": None if end_step == AUTHORS_NUM_STEPS else end_step,
        "mrsa_blocks": mrsa_blocks,
        "mrsa_layers": mrsa_layers,
    }


def _load_config(config_path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigImportError(f"{config_path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigImportError(f"{config_path}: cannot read the config: {e}") from None
    try:
        config = yaml.safe_load(text)  # data only: python/object tags are refused
    except yaml.YAMLError as e:
        raise ConfigImportError(f"{config_path}: not a valid YAML config (safe loader): {e}") from None
    if not isinstance(config, dict):
        raise ConfigImportError(
            f"{config_path}: a config must be a YAML mapping of keys, got {type(config).__name__}"
        )
    return config


def _concepts(config: dict[str, Any], root: Path, src: str, *, check_files: bool) -> list[dict[str, Any]]:
    infos = config["ref_image_infos"]
    if not isinstance(infos, Mapping) or not infos:
        raise ConfigImportError(
            f"{src}: ref_image_infos must be a non-empty mapping of image path -> concept prompt, got {infos!r}"
        )
    if len(infos) > _MAX_CONCEPTS:
        raise ConfigImportError(
            f"{src}: ref_image_infos has {len(infos)} reference images; at most {_MAX_CONCEPTS} are supported"
        )
    weights = config["mask_weights"]
    if not isinstance(weights, list):
        raise ConfigImportError(f"{src}: mask_weights must be a list of numbers, got {weights!r}")
    if len(weights) != len(infos):
        raise ConfigImportError(
            f"{src}: mask_weights has {len(weights)} values but ref_image_infos has {len(infos)} "
            "reference images; give one weight per image, in the same order"
        )

    concepts = []
    for (image, prompt), weight in zip(infos.items(), weights, strict=True):
        if not isinstance(image, str) or not image.strip():
            raise ConfigImportError(f"{src}: ref_image_infos has a key {image!r} that is not an image path")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ConfigImportError(f"{src}: mask_weights holds {weight!r}; weights must be positive numbers")
        if "/image/" not in image:
            raise ConfigImportError(
                f"{src}: ref_image_infos path {image!r} has no '/image/' folder, so its mask "
                "(the same path with '/image/' -> '/mask/') cannot be found"
            )
        image_path = _resolve(image, root)
        mask_path = _resolve(image.replace("/image/", "/mask/"), root)
        if check_files:
            for kind, path in (("image", image_path), ("mask", mask_path)):
                if not Path(path).is_file():
                    raise ConfigImportError(
                        f"{src}: ref_image_infos {image!r}: {kind} file {path} does not exist "
                        f"(config paths resolve against --root {str(root)!r}, the authors' repository root)"
                    )
        concepts.append(
            {
                "image": image_path,
                "prompt": _text(prompt, f"ref_image_infos[{image!r}]", src),
                "mask": mask_path,
                "weight": float(weight),
                "box": None,
                "points": None,
                "label": None,
                "context": None,
            }
        )
    return concepts


def _resolve(path: str, root: Path) -> str:
    p = Path(path)
    return os.path.abspath(p if p.is_absolute() else root / p)


def _relative(path: str, folder: Path) -> str:
    """``path`` relative to ``folder`` with ``/`` separators (absolute where no relative path exists: another
    drive)."""
    try:
        return Path(os.path.relpath(path, os.path.abspath(folder))).as_posix()
    except ValueError:
        return path


def _seeds(seeds: Any, src: str) -> list[int]:
    if not isinstance(seeds, list) or not seeds:
        raise ConfigImportError(f"{src}: seeds must be a non-empty list of integers, got {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
            raise ConfigImportError(f"{src}: seeds holds {seed!r}; seeds are integers in [0, 2**63)")
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise ConfigImportError(f"{src}: seeds repeats {duplicates}; each seed must appear once")
    return list(seeds)


def _text(value: Any, key: str, src: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or not (allow_empty or value.strip()):
        raise ConfigImportError(f"{src}: {key} must be non-empty text, got {value!r}")
    return value


def _style_fidelity(value: Any, src: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigImportError(f"{src}: style_fidelity must be a number in [0, 1], got {value!r}")
    return float(value)


def _optional_bool(config: dict[str, Any], key: str, src: str) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigImportError(f"{src}: {key} must be True or False, got {value!r}")
    return value


def _optional_int(config: dict[str, Any], key: str, src: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigImportError(f"{src}: {key} must be a non-negative integer, got {value!r}")
    return value
