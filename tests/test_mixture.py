"""`evaclip data inspect --recipe`: the data mixture a recipe samples (data/mixture.py), checked against the
published sizes of the 18B's data and against what the loader actually draws."""
import json
from collections import Counter

import pytest

from conftest import run_cli


def test_18b_samples_the_published_mixture():
    """LAION-2B 1.6B + COYO 0.4B + LAION-COCO 20M (Merged-2B+ without its video): weights in proportion to sizes."""
    from evaclip_cli.data.mixture import mixture
    from evaclip_cli.recipes import load_recipe

    r = load_recipe("18b").recipe
    mix = mixture(r.data.train, r.data.samples, r.data.resampled)
    assert mix.mode == "shards by weight"
    shares = [s.share for s in mix.sources]
    assert shares == pytest.approx([1600 / 2020, 400 / 2020, 20 / 2020])
    assert [s.named for s in mix.sources] == [160_000, 40_000, 2_000]  # 10,000 samples per shard
    assert all("PLACEHOLDER" in s.shards and s.present == 0 for s in mix.sources)
    assert abs(sum(s.samples for s in mix.sources) - 6_000_000_000) <= len(mix.sources)
    v = load_recipe("video-18b").recipe
    vmix = mixture(v.data.train, v.data.samples, v.data.resampled, video_stage=True,
                   image_weight=v.video.image_weight, video_weight=v.video.video_weight)
    assert vmix.mode == "samples by weight"
    assert [s.kind for s in vmix.sources] == ["image"] * 3 + ["video"]
    assert vmix.sources[-1].share == pytest.approx(23 / 2043)


def test_shares_follow_the_stage_and_mode(tmp_path):
    from types import SimpleNamespace as S

    from evaclip_cli.data.mixture import mixture

    for i in range(3):
        (tmp_path / f"a{i}.tar").write_bytes(b"")
    srcs = [S(shards=str(tmp_path / "a{0..3}.tar"), weight=3.0, kind="image"),  # 3 of 4 present
            S(shards=str(tmp_path / "b{0..11}.tar"), weight=1.0, kind="image"),
            S(shards="https://host/v{0..1}.tar", weight=1.0, kind="video")]
    res = mixture(srcs, 1000, resampled=True)
    assert [s.share for s in res.sources] == pytest.approx([0.6, 0.2, 0.2])
    assert [s.samples for s in res.sources] == [600, 200, 200]
    assert [s.present for s in res.sources] == [3, 0, None]
    epochs = mixture(srcs, 0, resampled=False)  # weights unused: share of the shards; no run length
    assert epochs.mode == "epochs over shards"
    assert [s.share for s in epochs.sources] == pytest.approx([4 / 18, 12 / 18, 2 / 18])
    assert all(s.samples is None for s in epochs.sources)
    video = mixture(srcs, 1000, resampled=True, video_stage=True, image_weight=0.0, video_weight=2.0)
    assert [s.kind for s in video.sources] == ["video"] and video.sources[0].weight == 2.0  # images left out


def test_reported_shares_are_what_the_loader_draws():
    """Resampled image data: the sources of 20,000 units drawn by the real stream schedule match the report."""
    from types import SimpleNamespace as S

    from evaclip_cli.data.mixture import mixture
    from evaclip_cli.data.wds import StreamDataset, expand_shards

    srcs = [S(shards="x/a{00..99}.tar", weight=1600.0, kind="image"),
            S(shards="x/b{0..9}.tar", weight=400.0, kind="image"),
            S(shards="x/c{0..1}.tar", weight=20.0, kind="image")]
    report = mixture(srcs, 20_000, resampled=True)
    expanded = [(expand_shards(s.shards), s.weight) for s in srcs]
    ds = StreamDataset(expanded, 64, 8, None, 0, 0, 2, 2, True, 100, (0.9, 1.0), "bicubic", False, None, 0)
    drawn = Counter(ds._unit(stream, u)[0].split("/")[1][0] for stream in range(4) for u in range(5000))
    for src, letter in zip(report.sources, "abc"):
        assert drawn[letter] / 20_000 == pytest.approx(src.share, abs=0.01)


def test_cli_reports_a_recipe_mixture(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table unfolded
    code, out, err = run_cli(["data", "inspect", "--recipe", "video-18b", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["recipe"] == "video-18b" and rep["run_samples"] == 200_000_000 and len(rep["sources"]) == 4
    code, out, err = run_cli(["data", "inspect", "--recipe", "18b"], capsys)
    assert code == 0, err
    assert "79.21%" in out and "19.80%" in out and "0.99%" in out and "160,000" in out
    code, out, _ = run_cli(["data", "inspect", "--recipe", "tiny"], capsys)
    assert code == 0 and "demo data" in out
    for args in ([], ["x/{0..1}.tar", "--recipe", "18b"]):
        code, _, err = run_cli(["data", "inspect", *args], capsys)
        assert code == 2 and "give a shard pattern or --recipe" in err and "Traceback" not in err
