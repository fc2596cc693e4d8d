"""Importing the FreeCustom authors' run configs as a manifest (``pipeline.from_config``).

The five sample cases are the input: the shared ones (``../shared/data/freecustom-samples``)
when present, else their synthetic copy (tests/samples.py: the same configs, drawn pictures).
Their configs name images relative to the authors' repository root
(``dataset/freecustom/multi_concept/<case>/image/...``), so the test recreates that layout in
``tmp_path`` with symlinks to the case folders. Error cases use a small synthetic case of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.from_config import (
    FROM_CONFIG_SCHEMA,
    ConfigImportError,
    layer_idx_to_mrsa,
    manifest_from_configs,
    write_manifest,
)

CASES_DIR = Path("dataset") / "freecustom" / "multi_concept"
CONFIG_NAME = "config_stable_diffusion.yaml"

# What the five shared configs hold (read from the files once, by hand; the synthetic copy's match).
EXPECTED = {
    "cat_necklace": ("a cat wearing a necklace", [15207, 20394], [2.0, 3.0]),
    "cat_phone": ("a cat holding a phone", [16, 27349, 394353], [3.0, 3.0]),
    "dog_flower": (
        "a dog with flowers around the neck",
        [69, 88, 100, 278, 5765, 9358, 394353, 970912],
        [3.0, 3.0],
    ),
    "dog_hat_sunglasses_0": (
        "a dog with sunglasses wearing a red and black hat",
        [2, 278, 9358, 324091, 53839932],
        [3.0, 3.0, 3.0],
    ),
    "dog_phone": ("a dog holding a phone", [393595], [3.0, 3.0]),
}


@pytest.fixture
def authors_repo(tmp_path: Path, samples_dir: Path) -> Path:
    """tmp_path laid out like the authors' repository, the sample cases linked in."""
    cases = tmp_path / CASES_DIR
    cases.mkdir(parents=True)
    for case in sorted(EXPECTED):
        assert (samples_dir / case / CONFIG_NAME).is_file(), f"sample case {case} is missing in {samples_dir}"
        (cases / case).symlink_to(samples_dir / case, target_is_directory=True)
    return tmp_path


def _configs(root: Path) -> list[Path]:
    return [root / CASES_DIR / case / CONFIG_NAME for case in sorted(EXPECTED)]


def test_imports_the_five_shared_cases(authors_repo: Path):
    table = manifest_from_configs([str(p) for p in _configs(authors_repo)], root=str(authors_repo))

    assert table.schema.equals(FROM_CONFIG_SCHEMA)
    assert table.schema.field("seeds").type == pa.list_(pa.int64())
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == sorted(EXPECTED)
    for row in rows:
        prompt, seeds, weights = EXPECTED[row["id"]]
        assert row["prompt"] == prompt
        assert row["seeds"] == seeds
        assert len(row["concepts"]) == len(weights)
        assert [c["weight"] for c in row["concepts"]] == weights
        for concept in row["concepts"]:
            image, mask = Path(concept["image"]), Path(concept["mask"])
            assert image.is_absolute() and image.is_file()
            assert image.is_relative_to(authors_repo / CASES_DIR / row["id"] / "image")
            assert mask.is_file() and mask == image.parent.parent / "mask" / image.name
            assert concept["prompt"]
            assert concept["box"] is None and concept["context"] is None
        assert row["mrsa_blocks"] == [5, 6]
        assert row["mrsa_layers"] is None
        assert row["negative_prompt"].startswith("lowres, bad anatomy")
        assert row["style_fidelity"] == 1.0
        assert row["null_ref_prompts"] is False
        assert (row["start_step"], row["end_step"]) == (0, None)

    necklace = rows[0]["concepts"]
    assert [c["prompt"] for c in necklace] == ["a cat", "a woman wearing a necklace"]
    assert [Path(c["image"]).name for c in necklace] == ["cat.jpg", "necklace.jpg"]


def test_write_manifest_round_trips_without_leftovers(authors_repo: Path, tmp_path: Path):
    table = manifest_from_configs(_configs(authors_repo), root=authors_repo)
    out = tmp_path / "manifests" / "freecustom.parquet"

    assert write_manifest(table, out) == out
    assert pq.read_table(out).equals(table)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left
    assert out.stat().st_mode & 0o044 == 0o044  # readable by the cluster's other users

    write_manifest(table.slice(0, 1), out)  # overwrite replaces the whole file
    assert pq.read_table(out).num_rows == 1


# --- synthetic cases: error paths and layer_idx -------------------------------------------


def _base_config(case: str) -> dict:
    prefix = f"{CASES_DIR.as_posix()}/{case}/image"
    return {
        "model_path": "runwayml/stable-diffusion-v1-5",
        "start_step": 0,
        "end_step": 50,
        "layer_idx": [10, 11, 12, 13, 14, 15],
        "seeds": [1, 2],
        "ref_image_infos": {f"{prefix}/a.jpg": "a cat", f"{prefix}/b.jpg": "a hat"},
        "target_prompt": "a cat wearing a hat",
        "use_null_ref_prompts": False,
        "mask_weights": [3.0, 2.5],
        "negative_prompt": "lowres",
        "style_fidelity": 1,
    }


def _write_case(root: Path, case: str, config: dict | str) -> Path:
    """A case folder with placeholder image/mask files and ``config`` (a dict or raw YAML)."""
    folder = root / CASES_DIR / case
    for sub in ("image", "mask"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for name in ("a.jpg", "b.jpg"):
            (folder / sub / name).write_bytes(b"placeholder")
    path = folder / CONFIG_NAME
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


def test_synthetic_case_defaults(tmp_path: Path):
    path = _write_case(tmp_path, "cat_hat", _base_config("cat_hat"))
    (row,) = manifest_from_configs([path], root=tmp_path).to_pylist()
    assert row["id"] == "cat_hat"
    assert [c["weight"] for c in row["concepts"]] == [3.0, 2.5]
    assert row["mrsa_blocks"] == [5, 6] and row["mrsa_layers"] is None


def test_other_layer_idx_map_to_layer_names(tmp_path: Path):
    config = _base_config("layers")
    config["layer_idx"] = [12, 13]
    path = _write_case(tmp_path, "layers", config)

    (row,) = manifest_from_configs([path], root=tmp_path).to_pylist()
    assert row["mrsa_blocks"] is None
    assert row["mrsa_layers"] == [
        "up_blocks.2.attentions.2.transformer_blocks.0.attn1",
        "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
    ]


def test_layer_idx_mapping_edges():
    assert layer_idx_to_mrsa([15, 14, 13, 12, 11, 10]) == ([5, 6], None)
    assert layer_idx_to_mrsa([0, 6]) == (
        None,
        [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
            "mid_block.attentions.0.transformer_blocks.0.attn1",
        ],
    )


@pytest.mark.parametrize("bad", [[10, 16], [-1], [True], [], "10"])
def test_bad_layer_idx_names_file_and_value(tmp_path: Path, bad):
    config = _base_config("bad_layers")
    config["layer_idx"] = bad
    path = _write_case(tmp_path, "bad_layers", config)
    with pytest.raises(ConfigImportError) as err:
        manifest_from_configs([path], root=tmp_path)
    assert str(path) in str(err.value)
    assert "layer_idx" in str(err.value)
    if bad == [10, 16]:
        assert "16" in str(err.value) and "0..15" in str(err.value)


@pytest.mark.parametrize("key", ["target_prompt", "seeds", "ref_image_infos", "mask_weights"])
def test_missing_required_key_names_file_and_key(tmp_path: Path, key: str):
    config = _base_config("missing")
    del config[key]
    path = _write_case(tmp_path, "missing", config)
    with pytest.raises(ConfigImportError, match=key) as err:
        manifest_from_configs([path], root=tmp_path)
    assert str(path) in str(err.value)


def test_optional_keys_become_nulls(tmp_path: Path):
    config = _base_config("minimal")
    for key in (
        "start_step",
        "end_step",
        "layer_idx",
        "use_null_ref_prompts",
        "negative_prompt",
        "style_fidelity",
    ):
        del config[key]
    (row,) = manifest_from_configs([_write_case(tmp_path, "minimal", config)], root=tmp_path).to_pylist()
    for column in ("start_step", "end_step", "mrsa_blocks", "mrsa_layers", "null_ref_prompts"):
        assert row[column] is None, column
    assert row["negative_prompt"] is None and row["style_fidelity"] is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mask_weights": [3.0]}, "mask_weights has 1 values but ref_image_infos has 2"),
        ({"seeds": [1, 1]}, "repeats"),
        ({"seeds": [-5]}, "seeds"),
        ({"seeds": []}, "seeds"),
        ({"style_fidelity": 2}, "style_fidelity"),
        ({"start_step": 30, "end_step": 10}, "start_step"),
        ({"ref_image_infos": {"elsewhere/a.jpg": "a cat"}, "mask_weights": [3.0]}, "/image/"),
    ],
)
def test_invalid_values_are_refused(tmp_path: Path, change: dict, message: str):
    config = _base_config("invalid") | change
    path = _write_case(tmp_path, "invalid", config)
    with pytest.raises(ConfigImportError, match=message) as err:
        manifest_from_configs([path], root=tmp_path)
    assert str(path) in str(err.value)


def test_missing_image_or_mask_file_is_named(tmp_path: Path):
    path = _write_case(tmp_path, "no_mask", _base_config("no_mask"))
    os.remove(path.parent / "mask" / "b.jpg")
    with pytest.raises(ConfigImportError, match=r"mask file .*b\.jpg does not exist"):
        manifest_from_configs([path], root=tmp_path)
    # the importer can skip the check, e.g. when images are staged later
    (row,) = manifest_from_configs([path], root=tmp_path, check_files=False).to_pylist()
    assert row["concepts"][1]["mask"].endswith("/no_mask/mask/b.jpg")


def test_duplicate_ids_are_refused(tmp_path: Path):
    first = _write_case(tmp_path / "a", "same", _base_config("same"))
    second = _write_case(tmp_path / "b", "same", _base_config("same"))
    with pytest.raises(ConfigImportError, match="already used"):
        manifest_from_configs([first, second], root=tmp_path / "a", check_files=False)


def test_python_object_tag_is_refused_and_never_runs(tmp_path: Path, monkeypatch):
    marker = tmp_path / "pwned"
    calls: list = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    body = yaml.safe_dump(_base_config("evil"), sort_keys=False)
    body += f'mark: !!python/object/apply:os.system ["touch {marker}"]\n'
    path = _write_case(tmp_path, "evil", body)

    with pytest.raises(ConfigImportError, match="safe loader") as err:
        manifest_from_configs([path], root=tmp_path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    assert calls == []


@pytest.mark.parametrize("body", ["just a string\n", "- a\n- list\n", "key: [unclosed\n"])
def test_non_mapping_or_broken_yaml_is_refused(tmp_path: Path, body: str):
    path = _write_case(tmp_path, "broken", body)
    with pytest.raises(ConfigImportError) as err:
        manifest_from_configs([path], root=tmp_path)
    assert str(path) in str(err.value)


def test_missing_config_file_and_empty_list(tmp_path: Path):
    with pytest.raises(ConfigImportError, match="no such config file"):
        manifest_from_configs([tmp_path / "nowhere" / CONFIG_NAME], root=tmp_path)
    with pytest.raises(ConfigImportError, match="no config files"):
        manifest_from_configs([], root=tmp_path)


def test_imported_manifest_passes_the_manifest_validator(authors_repo: Path):
    """What the importer writes is what `validate` and `run` accept, files opened and all."""
    from pipeline.validate import validate_table

    table = manifest_from_configs(_configs(authors_repo), root=authors_repo)
    specs, problems = validate_table(table, check_files=True)
    assert problems == []
    assert [s.id for s in specs] == sorted(EXPECTED)
    assert sum(len(s.seeds) for s in specs) == sum(len(seeds) for _, seeds, _ in EXPECTED.values())
