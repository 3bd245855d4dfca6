"""The frozen-feature cache: what PIB training needs from a frozen backbone, computed once.

With everything upstream of the block frozen, each pair's backbone outputs never change: the
hidden states at the positions the block reads (the last prompt position and the answers, or
every position for a block that attends over the text), the block's vision features, and the
reference log-probs. ``mllm-pib cache`` stores them in sharded safetensors; every epoch and
every run of a learning-rate/variant sweep then reads them (memory-mapped) instead of running
the backbone.

A manifest records what the cache depends on — base model identity (weights fingerprint,
feature option), data files (content hashes), template (token ids of a probe conversation),
which positions were kept, dtype, package version — and a cache that does not match the run
reading it is refused, saying which of them differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mllm_pib import __version__
from mllm_pib.backbone import VisionFeatures
from mllm_pib.errors import UserError
from mllm_pib.io import atomic_write_json, read_json
from mllm_pib.log import get_logger
from mllm_pib.objectives import IGNORE_INDEX
from mllm_pib.outputs import OutputKind, claim

logger = get_logger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROBE = ("Is there a dog in the image?", "No, there is no dog.")
PROBE_IMAGE_SIZE = (320, 240)  # not square: anyres backbones tokenise it with their tile grid


def cache_key(config, backbone, model) -> dict:
    """Everything a cache's contents depend on; compared field by field when it is read."""
    return {
        "format_version": FORMAT_VERSION,
        "mllm_pib_version": __version__,
        "base_model": backbone.identity(),
        "data": [{"format": s.format, "path": s.path, "sha256": _file_hash(s.path)} for s in config.data],
        "template": _template_hash(backbone),
        "positions": "answers" if model.pib.config.position_wise else "all",
        "max_length": config.max_length,
    }


def _template_hash(backbone) -> str:
    """A hash of a probe prompt's and answer's ids: changes with the template or the tokenizer."""
    from PIL import Image

    image = Image.new("RGB", PROBE_IMAGE_SIZE, (128, 128, 128))
    ids = [backbone.prompt_ids(PROBE[0], image), backbone.answer_ids(PROBE[1])]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


CACHE_OUTPUT = OutputKind(command="cache", what="feature cache", writes=(), done=MANIFEST)


def build_cache(config, out_dir: str | Path, dtype: str = "float16", batch_size: int = 8, shard_size: int = 1024,
                overwrite: bool = False) -> Path:
    """Run the frozen backbone over the training data once and write the cache, whole or not at
    all. A folder that is not empty is refused unless it holds an earlier cache and
    ``overwrite`` is set (see :mod:`mllm_pib.outputs`)."""
    from mllm_pib.data.dataset import PreferenceCollator
    from mllm_pib.data.records import BadRecordBudget
    from mllm_pib.plugins import get_backbone
    from mllm_pib.training.run import bootstrap, build_dataset, build_model

    if config.freeze_policy().trains_before_pib:
        raise UserError("a feature cache needs a frozen backbone up to the PIB; this freeze policy trains parts before it")
    output = claim(out_dir, CACHE_OUTPUT, overwrite=overwrite)
    bootstrap(config)
    backbone = get_backbone(config.backbone).load(config.model, **config.backbone_options)
    model = build_model(config, backbone).eval()
    budget = BadRecordBudget(config.max_bad_records)
    dataset = build_dataset(config, backbone, budget)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=PreferenceCollator(backbone))
    with output.staged() as tmp:
        shards, pair_ids, pending = [], [], {}
        for batch in tqdm(loader, desc="caching features", unit="batch"):
            batch = to_device(batch, model.device)
            for tensors in _pair_tensors(model, batch, DTYPES[dtype]):
                row = len(pair_ids) % shard_size
                pair_ids.append(tensors.pop("_id"))
                pending.update({f"{row}.{k}": v for k, v in tensors.items()})
                if len(pair_ids) % shard_size == 0:
                    shards.append(_write_shard(tmp, len(shards), pending))
                    pending = {}
        if pending:
            shards.append(_write_shard(tmp, len(shards), pending))
        atomic_write_json(tmp / MANIFEST, {
            **cache_key(config, backbone, model), "dtype": dtype, "pairs": len(pair_ids),
            "shard_size": shard_size, "shards": shards, "pair_ids": pair_ids, "skipped": budget.summary(),
        })
    logger.info(f"cached {len(pair_ids)} pairs in {len(shards)} shards at {output.path}; data: {budget.summary()}")
    return output.path


def to_device(value, device):
    """Tensors of a (nested) batch moved to ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


@torch.no_grad()
def _pair_tensors(model, batch, dtype):
    vision = model.backbone.encode_vision(**batch["vision_inputs"])
    rows = model.pair_hidden(batch, vision)
    ref = model.reference_logps(batch, computed=(vision, rows))
    n_pairs = len(batch["pair_ids"])
    for i, pair_id in enumerate(batch["pair_ids"]):
        both = torch.tensor([i, n_pairs + i])
        mask = rows.text_mask[both]
        used = (mask.sum(0) > 0).nonzero().squeeze(1)
        span = slice(int(used.min()), int(used.max()) + 1)  # drop the batch's padding columns
        tensors = {
            "hidden": rows.hidden[both, span].to(dtype),
            "labels": rows.labels[both, span],
            "text_mask": mask[:, span],
            # only the image's valid tokens: batches pad to their own largest count
            "vision": (vision.pib[i] if vision.pib_mask is None else vision.pib[i][vision.pib_mask[i]]).to(dtype),
            "ref_logps": ref.logps[both],
            "counts": ref.counts[both],
            "_id": pair_id,
        }
        yield tensors


def _write_shard(directory: Path, index: int, tensors: dict) -> str:
    name = f"shard-{index:05d}.safetensors"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, directory / name)
    return name


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_cache(directory: str | Path, expected: dict) -> dict:
    """The cache's manifest, after checking it was built for ``expected`` (see :func:`cache_key`)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise UserError(f"{directory}: not a feature cache (no {MANIFEST}); build one with `mllm-pib cache`")
    manifest = read_json(directory / MANIFEST)
    # a cache of every position also serves a block that reads only the answers
    fits = lambda key, value: manifest.get(key) == value or (key == "positions" and manifest.get(key) == "all")  # noqa: E731
    stale = [key for key, value in expected.items() if not fits(key, value)]
    if stale:
        details = "; ".join(f"{key}: cache has {manifest.get(key)!r}, run needs {expected[key]!r}" for key in stale)
        raise UserError(
            f"{directory}: the feature cache does not match this run ({details}). Rebuild it with "
            "`mllm-pib cache --config ... --out ...`"
        )
    return manifest


class CachedPairs(Dataset):
    """Pairs read from a feature cache; shards are opened memory-mapped, lazily in each worker."""

    def __init__(self, directory: str | Path, manifest: dict):
        self.directory = Path(directory)
        self.shards = manifest["shards"]
        self.shard_size = manifest["shard_size"]
        self.pair_ids = manifest["pair_ids"]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.pair_ids)

    def __getitem__(self, index: int) -> dict:
        shard, row = divmod(index, self.shard_size)
        if shard not in self._open:
            self._open[shard] = safe_open(self.directory / self.shards[shard], framework="pt")
        handle = self._open[shard]
        prefix = f"{row}."
        item = {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
        item["pair_id"] = self.pair_ids[index]
        return item

    def __getstate__(self):  # file handles stay in the process that opened them
        return {**self.__dict__, "_open": {}}


def collate_cached(items: list[dict]) -> dict:
    """A cached pair batch: rows right-padded to one width, chosen rows then rejected rows."""
    width = max(item["hidden"].shape[1] for item in items)

    def rows(key, fill):
        out = []
        for side in (0, 1):
            for item in items:
                t = item[key][side]
                pad = (0, 0, 0, width - t.shape[0]) if t.dim() == 2 else (0, width - t.shape[0])
                out.append(torch.nn.functional.pad(t, pad, value=fill))
        return torch.stack(out)

    batch = {
        "cached": True,
        "hidden": rows("hidden", 0.0),
        "labels": rows("labels", IGNORE_INDEX),
        "text_mask": rows("text_mask", 0),
        **_padded_vision([item["vision"] for item in items]),
        "ref_logps": torch.cat([torch.stack([item["ref_logps"][side] for item in items]) for side in (0, 1)]),
        "ref_counts": torch.cat([torch.stack([item["counts"][side] for item in items]) for side in (0, 1)]),
        "pair_ids": [item["pair_id"] for item in items],
    }
    return batch


def _padded_vision(features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pairs' vision features ``[B, N, Dv]``, padded to the largest count with a
    ``vision_mask`` of the valid ones when the counts differ."""
    count = max(f.shape[0] for f in features)
    if all(f.shape[0] == count for f in features):
        return {"vision": torch.stack(features)}
    vision = torch.stack([torch.nn.functional.pad(f, (0, 0, 0, count - f.shape[0])) for f in features])
    mask = torch.stack([torch.arange(count) < f.shape[0] for f in features])
    return {"vision": vision, "vision_mask": mask}


def cached_vision(batch: dict) -> VisionFeatures:
    """The block's vision features of a cached batch: each pair's image once, read by its
    chosen row and its rejected row."""
    pairs = batch["vision"].shape[0]
    rows = torch.arange(pairs, device=batch["vision"].device).repeat(2)
    return VisionFeatures(pib=batch["vision"], llm=None, pib_mask=batch.get("vision_mask"), rows=rows)
