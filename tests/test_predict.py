"""`evaclip predict`: the probabilities are open_clip's softmax(logit_scale · image · text) on the same folder, ranked;
bad input is one line."""
import json

import pytest

from conftest import run_cli

LABELS = ["a dog", "a cat", "a red car", "a handwritten seven"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("predict")
    paths = []
    for i, (w, h) in enumerate(((40, 52), (64, 33), (31, 31))):
        p = root / f"im{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _open_clip_probs(folder, images, labels, templates):
    """The reference, with open_clip's own API: preprocess, encode_image / encode_text, mean over templates."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(Image.open(p)) for p in images])), dim=-1)
        cls = []
        for label in labels:
            t = F.normalize(model.encode_text(tokenizer([tpl.format(label) for tpl in templates])), dim=-1)
            cls.append(F.normalize(t.mean(0), dim=-1))
        return torch.softmax(model.logit_scale.exp() * img @ torch.stack(cls).T, dim=-1)


@pytest.mark.parametrize("templates", [["a photo of a {}."], ["a photo of a {}.", "a blurry drawing of {}"]])
def test_probabilities_equal_open_clip(tiny_clip_folder, images, templates, capsys):
    args = ["predict", *images, "-m", tiny_clip_folder, "--labels", ",".join(LABELS), "--json"]
    for t in templates:
        args += ["--template", t]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["templates"] == len(templates) and got["labels"] == LABELS
    ref = _open_clip_probs(tiny_clip_folder, images, LABELS, templates)
    assert [r["image"] for r in got["images"]] == [str(p) for p in images]
    for i, item in enumerate(got["images"]):
        probs = [p["probability"] for p in item["predictions"]]
        assert probs == sorted(probs, reverse=True)  # ranked, best first
        assert sorted(p["label"] for p in item["predictions"]) == sorted(LABELS)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        for p in item["predictions"]:
            assert abs(p["probability"] - float(ref[i, LABELS.index(p["label"])])) <= 1e-5, (i, p)


def test_table_top_and_default_templates(tiny_clip_folder, images, tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("a dog\n\na cat\n")
    code, out, err = run_cli(["predict", images[0], "-m", tiny_clip_folder, "--labels-file", labels_file, "--json",
                              "--top", "1"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["labels"] == ["a dog", "a cat"] and got["templates"] == 80  # eval zeroshot's ImageNet templates
    assert len(got["images"][0]["predictions"]) == 1
    code, out, err = run_cli(["predict", *images[:2], "-m", tiny_clip_folder, "--labels", "a dog,a cat"], capsys)
    assert code == 0, err
    assert "a dog" in out and "a cat" in out and images[1].name in out and "%" in out


def test_bad_input_one_line(tiny_clip_folder, images, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    cases = [
        (["predict", tmp_path / "missing.png", "-m", tiny_clip_folder, "--labels", "a,b"], "image not found"),
        (["predict", bad, "-m", tiny_clip_folder, "--labels", "a,b"], "not a readable image"),
        (["predict", images[0], "-m", tiny_clip_folder, "--labels", " , "], "no labels"),
        (["predict", images[0], "-m", tiny_clip_folder], "no labels"),
        (["predict", images[0], "-m", tiny_clip_folder, "--labels", "a,a"], "given twice"),
        (["predict", images[0], "-m", tiny_clip_folder, "--labels", "a", "-t", "a photo"], "no placeholder"),
        (["predict", images[0], "-m", tmp_path / "nomodel", "--labels", "a,b"], "no such file or folder"),
    ]
    for args, msg in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
