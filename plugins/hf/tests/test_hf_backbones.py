"""llava_next, llava_onevision, gemma3, idefics3 and smolvlm (both its layouts: SmolVLM2 and SmolVLM-Instruct)
against transformers' own model and processor: prompt and answer ids as the published conversation format gives them, identity-block logits equal to
the model's forward, greedy and beam tokens equal to its ``generate`` (batched, left padding,
images of different sizes, and so of different tile grids for the tiling models), features as
the model computes them, and the CLI."""

import json

import pytest
import torch
from PIL import Image

from mllm_pib.cli import main
from mllm_pib.model import PIBModel
from mllm_pib.plugins import get_backbone

# test cases: a backbone's tiny model; "smolvlm" is SmolVLM-Instruct's layout, "smolvlm2" SmolVLM2's
CASES = ["llava_next", "llava_onevision", "gemma3", "idefics3", "smolvlm", "smolvlm2"]
BACKBONE = {"smolvlm2": "smolvlm"}  # the case's backbone, where it is not the case's name
TINY_OPTIONS = {"smolvlm": {"layout": "idefics3"}}
# The published single-turn formats, written out (llava-hf model cards): prompt, answer.
FORMATS = {
    "llava_next": ("[INST] <image>\n{question} [/INST]", " {answer}</s>"),
    "llava_onevision": ("<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n", "{answer}<|im_end|>"),
    "gemma3": ("<start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n", "{answer}<end_of_turn>"),
    # Idefics3 adds its BOS <|begin_of_text|> to the text; SmolVLM's <|im_start|> is written out
    "idefics3": ("User:<image>{question}<end_of_utterance>\nAssistant:", " {answer}<end_of_utterance>"),
    "smolvlm": ("<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:", " {answer}<end_of_utterance>"),
    "smolvlm2": ("<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:", " {answer}<end_of_utterance>"),
}
CLASSES = {  # model, processor, tokenizer as saved
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor", "LlamaTokenizer"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor", "Qwen2Tokenizer"),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor", "GemmaTokenizer"),
    # TokenizersBackend: transformers 5's name for PreTrainedTokenizerFast
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor", "TokenizersBackend"),
    "smolvlm": ("Idefics3ForConditionalGeneration", "Idefics3Processor", "GPT2Tokenizer"),
    "smolvlm2": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor", "GPT2Tokenizer"),
}
# SmolVLM-Instruct is published as an Idefics3 checkpoint, which the idefics3 backbone claims
MODEL_TYPE = {"smolvlm": "idefics3", "smolvlm2": "smolvlm"}
END_OF_TURN = {"llava_next": ["</s>"], "llava_onevision": ["<|im_end|>"], "gemma3": ["<end_of_turn>", "<eos>"],
               "idefics3": ["<end_of_utterance>", "<|end_of_text|>"], "smolvlm": ["<end_of_utterance>"],
               "smolvlm2": ["<end_of_utterance>"]}
ANYRES = ("llava_next", "llava_onevision")
IDEFICS3 = ("idefics3", "smolvlm", "smolvlm2")
QUESTIONS = ["Is there a cat in the image?", "Describe this image in detail."]
ANSWERS = ["Yes, there is a cat.", "The image shows a red circle, a blue square and a green tree."]


def pictures():
    """Two sizes that the tiny models cut into different tile grids."""
    return [Image.new("RGB", (40, 52), (200, 30, 30)), Image.new("RGB", (90, 20), (20, 90, 220))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(case)`` -> (case, directory, backbone) of a tiny model, written once."""
    made = {}

    def build(case):
        if case not in made:
            out, entry = tmp_path_factory.mktemp(case), get_backbone(BACKBONE.get(case, case))
            entry.write_tiny(str(out), seed=0, **TINY_OPTIONS.get(case, {}))
            made[case] = (case, str(out), entry.load(str(out)))
        return made[case]

    return build


@pytest.fixture(params=CASES)
def tiny(request, built):
    return built(request.param)


def published_inputs(backbone, name, questions, images):
    """The model-card usage: the prompt text written out, then the processor on text + images."""
    texts = [FORMATS[name][0].format(question=q) for q in questions]
    return backbone.processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt")


def test_tiny_layout(tiny):
    name, path, backbone = tiny
    config = json.loads(open(f"{path}/config.json").read())
    from mllm_pib.plugins import resolve_backbone

    model_type = MODEL_TYPE.get(name, name)  # every backbone claims its own name as model type
    assert config["model_type"] == model_type and resolve_backbone(path) == model_type
    assert get_backbone(model_type).spec.model_types == (model_type,)
    processor = json.loads(open(f"{path}/processor_config.json").read())
    tokenizer = json.loads(open(f"{path}/tokenizer_config.json").read())
    assert (*config["architectures"], processor["processor_class"], tokenizer["tokenizer_class"]) == CLASSES[name]
    assert type(backbone.model).__name__ == CLASSES[name][0]
    if name == "smolvlm2":  # SmolVLMProcessor reads its image tokens by name, as SmolVLM2's tokenizer names them
        named = ("fake_image_token", "image_token", "end_of_utterance_token", "global_image_token")
        assert [tokenizer[key] for key in named] == ["<fake_token_around_image>", "<image>", "<end_of_utterance>",
                                                      "<global-img>"]
    assert backbone.stop_sequences == [[i] for i in backbone.tokenizer.convert_tokens_to_ids(END_OF_TURN[name])]


def test_prompt_and_answer_ids_equal_the_published_format(tiny):
    name, _, backbone = tiny
    prompt_format, answer_format = FORMATS[name]
    tokenizer = backbone.tokenizer
    for question, image in zip(QUESTIONS, pictures()):
        expected = published_inputs(backbone, name, [question], [image])["input_ids"][0].tolist()
        assert backbone.prompt_ids(question, image) == expected
        assert expected.count(backbone.image_token_id) >= 16  # tiny models: 16 tokens a view or image
        assert expected.count(backbone.tokenizer.bos_token_id) == (backbone.tokenizer.bos_token_id is not None)
    counts = {backbone.prompt_ids(QUESTIONS[0], image).count(backbone.image_token_id) for image in pictures()}
    assert len(counts) == (2 if name in ANYRES + IDEFICS3 else 1)  # tiles: the count follows the image
    for answer in ANSWERS:
        prompt = prompt_format.format(question="?")
        before = tokenizer(prompt, add_special_tokens=False).input_ids
        whole = tokenizer(prompt + answer_format.format(answer=answer), add_special_tokens=False).input_ids
        assert whole[: len(before)] == before
        assert backbone.answer_ids(answer) == whole[len(before):]
    with pytest.raises(ValueError, match="needs the image"):
        backbone.prompt_ids(QUESTIONS[0])


@torch.no_grad()
def test_identity_block_logits_equal_the_model_forward(tiny):
    name, _, backbone = tiny
    model = PIBModel(backbone)
    batch = model.prompt_batch(pictures(), QUESTIONS)
    assert torch.equal(batch["input_ids"], published_inputs(backbone, name, QUESTIONS, pictures())["input_ids"])
    logits = model(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
    for row, (question, image) in enumerate(zip(QUESTIONS, pictures())):
        alone = published_inputs(backbone, name, [question], [image])  # no padding: the plain model's own case
        expected = backbone.model(**alone).logits[0]
        assert torch.allclose(logits[row, -expected.shape[0]:], expected, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_identity_block_generation_equals_transformers_generate(tiny, num_beams):
    name, _, backbone = tiny
    model = PIBModel(backbone)
    inputs = published_inputs(backbone, name, QUESTIONS, pictures())
    stops = [s[0] for s in backbone.stop_sequences]
    expected = backbone.model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=num_beams,
                                       eos_token_id=stops, pad_token_id=backbone.pad_token_id)
    expected = expected[:, inputs["input_ids"].shape[1]:]
    batch = model.prompt_batch(pictures(), QUESTIONS)
    tokens = model.generate(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"],
                            max_new_tokens=6, num_beams=num_beams)
    width = tokens.shape[1]
    assert tokens.tolist() == expected[:, :width].tolist()
    assert (expected[:, width:] == backbone.pad_token_id).all()


@pytest.mark.parametrize("name", ANYRES)
@pytest.mark.parametrize("feature", ["tower", "projector"])
@torch.no_grad()
def test_anyres_features_are_what_the_model_computes(built, name, feature):
    _, path, _ = built(name)
    choice = {"tower": {"llava_next": "clip", "llava_onevision": "siglip"}[name], "projector": "projector"}[feature]
    backbone = get_backbone(name).load(path, feature=choice)
    inputs = backbone.preprocess(pictures())
    feats = backbone.encode_vision(**inputs)
    inner, config = backbone.model.model, backbone.model.config
    for row, image in enumerate(pictures()):
        alone = backbone.preprocess([image])
        packed = inner.get_image_features(**alone, return_dict=True).pooler_output[0]
        valid = feats.llm_mask[row]
        assert torch.allclose(feats.llm[row, valid], packed, atol=1e-5) and not valid[len(packed):].any()
        views = alone["pixel_values"][0][: backbone.tiles(alone["image_sizes"][0])]
        tower = inner.vision_tower(views, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        tower = tower[:, 1:] if config.vision_feature_select_strategy == "default" else tower
        expected = packed if choice == "projector" else tower.reshape(-1, tower.shape[-1])
        assert torch.allclose(feats.pib[row, feats.pib_mask[row]], expected, atol=1e-5)
        assert int(feats.pib_mask[row].sum()) == len(expected)
    assert feats.pib.shape[-1] == backbone.pib_vision_size


def open_block(model_dir, name, out) -> str:
    """A block checkpoint whose gates are open, so that it changes the answers."""
    from mllm_pib.checkpoint import load_model, save_checkpoint
    from mllm_pib.freezing import FreezePolicy

    model = load_model(model_dir, backbone=name)
    gates = {key: torch.full_like(value, 0.5) for key, value in model.pib.state_dict().items() if key.endswith("gate")}
    model.pib.load_state_dict(gates, strict=False)
    save_checkpoint(out, model, FreezePolicy.preset("stage1"))
    return str(out)


def test_cli_tiny_model_generate_compare_export_and_pope(tiny, tmp_path, capsys):
    from mllm_pib.demo.world import World, export_dataset
    from mllm_pib.evaluation import pope

    _, path, backbone = tiny
    name = backbone.name
    pib = open_block(path, name, tmp_path / "pib")
    image = tmp_path / "red.png"
    pictures()[0].save(image)
    capsys.readouterr()
    assert main(["generate", "--backbone", name, "--model", path, "--pib", pib, "--image", str(image),
                 "--prompt", QUESTIONS[1], "--max-new-tokens", "5", "--compare", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)["answers"]
    assert set(answers) == {"base", "pib"}
    assert main(["export", "--pib", pib, "--base", path, str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert main(["generate", "--backbone", name, "--model", str(tmp_path / "export"), "--image", str(image),
                 "--prompt", QUESTIONS[1], "--max-new-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answers"]["pib"] == answers["pib"]

    world = export_dataset(World(5).sample(8, start=500), tmp_path / "world", seed=5)
    splits = pope.build_splits(pope.load_object_images(world.objects), num_images=2, seed=1)
    pope.write_splits(splits, tmp_path / "pope")
    assert main(["eval", "pope", "--backbone", name, "--model", path, "--pib", pib, "--questions",
                 str(tmp_path / "pope" / "coco_pope_random.json"), "--images", str(world.image_dir),
                 "--out", str(tmp_path / "out"), "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["random"]["total"] == len(pope.load_questions(tmp_path / "pope" / "coco_pope_random.json"))


@pytest.mark.parametrize("feature", ["siglip", "projector"])
@torch.no_grad()
def test_gemma3_features_are_what_the_model_computes(built, feature):
    _, path, _ = built("gemma3")
    backbone = get_backbone("gemma3").load(path, feature=feature)
    inputs = backbone.preprocess(pictures())
    feats = backbone.encode_vision(**inputs)
    inner = backbone.model.model
    tower = inner.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
    projected = inner.multi_modal_projector(tower)
    assert projected.shape[1] == 16 and feats.llm_mask is None and feats.pib_mask is None
    assert torch.allclose(feats.llm, projected, atol=1e-6)
    assert torch.allclose(feats.pib, tower if feature == "siglip" else projected, atol=1e-6)


@torch.no_grad()
def test_gemma3_image_tokens_attend_both_ways(built):
    """The logits equal the model's only with its bidirectional image mask: without
    ``token_type_ids`` (causal attention throughout) the model gives other logits."""
    _, _, backbone = built("gemma3")
    model = PIBModel(backbone)
    alone = published_inputs(backbone, "gemma3", QUESTIONS[:1], pictures()[:1])
    batch = model.prompt_batch(pictures()[:1], QUESTIONS[:1])
    logits = model(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
    causal = backbone.model(**{k: v for k, v in alone.items() if k != "token_type_ids"}).logits
    assert torch.allclose(logits, backbone.model(**alone).logits, atol=1e-4)
    assert not torch.allclose(logits, causal, atol=1e-2)
    assert not backbone.packs_pairs


@torch.no_grad()
def test_pairs_of_images_with_different_token_counts_score_as_each_alone(tiny):
    """Shared-prefix (packed) and whole-row scoring of a pair batch whose images give different
    numbers of visual tokens equal the scores of each pair run alone."""
    from mllm_pib.data.dataset import pad

    _, _, backbone = tiny
    model = PIBModel(backbone, pib_config={"num_heads": 4, "intermediate_size": 64})
    gates = {key: torch.full_like(value, 0.8) for key, value in model.pib.state_dict().items() if key.endswith("gate")}
    model.pib.load_state_dict(gates, strict=False)

    def batch(images, questions, chosen, rejected):
        prompt_ids, prompt_mask = pad([backbone.prompt_ids(q, i) for q, i in zip(questions, images)],
                                      backbone.pad_token_id, "left")
        answer_ids, answer_mask = pad([backbone.answer_ids(a) for a in chosen + rejected], backbone.pad_token_id, "right")
        return {"vision_inputs": backbone.preprocess(images), "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "answer_ids": answer_ids, "answer_mask": answer_mask, "pair_ids": list(questions)}

    both = batch(pictures(), QUESTIONS, ANSWERS, ["No.", "A dog."])
    for shared_prefix in (True, False):
        policy, reference = model.answer_logps(both, shared_prefix=shared_prefix)
        for i, image in enumerate(pictures()):
            alone = batch([image], QUESTIONS[i:i + 1], ANSWERS[i:i + 1], [["No.", "A dog."][i]])
            one_policy, one_reference = model.answer_logps(alone, shared_prefix=False)
            assert torch.allclose(policy.logps[[i, 2 + i]], one_policy.logps, atol=1e-4)
            assert torch.allclose(reference.logps[[i, 2 + i]], one_reference.logps, atol=1e-4)
    assert not torch.allclose(policy.logps, reference.logps, atol=1e-3)  # the block is not the identity


@pytest.mark.parametrize("name", IDEFICS3)
@pytest.mark.parametrize("feature", ["siglip", "projector"])
@torch.no_grad()
def test_idefics3_features_are_what_the_model_computes(built, name, feature):
    """Batched images of different tile counts (the smaller padded with all-zero tiles) give, per
    image, the tower's patches of its real tiles and the connector's tokens: equal to the model's
    ``get_image_features`` on the image alone, and to a pixel shuffle written out here."""
    _, path, tiny = built(name)
    backbone = get_backbone(tiny.name).load(path, feature=feature)
    inputs = backbone.preprocess(pictures())
    feats = backbone.encode_vision(**inputs)
    inner, config = backbone.model.model, backbone.model.config
    real = (inputs["pixel_values"] != 0).flatten(2).any(-1)
    assert real.sum(1).tolist()[0] != real.sum(1).tolist()[1] and not real.all()  # padding tiles in the batch
    scale, patches = config.scale_factor, config.vision_config.image_size // config.vision_config.patch_size
    for row, image in enumerate(pictures()):
        alone = backbone.preprocess([image])
        tiles = alone["pixel_values"][0]
        assert int(real[row].sum()) == len(tiles)
        tower = inner.vision_model(pixel_values=tiles).last_hidden_state  # [tiles, patches^2, Dv]
        grid = patches // scale  # token (I, J) concatenates the scale x scale patches of its block, row by row
        shuffled = tower.reshape(len(tiles), grid, scale, grid, scale, -1).permute(0, 1, 3, 2, 4, 5)
        projected = inner.connector.modality_projection(shuffled.reshape(len(tiles) * grid * grid, -1))
        assert torch.allclose(inner.get_image_features(**alone).pooler_output[0], projected, atol=1e-5)
        valid = feats.llm_mask[row]
        assert torch.allclose(feats.llm[row, valid], projected, atol=1e-5) and int(valid.sum()) == len(projected)
        expected = projected if feature == "projector" else tower.flatten(0, 1)
        assert torch.allclose(feats.pib[row, feats.pib_mask[row]], expected, atol=1e-5)
        assert int(feats.pib_mask[row].sum()) == len(expected)
    assert feats.pib.shape[-1] == backbone.pib_vision_size


def test_smolvlm_layouts_detected_from_config_json(built, tmp_path, capsys):
    """``--backbone`` left out: a SmolVLM2 checkpoint (``model_type: smolvlm``) runs on smolvlm, a
    SmolVLM-Instruct one (``model_type: idefics3``) on idefics3, the same architecture; named,
    smolvlm loads both; a backbone refuses a model type it does not load, in one line."""
    from mllm_pib.plugins import resolve_backbone

    image = tmp_path / "red.png"
    pictures()[0].save(image)

    def generate(path, *extra):
        capsys.readouterr()  # what building the tiny models printed
        code = main(["generate", "--model", path, "--image", str(image), "--prompt", QUESTIONS[0],
                     "--max-new-tokens", "4", "--json", *extra])
        out = capsys.readouterr()
        return code, json.loads(out.out)["answers"] if code == 0 else out.err.strip()

    for case, detected in (("smolvlm2", "smolvlm"), ("smolvlm", "idefics3")):
        _, path, _ = built(case)
        assert resolve_backbone(path) == detected
        code, answers = generate(path)
        assert code == 0 and generate(path, "--backbone", detected) == (0, answers)
        assert generate(path, "--backbone", "smolvlm")[0] == 0
    smolvlm2, llava_next = built("smolvlm2")[1], built("llava_next")[1]
    code, error = generate(smolvlm2, "--backbone", "idefics3")
    assert code == 2 and "\n" not in error
    assert f"{smolvlm2}/config.json: model_type 'smolvlm' is not 'idefics3'" in error
    code, error = generate(llava_next, "--backbone", "smolvlm")
    assert code == 2 and "\n" not in error
    assert (f"{llava_next}/config.json: model_type 'llava_next' is not 'smolvlm' or 'idefics3'; the smolvlm "
            "backbone loads smolvlm and idefics3 checkpoints only") in error


@pytest.mark.parametrize("config", ["smolvlm", "smolvlm2"])
def test_tiny_smolvlm_configs_train_their_layout(config, tmp_path, monkeypatch):
    """configs/tiny/smolvlm2.yaml trains from nothing on a tiny SmolVLM2; configs/tiny/smolvlm.yaml
    writes SmolVLM-Instruct's layout (``bootstrap.tiny_options``)."""
    from pathlib import Path

    path = Path(__file__).parents[3] / "configs" / "tiny" / f"{config}.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(path), "--set", "training.max_steps=2", "--set", "training.save_steps=100",
                 "--set", "bootstrap.synthetic_scenes=4"]) == 0
    assert (tmp_path / f"runs/tiny/{config}-pib/model.safetensors").is_file()
    written = json.loads((tmp_path / f"runs/tiny/{config}-model/config.json").read_text())
    assert (written["model_type"], *written["architectures"]) == (MODEL_TYPE[config], CLASSES[config][0])


# A later chat turn in the published multi-turn format, written out (llava-hf model card).
ONEVISION_SECOND_TURN = ("<|im_start|>user\n<image>\n{first}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
                         "<|im_start|>user\n{second}<|im_end|>\n<|im_start|>assistant\n")


@torch.no_grad()
def test_chat_continues_in_the_templates_multi_turn_format(built):
    from mllm_pib.chat import Chat, DecodingOptions

    _, _, backbone = built("llava_onevision")
    image = pictures()[0]
    chat = Chat(PIBModel(backbone), image, DecodingOptions(max_new_tokens=5), variants=("base",))
    answer = chat.ask(QUESTIONS[0]).answers["base"]
    second = chat.ask(QUESTIONS[1]).answers["base"]
    text = ONEVISION_SECOND_TURN.format(first=QUESTIONS[0], answer=answer, second=QUESTIONS[1])
    inputs = backbone.processor(text=[text], images=[[image]], return_tensors="pt")
    assert backbone.conversation_ids([(QUESTIONS[0], answer)], QUESTIONS[1], image) == inputs["input_ids"][0].tolist()
    stops = [s[0] for s in backbone.stop_sequences]
    tokens = backbone.model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=stops,
                                     pad_token_id=backbone.pad_token_id)[0, inputs["input_ids"].shape[1]:].tolist()
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    assert second == backbone.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
