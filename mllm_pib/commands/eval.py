"""``mllm-pib eval``: hallucination benchmarks that need no model.

- ``eval pope score``: score an answers file against POPE questions (pairs by question id).
- ``eval pope build``: build random / popular / adversarial POPE splits from object annotations.
- ``eval chair``: CHAIR_s, CHAIR_i and object recall of image descriptions.
- ``eval shr judge``: SHR of given descriptions, judged by a chat-completions endpoint.

Tables show percentages with 2 decimals; ``--json`` prints raw fractions (SHR, a percentage by
definition, excepted).

Every command that writes a folder records there what produced it; a rerun continues it only
when nothing changed, and ``--overwrite`` starts afresh (see :mod:`mllm_pib.evaluation.folder`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mllm_pib.commands.options import add_model_arguments, load_model_from_args
from mllm_pib.errors import UserError

if TYPE_CHECKING:
    from mllm_pib.evaluation.judge import JudgeConfig

POPE_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
COUNT_COLUMNS = ("tp", "fp", "tn", "fn", "total")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="hallucination benchmarks (POPE, CHAIR, SHR)")
    groups = parser.add_subparsers(dest="eval_command", metavar="BENCHMARK")
    _show_help_without_subcommand(parser)
    add_pope_parser(groups)
    add_chair_parser(groups)
    add_shr_parser(groups)
    add_run_parser(groups)


def add_run_parser(groups: argparse._SubParsersAction) -> None:
    run = groups.add_parser(
        "run",
        help="evaluate several models on POPE, CHAIR (and SHR) into one report",
        description="Evaluate a list of (backbone, model, pib) entries on the configured benchmarks; "
        "writes OUT/report.json, OUT/report.md and PNG charts. See configs/eval/ for examples.",
    )
    run.add_argument("--config", required=True, help="YAML evaluation config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set out=runs/eval2")
    add_overwrite_argument(run)
    run.add_argument("--json", action="store_true", help="print report.json")
    run.set_defaults(handler=run_suite_command)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start afresh: delete what an earlier evaluation wrote in the output folder (only that). Without "
        "it, an earlier evaluation of the same model, inputs and settings is continued and any other refused",
    )


def run_suite_command(args: argparse.Namespace) -> int:
    from mllm_pib.config import load_config
    from mllm_pib.evaluation.report import EvalRunConfig, markdown, run_suite

    report = run_suite(load_config(args.config, args.overrides, model=EvalRunConfig), overwrite=args.overwrite)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


def _show_help_without_subcommand(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)


# ---------------------------------------------------------------------------- POPE


def add_pope_parser(groups: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eval pope`` and its sub-commands; returns the ``pope`` parser."""
    pope = groups.add_parser(
        "pope",
        help="POPE: answer with a model and score; score answers; build question splits",
        description=(
            "With --model: answer POPE questions with a backbone (+ PIB) in batches (greedy, left "
            "padding, each answer stopped at its first sentence end), append answers as they come "
            "(a rerun of the same evaluation resumes), then score. Runs sharded under torchrun "
            "--nproc_per_node N. "
            "Sub-commands score an existing answers file or build question splits."
        ),
    )
    add_model_arguments(pope, required=False)
    pope.add_argument("--questions", metavar="FILE|DIR", help="POPE question file, or a directory of them")
    pope.add_argument("--images", metavar="DIR", help="image directory (file names as in the questions)")
    pope.add_argument("--out", metavar="DIR", help="output directory for answers and scores")
    pope.add_argument("--labels", metavar="DIR", help="label files for LLaVA's combined question file")
    pope.add_argument("--style", choices=("hadpo", "llava"), default="hadpo",
                      help="hadpo: the raw question (as HA-DPO scored); llava: add the single-word instruction")
    pope.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8)")
    pope.add_argument("--allow-outside-images", action="store_true",
                      help="use question images that lead outside --images (.., absolute paths, symlinks)")
    pope.add_argument("--max-new-tokens", type=int, default=64, help="cap per answer (default: 64)")
    add_overwrite_argument(pope)
    pope.add_argument("--json", action="store_true", help="print one JSON object keyed by split")
    pope.set_defaults(handler=lambda args: run_pope_model(args) if args.model else pope.print_help() or 2)
    commands = pope.add_subparsers(dest="pope_command", metavar="COMMAND")

    score = commands.add_parser(
        "score",
        help="score an answers file",
        description=(
            "Score answers with the official POPE rule (text before the first '.', commas dropped; "
            "'no' if a word is No/no/not), pairing answers with questions by question_id. Give "
            "--answers/--questions pairs (one labelled question file per split, JSON lines or a JSON "
            "array; the split comes from the file name), or LLaVA's combined llava_pope_test.jsonl "
            "with --labels DIR holding coco_pope_{category}.json."
        ),
    )
    score.add_argument(
        "--answers",
        action="append",
        required=True,
        metavar="FILE",
        help="answers JSON lines with question_id and text (or answer); repeat per --questions",
    )
    score.add_argument(
        "--questions",
        action="append",
        required=True,
        metavar="FILE",
        help="question file paired with the --answers at the same position",
    )
    score.add_argument("--labels", metavar="DIR", help="label files for LLaVA's combined question file")
    score.add_argument(
        "--answer-field",
        choices=("text", "answer"),
        help="the field to score when records carry both 'text' and 'answer' (by default such a "
        "record is refused unless both are equal)",
    )
    score.add_argument("--json", action="store_true", help="print one JSON object keyed by split")
    score.set_defaults(handler=run_pope_score)

    build = commands.add_parser(
        "build",
        help="build POPE splits from object annotations",
        description=(
            "POPE's own sampling (seeded; the same seed gives the files POPE's main.py writes after "
            "random.seed(SEED)): sample N images with at least --sample-num objects; per image ask "
            "about its first --sample-num objects (yes), each followed by one object absent from it "
            "(no), drawn from the sampled images' objects at random, by frequency (popular) or by "
            "co-occurrence with the positive (adversarial). Writes "
            "coco_pope_{random,popular,adversarial}.json (JSON lines)."
        ),
    )
    build.add_argument(
        "--annotations",
        required=True,
        metavar="FILE",
        help='COCO instances_*.json, or JSON lines of {"image", "objects"}',
    )
    build.add_argument("--images", type=int, required=True, metavar="N", help="number of images to sample")
    build.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    build.add_argument(
        "--sample-num", type=int, default=3, metavar="K",
        help="positive questions per image, and the objects an image needs to be sampled (default: 3)",
    )
    build.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_overwrite_argument(build)
    build.set_defaults(handler=run_pope_build)
    return pope


def run_pope_model(args: argparse.Namespace) -> int:
    from mllm_pib.evaluation.runner import GenerationSettings, distributed
    from mllm_pib.evaluation.suite import evaluate_pope, load_pope_sets

    for flag in ("questions", "images", "out"):
        if getattr(args, flag) is None:
            raise UserError(f"eval pope with --model needs --{flag}")
    # bad inputs fail before the model loads
    load_pope_sets(args.questions, args.images, args.labels, args.allow_outside_images)
    model = load_model_from_args(args)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop_at_sentence_end=True)
    report = evaluate_pope(model, args.questions, args.images, args.out, style=args.style, labels=args.labels,
                           settings=settings, overwrite=args.overwrite, allow_outside_images=args.allow_outside_images)
    if distributed()[0] == 0:
        print(json.dumps(report, indent=2) if args.json else format_pope_table(report))
    return 0


def run_pope_score(args: argparse.Namespace) -> int:
    from mllm_pib.evaluation import pope

    if len(args.answers) != len(args.questions):
        raise UserError(
            f"give one --answers per --questions "
            f"({len(args.answers)} answers files, {len(args.questions)} question files)"
        )
    scores = {}
    for answers_path, questions_path in zip(args.answers, args.questions):
        questions = pope.load_questions(questions_path, args.labels)
        answers = pope.read_answers(answers_path, args.answer_field)
        pope.check_answer_ids(questions, answers, f"{answers_path} vs {questions_path}")
        split_scores = pope.score(questions, answers)
        if clash := sorted(set(split_scores) & set(scores)):
            raise UserError(f"{questions_path}: split(s) {clash} already given by another question file")
        scores.update(split_scores)
    report = pope.report(scores)
    print(json.dumps(report, indent=2) if args.json else format_pope_table(report))
    return 0


def format_pope_table(report: dict) -> str:
    """Per-split metrics in percent (2 decimals) and confusion counts, then the mean F1."""
    header = ("split", *POPE_COLUMNS, *COUNT_COLUMNS)
    from mllm_pib.evaluation.pope import split_scores

    rows = [header]
    for split, m in split_scores(report).items():
        rows.append((split, *(f"{100 * m[c]:.2f}" for c in POPE_COLUMNS), *(str(m[c]) for c in COUNT_COLUMNS)))
    return _table(rows) + f"\nmean F1: {100 * report['mean_f1']:.2f}"


def run_pope_build(args: argparse.Namespace) -> int:
    from mllm_pib.evaluation import folder, pope

    if args.images < 1:
        raise UserError(f"--images must be at least 1, got {args.images}")
    splits = pope.build_splits(pope.load_object_images(args.annotations), args.images, args.seed, args.sample_num)
    sampling = {"images": args.images, "seed": args.seed, "sample_num": args.sample_num}
    identity = folder.identity(None, {"annotations": [args.annotations]}, sampling)
    folder.open_folder(args.out, folder.POPE_SPLITS, identity, args.overwrite)
    for path, questions in zip(pope.write_splits(splits, args.out), splits.values()):
        print(f"{path}: {len(questions)} questions")
    return 0


# ---------------------------------------------------------------------------- CHAIR


def add_chair_parser(groups: argparse._SubParsersAction) -> argparse.ArgumentParser:
    chair = groups.add_parser(
        "chair",
        help="CHAIR object hallucination of image descriptions",
        description=(
            "CHAIR_s (descriptions with a hallucinated object), CHAIR_i (hallucinated object "
            "mentions) and object recall, against COCO instance + caption annotations or JSON "
            'lines of {"image_id", "objects"} / {"image", "objects"}. --matcher nltk reads words as '
            "the original CHAIR script does (needs pip install 'mllm-pib[chair]' and NLTK data: "
            "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet)."
        ),
    )
    chair.add_argument(
        "--captions",
        metavar="FILE",
        help='JSON lines (or array) of {"image_id", "caption"}, or the descriptions.jsonl this tool writes',
    )
    chair.add_argument(
        "--annotations",
        nargs="+",
        metavar="PATH",
        help="a COCO annotations directory, instances_*.json / captions_*.json files, or objects JSON lines",
    )
    chair.add_argument("--synonyms", metavar="FILE", help="CHAIR synonym list (default: the COCO list shipped)")
    chair.add_argument(
        "--matcher",
        choices=("builtin", "nltk"),
        default="builtin",
        help="builtin: rule-based, no data; nltk: the original script's tokenizer, POS tagger and "
        "WordNet lemmatizer",
    )
    chair.add_argument("--json", action="store_true", help="print metrics and per-caption hallucinations as JSON")
    chair.set_defaults(handler=lambda args: run_chair(args) if args.captions or args.annotations else chair.print_help() or 2)
    commands = chair.add_subparsers(dest="chair_command", metavar="COMMAND")
    wordnet = commands.add_parser(
        "wordnet",
        help="install WordNet 3.0 for the nltk matcher from a local WordNet database",
        description=(
            "Copy a WordNet 3.0 database folder (e.g. Debian's wordnet-base + wordnet-sense-index: "
            "/usr/share/wordnet) into NLTK's data folder as corpora/wordnet, for machines that cannot "
            "run the NLTK downloader. The tokenizer and tagger data still come from the downloader."
        ),
    )
    wordnet.add_argument("--source", required=True, metavar="DIR", help="WordNet 3.0 database folder")
    wordnet.add_argument(
        "--nltk-data", metavar="DIR", default=str(Path.home() / "nltk_data"), help="NLTK data folder (default: ~/nltk_data)"
    )
    wordnet.set_defaults(handler=run_chair_wordnet)
    return chair


def run_chair(args: argparse.Namespace) -> int:
    from mllm_pib.evaluation import chair

    for flag in ("captions", "annotations"):
        if getattr(args, flag) is None:
            raise UserError(f"eval chair needs --{flag}")
    vocab = chair.ChairVocabulary.from_file(args.synonyms, args.matcher)
    captions = chair.load_captions(args.captions)
    truth = chair.load_annotations(args.annotations, vocab).objects
    report = chair.evaluate(captions, truth, vocab)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return 0
    rows = [
        ("CHAIR_s", "CHAIR_i", "recall", "captions", "mentions", "hallucinated", "matcher"),
        (
            f"{100 * report.chair_s:.2f}",
            f"{100 * report.chair_i:.2f}",
            f"{100 * report.recall:.2f}",
            str(report.captions),
            str(report.mentions),
            str(report.hallucinated_mentions),
            report.matcher,
        ),
    ]
    print(_table(rows))
    return 0


def run_chair_wordnet(args: argparse.Namespace) -> int:
    from mllm_pib.evaluation.chair_nltk import install_wordnet

    print(f"WordNet 3.0 installed in {install_wordnet(args.source, args.nltk_data)}")
    return 0


# ---------------------------------------------------------------------------- SHR


def add_shr_parser(groups: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eval shr`` and its ``judge`` sub-command; returns the ``shr`` parser."""
    shr = groups.add_parser(
        "shr",
        help="SHR: describe VG images with a model and judge them; or judge given descriptions",
        description=(
            "With --model: describe every SHR validation image (beam search, long answers; "
            "resumable, shardable under torchrun), then judge the descriptions sentence by "
            "sentence with a judge LLM behind an OpenAI-compatible chat-completions endpoint. "
            "For SHR comparable with published figures pass HA-DPO's judge prompt with "
            "--judge-prompt (see docs/evaluation.md)."
        ),
    )
    add_model_arguments(shr, required=False)
    shr.add_argument("--shr-dir", metavar="DIR", help="val_images_final.json and shr_factual_part*.jsonl")
    shr.add_argument("--vg-dir", metavar="DIR", help="image_data.json, region_descriptions.json and the VG images")
    shr.add_argument("--out", metavar="DIR", help="output directory")
    shr.add_argument("--num-beams", type=int, default=5, help="beams per description (default: 5, as HA-DPO)")
    shr.add_argument("--max-new-tokens", type=int, default=512, help="cap per description (default: 512)")
    shr.add_argument("--batch-size", type=int, default=4, help="images per generation batch (default: 4)")
    shr.add_argument("--allow-outside-images", action="store_true",
                     help="use VG images that lead outside --vg-dir (.., absolute paths, symlinks)")
    add_judge_arguments(shr, required=False)
    add_overwrite_argument(shr)
    shr.add_argument("--json", action="store_true", help="print the metrics as JSON")
    shr.set_defaults(handler=lambda args: run_shr_model(args) if args.model else shr.print_help() or 2)
    commands = shr.add_subparsers(dest="shr_command", metavar="COMMAND")
    judge = commands.add_parser(
        "judge",
        help="judge given descriptions",
        description=(
            "Judge model descriptions of SHR validation images sentence by sentence with a judge "
            "LLM behind an OpenAI-compatible chat-completions endpoint; writes judgements.jsonl "
            "and metrics.json. Replies are cached in OUT/judge_cache.jsonl, so a rerun asks "
            "nothing twice. For SHR comparable with published figures pass HA-DPO's judge "
            "prompt with --judge-prompt (see docs/evaluation.md)."
        ),
    )
    judge.add_argument(
        "--descriptions", required=True, metavar="FILE",
        help='JSON object {"<VG image id>": "description", ...}, or the descriptions.jsonl eval shr --model writes',
    )
    judge.add_argument(
        "--shr-dir", required=True, metavar="DIR", help="val_images_final.json and shr_factual_part*.jsonl"
    )
    judge.add_argument("--vg-dir", required=True, metavar="DIR", help="image_data.json and region_descriptions.json")
    judge.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_judge_arguments(judge)
    add_overwrite_argument(judge)
    judge.add_argument("--json", action="store_true", help="print the metrics as JSON")
    judge.set_defaults(handler=run_shr_judge)
    return shr


def add_judge_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The judge options: endpoint, request settings, and how SHR asks and reads."""
    parser.add_argument(
        "--judge-url", required=required, metavar="URL", help="API base URL, e.g. https://api.openai.com/v1"
    )
    parser.add_argument("--judge-model", default="gpt-4", metavar="NAME",
                        help="judge model name (default: gpt-4, as HA-DPO)")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    parser.add_argument(
        "--judge-prompt",
        metavar="FILE",
        help="judge prompt template (str.format, three {} fields: regions, facts, sentences) "
        "(default: the built-in prompt, which is not HA-DPO's)",
    )
    parser.add_argument(
        "--judge-parser",
        choices=("hadpo", "lenient"),
        default="hadpo",
        help="read replies as HA-DPO's post_process_no_revise (hadpo) or leniently",
    )
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=15000,
        metavar="N",
        help="skip (and count) images whose prompt is longer; 0: no limit "
        "(default: 15000, as HA-DPO's LLaVA-1.5 script)",
    )
    parser.add_argument(
        "--judge-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a request setting (defaults are HA-DPO's: temperature 0.7, top_p 1, max_tokens 800, "
        'stop ["###"], logit_bias {"50256": -100}), e.g. --judge-option logit_bias=null (null: not sent)',
    )
    parser.add_argument("--judge-concurrency", type=int, default=4, metavar="N", help="requests in flight (default: 4)")
    parser.add_argument(
        "--judge-retries", type=int, default=5, metavar="N", help="retries of 429/5xx/timeouts (default: 5)"
    )
    parser.add_argument(
        "--judge-reasks", type=int, default=5, metavar="N",
        help="times a reply without a judgement is asked again (default: 5)",
    )
    parser.add_argument(
        "--judge-timeout", type=float, default=120.0, metavar="S",
        help="deadline of one whole request, in seconds (default: 120)",
    )


def judge_config(args: argparse.Namespace) -> JudgeConfig:
    """A :class:`~mllm_pib.evaluation.judge.JudgeConfig` from :func:`add_judge_arguments` options."""
    from pydantic import ValidationError

    from mllm_pib.evaluation.judge import JudgeConfig

    request = {}
    for option in args.judge_option:
        key, sep, value = option.partition("=")
        try:
            if not sep:
                raise ValueError(option)
            request[key] = json.loads(value)
        except ValueError:
            raise UserError(f"--judge-option {option}: expected KEY=JSON, e.g. temperature=0 or stop='[\"###\"]'") from None
    try:
        return JudgeConfig(
            url=args.judge_url,
            model=args.judge_model,
            request=request,
            api_key_env=args.api_key_env,
            concurrency=args.judge_concurrency,
            max_retries=args.judge_retries,
            reasks=args.judge_reasks,
            timeout_s=args.judge_timeout,
        )
    except ValidationError as err:
        raise UserError(f"bad judge options: {err}") from None


def shr_options(args: argparse.Namespace):
    """The :class:`~mllm_pib.evaluation.shr.ShrOptions` of :func:`add_judge_arguments` options."""
    from pydantic import ValidationError

    from mllm_pib.evaluation.shr import ShrOptions

    try:
        return ShrOptions(judge_prompt=args.judge_prompt, parser=args.judge_parser, max_prompt_chars=args.max_prompt_chars)
    except ValidationError as err:
        raise UserError(f"bad SHR options: {err}") from None


def run_shr_model(args: argparse.Namespace) -> int:
    from mllm_pib.evaluation.runner import GenerationSettings
    from mllm_pib.evaluation.suite import check_shr_inputs, evaluate_shr

    for flag in ("shr_dir", "vg_dir", "out", "judge_url"):
        if getattr(args, flag) is None:
            raise UserError(f"eval shr with --model needs --{flag.replace('_', '-')}")
    judge, options = judge_config(args), shr_options(args)
    # bad inputs (files, images, judge prompt, API key variable) fail before the model loads
    check_shr_inputs(args.shr_dir, args.vg_dir, judge, options, args.allow_outside_images)
    model = load_model_from_args(args)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, batch_size=args.batch_size)
    metrics = evaluate_shr(model, args.shr_dir, args.vg_dir, judge, args.out, options=options, settings=settings,
                           overwrite=args.overwrite, allow_outside_images=args.allow_outside_images)
    return 0 if metrics is None else print_shr(args, metrics)  # None: not the first process


def run_shr_judge(args: argparse.Namespace) -> int:
    from mllm_pib.evaluation.suite import judge_descriptions

    metrics = judge_descriptions(args.descriptions, args.shr_dir, args.vg_dir, judge_config(args), args.out,
                                 options=shr_options(args), overwrite=args.overwrite)
    return print_shr(args, metrics)


def print_shr(args: argparse.Namespace, metrics: dict) -> int:
    from mllm_pib.evaluation.shr import summary

    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    hadpo = metrics["hadpo"]
    print(
        _table(
            [
                ("SHR", "hal_sents_ratio", "images", "sentences/img", "words/img", "hal sent/img", "hal words/img"),
                (
                    _number(metrics["shr"]),
                    _number(hadpo["hal_sents_ratio"], ".3f"),
                    str(metrics["images"]),
                    _number(metrics["sentences_per_image"]),
                    _number(metrics["words_per_image"]),
                    _number(metrics["hal_sentences_per_image"]),
                    _number(metrics["hal_words_per_image"]),
                ),
            ]
        )
    )
    print("\n".join(summary(metrics)))
    return 0


def _number(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # first column (names) left-aligned, numbers right-aligned
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    )
