"""A small output folder written without Ray or a diffusion model, through the real writers
(``OutputFolder.prepare``, ``write_folder`` for references, ``stages.generation.generate.pack_shard``,
``stages.output.write.write_shard``), for the score and review tests: concept sets with references, masks and
contact sheets, shards of samples (optionally with further fields: attention maps, control conditions)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from freecustom_core.heatmap import maps_image
from stages.generation.generate import pack_shard
from stages.inputs.concepts import image_to_png, mask_to_png
from stages.output.folder import OutputFolder
from stages.output.layout import ATTENTION_FILE, control_file
from stages.output.write import parquet_bytes, write_shard

PROMPTS = [
    "a dog wearing a red hat",
    "a blue vase on a table",
    "a cat in the snow",
    "an oil painting of a hat",
]


def reference(colour: str, box, size=(72, 64), seed=0) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 90).astype(np.uint8))
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, np.asarray(mask) >= 128


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build_output(
    root: Path,
    *,
    samples_per_set=(5, 3),
    per_shard: int = 3,
    seed: int = 0,
    rejected: int = 0,
    attention: bool = False,
    control: int = 0,
    annotate: bool = False,
) -> dict:
    """Write the output folder; returns ``{"out": OutputFolder, "concept_sets": {id: [(image, mask)]},
    "samples": {key: (PIL image, metadata)}, "rejected": {key: (PIL image, metadata)}}``. Concept set
    ``cs1`` has two concepts, ``cs0`` one. The first ``rejected`` samples of ``cs0`` are written to
    ``rejected/00000.tar`` + ``.parquet`` (with ``rejected_by``) instead of ``shards/``. ``attention``:
    the samples of ``cs1`` also get ``<key>.attn.png`` (random maps drawn by ``maps_image``) and
    ``attention`` in their metadata, as ``run --save-attention`` writes them. ``control``: the samples of
    ``cs1`` also get that many control conditions, ``<key>.control.png``, ``<key>.control1.png``... (a
    canny-like edge map for the first, the given image, of another size, for the others) and ``control``
    in their metadata, as ``run --controlnet`` (repeated ``control`` times) writes them. ``annotate``: the
    samples of ``cs1`` also get ``annotations`` (concept 0 in the box [4 + seed, 8, 30, 40], concept 1 in
    [34, 20, 60, 56]), ``presence``, ``overlap`` and ``<key>.ann{i}.mask.png``, as ``run --annotate`` writes them."""
    folder = OutputFolder(str(root))
    folder.prepare({"image_format": "png", "test": "review_output"}, overwrite=False)
    sets = {
        "cs0": [reference("red", (10, 8, 50, 48), seed=seed + 1)],
        "cs1": [
            reference("blue", (20, 4, 60, 40), seed=seed + 2),
            reference("green", (5, 30, 40, 60), seed=seed + 3),
        ],
    }
    for cs, concepts in sets.items():
        files = {}
        for i, (image, mask) in enumerate(concepts):
            files[f"{i:02d}_reference.png"] = image_to_png(image)
            files[f"{i:02d}_mask.png"] = mask_to_png(mask)
        files["contact_sheet.png"] = _png(Image.new("RGB", (120, 40 * len(concepts)), (60, 60, 90)))
        folder.write_folder(OutputFolder.references(cs), files)
    rng = np.random.default_rng(seed)
    targets = []
    for (cs, concepts), n in zip(sets.items(), samples_per_set, strict=True):
        for s in range(n):
            row_id = f"{cs}_row{s % 2}"
            meta = {
                "key": f"{row_id}-{s}",
                "id": row_id,
                "seed": s,
                "prompt": PROMPTS[(s + len(cs)) % len(PROMPTS)],
                "negative_prompt": "",
                "concept_set_id": cs,
                "width": 64,
                "height": 64,
                "num_inference_steps": 2,
                "guidance_scale": 7.5,
                "concepts": [{"prompt": f"concept {i}"} for i in range(len(concepts))],
            }
            if attention and cs == "cs1":
                meta["attention"] = {"file": ATTENTION_FILE, "panels": len(concepts), "panel_size": [64, 64]}
            if control and cs == "cs1":
                meta["control"] = _control_record(control, s)
            if annotate and cs == "cs1":
                boxes = [[4 + s, 8, 30, 40], [34, 20, 60, 56]]
                meta.update(
                    annotations=[
                        {"box": b, "mask": f"ann{i}.mask.png", "confidence": 0.5, "source": "attention"}
                        for i, b in enumerate(boxes)
                    ],
                    presence=[0.3 + 0.1 * s, 0.2],
                    overlap=0.0,
                )
            image = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
            targets.append((image, meta))
    kept_out, targets = targets[:rejected], targets[rejected:]
    samples = {}
    for shard_id, start in enumerate(range(0, len(targets), per_shard)):
        chunk = targets[start : start + per_shard]
        metas = [dict(m, shard=shard_id) for _, m in chunk]
        write_shard(folder, shard_id, _tar(chunk), metas, [], expected=len(metas))
        samples.update({m["key"]: (image, m) for image, m in chunk})
    if kept_out:
        table = pq.read_table(io.BytesIO(parquet_bytes([m for _, m in kept_out])))
        table = table.append_column("rejected_by", pa.array(["clip_t<20"] * len(kept_out), pa.string()))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        folder.write("rejected/00000.tar", _tar(kept_out))
        folder.write("rejected/00000.parquet", buf.getvalue())
    return {
        "out": folder,
        "concept_sets": sets,
        "samples": samples,
        "rejected": {m["key"]: (i, m) for i, m in kept_out},
    }


def _control_record(n: int, seed: int) -> dict:
    """A sample's ``control`` metadata with ``n`` ControlNets: the first gets a canny map, the others the
    image as given (the fields of ``stages.generation.generate``'s records that the review reads, and a few more)."""
    sources = [
        {
            "image": f"/data/layouts/layout{seed}_{k}.png",
            "type": "canny" if k == 0 else "none",
            **({"canny_low": 50.0, "canny_high": 150.0} if k == 0 else {}),
            "condition_digest": f"{seed:04d}{k:012d}",
        }
        for k in range(n)
    ]
    return {
        "controlnet": [f"/models/controlnet{k}" for k in range(n)],
        "scale": [0.8] * n,
        "start": [0.0] * n,
        "end": [1.0] * n,
        "control_references": False,
        "sources": sources,
    }


def _control_png(meta: dict, k: int) -> bytes:
    """Condition ``k`` of a sample: white edges on black (canny), or a coloured layout of 48x80 (none)."""
    if k == 0:
        edges = Image.new("RGB", (64, 64))
        ImageDraw.Draw(edges).rectangle((8 + meta["seed"], 12, 50, 52), outline="white")
        return _png(edges)
    layout = Image.new("RGB", (48, 80), (30 * k, 90, 160))
    ImageDraw.Draw(layout).ellipse((4, 10, 40, 70), fill=(220, 200, 40))
    return _png(layout)


def _tar(chunk) -> bytes:
    """The shard's tar through the pipeline's writer; further fields as ``extra_fields`` names them."""
    extras = {}
    for _, meta in chunk:
        key = meta["key"]
        if "attention" in meta:
            maps = np.random.default_rng(meta["seed"]).random((meta["attention"]["panels"], 8, 8))
            extras[f"{key}.{ATTENTION_FILE}"] = _png(maps_image(maps, (64, 64)))
        for k in range(len(meta.get("control", {}).get("sources", []))):
            extras[f"{key}.{control_file(k)}"] = _control_png(meta, k)
        for note in meta.get("annotations", []):
            mask = np.zeros((meta["height"], meta["width"]), dtype=bool)
            x0, y0, x1, y1 = note["box"]
            mask[y0:y1, x0:x1] = True
            extras[f"{key}.{note['mask']}"] = mask_to_png(mask)
    return pack_shard([(m["key"], "png", _png(image), m) for image, m in chunk], extras)
