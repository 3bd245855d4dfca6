"""Peak memory of reading Visual Genome's ``region_descriptions.json`` for SHR: streamed (what
``mllm_pib.evaluation.shr_data.stream_regions`` does) against the whole-file ``json`` load that
preceded it, on synthetic files of growing size.

Each file holds VG-shaped records (``{"regions": [{"region_id", "width", "height", "image_id",
"phrase", "y", "x"}, ...], "id"}``, ~50 regions of ~130 bytes per image, as in VG 1.2's ~700 MB
file) and both readers keep the regions of ``--wanted`` images spread over the file. Each reading
runs in a fresh process; its peak is the resident set size above the baseline taken after the
imports (``_common.PeakMemory``).

Usage::

    python benchmarks/shr_regions_memory.py                      # 16, 128, 512, 1024 MB files
    python benchmarks/shr_regions_memory.py --sizes 16,64 --json
    python benchmarks/shr_regions_memory.py --sizes 1024 --skip-whole   # only the streamed reader
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import _common as C

READERS = ("streamed", "whole")
PHRASES = ["a man wearing a black shirt", "white clouds in blue sky", "the leaves are green", "a red car parked",
           "window on the side of a building", "a wooden bench", "sign on the pole", "café awning over the door"]


def write_file(path: Path, megabytes: int, seed: int = 0) -> int:
    """Write a VG-shaped region file of about ``megabytes`` MB; returns its number of images."""
    rng = random.Random(seed)
    target = megabytes * 2**20
    written, image_id = 1, 0
    with path.open("w", encoding="utf-8") as handle:
        handle.write("[")
        while written < target:
            image_id += 1
            regions = [
                {"region_id": image_id * 100 + j, "width": rng.randint(1, 800), "height": rng.randint(1, 600),
                 "image_id": image_id, "phrase": rng.choice(PHRASES), "y": rng.randint(0, 600), "x": rng.randint(0, 800)}
                for j in range(50)
            ]
            text = ("" if image_id == 1 else ", ") + json.dumps({"regions": regions, "id": image_id}, ensure_ascii=False)
            handle.write(text)
            written += len(text.encode("utf-8"))
        handle.write("]")
    return image_id


def wanted_ids(images: int, count: int) -> set[int]:
    step = max(images // count, 1)
    return set(range(1, images + 1, step)[:count])


def whole_file_regions(path: Path, wanted: set[int]) -> dict[int, list]:
    """The former reader: the whole document parsed, every image's regions kept, then picked."""
    from mllm_pib.io import read_json

    regions = {}
    for entry in read_json(path):
        image_regions = entry.get("regions") or []
        regions[entry.get("id", image_regions[0].get("image_id") if image_regions else None)] = image_regions
    return {i: regions[i] for i in wanted if i in regions}


def worker(reader: str, path: Path, wanted: set[int]) -> dict:
    from mllm_pib.evaluation.shr_data import stream_regions

    memory = C.PeakMemory("cpu")
    memory.start()
    started = time.perf_counter()
    found = stream_regions(path, wanted) if reader == "streamed" else whole_file_regions(path, wanted)
    seconds = time.perf_counter() - started
    return {"peak_mb": memory.peak_mb(), "seconds": seconds, "images_found": len(found)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,128,512,1024", help="file sizes in MB, comma-separated")
    parser.add_argument("--wanted", type=int, default=200, help="images whose regions are kept (default 200)")
    parser.add_argument("--skip-whole", action="store_true", help="measure the streamed reader only")
    parser.add_argument("--workdir", help="where the synthetic files go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", choices=READERS, help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.file), wanted_ids(args.images, args.wanted))))
        return

    readers = ("streamed",) if args.skip_whole else READERS
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for megabytes in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"region_descriptions_{megabytes}mb.json"
            print(f"writing {path.name} ...", file=sys.stderr, flush=True)
            images = write_file(path, megabytes)
            row = {"file_mb": round(path.stat().st_size / 2**20, 1), "images": images}
            for reader in readers:
                print(f"  {reader} ...", file=sys.stderr, flush=True)
                worker_args = ["--worker", reader, "--file", str(path), "--images", str(images), "--wanted", str(args.wanted)]
                result = C.run_worker(__file__, worker_args)
                row |= {f"{reader}_{key}": value for key, value in result.items()}
            rows.append(row)
            path.unlink()
    lines = [f"{'file MB':>8} {'images':>7} " + " ".join(f"{r + ' peak MB':>18} {r + ' s':>10}" for r in readers)]
    for row in rows:
        cells = " ".join(f"{row[f'{r}_peak_mb']:>18.1f} {row[f'{r}_seconds']:>10.1f}" for r in readers)
        lines.append(f"{row['file_mb']:>8.1f} {row['images']:>7} {cells}")
    C.emit({"wanted": args.wanted, "rows": rows}, args.json, lines)


if __name__ == "__main__":
    main()
