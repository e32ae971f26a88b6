"""The shipped class names (evaclip_cli/eval_files/zeroshot_metadata.json) of the paper's 27-set suite.

A shipped list is used by label: name i is class i. So each list of the ten sets whose copies often come without a
classnames.txt is checked against the folder / class names of the dataset's standard release, in the label order
that release's loaders use (torchvision, tfds, CLIP_benchmark): same count, same order, and each name the folder name
written as a prompt. The reference lists are fixtures (tests/fixtures/classnames/, each file names its source).
"""
import json
import tomllib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "evaclip_cli" / "eval_files"
REF = Path(__file__).resolve().parent / "fixtures" / "classnames"
META = json.loads((PKG / "zeroshot_metadata.json").read_text(encoding="utf-8"))


def reference(key: str) -> list[str]:
    lines = (REF / f"{key}.txt").read_text(encoding="utf-8").splitlines()
    return [ln for ln in lines if ln and not ln.startswith("#")]


def spaced(name: str) -> str:
    return name.replace("_", " ")


def objectnet_expected() -> list[str]:
    rows = [ln.split("\t") for ln in (REF / "objectnet.tsv").read_text(encoding="utf-8").splitlines()
            if ln and not ln.startswith("#")]
    assert len(rows) == 113
    return [label.lower() for _folder, label in sorted(rows)]


# key in the metadata -> (expected names in label order, derived from the release's own names)
EXPECTED = {
    # ClassName.txt paths (/a/apartment_building/outdoor), in file order; '_' and '/' become spaces
    "sun397": lambda: [p[3:].replace("_", " ").replace("/", " ") for p in reference("sun397")],
    # Stanford Cars devkit class names, devkit order
    "cars": lambda: reference("cars"),
    # CIFAR-100 fine_label_names, label order
    "cifar100": lambda: [spaced(n) for n in reference("cifar100")],
    # folder names, sorted (torchvision's DTD/Food101, ImageFolder)
    "dtd": lambda: sorted(reference("dtd")),
    "food101": lambda: [spaced(n) for n in sorted(reference("food101"))],
    "resisc45": lambda: [spaced(n) for n in sorted(reference("resisc45"))],
    # FGVC-Aircraft variants.txt, file order
    "fgvc_aircraft": lambda: reference("fgvc_aircraft"),
    # VOC devkit class names, devkit order
    "voc2007": lambda: reference("voc2007"),
    # Birdsnap species directories, sorted
    "birdsnap": lambda: [spaced(n) for n in sorted(reference("birdsnap"))],
    # ObjectNet: CLIP_benchmark's 113 classes, sorted folder order, label lower-cased
    "objectnet": objectnet_expected,
}
COUNTS = {"sun397": 397, "cars": 196, "cifar100": 100, "dtd": 47, "food101": 101, "resisc45": 45,
          "fgvc_aircraft": 100, "voc2007": 20, "birdsnap": 500, "objectnet": 113}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_shipped_names_match_the_release(key):
    shipped = META["classnames"][key]
    expected = EXPECTED[key]()
    assert len(shipped) == len(expected) == COUNTS[key]
    assert len(set(shipped)) == len(shipped), f"{key}: duplicate class names"
    wrong = [(i, s, e) for i, (s, e) in enumerate(zip(shipped, expected)) if s != e]
    assert not wrong, f"{key}: (label, shipped, release) {wrong[:5]}"


def test_reference_fixtures_are_the_release_lists():
    """Spot checks of the fixtures themselves (well-known entries and orders of each release)."""
    assert reference("sun397")[:2] == ["/a/abbey", "/a/airplane_cabin"]
    assert reference("sun397").index("/j/jail/indoor") + 1 == reference("sun397").index("/j/jail_cell")
    cars = reference("cars")
    assert cars[0] == "AM General Hummer SUV 2000" and cars[-1] == "smart fortwo Convertible 2012"
    assert reference("fgvc_aircraft")[:2] == ["707-320", "727-200"] and "F/A-18" in reference("fgvc_aircraft")
    assert reference("voc2007")[10] == "diningtable" and reference("cifar100")[1] == "aquarium_fish"
    assert "Black_and_white_Warbler" in reference("birdsnap") and "Allens_Hummingbird" in reference("birdsnap")
    assert len(reference("food101")) == 101 and "cheese_plate" in reference("food101")


def test_every_set_of_the_paper_suite_ships_names_and_templates():
    suite = tomllib.loads((PKG / "suites" / "eva-clip-27.toml").read_text(encoding="utf-8"))
    keys = {d["name"]: d.get("key", d["name"]).lower().replace("-", "_") for d in suite["datasets"]}
    assert len(keys) == 27
    assert not [n for n, k in keys.items() if k not in META["classnames"]], "sets without shipped class names"
    assert not [n for n, k in keys.items() if k not in META["templates"]], "sets without shipped templates"


def test_every_added_list_names_its_source_and_licence():
    sources = META["_classnames_sources"]
    assert set(EXPECTED) <= set(sources)
    for key in EXPECTED:
        assert "MIT" in sources[key] or "Apache" in sources[key], key
    assert "_classnames_sources" in META["_source"]
