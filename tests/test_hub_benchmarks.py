"""The benchmark sets from the Hub (issue 23, part 3): `evaclip eval zeroshot|retrieval -d hf-hub:OWNER/wds_NAME` and
`evaclip eval suite` without --root (CLIP_benchmark's `clip-benchmark/wds_<name>` dataset repos) or with
`--root hf-hub:OWNER`, against the loopback Hub (tests/helpers/hub_server.py, dataset repos) through huggingface_hub's
own cache: only the test split fetched, the free space checked first, HF_HUB_OFFLINE honoured, sets that are not on
the Hub named in one line while the suite goes on. No test reaches the internet."""
import json
from pathlib import Path

import pytest

from conftest import run_cli
from helpers.hub_server import HubServer, dataset_id, point_hub_at

OWNER = "clip-benchmark"


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from helpers.realdata import write_digits_benchmark

    return write_digits_benchmark(tmp_path_factory.mktemp("digits"), n=60, shard_size=25)


@pytest.fixture
def hub(digits, tmp_path, monkeypatch):
    """The loopback Hub serving CLIP_benchmark-style dataset repos (test and train splits), huggingface_hub in this
    process pointed at it with an empty cache of its own."""

    with HubServer() as server:
        for name in ("wds_digits", "wds_digits_captions"):
            files = _files(Path(digits[{"wds_digits": "wds_cls", "wds_digits_captions": "wds_ret"}[name]]))
            files.update({k.replace("test/", "train/", 1): v for k, v in files.items() if k.startswith("test/")})
            files["README.md"] = b"# a CLIP_benchmark export\n"
            server.create(dataset_id(f"{OWNER}/{name}"), files=files, lfs=True)
        point_hub_at(server, tmp_path, monkeypatch)
        monkeypatch.setenv("EVACLIP_CACHE", str(tmp_path / "evaclip_cache"))
        yield server


def _fetched(hub, name: str) -> set:
    return {r["path"].split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.downloads(dataset_id(f"{OWNER}/{name}"))}


def _one_line(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("evaclip: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_zeroshot_and_retrieval_from_the_hub(hub, digits, tiny_clip_folder, tmp_path, capsys):
    """The same numbers as the local folder; the test split and the layout's .txt files only; cached afterwards
    (and offline)."""
    from huggingface_hub import constants

    m = tiny_clip_folder
    code, _, err = run_cli(["eval", "zeroshot", "-m", m, "-d", digits["wds_cls"], "-o", tmp_path / "local.json"],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["eval", "zeroshot", "-m", m, "-d", f"hf-hub:{OWNER}/wds_digits", "-o",
                            tmp_path / "hub.json"], capsys)
    assert code == 0, err
    local, got = (json.loads((tmp_path / f).read_text()) for f in ("local.json", "hub.json"))
    assert got["dataset"] == "digits" and got["samples"] == local["samples"] == 60
    assert got["metrics"] == local["metrics"]
    assert _fetched(hub, "wds_digits") == {"classnames.txt", "zeroshot_classification_templates.txt",
                                           "test/nshards.txt", "test/0.tar", "test/1.tar", "test/2.tar"}
    code, _, err = run_cli(["eval", "retrieval", "-m", m, "-d", f"hf-hub:{OWNER}/wds_digits_captions", "-o",
                            tmp_path / "ret.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ret.json").read_text())["captions"] == 180
    assert not any(f.startswith("train/") or f == "README.md" for f in _fetched(hub, "wds_digits_captions"))
    n = len(hub.downloads(dataset_id(f"{OWNER}/wds_digits")))
    code, _, err = run_cli(["eval", "zeroshot", "-m", m, "-d", f"hf-hub:{OWNER}/wds_digits"], capsys)
    assert code == 0 and len(hub.downloads(dataset_id(f"{OWNER}/wds_digits"))) == n  # from the cache
    constants.HF_HUB_OFFLINE = True
    asked = len(hub.requests)
    code, _, err = run_cli(["eval", "zeroshot", "-m", m, "-d", f"hf-hub:{OWNER}/wds_digits", "-o",
                            tmp_path / "offline.json"], capsys)
    assert code == 0, err
    assert len(hub.requests) == asked  # nothing asked of the Hub
    assert json.loads((tmp_path / "offline.json").read_text())["metrics"] == local["metrics"]


@pytest.mark.parametrize("setup,args,needles", [
    ("offline", ["-d", f"hf-hub:{OWNER}/wds_digits"], ("HF_HUB_OFFLINE", "not in the cache")),
    (None, ["-d", f"hf-hub:{OWNER}/wds_nothere"], ("repository clip-benchmark/wds_nothere not found",)),
    ("no-disk", ["-d", f"hf-hub:{OWNER}/wds_digits"], ("not enough disk space", "HF_HUB_CACHE")),
    (None, ["-d", f"hf-hub:{OWNER}/wds_digits/test/0.tar"], ("a whole dataset repo",)),
    (None, ["-d", f"hf-hub:{OWNER}/wds_digits", "--split", "val"], ("no val/nshards.txt",)),
])
def test_bad_hub_sets_are_one_line(setup, args, needles, hub, tiny_clip_folder, monkeypatch, capsys):
    from huggingface_hub import constants

    from evaclip_cli.checkpoints import hub_source

    if setup == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif setup == "no-disk":
        monkeypatch.setattr(hub_source, "_free_bytes", lambda path: 1000)
    code, _, err = run_cli(["eval", "zeroshot", "-m", tiny_clip_folder, *args], capsys)
    _one_line(code, err, *needles)
    assert not _fetched(hub, "wds_digits")


def _suite(tmp_path: Path) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text('name = "hubsuite"\n'
                    '[[datasets]]\nname = "digits"\ntask = "zeroshot"\ndirs = ["digits", "wds_digits"]\n'
                    '[[datasets]]\nname = "objectnet"\ntask = "zeroshot"\nhub = false\n'
                    'source = "its licence forbids redistribution"\n'
                    '[[datasets]]\nname = "nothere"\ntask = "zeroshot"\n'
                    '[[datasets]]\nname = "digits-captions"\ntask = "retrieval"\ndirs = ["wds_digits_captions"]\n'
                    '[[datasets]]\nname = "ucf101"\ntask = "video"\n')
    return path


def test_suite_fetches_what_is_on_the_hub_and_names_the_rest(hub, tiny_clip_folder, tmp_path, capsys):
    """No --root: CLIP_benchmark's repos; a set that is not on the Hub gets one line and the suite goes on."""
    code, out, err = run_cli(["eval", "suite", "-m", tiny_clip_folder, "-s", _suite(tmp_path), "--out",
                              tmp_path / "res"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert [r["dataset"] for r in res["results"]] == ["digits", "digits-captions"]
    assert res["missing"] == ["objectnet", "nothere", "ucf101"] and res["failed"] == []
    text = " ".join(out.split())
    assert "objectnet: not on the Hub (its licence forbids redistribution); put it in DIR/objectnet" in text
    assert "ucf101: not on the Hub (a video set" in text
    assert "repository clip-benchmark/wds_nothere not found" in text
    assert not any(f.startswith("train/") for f in _fetched(hub, "wds_digits") | _fetched(hub, "wds_digits_captions"))
    # --root hf-hub:OWNER says so explicitly; a second run reads the cache
    n = len(hub.downloads(dataset_id(f"{OWNER}/wds_digits")))
    code, _, err = run_cli(["eval", "suite", "-m", tiny_clip_folder, "-s", _suite(tmp_path), "--root",
                            f"hf-hub:{OWNER}", "--out", tmp_path / "res2"], capsys)
    assert code == 0, err
    assert len(hub.downloads(dataset_id(f"{OWNER}/wds_digits"))) == n
    again = json.loads((tmp_path / "res2" / "results.json").read_text())
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in res["results"]]


def test_suite_checks_the_free_space_before_fetching_anything(hub, tiny_clip_folder, tmp_path, monkeypatch, capsys):
    from evaclip_cli.checkpoints import hub_source

    sizes = sum(len(v) for k, v in hub.files(dataset_id(f"{OWNER}/wds_digits")).items() if not k.startswith("train"))
    monkeypatch.setattr(hub_source, "_free_bytes", lambda path: sizes + 10)  # one set fits, not both
    code, _, err = run_cli(["eval", "suite", "-m", tiny_clip_folder, "-s", _suite(tmp_path), "--out",
                            tmp_path / "res"], capsys)
    _one_line(code, err, "not enough disk space for 2 benchmark sets from hf-hub:clip-benchmark")
    assert not _fetched(hub, "wds_digits") and not _fetched(hub, "wds_digits_captions")
    assert not (tmp_path / "res").exists()
