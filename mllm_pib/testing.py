"""Contract tests for backbone plugins: one import gives a plugin's test suite the checks every
backbone must pass, run against its own tiny checkpoint.

In a plugin's ``tests/test_contract.py``::

    from mllm_pib.testing import BackboneContractTests


    class TestMyModelContract(BackboneContractTests):
        backbone_name = "mymodel"

pytest then collects every ``test_*`` method below for that backbone. The class writes the
backbone's tiny checkpoint once (its spec's ``write_tiny``), loads it through the registry (so the
entry point is tested too) and shares the loaded backbone between its tests. Each check compares
the backbone with an independent computation: pieces against whole forwards, cached against
recomputed decoding, saved against loaded. Backbone-specific fidelity (against the original
model or its transformers class) stays in the plugin's own tests.

Override the class attributes and hooks (``tiny_options``, ``load_options``, ``questions``,
``answers``, :meth:`~BackboneContractTests.contract_images`,
:meth:`~BackboneContractTests.native_logits`, :meth:`~BackboneContractTests.features`) for
what differs between backbones. Needs pytest; the core never imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

INTERACTIONS = ("cross_attention", "self_attention")
ALLOWED_PARTS = {"vision", "projector", "qformer", "llm", "lm_head"}


class BackboneContractTests:
    """Subclass it (the subclass's name starting with ``Test``) and set :attr:`backbone_name`.

    Attributes:
        backbone_name: the registry name of the backbone under test.
        tiny_options: options given to ``write_tiny`` (e.g. a variant).
        claimed_by: the backbone that claims the tiny checkpoint's ``model_type`` when this one
            does not (a published layout it also loads under another backbone's model type).
        load_options: options given to ``load``.
        questions, answers: two prompts of different lengths and their answers.
        atol: tolerance of logits compared across computation orders (fp32).
        logp_atol: tolerance of summed answer log-probabilities.
        max_new_tokens: length of the generation checks.
    """

    backbone_name: ClassVar[str] = ""
    tiny_options: ClassVar[dict[str, Any]] = {}
    claimed_by: ClassVar[str] = ""
    load_options: ClassVar[dict[str, Any]] = {}
    questions: ClassVar[tuple[str, ...]] = (
        "Is there a cat in the image?",
        "Describe this image in detail, with every object, its colour and where it is.",
    )
    answers: ClassVar[tuple[str, ...]] = ("Yes, there is a cat.", "A red circle next to a blue square.")
    atol: ClassVar[float] = 1e-5
    logp_atol: ClassVar[float] = 1e-4
    max_new_tokens: ClassVar[int] = 6

    # --- hooks ------------------------------------------------------------------------------
    def contract_images(self) -> list:
        """One image per question, of different sizes and random content (seeded)."""
        from PIL import Image

        generator = torch.Generator().manual_seed(0)
        sizes = ((52, 40), (48, 64))  # (height, width)
        return [
            Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
            for h, w in sizes
        ]

    def native_logits(self, backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      vision_inputs: dict) -> torch.Tensor | None:
        """The logits of the model's own whole forward on left-padded rows (positions counted
        over real tokens), or ``None`` when the backbone wraps no such model. Default: the
        transformers model at ``backbone.model``."""
        model = getattr(backbone, "model", None)
        if not isinstance(model, torch.nn.Module):
            return None
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **vision_inputs).logits

    def features(self, backbone) -> tuple[str, ...]:
        """The ``feature`` options this checkpoint loads with. Default: ``feature_choices``."""
        return tuple(backbone.feature_choices)

    # --- fixtures (one tiny model per test class) --------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def contract_dir(cls, tmp_path_factory) -> str:
        from mllm_pib.plugins import get_backbone

        assert cls.backbone_name, f"{cls.__name__} must set backbone_name"
        out = tmp_path_factory.mktemp(f"contract-{cls.backbone_name}") / "tiny"
        get_backbone(cls.backbone_name).write_tiny(str(out), seed=0, **cls.tiny_options)
        return str(out)

    @pytest.fixture(scope="class")
    @classmethod
    def contract_backbone(cls, contract_dir):
        from mllm_pib.plugins import get_backbone

        return get_backbone(cls.backbone_name).load(contract_dir, **cls.load_options)

    @pytest.fixture(scope="class")
    @classmethod
    def contract_batch(cls, contract_backbone) -> dict:
        """Prompt + answer rows of different lengths, left padded, with their images."""
        backbone, images = contract_backbone, cls().contract_images()
        rows = [backbone.prompt_ids(q, image) + backbone.answer_ids(a)
                for q, a, image in zip(cls.questions, cls.answers, images)]
        assert len({len(row) for row in rows}) > 1, "the contract questions must give rows of different lengths"
        ids, mask = _left_pad(rows, backbone.pad_token_id)
        return {"rows": rows, "input_ids": ids, "attention_mask": mask,
                "vision_inputs": backbone.preprocess(images, list(cls.questions))}

    # --- registration and templates -----------------------------------------------------------
    def test_registration(self, contract_dir, contract_backbone):
        """The spec declares ``feature`` (checkpoints record it and reload with it) and, when it
        names model types, the tiny checkpoint's ``config.json`` resolves to this backbone (or,
        for a layout another backbone claims, to :attr:`claimed_by`)."""
        import json

        from mllm_pib.plugins import get_backbone, resolve_backbone

        entry = get_backbone(self.backbone_name)
        assert "feature" in entry.spec.options, "the spec must declare the `feature` option"
        assert contract_backbone.name == self.backbone_name
        assert contract_backbone.feature in contract_backbone.feature_choices
        if entry.spec.model_types:
            model_type = json.loads((Path(contract_dir) / "config.json").read_text())["model_type"]
            assert (model_type not in entry.spec.model_types) == bool(self.claimed_by)
            assert resolve_backbone(contract_dir) == (self.claimed_by or self.backbone_name)

    def test_token_ids(self, contract_backbone):
        """Prompts hold the image placeholders; answers hold none and end with a stop sequence;
        stop sequences are non-empty lists of token ids of the vocabulary."""
        backbone = contract_backbone
        vocab = len(backbone.tokenizer)
        stops = backbone.stop_sequences
        assert stops and all(stop and all(isinstance(t, int) and 0 <= t < vocab for t in stop) for stop in stops)
        for question, answer, image in zip(self.questions, self.answers, self.contract_images()):
            prompt, answer_ids = backbone.prompt_ids(question, image), backbone.answer_ids(answer)
            assert all(isinstance(t, int) and 0 <= t < vocab for t in prompt + answer_ids)
            assert backbone.image_token_id in prompt
            assert backbone.image_token_id not in answer_ids
            assert any(answer_ids[-len(stop):] == stop for stop in stops), (
                f"answer_ids({answer!r}) = {answer_ids} ends with none of the stop sequences {stops}")

    def test_vision_features(self, contract_backbone, contract_batch):
        backbone = contract_backbone
        with torch.no_grad():
            vision = backbone.encode_vision(**contract_batch["vision_inputs"])
        n = len(self.questions)
        assert vision.pib.dim() == 3 and vision.pib.shape[0] == n and vision.pib.shape[2] == backbone.pib_vision_size
        assert vision.llm.dim() == 3 and vision.llm.shape[0] == n and vision.llm.shape[2] == backbone.hidden_size
        if vision.pib_mask is not None:
            assert vision.pib_mask.dtype == torch.bool and vision.pib_mask.shape == vision.pib.shape[:2]
            assert vision.pib_mask.any(-1).all(), "every image needs at least one valid feature"
        assert not torch.allclose(vision.llm[0], vision.llm[1]), "the visual tokens must depend on the image"

    def test_parts_cover_every_weight_once(self, contract_backbone):
        """Every weight belongs to one part; only a head tied to the input embeddings (Gemma 3)
        shares its weight, which the freezing policy unties when the head trains."""
        owners: dict[int, str] = {}
        parts = contract_backbone.parts()
        assert set(parts) <= ALLOWED_PARTS and {"llm", "lm_head"} <= set(parts)
        tied = id(parts["llm"].get_input_embeddings().weight)
        for part, module in parts.items():
            for param in module.parameters():
                shared = id(param) in owners and parts[owners[id(param)]] is not module
                assert not shared or (part == "lm_head" and id(param) == tied), (
                    f"{part} shares a weight with {owners.get(id(param))}")
                owners.setdefault(id(param), part)
        assert set(owners) == {id(p) for p in contract_backbone.parameters()}

    # --- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def test_identity_block_logits(self, contract_backbone, contract_batch):
        """A fresh (identity) block gives ``lm_head(lm_forward(...).hidden)``, and each left-padded
        row equals the same row run alone."""
        from mllm_pib.model import PIBModel

        backbone, batch = contract_backbone, contract_batch
        ids, mask, inputs = batch["input_ids"], batch["attention_mask"], batch["vision_inputs"]
        vision = backbone.encode_vision(**inputs)
        hidden = backbone.lm_forward(backbone.embed(ids), vision, mask, image_mask=ids == backbone.image_token_id).hidden
        pieces = backbone.lm_head(hidden)
        logits = PIBModel(backbone)(ids, mask, inputs)
        real = mask.bool()
        torch.testing.assert_close(logits[real], pieces[real], atol=self.atol, rtol=0)
        for i, row in enumerate(batch["rows"]):
            alone = torch.tensor([row])
            one = vision.map(lambda t: t[i : i + 1])
            hidden = backbone.lm_forward(backbone.embed(alone), one, torch.ones_like(alone),
                                         image_mask=alone == backbone.image_token_id).hidden
            torch.testing.assert_close(pieces[i, -len(row):], backbone.lm_head(hidden)[0], atol=self.atol, rtol=0)

    @torch.no_grad()
    def test_identity_block_logits_equal_native_forward(self, contract_backbone, contract_batch):
        batch = contract_batch
        native = self.native_logits(contract_backbone, batch["input_ids"], batch["attention_mask"],
                                    batch["vision_inputs"])
        if native is None:
            pytest.skip(f"{self.backbone_name} wraps no whole model; override native_logits to compare with one")
        from mllm_pib.model import PIBModel

        ours = PIBModel(contract_backbone)(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(ours[real], native[real], atol=self.atol, rtol=0)

    @pytest.mark.parametrize("interaction", INTERACTIONS)
    @torch.no_grad()
    def test_shared_prefix_scoring_equals_full_forwards(self, contract_backbone, interaction):
        """Pair scoring with one pass over image + prompt per pair equals separate whole
        sequences, and both equal answer log-probs computed here from whole-sequence logits."""
        model = _open_block(contract_backbone, interaction)
        batch = self._pair_batch(contract_backbone)
        assert len(set(batch["prompt_mask"].sum(1).tolist())) > 1, "prompts of different lengths"
        shared = model.answer_logps(batch, shared_prefix=True)
        full = model.answer_logps(batch, shared_prefix=False)
        for a, b in zip(shared, full):
            assert torch.equal(a.counts, b.counts)
            torch.testing.assert_close(a.logps, b.logps, atol=self.logp_atol, rtol=0)
        policy, reference = (self._whole_sequence_logps(model, batch, bypass) for bypass in (False, True))
        torch.testing.assert_close(shared[0].logps, policy, atol=self.logp_atol, rtol=0)
        torch.testing.assert_close(shared[1].logps, reference, atol=self.logp_atol, rtol=0)
        assert not torch.allclose(policy, reference, atol=1e-2), "the open block must change the log-probs"

    # --- generation ---------------------------------------------------------------------------
    @pytest.mark.parametrize(("num_beams", "interaction"), [(1, "cross_attention"), (3, "self_attention")])
    @torch.no_grad()
    def test_cached_generation_equals_uncached(self, contract_backbone, num_beams, interaction):
        """Greedy and beam search on a left-padded batch of two images of different sizes, with
        a block strong enough to change the tokens: cached equals recomputed, and (greedy) each
        step's logits agree and each row equals its prompt decoded alone."""
        model = _open_block(contract_backbone, interaction, scale=8.0)
        images, questions = self.contract_images(), list(self.questions)
        batch = model.prompt_batch(images, questions)
        assert (batch["attention_mask"] == 0).any(), "the contract prompts must need left padding"
        args = (batch["input_ids"], batch["attention_mask"], batch["vision_inputs"])
        settings = {"max_new_tokens": self.max_new_tokens, "num_beams": num_beams}
        cached = model.generate(*args, **settings)
        assert cached.shape[1] > 0
        assert torch.equal(cached, model.generate(*args, **settings, use_cache=False))
        if num_beams > 1:
            return
        assert not torch.equal(cached, model.generate(*args, **settings, bypass_pib=True)), (
            "the block should change the tokens")
        # tokens of tiny random models hide small errors (e.g. a wrong position): compare the
        # next-token logits of each step too, both fed the same tokens
        steps = [_step_logits(model, batch, cached, use_cache) for use_cache in (True, False)]
        torch.testing.assert_close(steps[0], steps[1], atol=self.logp_atol, rtol=self.logp_atol)
        stops = contract_backbone.stop_sequences
        for i in range(len(questions)):
            single = model.prompt_batch(images[i : i + 1], questions[i : i + 1])
            alone = model.generate(single["input_ids"], single["attention_mask"], single["vision_inputs"], **settings)
            assert _until_stop(alone[0].tolist(), stops) == _until_stop(cached[i].tolist(), stops)

    @torch.no_grad()
    def test_identity_greedy_equals_full_recomputation(self, contract_backbone):
        """Greedy decoding with an identity block is the base model's argmax, each step
        recomputed from the whole sequence here."""
        from mllm_pib.generation import first_stop
        from mllm_pib.model import PIBModel

        backbone, model = contract_backbone, PIBModel(contract_backbone)
        for image, question in zip(self.contract_images(), self.questions):
            batch = model.prompt_batch([image], [question])
            tokens = model.generate(batch["input_ids"], batch["attention_mask"], batch["vision_inputs"],
                                    max_new_tokens=self.max_new_tokens)[0].tolist()
            ids = torch.tensor([backbone.prompt_ids(question, image)])
            vision = backbone.encode_vision(**backbone.preprocess([image], [question]))
            expected: list[int] = []
            while len(expected) < self.max_new_tokens and first_stop(expected, backbone.stop_sequences) is None:
                hidden = backbone.lm_forward(backbone.embed(ids), vision, torch.ones_like(ids),
                                             image_mask=ids == backbone.image_token_id).hidden
                expected.append(int(backbone.lm_head(hidden)[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([expected[-1:]])], 1)
            assert tokens[: len(expected)] == expected

    # --- persistence --------------------------------------------------------------------------
    @torch.no_grad()
    def test_save_pretrained_round_trip(self, contract_backbone, contract_batch, tmp_path):
        """``save_pretrained`` writes what ``load`` reads back: same logits, same base identity
        (``export`` depends on it)."""
        from mllm_pib.plugins import get_backbone

        backbone = contract_backbone
        backbone.save_pretrained(str(tmp_path / "saved"))
        assert [p.name for p in tmp_path.iterdir()] == ["saved"], "save_pretrained left other files next to its folder"
        again = get_backbone(self.backbone_name).load(str(tmp_path / "saved"), feature=backbone.feature,
                                                      **self._load_options_without_feature())
        image = self.contract_images()[0]
        assert again.prompt_ids(self.questions[0], image) == backbone.prompt_ids(self.questions[0], image)
        before, after = backbone.identity(), again.identity()
        assert {k: v for k, v in after.items() if k != "model_id"} == {k: v for k, v in before.items() if k != "model_id"}
        ids, mask, inputs = contract_batch["input_ids"], contract_batch["attention_mask"], contract_batch["vision_inputs"]
        torch.testing.assert_close(_logits(again, ids, mask, inputs), _logits(backbone, ids, mask, inputs),
                                   atol=self.atol, rtol=0)

    def test_identity_stable_across_reload(self, contract_dir, contract_backbone):
        from mllm_pib.plugins import get_backbone

        again = get_backbone(self.backbone_name).load(contract_dir, **self.load_options)
        assert again.identity() == contract_backbone.identity()
        assert len(contract_backbone.identity()["fingerprint"]) == 16

    def test_every_feature_loads(self, contract_dir, contract_backbone):
        from mllm_pib.model import PIBModel
        from mllm_pib.plugins import get_backbone

        features = self.features(contract_backbone)
        assert features, "the backbone lists no feature_choices"
        inputs = contract_backbone.preprocess(self.contract_images()[:1], list(self.questions[:1]))
        for feature in features:
            backbone = get_backbone(self.backbone_name).load(contract_dir, feature=feature,
                                                             **self._load_options_without_feature())
            assert backbone.feature == feature and backbone.identity()["feature"] == feature
            with torch.no_grad():
                vision = backbone.encode_vision(**inputs)
            assert vision.pib.shape[-1] == backbone.pib_vision_size, feature
            PIBModel(backbone)  # the block fits the widths the backbone reports

    @torch.no_grad()
    def test_pib_checkpoint_reloads_and_exports(self, contract_dir, contract_batch, tmp_path):
        """A PIB checkpoint (on the last feature option, so that reloading must take the feature
        from the checkpoint) reloads onto the base and through ``export`` with equal logits."""
        from mllm_pib.checkpoint import export_model, load_model, save_checkpoint
        from mllm_pib.freezing import FreezePolicy
        from mllm_pib.plugins import get_backbone

        registered = get_backbone(self.backbone_name)
        probe = registered.load(contract_dir, **self.load_options)
        feature = self.features(probe)[-1]
        backbone = registered.load(contract_dir, feature=feature, **self._load_options_without_feature())
        model = _open_block(backbone, "cross_attention")
        save_checkpoint(tmp_path / "pib", model, FreezePolicy.preset("stage1"))
        ids, mask, inputs = contract_batch["input_ids"], contract_batch["attention_mask"], contract_batch["vision_inputs"]
        expected = model(ids, mask, inputs)
        options = self._load_options_without_feature()
        reloaded = load_model(contract_dir, pib=str(tmp_path / "pib"), **options)
        assert reloaded.backbone.feature == feature
        assert torch.equal(reloaded(ids, mask, inputs), expected)
        exported = export_model(tmp_path / "pib", contract_dir, tmp_path / "export", **options)
        assert torch.equal(load_model(str(exported), **options)(ids, mask, inputs), expected)

    # --- helpers ------------------------------------------------------------------------------
    def _load_options_without_feature(self) -> dict[str, Any]:
        return {k: v for k, v in self.load_options.items() if k != "feature"}

    def _pair_batch(self, backbone) -> dict:
        """A preference batch of two pairs built by the training collator: each answer of the
        contract is the chosen one of a pair and the other pair's rejected one."""
        from mllm_pib.data.dataset import PreferenceCollator, TokenisedPair
        from mllm_pib.data.records import PreferencePair

        examples = []
        for i, (question, image) in enumerate(zip(self.questions, self.contract_images())):
            chosen, rejected = self.answers[i], self.answers[1 - i]
            pair = PreferencePair(image=Path(f"contract-{i}.png"), prompt=question, chosen=chosen, rejected=rejected,
                                  source="contract", index=i, pair_id=f"contract:{i}")
            item = TokenisedPair(pair, backbone.prompt_ids(question, image), backbone.answer_ids(chosen),
                                 backbone.answer_ids(rejected))
            examples.append({"item": item, "image": image})
        return PreferenceCollator(backbone)(examples)

    def _whole_sequence_logps(self, model, batch: dict, bypass_pib: bool = False) -> torch.Tensor:
        """Every answer row's summed log-probs (chosen rows, then rejected rows), its pair's
        prompt + answer run whole and alone."""
        pairs = batch["prompt_ids"].shape[0]
        logps = []
        for row in range(batch["answer_ids"].shape[0]):
            pair = row % pairs
            prompt = batch["prompt_ids"][pair][batch["prompt_mask"][pair].bool()]
            answer = batch["answer_ids"][row][batch["answer_mask"][row].bool()]
            ids = torch.cat([prompt, answer])[None]
            # each image preprocessed alone: some layouts flatten a batch's patches (Qwen2-VL)
            inputs = model.backbone.preprocess(self.contract_images()[pair : pair + 1], [self.questions[pair]])
            logits = model(ids, torch.ones_like(ids), inputs, bypass_pib=bypass_pib)
            log_probs = torch.log_softmax(logits.float(), -1)[0]
            logps.append(sum(log_probs[len(prompt) - 1 + j, int(token)] for j, token in enumerate(answer)))
        return torch.stack(logps)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def _logits(backbone, ids, mask, vision_inputs) -> torch.Tensor:
    vision = backbone.encode_vision(**vision_inputs)
    hidden = backbone.lm_forward(backbone.embed(ids), vision, mask, image_mask=ids == backbone.image_token_id).hidden
    return backbone.lm_head(hidden)


def _until_stop(tokens: list[int], stops: list[list[int]]) -> list[int]:
    from mllm_pib.generation import first_stop

    start = first_stop(tokens, stops)
    return tokens if start is None else tokens[:start]


def _step_logits(model, batch: dict, tokens: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """``[B, L, V]`` next-token logits of each decoding step, the steps fed ``tokens``."""
    from mllm_pib.generation import Decoder

    decoder = Decoder(model, batch["vision_inputs"], use_cache=use_cache, bypass_pib=False)
    logits = [decoder.start(batch["input_ids"], batch["attention_mask"])]
    for column in tokens.T[:-1]:
        logits.append(decoder.step(column))
    return torch.stack(logits, 1)


def _open_block(backbone, interaction: str, scale: float = 1.0):
    """A PIB model whose block changes the logits (gates open; weights scaled by ``scale``:
    a strong block makes a decoding mistake change the tokens), so that a mistake in caching,
    packing or reloading shows in the tokens and log-probs."""
    from mllm_pib.model import PIBModel

    torch.manual_seed(1)
    model = PIBModel(backbone, pib_config={"interaction": interaction, "num_heads": 4, "intermediate_size": 64})
    with torch.no_grad():
        for name, param in model.pib.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.7)
            elif param.dim() > 1:
                param.mul_(scale)
    return model.eval()
