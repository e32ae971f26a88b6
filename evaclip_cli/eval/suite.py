"""Benchmark suites (``eval_files/suites/*.toml``): which datasets, their headline metric, the aggregates the paper
reports, and the suite's outputs (``results.json``, ``results.md``, ``results.png``). ``runner.run_suite`` runs
them."""
from __future__ import annotations

from evaclip_cli.errors import UserError

SUITE_DIR = "eval_files/suites"
TASKS = ("zeroshot", "retrieval", "video")


def suite_names() -> list:
    from pathlib import Path

    return sorted(p.stem for p in (Path(__file__).parent.parent / SUITE_DIR).glob("*.toml"))


def load_suite(name_or_path: str) -> dict:
    """A suite file: ``name``, ``[[datasets]]`` (name, task zeroshot|retrieval|video, dirs, key, metric, frames)
    and ``[[aggregates]]`` (name, and task or datasets: the mean of those datasets' metric; paper: the reported
    figure)."""
    import tomllib
    from pathlib import Path

    p = Path(name_or_path)
    if not p.is_file():
        p = Path(__file__).parent.parent / SUITE_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        raise UserError(f"suite '{name_or_path}' not found: give a shipped suite ({', '.join(suite_names())}) or a "
                        ".toml file")
    try:
        s = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: invalid TOML ({e})") from None
    s.setdefault("name", p.stem)
    for i, d in enumerate(s.get("datasets", [])):
        if "name" not in d or d.get("task") not in TASKS:
            raise UserError(f"{p}: datasets[{i}] needs a name and task = zeroshot | retrieval | video")
        d.setdefault("dirs", [d["name"]])
        d.setdefault("metric", {"zeroshot": "acc1", "retrieval": "mean_recall", "video": "acc1"}[d["task"]])
    if not s.get("datasets"):
        raise UserError(f"{p}: no [[datasets]]")
    return s


def headline(result: dict, metric: str):
    """A result's headline figure: a metric, or ``mean_recall`` (the mean of every R@k both ways)."""
    m = result["metrics"]
    if metric == "mean_recall":
        vals = [v for k, v in m.items() if "_retrieval_recall@" in k]
        return sum(vals) / len(vals) if vals else None
    return m.get(metric)


def aggregates(per_suite: list) -> tuple[dict, dict]:
    """({label: mean of the members' headlines}, {label: the paper's figure}); a label says "(k of n)" when some
    members are absent."""
    out, paper = {}, {}
    for suite, rows in per_suite:
        for a in suite.get("aggregates", []):
            members = a.get("datasets") or [d["name"] for d in suite["datasets"]
                                            if d["task"] == a.get("task", d["task"])]
            vals = [r["headline"]["value"] for r in rows
                    if r["dataset"] in members and r["headline"]["value"] is not None]
            if vals:
                label = a["name"] if len(vals) == len(members) else f"{a['name']} ({len(vals)} of {len(members)})"
                out[label] = sum(vals) / len(vals)
                if "paper" in a:
                    paper[label] = a["paper"]
    return out, paper


def write_outputs(out: dict, out_dir) -> list:
    """``results.json``, ``results.md`` and (when there is a headline) ``results.png`` in ``out_dir``."""
    from evaclip_cli import atomic
    from evaclip_cli.eval.report import results_markdown

    written = [atomic.write_json(out_dir / "results.json", out),
               atomic.write_text(out_dir / "results.md", results_markdown(out))]
    png = chart(out, out_dir / "results.png")
    return written + ([png] if png else [])


def chart(results: dict, path):
    """A horizontal bar chart of each dataset's headline metric."""
    rows = [r for r in results["results"] if r.get("headline", {}).get("value") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaclip_cli.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.2))
    names = [f"{r['dataset']} ({r['headline']['metric']})" for r in rows][::-1]
    vals = [100 * r["headline"]["value"] for r in rows][::-1]
    ax.barh(names, vals, color="#4C72B0")
    for y, v in enumerate(vals):
        ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 105)
    ax.set_xlabel("%")
    ax.set_title(f"{results['suite']}: {_short(results['model'])}", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _short(p: str) -> str:
    from pathlib import Path

    return Path(p).name or p
