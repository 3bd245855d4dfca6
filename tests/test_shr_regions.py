"""Visual Genome's region_descriptions.json is streamed: the same regions as a whole-file
``json.load``, memory independent of the file size, and clear errors naming the file, record and
field of a bad record."""

from __future__ import annotations

import json
import random
import re
import tracemalloc

import pytest

from mllm_pib.errors import UserError
from mllm_pib.evaluation.shr_data import load_shr_images, stream_regions


def vg_records(n_images: int, regions_per_image: int, seed: int = 0) -> list[dict]:
    """Records shaped like VG's (regions first, then the image id), with floats, unicode and escapes."""
    rng = random.Random(seed)
    phrases = ["a brown dog", "café sign", "naïve \"quoted\" art", "line\nbreak", "", "emoji 🐕", "tab\there"]
    records = []
    for image_id in range(1, n_images + 1):
        regions = [
            {"region_id": image_id * 1000 + j, "width": rng.randint(1, 300), "height": rng.randint(1, 300),
             "image_id": image_id, "phrase": rng.choice(phrases), "y": rng.choice([rng.randint(0, 500), 12.75]),
             "x": rng.randint(0, 500)}
            for j in range(regions_per_image)
        ]
        records.append({"regions": regions, "id": image_id})
    return records


def test_streaming_gives_the_regions_of_a_whole_file_load(tmp_path):
    records = vg_records(60, 7)
    records.append({"regions": [{**records[4]["regions"][0], "image_id": 61}]})  # no "id": HA-DPO's key
    records.append({"regions": records[9]["regions"][:2], "id": 10})  # a later record replaces an earlier one
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    wanted = {1, 5, 10, 33, 60, 61, 999}
    with path.open(encoding="utf-8") as handle:
        whole = {r["regions"][0]["image_id"]: r["regions"] for r in json.load(handle)}  # HA-DPO's id2reg
    streamed = stream_regions(path, wanted)
    assert {i: regions for i, (_, regions) in streamed.items()} == {i: whole[i] for i in wanted if i in whole}
    assert all(type(a["y"]) is type(b["y"]) for i in streamed for a, b in zip(streamed[i][1], whole[i]))
    assert streamed[61][0] == f"{path} record 60 (image 61)" and streamed[10][0] == f"{path} record 61 (image 10)"


def test_streaming_memory_does_not_grow_with_the_file(tmp_path):
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(vg_records(1000, 40)))  # ~4.7 MB; json.load peaks near 5x that
    size = path.stat().st_size
    tracemalloc.start()
    try:
        found = stream_regions(path, {7, 999})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(found) == [7, 999] and size > 4e6
    assert peak < size / 4, (peak, size)  # one record and the parser's buffer


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"regions": []}', r"{path}: expected a JSON list of image records"),
        ('[{"regions": [], "id": 1}, [1, 2]]', r"{path} record 1: expected an object with 'id' and 'regions', got list"),
        ('[{"regions": [], "id": "x7"}]', r"{path} record 0: field 'id': expected an integer image id, got 'x7'"),
        ('[{"regions": []}]', r"{path} record 0: field 'id' is missing \(and no region carries an 'image_id'\)"),
        ('[{"regions": [{"image_id": 2.5}]}]', r"{path} record 0: field 'regions\[0\].image_id': expected an integer"),
        ('[{"id": 1, "regions": []}, {"id": 5, "regions": {"x": 1}}]',
         r"{path} record 1 \(image 5\): field 'regions' must be a list, got \{'x': 1\}"),
        ('[{"id": 1, "regions": []}, {"id": 2, "regions": [', r"{path}: invalid JSON after record 0: "),
        ('[{"id": 1, "regions": []} {"id": 2}]', r"{path}: invalid JSON after record 0: "),
    ],
)
def test_bad_records_are_named(tmp_path, content, message):
    path = tmp_path / "region_descriptions.json"
    path.write_text(content)
    with pytest.raises(UserError, match="^" + message.replace("{path}", re.escape(str(path)))):
        stream_regions(path, {5})


def test_bad_region_fields_are_named_when_judged(tmp_path):
    from mllm_pib.evaluation.shr import format_regions

    shr_dir, vg_dir = tmp_path / "shr", tmp_path / "VG"
    shr_dir.mkdir()
    vg_dir.mkdir()
    (shr_dir / "val_images_final.json").write_text(json.dumps([{"image_id": 4}]))
    (shr_dir / "shr_factual_part1.jsonl").write_text("")
    (vg_dir / "image_data.json").write_text(json.dumps([{"image_id": 4, "width": 10, "height": 10}]))
    regions = [{"x": 1, "y": 1, "width": 2, "height": 2, "phrase": "a"}, {"x": 1, "y": None, "width": 2, "height": 2}]
    (vg_dir / "region_descriptions.json").write_text(json.dumps([{"id": 3, "regions": []}, {"id": 4, "regions": regions}]))
    image = load_shr_images(shr_dir, vg_dir)[4]
    with pytest.raises(UserError, match=r"record 1 \(image 4\) region 1: field 'y' must be a number, got None"):
        format_regions(image.regions, image.width, image.height, image.where)
    with pytest.raises(UserError, match=r"VG/missing.json: file not found"):
        stream_regions(vg_dir / "missing.json", {1})
