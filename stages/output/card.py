"""The output folder's dataset card (``README.md`` in OUT): what the samples are and how to read them.

Its YAML front matter names the samples for Hugging Face ``datasets``: ``configs`` point the
webdataset builder at ``shards/*.tar``, so ``datasets.load_dataset(OUT)`` loads the images with
their metadata (without it, ``datasets`` takes the reference previews under ``references/`` for an
image folder). The per-shard Parquet files sit beside the tars and are not matched by the pattern.
"""

from __future__ import annotations

import json

import yaml

from .layout import ERRORS_FILE, PROGRESS, REFERENCES, RUN_FILE, SHARDS, STATS_FILE


def card_front_matter() -> dict:
    """The card's YAML front matter: one ``default`` config, the shards' tars as its ``train`` split."""
    return {
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": f"{SHARDS}/*.tar"}]}
        ],
        "task_categories": ["text-to-image"],
        "tags": ["freecustom", "synthetic", "webdataset"],
    }


def training_lines(settings: dict) -> str:
    """The card's lines on ``run --embed-references`` and ``--annotate`` (empty without them)."""
    lines = ""
    if settings.get("embed_references"):
        lines += ("\n- references embedded: each sample also has `<id>-<seed>.ref0.png`, `<id>-<seed>.ref0.mask.png`, "
                  "`ref1.png`, ... (each concept's reference and mask as the engine took them, at the image's size), "
                  "named by `embedded_references` in its JSON and the Parquet columns `reference_fields`, "
                  "`reference_mask_fields`")
    if settings.get("annotate"):
        lines += ("\n- annotated: per concept a box `[x0, y0, x1, y1]` (pixels), a mask `<id>-<seed>.ann0.mask.png`, "
                  "`ann1.mask.png`, ..., a confidence and its source, in `annotations` in the JSON; `presence` per "
                  "concept and `overlap` (largest IoU of two concepts' masks); Parquet columns `boxes`, "
                  "`annotation_masks`, `confidence`, `presence`, `overlap`. Boxes come from coarse attention "
                  "maps: see the pipeline's docs/training-data.md")
    return lines


def dataset_card(stats: dict, settings: dict) -> str:
    """The card's text. ``stats``: the run's ``_stats.json``; ``settings``: its identity (``_run.json``)."""
    image_format = settings.get("image_format", "png")
    defaults = settings.get("defaults") or {}
    front = yaml.safe_dump(card_front_matter(), sort_keys=False)
    status = "complete" if stats.get("complete") else "incomplete (rerun the same command to finish it)"
    controlnet = settings.get("controlnet")
    control = (f"\n- ControlNet: `{', '.join(controlnet['ids'])}`; each sample also has `<id>-<seed>.control.png`, "
               "the condition fed to ControlNet, and `control` in its JSON") if controlnet else ""
    control += training_lines(settings)
    return f"""---
{front}---

# FreeCustom renders

Images rendered by freecustom-pipeline with FreeCustom (CVPR 2024,
tuning-free multi-concept customization) from a Parquet manifest: one sample per manifest row
and seed, in WebDataset shards.

- samples: {stats.get("samples_written", 0)} of {stats.get("samples_expected", 0)} expected, \
{stats.get("shards", 0)} shards; manifest rows: {stats.get("rows", 0)}, failed: {stats.get("rows_failed", 0)}
- status: {status}
- model: `{settings.get("model")}` ({settings.get("dtype")}, scheduler `{settings.get("scheduler")}`){control}
- defaults: `{json.dumps(defaults, sort_keys=True)}`

## Files

| path | content |
|---|---|
| `{SHARDS}/NNNNN.tar` | per sample `<id>-<seed>.{image_format}` and `<id>-<seed>.json` (its full metadata) |
| `{SHARDS}/NNNNN.parquet` | one row per sample of that tar: `key`, `id`, `seed`, `prompt`, ..., `metadata` (the JSON), \
and the manifest's pass-through columns with their types |
| `{ERRORS_FILE}` | one row per failed manifest row |
| `{REFERENCES}/` | reference previews and contact sheets (not samples) |
| `{STATS_FILE}`, `{RUN_FILE}`, `{PROGRESS}/` | counts and timings; the settings; per-shard done markers |

## Reading

```python
import datasets; ds = datasets.load_dataset("OUT", split="train")       # images with their metadata
import webdataset as wds, glob; wds.WebDataset(sorted(glob.glob("OUT/{SHARDS}/*.tar"))).decode("pil")
import ray; ray.data.read_webdataset("OUT/{SHARDS}", file_extensions=["tar"])
import pandas as pd, glob; pd.read_parquet(sorted(glob.glob("OUT/{SHARDS}/*.parquet")))
import duckdb; duckdb.sql("SELECT * FROM 'OUT/{SHARDS}/*.parquet'")
```
"""
