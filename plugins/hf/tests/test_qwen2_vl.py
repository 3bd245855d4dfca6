"""The qwen2_vl and qwen2_5_vl backbones against transformers' own models and processors (tiny
random models of the real classes): prompt and answer ids, vision features, logits, M-RoPE
positions, greedy and beam generation, cached against uncached decoding, shared-prefix scoring."""

import json
import math

import pytest
import torch
from PIL import Image

from mllm_pib.backbone import position_ids_from_mask
from mllm_pib.cli import main
from mllm_pib.model import PIBModel
from mllm_pib.plugins import get_backbone
from mllm_pib_hf.mrope import llm_grids, mrope_positions

VARIANTS = ["qwen2_vl", "qwen2_5_vl"]
QUESTIONS = ["Is there a cat in the image?", "Describe this image in detail."]
ANSWERS = ["Yes, there is a cat.", "The image shows a red circle and a blue square."]
SIZES = [(60, 60), (120, 50), (90, 120)]  # 2x2, 2x4 and 4x3 visual tokens: different counts in one batch


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    assert main(["tiny-model", "--backbone", request.param, str(out)]) == 0
    return request.param, str(out)


@pytest.fixture(scope="module")
def backbone(tiny):
    return get_backbone(tiny[0]).load(tiny[1])


def picture(size, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def pictures(n=2):
    return [picture(size, seed) for seed, size in enumerate(SIZES[:n])]


def with_gates(model, value=0.7):
    with torch.no_grad():
        for name, param in model.pib.named_parameters():
            if name.endswith("_gate"):
                param.fill_(value)
    return model


def processor_batch(bb, questions, images):
    """transformers' own inputs: its chat template and processor, left padding."""
    texts = [bb.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in questions]
    return bb.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


# ------------------------------------------------------------------ layout, prompt and answer ids


def smart_resize_tokens(width, height, min_pixels, max_pixels, factor=28):
    """Visual tokens of an image as Qwen2-VL's image processor sizes it (its published rule:
    sides rounded to multiples of 28 px, area scaled into [min_pixels, max_pixels])."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


def test_tiny_layout(tiny, backbone):
    name, path = tiny
    config = json.loads(open(f"{path}/config.json").read())
    assert config["model_type"] == name
    saved = json.loads(open(f"{path}/tokenizer_config.json").read())
    assert saved["tokenizer_class"] == "Qwen2Tokenizer" and saved["eos_token"] == "<|im_end|>"
    tok = backbone.tokenizer
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    first = tok.convert_tokens_to_ids(specials[0])
    assert tok.convert_tokens_to_ids(specials) == [first, first + 1, first + 2]  # appended in Qwen's order
    assert tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]) == [first + 9, first + 10, first + 12]
    assert tok.bos_token is None and tok("Hi").input_ids == tok("Hi", add_special_tokens=False).input_ids
    assert backbone.stop_sequences == [[tok.convert_tokens_to_ids("<|im_end|>")], [first]]
    assert backbone.pad_token_id == first


def test_prompt_and_answer_ids_equal_the_published_template(backbone):
    tok = backbone.tokenizer
    size = dict(backbone.processor.image_processor.size)
    for question, answer, image in zip(QUESTIONS, ANSWERS, pictures(2)):
        n = smart_resize_tokens(*image.size, size["shortest_edge"], size["longest_edge"])
        text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * n + f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")
        prompt = backbone.prompt_ids(question, image)
        assert prompt == tok(text).input_ids
        # transformers' own chat-template path, the image read from the message
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        assert prompt == backbone.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                return_dict=True)["input_ids"][0]
        answer_ids = backbone.answer_ids(answer)
        assert answer_ids == tok(answer + "<|im_end|>").input_ids
        whole = backbone.processor.apply_chat_template(
            messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=True,
            return_dict=True)["input_ids"][0]
        assert prompt + answer_ids == whole[: len(prompt) + len(answer_ids)]
    with pytest.raises(ValueError, match="needs the image"):
        backbone.prompt_ids(QUESTIONS[0])


def test_reads_the_hub_layout_and_pixel_bounds(tiny, tmp_path):
    """The hub's files (``preprocessor_config.json``, ``chat_template.json``) load to the same
    prompts; ``max_pixels`` / ``min_pixels`` change the count as the processor's rule says."""
    import shutil

    name, path = tiny
    hub = tmp_path / "hub"
    shutil.copytree(path, hub)
    saved = json.loads((hub / "processor_config.json").read_text())
    processor_class = "Qwen2_5_VLProcessor" if name == "qwen2_5_vl" else "Qwen2VLProcessor"
    (hub / "preprocessor_config.json").write_text(json.dumps({**saved["image_processor"], "processor_class": processor_class}))
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": (hub / "chat_template.jinja").read_text()}))
    (hub / "processor_config.json").unlink()
    (hub / "chat_template.jinja").unlink()
    image = picture((300, 200), 0)
    reference = get_backbone(name).load(path)
    assert get_backbone(name).load(str(hub)).prompt_ids(QUESTIONS[0], image) == reference.prompt_ids(QUESTIONS[0], image)
    wider = get_backbone(name).load(str(hub), max_pixels=28 * 28 * 64, min_pixels=28 * 28 * 8)
    count = wider.prompt_ids(QUESTIONS[0], image).count(wider.image_token_id)
    assert count == smart_resize_tokens(300, 200, 28 * 28 * 8, 28 * 28 * 64) == 54
    assert reference.prompt_ids(QUESTIONS[0], image).count(reference.image_token_id) == smart_resize_tokens(300, 200, 56**2, 112**2) == 12


def test_load_refuses_other_directories(tiny, tmp_path):
    from mllm_pib.errors import UserError

    name = tiny[0]
    with pytest.raises(UserError, match="no config.json"):
        get_backbone(name).load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(UserError, match=f"model_type 'llava' is not '{name}'"):
        get_backbone(name).load(str(tmp_path))


def test_prompt_batch_equals_the_processor_batch(backbone):
    model = PIBModel(backbone)
    images = pictures(2)
    ours = model.prompt_batch(images, QUESTIONS)
    theirs = processor_batch(backbone, QUESTIONS, images)
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["vision_inputs"]["pixel_values"], theirs["pixel_values"])
    assert torch.equal(ours["vision_inputs"]["image_grid_thw"], theirs["image_grid_thw"])


# ------------------------------------------------------------------ vision features


@pytest.mark.parametrize("feature", ["vision", "projector"])
def test_features_equal_transformers_image_features(tiny, feature):
    bb = get_backbone(tiny[0]).load(tiny[1], feature=feature)
    inputs = bb.preprocess(pictures(3))
    vision = bb.encode_vision(**inputs)
    theirs = torch.cat(bb.model.get_image_features(**inputs).pooler_output)
    tokens = inputs["image_grid_thw"].prod(-1) // 4
    assert vision.llm_mask.sum(-1).tolist() == tokens.tolist() == [4, 8, 12]
    assert torch.allclose(vision.llm[vision.llm_mask], theirs, atol=1e-6)
    assert bb.pib_vision_size == vision.pib.shape[-1] == (32 if feature == "vision" else 64)
    if feature == "vision":  # the patches, in the processor's order, are what the merger maps to the LLM's tokens
        assert vision.pib_mask.sum(-1).tolist() == (4 * tokens).tolist()
        assert torch.allclose(bb.model.model.visual.merger(vision.pib[vision.pib_mask]), theirs, atol=1e-5)
    else:
        assert torch.equal(vision.pib, vision.llm) and torch.equal(vision.pib_mask, vision.llm_mask)


def test_vision_part_excludes_the_merger(backbone):
    """The merger sits inside transformers' ViT module; the parts split them, so that freezing
    "vision" and training "projector" (or the reverse) each touch their own weights."""
    parts = {name: {id(p) for p in module.parameters()} for name, module in backbone.parts().items()}
    assert not parts["vision"] & parts["projector"]
    assert parts["vision"] | parts["projector"] == {id(p) for p in backbone.model.model.visual.parameters()}


# ------------------------------------------------------------------ positions and logits


def test_mrope_positions_equal_get_rope_index(backbone):
    images = pictures(3)
    batch = processor_batch(backbone, QUESTIONS + ["Is there a dog?"], images)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected, deltas = backbone.model.model.get_rope_index(
        ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    grids = llm_grids(batch["image_grid_thw"], backbone.merge_size)
    image_mask = ids == backbone.image_token_id
    assert torch.equal(mrope_positions(position_ids_from_mask(mask, ids.shape[1]), image_mask, grids), expected)
    # a decoding step: positions continue from the prompt's largest, as transformers' rope_deltas give
    step_mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
    step = mrope_positions(position_ids_from_mask(step_mask, 1), None, grids)
    assert torch.equal(step[:, :, 0], (expected.amax(-1) + 1)) and deltas.flatten().tolist() == [-2, -4, -8]


def test_identity_logits_equal_transformers_forward(backbone):
    model = PIBModel(backbone)
    images = pictures(2)
    batch = processor_batch(backbone, QUESTIONS, images)
    ours = model.prompt_batch(images, QUESTIONS)
    with torch.no_grad():
        logits = model(ours["input_ids"], ours["attention_mask"], ours["vision_inputs"])
        expected = backbone.model(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(logits[real], expected[real], atol=1e-5)


# ------------------------------------------------------------------ generation


def transformers_generate(bb, batch, **kwargs):
    out = bb.model.generate(**batch, do_sample=False, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


def until_stop(row, bb):
    stops = {s[0] for s in bb.stop_sequences}
    end = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
    return row[: end + 1]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_identity_generation_equals_transformers_generate(backbone, num_beams):
    model = PIBModel(backbone)
    images = pictures(2)
    ours = model.prompt_batch(images, QUESTIONS)
    tokens = model.generate(ours["input_ids"], ours["attention_mask"], ours["vision_inputs"], max_new_tokens=8,
                            num_beams=num_beams)
    theirs = transformers_generate(backbone, processor_batch(backbone, QUESTIONS, images), max_new_tokens=8,
                                   num_beams=num_beams)
    for mine, reference in zip(tokens.tolist(), theirs.tolist()):
        assert until_stop(mine, backbone) == until_stop(reference, backbone)


def test_cached_decoding_logits_equal_transformers_forward(backbone):
    """Each cached decoding step (positions from the rope deltas of the rows' images) gives the
    logits transformers' model gives that position in one uncached forward over the whole text
    (positions from ``get_rope_index``); batched, left-padded, images of different sizes."""
    from mllm_pib.generation import Decoder

    model = PIBModel(backbone)
    images = pictures(3)
    questions = QUESTIONS + ["Is there a dog?"]
    batch = model.prompt_batch(images, questions)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    words = ["Yes, there", " there is a", ". No, it"]
    new = torch.tensor([backbone.tokenizer(w, add_special_tokens=False).input_ids[:3] for w in words])
    with torch.no_grad():
        decoder = Decoder(model, batch["vision_inputs"], use_cache=True, bypass_pib=False)
        steps = [decoder.start(ids, mask)] + [decoder.step(new[:, j]) for j in range(new.shape[1])]
        whole = torch.cat([ids, new], 1)
        theirs = backbone.model(
            input_ids=whole, attention_mask=torch.cat([mask, torch.ones_like(new)], 1),
            pixel_values=batch["vision_inputs"]["pixel_values"], image_grid_thw=batch["vision_inputs"]["image_grid_thw"],
            mm_token_type_ids=(whole == backbone.image_token_id).int()).logits
    for j, logits in enumerate(steps):
        assert torch.allclose(logits, theirs[:, ids.shape[1] - 1 + j], atol=1e-5)


# ------------------------------------------------------------------ preference scoring


def pair_batch(bb, images):
    """Three pairs in the layout of ``PreferenceCollator``: left-padded prompts, right-padded
    answers (chosen rows, then rejected rows), the images' processor inputs."""
    from mllm_pib.data.dataset import pad

    prompts = [bb.prompt_ids(q, image) for q, image in zip(QUESTIONS + ["Is there a dog?"], images)]
    chosen = [bb.answer_ids(a) for a in ANSWERS + ["No."]]
    rejected = [bb.answer_ids(a) for a in ["No, there is none.", "A dog.", "Yes, there is a big brown dog."]]
    prompt_ids, prompt_mask = pad(prompts, bb.pad_token_id, "left")
    answer_ids, answer_mask = pad(chosen + rejected, bb.pad_token_id, "right")
    return {"vision_inputs": bb.preprocess(images), "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "answer_ids": answer_ids, "answer_mask": answer_mask}


@pytest.mark.parametrize("interaction", ["cross_attention", "self_attention"])
def test_shared_prefix_scoring_equals_full_forwards(backbone, interaction):
    torch.manual_seed(0)
    model = with_gates(PIBModel(backbone, pib_config={"interaction": interaction, "num_heads": 4, "intermediate_size": 64}))
    batch = pair_batch(backbone, pictures(3))
    assert backbone.packs_pairs
    with torch.no_grad():
        vision = backbone.encode_vision(**batch["vision_inputs"])
        shared = model.pair_hidden(batch, vision, shared_prefix=True)
        full = model.pair_hidden(batch, vision, shared_prefix=False)
        scores = [model.score_answers(r.hidden, r.vision(vision), r.labels, r.text_mask) for r in (shared, full)]
        # the full forwards equal transformers' model on each whole sequence
        ids = torch.cat([batch["prompt_ids"].repeat(2, 1), batch["answer_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"].repeat(2, 1), batch["answer_mask"]], 1)
        rows = [0, 1, 2, 0, 1, 2]  # chosen rows, then rejected rows
        inputs = batch["vision_inputs"]
        per_image = inputs["image_grid_thw"].prod(-1)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), per_image.cumsum(0)])
        pixel_values = torch.cat([inputs["pixel_values"][starts[r]:starts[r + 1]] for r in rows])
        expected = backbone.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                                  image_grid_thw=inputs["image_grid_thw"][rows],
                                  mm_token_type_ids=(ids == backbone.image_token_id).int()).logits
    targets = ids[:, 1:]
    logps = expected[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    scored = torch.cat([torch.zeros_like(batch["prompt_mask"].repeat(2, 1)), batch["answer_mask"]], 1)[:, 1:].bool()
    for shared_prefix in (True, False):
        reference = model.reference_logps(batch, shared_prefix=shared_prefix)
        assert torch.allclose(reference.logps, (logps * scored).sum(-1), atol=1e-4)
    assert torch.equal(scores[0].counts, scores[1].counts)
    assert torch.allclose(scores[0].logps, scores[1].logps, atol=1e-4)


# ------------------------------------------------------------------ the command line


def test_cli_tiny_config_trains_then_generate_export_and_pope(tmp_path, monkeypatch, capsys):
    """configs/tiny/qwen2_5_vl.yaml trains from nothing (both tiny configs do in the core's
    tests/test_training.py; the variants share every command's code path); ``generate --compare`` gives the answers of
    ``PIBModel.generate_text`` with and without the block; the exported model reloads to the same
    answer; POPE evaluation answers every question."""
    from pathlib import Path

    from mllm_pib.checkpoint import load_model
    from mllm_pib.evaluation import pope

    name = "qwen2_5_vl"
    config = Path(__file__).parents[3] / "configs" / "tiny" / f"{name}.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config), "--set", "training.max_steps=2", "--set", "training.save_steps=100",
                 "--set", "bootstrap.synthetic_scenes=4"]) == 0
    model_dir, pib = f"runs/tiny/{name}-model", f"runs/tiny/{name}-pib"
    image = next(Path("runs/tiny/data/VG").rglob("*.png"))
    question, tokens = QUESTIONS[1], "4"
    capsys.readouterr()
    common = ["--backbone", name, "--image", str(image), "--prompt", question, "--max-new-tokens", tokens, "--json"]
    assert main(["generate", "--model", model_dir, "--pib", pib, "--compare", *common]) == 0
    answers = json.loads(capsys.readouterr().out)["answers"]
    model = load_model(model_dir, backbone=name, pib=pib)
    picture = Image.open(image).convert("RGB")
    expected = {kind: model.generate_text([picture], [question], max_new_tokens=4, bypass_pib=kind == "base")[0]
                for kind in ("base", "pib")}
    assert answers == expected
    assert main(["export", "--pib", pib, "--base", model_dir, "--out", "exported"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "exported", *common]) == 0
    assert json.loads(capsys.readouterr().out)["answers"]["pib"] == expected["pib"]

    splits = pope.build_splits(pope.load_object_images(Path("runs/tiny/data/objects.jsonl")), num_images=3, seed=0)
    pope.write_splits(splits, tmp_path / "pope")
    questions = tmp_path / "pope" / "coco_pope_adversarial.json"
    assert main(["eval", "pope", "--backbone", name, "--model", "exported", "--questions", str(questions),
                 "--images", str(image.parent), "--out", "eval", "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adversarial"]["total"] == len(pope.load_questions(questions)) > 0
