"""Batched, resumable, rank-sharded generation over evaluation items.

Every benchmark that needs a model (POPE answers, SHR and CHAIR descriptions) reduces to: for
each item (an id, an image, a prompt) generate a text. :func:`generate_answers` does that in
batches with left padding, appends each answer to a per-rank JSON-lines file as soon as it
exists (a killed run resumes where it stopped, whatever the number of processes), and merges
the ranks' files by id into one answers file. Under ``torchrun --nproc_per_node N`` each rank
answers every N-th pending item; the merged file is identical to a single process's.

Every rank reads what is already answered before any rank writes (a barrier separates the two),
so all ranks see the same pending list and their slices partition it; a rank only ever trims or
appends to its own part file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mllm_pib.data.images import ImageError, open_image
from mllm_pib.errors import UserError
from mllm_pib.evaluation.pope import AnswerWriter
from mllm_pib.io import atomic_write_text, read_jsonl, read_text


@dataclass(frozen=True)
class EvalItem:
    item_id: int
    image: Path
    prompt: str


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    num_beams: int = 1
    batch_size: int = 8
    stop_at_sentence_end: bool = False


def distributed() -> tuple[int, int]:
    """(rank, world size), starting the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def barrier() -> None:
    """Wait for every process (starting the process group under torchrun if needed)."""
    if distributed()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def generate_answers(
    model,
    items: list[EvalItem],
    out_file: str | Path,
    settings: GenerationSettings,
    desc: str = "generating",
) -> dict[int, str]:
    """Answer every item once (skipping those already answered) and return ``{id: text}``."""
    out_file = Path(out_file)
    rank, world = distributed()
    done = _answered(out_file)
    barrier()  # every rank has read before any rank writes: the pending list is the same everywhere
    pending = [item for item in items if item.item_id not in done]
    mine = pending[rank::world]
    with AnswerWriter(_rank_file(out_file, rank)) as writer:  # trims a torn last line of this rank's file
        stop = _sentence_stop(model) if settings.stop_at_sentence_end else None
        bar = tqdm(total=len(mine), desc=desc, unit="item", disable=rank != 0)
        for start in range(0, len(mine), settings.batch_size):
            batch = mine[start : start + settings.batch_size]
            texts = model.generate_text(
                [_image(item) for item in batch], [item.prompt for item in batch],
                max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, stop=stop,
            )
            for item, text in zip(batch, texts):
                writer.write(item.item_id, item.prompt, text)
            bar.update(len(batch))
        bar.close()
    barrier()
    if rank == 0:
        _merge(out_file)
    barrier()
    answers = {int(r["question_id"]): r["text"] for r in read_jsonl(out_file)}
    missing = [item.item_id for item in items if item.item_id not in answers]
    if missing:
        raise UserError(f"{out_file}: {len(missing)} items have no answer after generation, e.g. {missing[:5]}")
    return answers


def _rank_file(out_file: Path, rank: int) -> Path:
    return out_file.with_name(f"{out_file.stem}.part{rank}{out_file.suffix}")


def _part_files(out_file: Path) -> list[Path]:
    return sorted(out_file.parent.glob(f"{out_file.stem}.part*{out_file.suffix}"))


def _answered(out_file: Path) -> set[int]:
    """Ids answered in the merged file and the part files; reads only, so that a line another
    rank is writing right now, or an earlier crash cut short, is not counted (nor removed)."""
    ids: set[int] = set()
    for path in [out_file, *_part_files(out_file)]:
        ids.update(int(record["question_id"]) for record in _complete_records(path))
    return ids


def _complete_records(path: Path) -> list[dict]:
    """The newline-terminated records of a JSON-lines file (none when it is absent)."""
    if not path.exists():
        return []
    text = read_text(path)
    complete = text[: text.rfind("\n") + 1]
    records = []
    for lineno, line in enumerate(complete.split("\n"), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    return records


def _merge(out_file: Path) -> None:
    """Fold the ranks' files into ``out_file``, sorted by id, atomically; then drop them (a torn
    last line, e.g. of a rank of an earlier run with more processes, is dropped with them)."""
    records: dict[int, dict] = {}
    parts = _part_files(out_file)
    for path in [out_file, *parts]:
        for record in _complete_records(path):
            records.setdefault(int(record["question_id"]), record)
    lines = [json.dumps(records[key], ensure_ascii=False) for key in sorted(records)]
    atomic_write_text(out_file, "".join(line + "\n" for line in lines))
    for path in parts:
        path.unlink()


def _image(item: EvalItem):
    try:
        return open_image(item.image)
    except ImageError as err:
        raise UserError(f"item {item.item_id}: {err}") from None


def _sentence_stop(model) -> Callable[[list[int]], bool]:
    """Stop once the decoded answer holds a '.': only the text before it is scored."""
    from mllm_pib.evaluation.pope import is_sentence_end

    decode = model.backbone.tokenizer.decode
    return lambda tokens: is_sentence_end(decode(tokens, skip_special_tokens=True))
