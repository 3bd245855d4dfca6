"""The files one seed of the demo trains and evaluates on, all drawn from the world.

- preference data: HA-DPO ``desc_data.json`` / ``pope_data.json`` (and the generic jsonl) over
  the seed's training scenes, with their images in a Visual Genome layout;
- POPE: random / popular / adversarial splits built by the POPE builder from the held-out
  scenes' object annotations;
- CHAIR: the held-out images to describe, their ground-truth objects and a synonym file of the
  world's object words (one object per line, no synonyms: the world names each kind one way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mllm_pib.demo import world as W
from mllm_pib.demo.config import EVAL_OFFSET, SEED_STRIDE, DemoConfig
from mllm_pib.evaluation import pope


@dataclass(frozen=True)
class SeedData:
    """Where one seed's files are."""

    preference: W.ExportPaths
    eval_image_dir: Path
    pope_dir: Path
    chair_images: dict[int, Path]
    chair_annotations: Path
    chair_synonyms: Path


def held_out_scenes(world: W.World, start: int, pope_images: int, chair_images: int) -> list[W.Scene]:
    """Consecutive scenes from ``start`` until ``pope_images`` of them have the three objects a
    POPE image needs and there are at least ``chair_images``."""
    scenes: list[W.Scene] = []
    eligible = 0
    image_id = start
    while eligible < pope_images or len(scenes) < chair_images:
        scene = world.scene(image_id)
        scenes.append(scene)
        eligible += len(scene.objects) >= pope.POSITIVES_PER_IMAGE
        image_id += 1
    return scenes


def prepare_seed_data(config: DemoConfig, seed: int, out_dir: str | Path, progress: bool = True) -> SeedData:
    """Export the preference data and build the evaluation sets of ``seed`` under ``out_dir``."""
    out = Path(out_dir)
    world = W.World(config.world_seed, config.world)
    base = (seed + 1) * SEED_STRIDE
    training = world.sample(config.preference.scenes, start=base)
    preference = W.export_dataset(training, out / "preference", seed=seed, progress=progress)

    ev = config.evaluation
    held_out = held_out_scenes(world, base + EVAL_OFFSET, ev.pope_images, ev.chair_images)
    image_dir = W.write_images(held_out, out / "eval" / "VG", progress=progress)
    objects = out / "eval" / "objects.jsonl"
    W.write_jsonl(objects, W.object_records(held_out))
    splits = pope.build_splits(pope.load_object_images(objects), ev.pope_images, seed)
    pope_dir = out / "eval" / "pope"
    pope.write_splits(splits, pope_dir)

    described = held_out[: ev.chair_images]
    annotations = out / "eval" / "chair_objects.jsonl"
    W.write_jsonl(annotations, [{"image_id": s.image_id, "objects": list(s.words)} for s in described])
    synonyms = out / "eval" / "chair_synonyms.txt"
    W.write_synonyms(synonyms)
    return SeedData(
        preference=preference,
        eval_image_dir=image_dir,
        pope_dir=pope_dir,
        chair_images={s.image_id: image_dir / s.filename for s in described},
        chair_annotations=annotations,
        chair_synonyms=synonyms,
    )
