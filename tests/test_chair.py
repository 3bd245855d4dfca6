"""CHAIR: singularisation, synonyms and two-word names, the special cases of the original
script, and CHAIR_s / CHAIR_i / recall on hand-built annotations and on real OPERA captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm_pib.cli import main
from mllm_pib.errors import UserError
from mllm_pib.evaluation import chair

DATA = Path(__file__).parent / "data" / "chair"  # copies of the official files (see tests/data/README.md)


@pytest.fixture(scope="module")
def vocab() -> chair.ChairVocabulary:
    return chair.ChairVocabulary.from_file(DATA / "synonyms.txt")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "plural, singular",
    [
        ("dogs", "dog"),
        ("buses", "bus"),
        ("bus", "bus"),
        ("knives", "knife"),
        ("skis", "ski"),
        ("taxis", "taxi"),
        ("ponies", "pony"),
        ("puppies", "puppy"),
        ("ties", "tie"),
        ("collies", "collie"),
        ("glasses", "glass"),
        ("glass", "glass"),
        ("benches", "bench"),
        ("sandwiches", "sandwich"),
        ("toothbrushes", "toothbrush"),
        ("boxes", "box"),
        ("tomatoes", "tomato"),
        ("canoes", "canoe"),
        ("shoes", "shoe"),
        ("horses", "horse"),
        ("suitcases", "suitcase"),
        ("giraffes", "giraffe"),
        ("stoves", "stove"),
        ("shelves", "shelf"),
        ("men", "man"),
        ("women", "woman"),
        ("policemen", "policeman"),
        ("children", "child"),
        ("grandchildren", "grandchild"),
        ("people", "people"),
        ("mice", "mouse"),
        ("oxen", "ox"),
        ("sheep", "sheep"),
        ("cattle", "cattle"),
        ("scissors", "scissors"),
        ("tennis", "tennis"),
        ("tvs", "tv"),
        ("bananas", "banana"),
        ("pizzas", "pizza"),
        ("sofas", "sofa"),
        ("is", "is"),
        ("this", "this"),
        ("grass", "grass"),
        ("buffaloes", "buffalo"),
        ("donuts", "donut"),
        ("skies", "sky"),
        ("microwaves", "microwave"),
    ],
)
def test_singularize(plural, singular):
    assert chair.singularize(plural) == singular


def test_every_synonym_is_a_fixed_point_of_singularize(vocab):
    # a synonym that singularisation changed could never be found in a caption
    single_words = [name for name in vocab.synonyms if " " not in name]
    assert [w for w in single_words if chair.singularize(w) != w and chair.singularize(w) not in vocab.synonyms] == []


def test_synonym_file_semantics(vocab, tmp_path):
    assert len(set(vocab.synonyms.values())) == 80
    assert vocab.synonyms["puppy"] == "dog" and vocab.synonyms["iphone"] == "cell phone"
    assert vocab.synonyms["motor bike"] == "motorcycle"  # "  motor bike" in the file
    assert vocab.synonyms["cheesecake"] == "cake"
    bad = tmp_path / "syn.txt"
    bad.write_text("dog, puppy\ncat, puppy\n")
    with pytest.raises(UserError, match=r"syn.txt:2: 'puppy' is already a synonym of 'dog'"):
        chair.load_synonyms(bad)


def test_shipped_synonyms_equal_the_published_list(vocab):
    assert chair.ChairVocabulary.from_file().synonyms == vocab.synonyms


@pytest.mark.parametrize(
    "text, objects",
    [
        ("Two puppies chase a ball.", ["dog", "sports ball"]),
        ("A traffic light and traffic lights.", ["traffic light", "traffic light"]),
        ("Hot dogs on a table.", ["hot dog", "dining table"]),
        ("A teddy bear.", ["teddy bear"]),
        ("A baby elephant and adult giraffes.", ["elephant", "giraffe"]),  # not "person"
        ("A baby on a bed.", ["person", "bed"]),
        ("A passenger jet and a passenger train.", ["airplane", "train"]),
        ("A passenger waits.", ["person"]),
        ("A man in a bow tie.", ["person", "tie"]),
        ("The toilet seat is up.", ["toilet"]),
        ("The seat of the toilet is up next to a chair.", ["toilet", "chair"]),  # "seat" dropped
        ("A seat by the window.", ["chair"]),
        ("The train tracks and home plate.", []),
        ("Wine glasses, knives and a stove top oven.", ["wine glass", "knife", "oven", "oven"]),
        ("A man's dog-leash.", ["person"]),
    ],
)
def test_mentions(vocab, text, objects):
    assert [m.object for m in vocab.mentions(text)] == objects


# ---------------------------------------------------------------- hand-built COCO case

INSTANCES = {
    1: ["person", "dog", "dog", "traffic light"],
    2: ["toilet", "sink"],
    3: ["elephant"],
}
HUMAN_CAPTIONS = {
    1: ["A man walking two puppies past a bench."],  # adds bench through the caption
    2: ["A bathroom with a white toilet."],
    3: ["A baby elephant in the grass."],
}
GENERATED = [
    (1, "Two puppies and a man wait at the traffic lights next to a hot dog stand and a bench."),
    (2, "The seat of the toilet is up and a cat sits nearby."),
    (3, "A baby elephant walks with adult elephants near a motor bike."),
    (3, "An elephant."),
]


def coco_dir(tmp_path: Path) -> Path:
    names = sorted({o for objects in INSTANCES.values() for o in objects})
    categories = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(names)]
    ids = {c["name"]: c["id"] for c in categories}
    annotations = [
        {"id": 100 * image + j, "image_id": image, "category_id": ids[o]}
        for image, objects in INSTANCES.items()
        for j, o in enumerate(objects)
    ]
    images = [{"id": image, "file_name": f"COCO_val2014_{image:012d}.jpg"} for image in INSTANCES]
    out = tmp_path / "annotations"
    out.mkdir()
    (out / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    captions = [
        {"id": 10 * image + j, "image_id": image, "caption": c}
        for image, cs in HUMAN_CAPTIONS.items()
        for j, c in enumerate(cs)
    ]
    (out / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return out


def test_hand_built_case(tmp_path, capsys):
    annotations = coco_dir(tmp_path)
    captions = write_jsonl(tmp_path / "captions.jsonl", [{"image_id": i, "caption": c} for i, c in GENERATED])
    code, out, _ = run_cli(capsys, "eval", "chair", "--captions", captions, "--annotations", annotations, "--json")
    assert code == 0
    report = json.loads(out)
    # mentions: [dog, person, traffic light, hot dog*, bench], [toilet, cat*],
    #           [elephant, elephant, motorcycle*], [elephant]
    assert report["captions"] == 4 and report["mentions"] == 11 and report["hallucinated_mentions"] == 3
    assert report["chair_s"] == 3 / 4
    assert report["chair_i"] == 3 / 11
    # ground truth: {person, dog, traffic light, bench}, {toilet, sink}, {elephant}, {elephant}
    assert report["recall"] == (4 + 1 + 1 + 1) / (4 + 2 + 1 + 1)
    per = report["per_caption"]
    assert [p["hallucinated"] for p in per] == [
        [["hot dog", "hot dog"]],
        [["cat", "cat"]],
        [["motor bike", "motorcycle"]],
        [],
    ]
    assert per[0]["ground_truth"] == ["bench", "dog", "person", "traffic light"]
    # the table shows percentages
    code, out, _ = run_cli(capsys, "eval", "chair", "--captions", captions, "--annotations", annotations)
    assert out.splitlines()[1].split()[:3] == ["75.00", f"{100 * 3 / 11:.2f}", "87.50"]


def test_annotation_files_and_objects_jsonl_agree_with_directory(tmp_path, vocab):
    annotations = coco_dir(tmp_path)
    from_dir = chair.load_annotations([annotations], vocab).objects
    from_files = chair.load_annotations(
        [annotations / "captions_val2014.json", annotations / "instances_val2014.json"], vocab
    ).objects
    objects = write_jsonl(
        tmp_path / "objects.jsonl",
        [
            {"image_id": 1, "objects": ["person", "dogs", "traffic light", "bench"]},
            {"image_id": 2, "objects": ["toilet", "sink"]},
            {"image_id": 3, "objects": ["Elephant"]},
        ],
    )
    assert from_dir == from_files == chair.load_annotations([objects], vocab).objects
    assert from_dir == {1: {"person", "dog", "traffic light", "bench"}, 2: {"toilet", "sink"}, 3: {"elephant"}}


def test_unannotated_images_and_unknown_objects_are_errors(tmp_path, vocab, capsys):
    annotations = coco_dir(tmp_path)
    captions = write_jsonl(
        tmp_path / "captions.jsonl", [{"image_id": 7, "caption": "A dog."}, {"image_id": 1, "caption": "A dog."}]
    )
    code, _, err = run_cli(capsys, "eval", "chair", "--captions", captions, "--annotations", annotations)
    assert code == 2 and "1 described images have no annotations (e.g. image ids [7])" in err
    objects = write_jsonl(
        tmp_path / "objects.jsonl", [{"image_id": 1, "objects": ["dog"]}, {"image_id": 2, "objects": ["spaceship"]}]
    )
    with pytest.raises(UserError, match=r"objects.jsonl record 2: object 'spaceship' is not a COCO object"):
        chair.load_annotations([objects], vocab)


# ---------------------------------------------------------------- real OPERA captions

# hand annotations for three OPERA images; the mention counts below were read off the captions
OPERA_TRUTH = {
    226988: ["person", "dining table", "pizza", "cup"],
    337443: ["car", "truck", "person", "traffic light"],
    112022: ["person", "suitcase", "backpack", "handbag"],
}


def test_opera_captions_against_hand_annotations(tmp_path, capsys):
    records = [json.loads(line) for line in (DATA / "opera_llava-1.5_greedy.jsonl").open()]
    assert len(records) == 500
    subset = write_jsonl(tmp_path / "captions.jsonl", [r for r in records if r["image_id"] in OPERA_TRUTH])
    objects = write_jsonl(tmp_path / "objects.jsonl", [{"image_id": k, "objects": v} for k, v in OPERA_TRUTH.items()])
    code, out, _ = run_cli(capsys, "eval", "chair", "--captions", subset, "--annotations", objects, "--json")
    assert code == 0
    report = json.loads(out)
    per = {p["image_id"]: p for p in report["per_caption"]}
    # 226988: woman, dining table, pizza, pizza, people, table, bench, chair, table, bottles, table
    assert [m[1] for m in per[226988]["mentioned"]] == [
        "person",
        "dining table",
        "pizza",
        "pizza",
        "person",
        "dining table",
        "bench",
        "chair",
        "dining table",
        "bottle",
        "dining table",
    ]
    assert [m[1] for m in per[226988]["hallucinated"]] == ["bench", "chair", "bottle"]
    # 337443: cars, truck, "orange construction sign" (the fruit, a known CHAIR false positive), people
    assert [m[1] for m in per[337443]["mentioned"]] == ["car", "truck", "orange", "person"]
    assert [m[1] for m in per[337443]["hallucinated"]] == ["orange"]
    # 112022: people, luggage, people, suitcases, backpacks, suitcases, backpacks, suitcases, people, backpacks, people
    assert len(per[112022]["mentioned"]) == 11 and per[112022]["hallucinated"] == []
    assert report["chair_s"] == 2 / 3
    assert report["chair_i"] == 4 / 26
    assert report["recall"] == 9 / 12


@pytest.mark.parametrize(
    "name", ["opera_llava-1.5_beam5.jsonl", "opera_llava-1.5_greedy.jsonl", "opera_llava-1.5_ours.jsonl"]
)
def test_all_opera_files_are_read(name, vocab):
    captions = chair.load_captions(DATA / name)
    truth = {image_id: set() for image_id, _ in captions}  # nothing annotated: every mention hallucinated
    report = chair.evaluate(captions, truth, vocab)
    assert report.captions == 500
    assert report.mentions > 500 and report.hallucinated_mentions == report.mentions
    assert report.chair_s == sum(bool(vocab.mentions(c)) for _, c in captions) / 500
