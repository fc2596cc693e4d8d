"""Pools: where concept items come from, read as a stream of ``Item`` batches.

Three sources (``PoolSpec.kind``):

* ``folder``: every image under it (recursively, sorted; ``.png .jpg .jpeg .webp .bmp .tif .tiff``).
  The mask of ``dogs/rex.jpg`` is ``dogs/rex_mask.png`` beside it (any image extension; the suffix is
  ``mask_suffix``, default ``_mask``); files named like a mask are masks, never items. Without a mask
  file the image's alpha is the mask (a cut-out), else the pool's detector ``label``. Attributes:
  ``key`` (``dogs/rex``: the path without extension, or the file's digest with ``key: digest``),
  ``name`` (``rex``), ``folder`` (``dogs``).
* ``table``: a CSV, TSV, JSONL or Parquet file (a local path, any ``pyarrow.fs`` URI such as
  ``s3://bucket/feed.parquet``, or an ``http(s)://`` export, downloaded once to a temporary file) with
  a column mapping: ``columns.image`` (a path, URI or URL; relative paths resolve against the table's
  folder), optional ``key``, ``mask``, ``label``; ``attributes`` lists the columns templates may use.
  CSV/TSV cells are read as text (``00123`` stays ``00123``). Without a key column an item's key is the
  digest of its image's bytes (read once, at build time).
* ``dataset``: a Hugging Face ``datasets`` folder as ``save_to_disk`` writes it (``state.json`` and
  ``data-*.arrow``), read with pyarrow, so ``datasets`` is no runtime dependency. An ``Image`` column
  (``{bytes, path}``) with embedded bytes is written once as ``<digest>.png`` into the build's image
  folder; a text column is a path or URL.

``where`` keeps the items whose attribute is one of the given values (compared as text).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from stages.errors import RowError
from stages.inputs.decode import probe_size
from stages.inputs.http import is_http_url
from stages.inputs.read import InputSettings, is_uri, read_bytes, resolve_path

from .spec import BuildError, PoolSpec

__all__ = ["EMBEDDED", "IMAGE_EXTENSIONS", "ImageSink", "Item", "check_image", "iter_items", "table_base"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
BATCH_ROWS = 8192
EMBEDDED = "embedded:"  # a dry run's stand-in path for a dataset's image bytes (not written)
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Item:
    """One concept of a pool: its key (what it is), image and mask (absolute paths, URIs or URLs),
    detector label, attributes (column -> value) and where it was read (``feed.csv row 12``)."""

    key: str
    image: str
    mask: str | None
    label: str | None
    attributes: dict[str, Any]
    where: str


class ImageSink:
    """Where a dataset's embedded image bytes go: ``<digest>.png`` (content-addressed, each file written
    to a temporary name and renamed). ``final`` is the folder the manifest names, ``staging`` the folder
    written now (the same, or the build's temporary folder that becomes ``final``); None: a dry run."""

    def __init__(self, final: str | None, staging: str | None):
        self.final, self.staging = final, staging

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()[:32]
        if self.final is None or self.staging is None:
            return f"{EMBEDDED}{digest}"
        name = f"{digest}.png"
        target = os.path.join(self.staging, name)
        if not os.path.exists(target):
            os.makedirs(self.staging, exist_ok=True)
            tmp = f"{target}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return os.path.join(self.final, name)

    def written(self, path: str) -> str:
        """Where ``path`` (a path ``put`` returned, or any other) is readable now: a dataset's image is in
        ``staging`` until the build is committed as ``final``."""
        if self.final is None or self.staging is None or os.path.dirname(path) != self.final:
            return path
        return os.path.join(self.staging, os.path.basename(path))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _matches(pool: PoolSpec, attributes: dict[str, Any]) -> bool:
    return all(_text(attributes.get(k)) in values for k, values in pool.where.items())


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def iter_items(pool: PoolSpec, sink: ImageSink, settings: InputSettings) -> Iterator[list[Item]]:
    """The pool's items after its filter, in batches, in the source's order."""
    if pool.kind == "folder":
        yield from _folder_items(pool, settings)
    else:
        yield from _table_items(pool, sink, settings)


# --------------------------------------------------------------------------- folders


def _folder_items(pool: PoolSpec, settings: InputSettings) -> Iterator[list[Item]]:
    root = Path(pool.location)
    if not root.is_dir():
        raise BuildError(f"pool {pool.name}: folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    by_stem = {p.with_suffix(""): p for p in files}
    batch: list[Item] = []
    for path in files:
        stem = path.with_suffix("")
        if stem.name.endswith(pool.mask_suffix):
            continue
        mask = by_stem.get(stem.with_name(stem.name + pool.mask_suffix))
        relative = stem.relative_to(root).as_posix()
        key = relative if pool.key == "name" else _digest(path.read_bytes())
        attributes = {
            "key": key,
            "name": stem.name,
            "folder": "" if stem.parent == root else stem.parent.relative_to(root).as_posix(),
        }
        if not _matches(pool, attributes):
            continue
        batch.append(Item(key, str(path), str(mask) if mask else None, None, attributes, f"{path}"))
        if len(batch) >= BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- tables and datasets


def table_base(location: str) -> str:
    """The folder a table's relative image paths resolve against."""
    return location.rsplit("/", 1)[0] if is_uri(location) else os.path.dirname(location)


def _format(pool: PoolSpec) -> str:
    if pool.format:
        return pool.format
    name = pool.location.split("?", 1)[0].lower()
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise BuildError(
        f"pool {pool.name}: cannot tell the format of {pool.location} from its name; "
        f"give format: csv, tsv, jsonl or parquet"
    )


def _open_table(pool: PoolSpec, settings: InputSettings, tmp: str) -> pads.Dataset:
    fmt = _format(pool)
    location = pool.location
    if is_http_url(location):  # an http export: downloaded once (size limit and address rules of stages.inputs.http)
        try:
            data = read_bytes(
                resolve_path(location, base_dir=None, settings=settings, field="table"),
                settings=settings,
                field="table",
            )
        except RowError as exc:
            raise BuildError(f"pool {pool.name}: cannot download the table: {exc.reason}") from None
        location = os.path.join(tmp, "table." + ("csv" if fmt == "tsv" else fmt))
        Path(location).write_bytes(data)
    try:
        fs, inner = (
            pafs.FileSystem.from_uri(location)
            if is_uri(location)
            else (pafs.LocalFileSystem(), os.path.abspath(location))
        )
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            raise BuildError(f"pool {pool.name}: table {pool.location} not found")
        if fmt in ("csv", "tsv"):
            probe = pads.dataset(
                inner,
                filesystem=fs,
                format=pads.CsvFileFormat(
                    parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
                ),
            )
            text = {name: pa.string() for name in probe.schema.names}  # every cell as text
            file_format = pads.CsvFileFormat(
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                # only an empty cell is null: "NA", "N/A", "null" are a feed's text (a colour, a SKU)
                convert_options=pacsv.ConvertOptions(column_types=text, strings_can_be_null=True, null_values=[""]),
            )
        else:
            file_format = {"jsonl": "json", "parquet": "parquet"}[fmt]
        return pads.dataset(inner, filesystem=fs, format=file_format)
    except BuildError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BuildError(f"pool {pool.name}: cannot read {pool.location} as {fmt}: {exc}") from None


def _read_or_refuse(batches: Iterable[pa.RecordBatch], pool: PoolSpec, source: str) -> Iterator[pa.RecordBatch]:
    """``batches`` as they are read; a file that turns out unreadable part-way (a CSV row with a column too
    many past the first block) is a ``BuildError`` naming the pool and the source, not a traceback."""
    iterator = iter(batches)
    while True:
        try:
            record_batch = next(iterator)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise BuildError(f"pool {pool.name}: cannot read {source}: {exc}") from None
        yield record_batch


def _dataset_batches(pool: PoolSpec) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    folder = Path(pool.location)
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state["_data_files"]]
        schema = pa.ipc.open_stream(pa.memory_map(str(files[0]))).schema
    except (OSError, ValueError, KeyError, IndexError, pa.ArrowException) as exc:
        raise BuildError(
            f"pool {pool.name}: {folder} is not a datasets folder written by save_to_disk "
            f"(state.json and data-*.arrow; for a DatasetDict name the split's folder): {exc}"
        ) from None

    def batches():
        for file in files:
            yield from pa.ipc.open_stream(pa.memory_map(str(file)))

    return schema, batches()


def _image_value(value: Any, base: str, sink: ImageSink) -> str | None:
    if isinstance(value, dict):  # a datasets Image: {bytes, path}
        if value.get("bytes"):
            return sink.put(value["bytes"])
        value = value.get("path")
    if value is None or not str(value).strip():
        return None
    value = str(value)
    return (
        value
        if is_uri(value) or os.path.isabs(value)
        else (f"{base.rstrip('/')}/{value}" if is_uri(base) else os.path.abspath(os.path.join(base, value)))
    )


def _table_items(pool: PoolSpec, sink: ImageSink, settings: InputSettings) -> Iterator[list[Item]]:
    columns = pool.columns
    needed = list(dict.fromkeys([*columns.values(), *pool.attributes]))
    with tempfile.TemporaryDirectory(prefix="freecustom-build-") as tmp:
        if pool.kind == "dataset":
            schema, batches = _dataset_batches(pool)
            source = pool.location
        else:
            dataset = _open_table(pool, settings, tmp)
            schema, source = dataset.schema, pool.location
        missing = [c for c in needed if c not in schema.names]
        if missing:
            raise BuildError(
                f"pool {pool.name}: column(s) {missing} not in {source} (its columns: {schema.names})"
            )
        if pool.kind != "dataset":
            # a Python consumer is the bottleneck: little readahead keeps memory flat whatever the file's size
            batches = dataset.to_batches(
                columns=needed, batch_size=BATCH_ROWS, batch_readahead=2, fragment_readahead=1
            )
        base = table_base(pool.location) if pool.kind == "table" else pool.location
        row = 0
        for record_batch in _read_or_refuse(batches, pool, source):
            batch = []
            data = (
                record_batch.select(needed).to_pydict()
                if pool.kind == "dataset"
                else record_batch.to_pydict()
            )
            for i in range(record_batch.num_rows):
                row += 1
                where = f"{source} row {row}"
                attributes = {a: data[a][i] for a in pool.attributes}
                if not _matches(pool, attributes):
                    continue
                image = _image_value(data[columns["image"]][i], base, sink)
                if image is None:
                    raise BuildError(f"pool {pool.name}: {where}: column {columns['image']!r} is empty")
                if "key" in columns:
                    key = _text(data[columns["key"]][i]).strip()
                    if not key:
                        raise BuildError(f"pool {pool.name}: {where}: key column {columns['key']!r} is empty")
                else:
                    key = _image_key(data[columns["image"]][i], image, where, pool, settings)
                mask = _image_value(data[columns["mask"]][i], base, sink) if "mask" in columns else None
                label = _text(data[columns["label"]][i]).strip() or None if "label" in columns else None
                batch.append(Item(key, image, mask, label, attributes, where))
            if batch:
                yield batch


def _image_key(raw: Any, image: str, where: str, pool: PoolSpec, settings: InputSettings) -> str:
    """An item without a key column is keyed by its image's content: the same picture, the same key."""
    if isinstance(raw, dict) and raw.get("bytes"):
        return _digest(raw["bytes"])
    try:
        return _digest(read_bytes(resolve_path(image, base_dir=None, settings=settings), settings=settings))
    except RowError as exc:
        raise BuildError(
            f"pool {pool.name}: {where}: no key column, and the image (whose digest would be the "
            f"key) cannot be read: {exc.reason}"
        ) from None


def check_image(path: str, settings: InputSettings, field: str) -> str | None:
    """Why an image or mask cannot be used (``--check-images``), or None: read and probed like ``validate``."""
    try:
        data = read_bytes(
            resolve_path(path, base_dir=None, settings=settings, field=field), settings=settings, field=field
        )
        probe_size(data, max_pixels=settings.max_pixels, field=field)
    except RowError as exc:
        return exc.reason
    return None
