"""What the training benchmarks share: a run's size, the synthetic world's preference pairs, and
running schemes round-robin.

The scripts import this module as ``_pairs`` (their own folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

import _common as C

# A scheme is built into a function that runs one optimisation step on its next batch (data
# loading included).
Step = Callable[[], None]


# LLaVA-1.5-7B: CLIP ViT-L/14-336 (1024 wide, 24 layers, 576 image tokens), LLaMA 4096 wide with
# an 11008 MLP, 32 heads and 32 layers, 32000 words; here at half its depth on both sides
LLAVA_7B_HALF_DEPTH = C.LlavaSize(
    image_size=336, patch_size=14, vision_hidden=1024, vision_intermediate=4096, vision_layers=12, vision_heads=16,
    hidden=4096, intermediate=11008, layers=16, heads=32, vocab_size=32000,
)
# the CPU presets' vision side and vocabulary: a quarter of LLaVA's image tokens (CLIP 96 px / 8)
SMALL_VISION = {"image_size": 96, "patch_size": 8, "vision_hidden": 192, "vision_intermediate": 768,
                "vision_layers": 4, "vision_heads": 3, "vocab_size": 2048}


class BenchSize(BaseModel):
    """A model size plus the data and the number of steps measured with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: C.LlavaSize
    answer_words: int = Field(gt=0, description="approximate tokens per answer")
    pairs_per_batch: int = Field(gt=0)
    warmup: int = Field(ge=0, description="untimed rounds first")
    steps: int = Field(gt=0, description="timed rounds (one step of each scheme per round)")

    @property
    def pib(self) -> dict:
        """The research block's proportions: align MLP and block MLP as wide as the LLM's MLP."""
        m = self.model
        return {"num_heads": m.heads, "intermediate_size": m.intermediate, "align_intermediate_size": m.intermediate}

    def resized(self, steps: int | None = None, layers: int | None = None) -> "BenchSize":
        """This size with another number of timed rounds or decoder layers."""
        size = self
        if steps:
            size = size.model_copy(update={"steps": steps})
        if layers:
            size = size.model_copy(update={"model": size.model.model_copy(update={"layers": layers})})
        return size


def place(box: tuple[int, int, int, int], image_size: int) -> str:
    """Where a box lies in the image, in words ("at the top left")."""
    thirds = lambda centre, names: names[min(int(3 * centre / image_size), 2)]  # noqa: E731
    vertical = thirds((box[1] + box[3]) / 2, ("top", "middle", "bottom"))
    horizontal = thirds((box[0] + box[2]) / 2, ("left", "centre", "right"))
    return f"at the {vertical} {horizontal}"


def description(objects: list[tuple[str, str]], words: int) -> str:
    """A detailed description of ``(object, place)`` pairs, about ``words`` tokens long: the
    list of objects, then one sentence per object, repeated until the length is reached."""
    from mllm_pib.demo import world as W

    sentences = [W.describe([name for name, _ in objects])] + [f"The {name} is {where}." for name, where in objects]
    text, i = [], 0
    while len(W.split_words(" ".join(text))) < words:
        text.append(sentences[i % len(sentences)])
        i += 1
    return " ".join(text)


def preference_records(scenes, words: int) -> list[dict]:
    """Generic preference records: the faithful description against one naming an absent object."""
    from mllm_pib.demo import world as W

    records = []
    for scene in scenes:
        objects = [(obj.word, place(obj.bbox, scene.image_size)) for obj in scene.objects]
        ghost = (scene.lures or scene.absent)[0]
        hallucinated = objects[:1] + [(ghost, objects[0][1])] + objects[1:]
        records.append({"image": scene.filename, "prompt": W.DESCRIBE_PROMPT,
                        "chosen": description(objects, words), "rejected": description(hallucinated, words)})
    return records


def write_pairs_and_model(work: Path, size: BenchSize, device: str, dtype: str, legacy: bool = False) -> Path:
    """Write one pair per step of the run (``data/pairs.jsonl`` and its images) and a random
    LLaVA of ``size`` whose tokenizer is trained on them (``model/``, with the Llama tokenizer's
    ``legacy`` setting); returns the pairs file."""
    from mllm_pib.demo import world as W
    from mllm_pib.tokenizer import DEFAULT_CORPUS

    scenes = W.World(0).sample(size.pairs_per_batch * (size.warmup + size.steps))
    records = preference_records(scenes, size.answer_words)
    C.write_scene_images(scenes, work / "data")
    pairs = work / "data" / "pairs.jsonl"
    W.write_jsonl(pairs, records)
    corpus = [DEFAULT_CORPUS] + [r[k] for r in records for k in ("chosen", "rejected")]
    C.write_llava(size.model, work / "model", corpus, device=device, dtype=dtype, legacy=legacy)
    return pairs


def read_records(pairs: Path) -> list[dict]:
    return [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]


def pair_dataset(backbone, pairs: str | Path):
    """mllm-pib's checked, tokenised pairs of a generic pairs file (images beside it)."""
    from mllm_pib.data.dataset import PreferenceDataset
    from mllm_pib.data.images import ImageResolver
    from mllm_pib.data.records import READERS, BadRecordBudget

    budget = BadRecordBudget(0)
    records = READERS["generic"](pairs, ImageResolver(Path(pairs).parent), budget)
    return PreferenceDataset(records, backbone, budget, max_length=8192)


def token_counts(dataset) -> dict:
    """Mean prompt tokens (image tokens included) and mean answer tokens (end token included)
    of a :class:`~mllm_pib.data.dataset.PreferenceDataset`."""
    items = dataset.items
    answers = [len(i.chosen_ids) + len(i.rejected_ids) for i in items]
    return {"prompt": sum(len(i.prompt_ids) for i in items) / len(items), "answer": sum(answers) / (2 * len(items))}


def endless(loader: Iterable):
    while True:
        yield from loader


def round_robin(schemes: Mapping[str, Step], size: BenchSize, device: str) -> dict:
    """Median wall-clock and CPU seconds per step of every scheme, run round-robin in this
    process (the order rotating each round, so that a change in the machine's load hits every
    scheme alike) after ``size.warmup`` untimed rounds."""
    from tqdm.auto import tqdm

    names = list(schemes)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in tqdm(range(size.warmup + size.steps), desc="timing rounds", unit="round"):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = C.timed(schemes[name], device)
            if round_ >= size.warmup:
                times[name].append(seconds)
    return {
        "s_per_step": {name: C.median([wall for wall, _ in t]) for name, t in times.items()},
        "cpu_s_per_step": {name: C.median([cpu for _, cpu in t]) for name, t in times.items()},
    }
