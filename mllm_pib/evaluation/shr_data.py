"""SHR's inputs: HA-DPO's SHR files and the Visual Genome annotations of the judged images.

Expected layout (HA-DPO's)::

    shr_dir/
        val_images_final.json     [{"image_id": <VG id>, ...}, ...]   the SHR validation images
        shr_factual_part*.jsonl   {"<VG id>": ["factual sentence", ...]} per line (all parts read)
    vg_dir/
        image_data.json           [{"image_id", "width", "height", "url", ...}, ...]
        region_descriptions.json  [{"regions": [{"x", "y", "width", "height", "phrase",
                                     "image_id", ...}, ...], "id": <VG id>}, ...]

Visual Genome's ``region_descriptions.json`` is ~700 MB, several GB once parsed whole; it is
streamed (``ijson``), one image record at a time, and only the judged images' regions are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ijson

from mllm_pib.errors import UserError
from mllm_pib.io import read_json, read_jsonl, read_text


@dataclass(frozen=True)
class ShrImage:
    """What the judge needs about one validation image: its size, VG regions and SHR facts."""

    image_id: int
    width: float
    height: float
    regions: list[dict]
    facts: list[str]
    where: str  # the regions' record, for error messages


def load_val_image_ids(shr_dir: str | Path) -> list[int]:
    """The SHR validation image ids, in file order."""
    path = Path(shr_dir) / "val_images_final.json"
    return [_image_id(r, f"{path} element {i}") for i, r in enumerate(_list(read_json(path), path))]


def load_shr_images(shr_dir: str | Path, vg_dir: str | Path, image_ids: set[int] | None = None) -> dict[int, ShrImage]:
    """The SHR validation images (all, or those in ``image_ids``) in ``val_images_final.json``
    order, with their size, VG regions and factual sentences."""
    shr_dir, vg_dir = Path(shr_dir), Path(vg_dir)
    val_ids = load_val_image_ids(shr_dir)
    if image_ids is not None and (unknown := sorted(image_ids - set(val_ids))):
        raise UserError(f"{len(unknown)} described images are not SHR validation images (e.g. {unknown[:5]})")
    wanted = [i for i in val_ids if image_ids is None or i in image_ids]
    facts = _load_facts(shr_dir)
    meta_path = vg_dir / "image_data.json"
    meta = {_image_id(m, f"{meta_path} element {i}"): m for i, m in enumerate(_list(read_json(meta_path), meta_path))}
    regions_path = vg_dir / "region_descriptions.json"
    regions = stream_regions(regions_path, set(wanted))
    out = {}
    for image_id in wanted:
        if image_id not in meta or image_id not in regions:
            raise UserError(f"VG image {image_id}: missing from {meta_path if image_id not in meta else regions_path}")
        where, image_regions = regions[image_id]
        width, height = meta[image_id].get("width"), meta[image_id].get("height")
        out[image_id] = ShrImage(image_id, width, height, image_regions, facts.get(image_id, []), where)
    return out


def stream_regions(path: str | Path, wanted: set[int]) -> dict[int, tuple[str, list[dict]]]:
    """Regions of the ``wanted`` images in VG's ``region_descriptions.json``: image id ->
    (``"<file> record <i> (image <id>)"``, regions). A record's image is its ``id``, else its
    first region's ``image_id`` (HA-DPO's key); a later record of the same image replaces an
    earlier one, as in HA-DPO. Memory stays at one record plus the kept regions."""
    path = Path(path)
    found: dict[int, tuple[str, list[dict]]] = {}
    index = -1
    try:
        with path.open("rb") as handle:
            _expect_array(handle, path)
            for index, record in enumerate(ijson.items(handle, "item", use_float=True)):
                where = f"{path} record {index}"
                image_id = _record_image_id(record, where)
                if image_id in wanted:
                    regions = record.get("regions")
                    if not isinstance(regions, list):
                        raise UserError(f"{where} (image {image_id}): field 'regions' must be a list, got {regions!r:.80}")
                    found[image_id] = (f"{where} (image {image_id})", regions)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except ijson.JSONError as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"{path}: invalid JSON after record {index}: {reason}") from None
    return found


def _expect_array(handle, path: Path) -> None:
    head = handle.read(64).lstrip()
    handle.seek(0)
    if not head.startswith(b"["):
        raise UserError(f"{path}: expected a JSON list of image records")


def _record_image_id(record, where: str) -> int:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with 'id' and 'regions', got {type(record).__name__}")
    if "id" in record:
        return as_image_id(record["id"], f"{where}: field 'id'")
    regions = record.get("regions")
    if isinstance(regions, list) and regions and isinstance(regions[0], dict) and "image_id" in regions[0]:
        return as_image_id(regions[0]["image_id"], f"{where}: field 'regions[0].image_id'")
    raise UserError(f"{where}: field 'id' is missing (and no region carries an 'image_id')")


def input_files(shr_dir: str | Path, vg_dir: str | Path) -> list[Path]:
    """Every file SHR reads (the images excepted)."""
    shr_dir, vg_dir = Path(shr_dir), Path(vg_dir)
    return [shr_dir / "val_images_final.json", *_factual_files(shr_dir),
            vg_dir / "image_data.json", vg_dir / "region_descriptions.json"]


def _factual_files(shr_dir: Path) -> list[Path]:
    parts = sorted(shr_dir.glob("shr_factual_part*.jsonl"))
    if not parts:
        raise UserError(f"{shr_dir}: no shr_factual_part*.jsonl files")
    return parts


def _load_facts(shr_dir: Path) -> dict[int, list[str]]:
    facts: dict[int, list[str]] = {}
    for path in _factual_files(shr_dir):
        for lineno, record in enumerate(read_jsonl(path), start=1):
            for key, sentences in record.items():
                if not key.isdigit() or not isinstance(sentences, list):
                    raise UserError(f'{path} record {lineno}: expected {{"<VG image id>": [sentences]}}')
                facts[int(key)] = [str(s) for s in sentences]
    return facts


def load_descriptions(path: str | Path) -> dict[int, str]:
    """VG image id -> description, from a JSON object ``{"<image id>": "text", ...}`` or from the
    JSON lines ``eval shr --model`` writes (``descriptions.jsonl``: ``{"question_id": <image id>,
    "prompt", "text"}`` per line)."""
    path = Path(path)
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # several values: JSON lines
    if isinstance(data, dict) and not {"question_id", "text"} <= data.keys():
        pairs = [(as_image_id(key, f"{path}: key {key!r}"), value, f"{path}: image {key}") for key, value in data.items()]
    else:
        pairs = [
            (as_image_id(record.get("question_id"), f"{path} record {i}: field 'question_id'"), record.get("text"),
             f"{path} record {i}: field 'text'")
            for i, record in enumerate(read_jsonl(path), start=1)
        ]
    descriptions: dict[int, str] = {}
    for image_id, description, where in pairs:
        if not isinstance(description, str):
            raise UserError(f"{where}: the description must be text, got {description!r:.80}")
        if descriptions.setdefault(image_id, description) != description:
            raise UserError(f"{where}: image {image_id} is described twice, differently")
    if not descriptions:
        raise UserError(f"{path}: no descriptions")
    return descriptions


def _list(data, path: Path) -> list:
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list")
    return data


def _image_id(record, where: str) -> int:
    """``record``'s ``image_id`` (or ``record`` itself when it is not an object) as an int."""
    return as_image_id(record.get("image_id") if isinstance(record, dict) else record, where)


def as_image_id(value, where: str) -> int:
    """``value`` as an integer image id (digit strings accepted); a clear error naming ``where`` otherwise."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: expected an integer image id, got {value!r}")
    return value
