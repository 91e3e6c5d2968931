"""A run's report (`fedit report`): report.md beside its metrics, with PNG charts.

For one run (a directory with metrics.jsonl of rounds): held-out loss per category by
round, each client's train loss by round, who took part in each round (trained, dropped,
rejected), bytes sent each round, and the final held-out loss per category. A baseline
(federation.mode "local" or "centralized", e.g. a `fedit compare` contender) has one
trainer, named as the run, and sends nothing. For a
`fedit compare` directory: its score tables, every contender's overall held-out loss by
round on one chart, and a report of each contender's run, linked.

Everything is read from what the runs wrote (metrics.jsonl, scores.md); nothing is
computed again.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

from fedit.data.readers import jsonl_rows
from fedit.data.records import DataFormatError
from fedit.textfile import read_utf8

REPORT = "report.md"
CHARTS = "report"  # the PNGs' directory beside report.md
CLIENT_STATES = {"trained": 2, "rejected": 1, "dropped": -1}  # the participation chart's codes


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics lines, in round order (round 0: the starting model)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory)")
    lines = []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise DataFormatError(f"{where}: not a round's metrics line")
        lines.append(row)
    if not lines:
        raise DataFormatError(f"{path}: no rounds yet")
    return sorted(lines, key=lambda r: r["round"])


def heldout_by_category(rounds: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{category (and "overall"): [(round, loss)]} of the rounds that were evaluated."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for category, scores in r.get("heldout", {}).items():
            series.setdefault(category, []).append((r["round"], scores["loss"]))
    return series


def participation(rounds: list[dict]) -> tuple[list[int], list[int], list[list[int]]]:
    """(round numbers, client ids, codes[round][client]) with CLIENT_STATES' codes, 0 for
    a client not selected."""
    trained = [r for r in rounds if r["round"] > 0]
    ids = sorted(
        {c["id"] for r in trained for c in r.get("clients", [])}
        | {d["client"] for r in trained for key in ("dropped", "rejected") for d in r.get(key, [])}
    )
    codes = []
    for r in trained:
        row = dict.fromkeys(ids, 0)
        row |= {c["id"]: CLIENT_STATES["trained"] for c in r.get("clients", [])}
        for key in ("rejected", "dropped"):
            row |= {d["client"]: CLIENT_STATES[key] for d in r.get(key, [])}
        codes.append([row[k] for k in ids])
    return [r["round"] for r in trained], ids, codes


def write_run_report(run_dir: Path) -> Path:
    """report.md and its charts for one run; returns report.md's path."""
    rounds = read_rounds(run_dir)
    charts = run_dir / CHARTS
    charts.mkdir(exist_ok=True)
    trained = [r for r in rounds if r.get("clients")]
    lines = [f"# Run report: {run_dir.name}\n", f"{len(trained)} trained rounds.\n"]
    heldout = heldout_by_category(rounds)
    if heldout:
        _line_chart(heldout, charts / "heldout_loss.png", "held-out loss", "round")
        lines += [
            "## Held-out loss per category\n",
            f"![held-out loss]({CHARTS}/heldout_loss.png)\n",
        ]
        last = max(r for series in heldout.values() for r, _ in series)
        final = {c: dict(s)[last] for c, s in heldout.items() if last in dict(s)}
        lines += [f"After round {last}:\n", "| category | loss |", "|---|---:|"]
        lines += [f"| {c} | {v:.4f} |" for c, v in sorted(final.items())] + [""]
    mode = federation_mode(run_dir)
    if trained and mode == "federated":
        lines += federation_sections(rounds, trained, charts)
    elif trained:
        losses = {run_dir.name: [(r["round"], r["clients"][0]["train_loss"]) for r in trained]}
        _line_chart(losses, charts / "train_loss.png", "train loss", "round")
        lines += [
            "## Train loss\n",
            f"![train loss]({CHARTS}/train_loss.png)\n",
            f"A baseline (federation.mode = {mode!r}): one trainer and no federation, so "
            "nothing is sent (0 bytes) and there is no participation to show.\n",
        ]
    path = run_dir / REPORT
    path.write_text("\n".join(lines))
    return path


def federation_mode(run_dir: Path) -> str:
    """The run's federation.mode from its config.toml ("federated" when it has none)."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return "federated"
    try:
        saved = tomllib.loads(read_utf8(path))
    except tomllib.TOMLDecodeError as err:
        raise DataFormatError(f"{path}: not valid TOML ({err})") from None
    return str(saved.get("federation", {}).get("mode", "federated"))


def federation_sections(rounds: list[dict], trained: list[dict], charts: Path) -> list[str]:
    """Each client's train loss, who took part in each round, and the bytes sent."""
    losses = {
        f"client {k}": [
            (r["round"], c["train_loss"]) for r in trained for c in r["clients"] if c["id"] == k
        ]
        for k in sorted({c["id"] for r in trained for c in r["clients"]})
    }
    _line_chart(losses, charts / "train_loss.png", "train loss", "round")
    lines = ["## Clients' train loss\n", f"![train loss]({CHARTS}/train_loss.png)\n"]
    numbers, ids, codes = participation(rounds)
    _participation_chart(numbers, ids, codes, charts / "participation.png")
    lines += [
        "## Participation\n",
        "Trained (green), rejected (orange), dropped (red), not selected (white).\n",
        f"![participation]({CHARTS}/participation.png)\n",
    ]
    traffic = {
        direction: [
            (r["round"], sum(c.get(f"bytes_{direction}", 0) for c in r["clients"]) / 1e6)
            for r in trained
        ]
        for direction in ("down", "up")
    }
    _line_chart(traffic, charts / "bytes.png", "MB per round (all clients)", "round")
    total = sum(mb for series in traffic.values() for _, mb in series)
    lines += [
        "## Bytes per round\n",
        f"![bytes]({CHARTS}/bytes.png)\n",
        f"{total:.1f} MB in all, both directions.\n",
    ]
    return lines


def write_comparison_report(out_dir: Path) -> Path:
    """report.md of a `fedit compare` directory: its scores, every contender's held-out
    loss by round, and each contender's own report."""
    scores = out_dir / "scores.md"
    if not scores.is_file():
        raise FileNotFoundError(f"{out_dir}: no scores.md (not a `fedit compare` directory)")
    runs = sorted(p for p in out_dir.iterdir() if (p / "metrics.jsonl").is_file())
    charts = out_dir / CHARTS
    charts.mkdir(exist_ok=True)
    lines = [f"# Comparison report: {out_dir.name}\n", "## Final scores\n", scores.read_text()]
    for png in sorted(out_dir.glob("*.png")):
        lines.append(f"![{png.stem}]({png.name})\n")
    overall = {}
    for run in runs:
        series = heldout_by_category(read_rounds(run)).get("overall")
        if series:
            overall[run.name] = series
        write_run_report(run)
    if overall:
        _line_chart(overall, charts / "heldout_loss.png", "held-out loss (overall)", "round")
        lines += ["## Held-out loss by round\n", f"![held-out loss]({CHARTS}/heldout_loss.png)\n"]
    lines += ["## Runs\n"] + [f"- [{run.name}]({run.name}/{REPORT})" for run in runs] + [""]
    path = out_dir / REPORT
    path.write_text("\n".join(lines))
    return path


def write_report(directory: Path) -> Path:
    """A comparison's report if `directory` holds scores.md, else a run's."""
    if (directory / "scores.md").is_file():
        return write_comparison_report(directory)
    return write_run_report(directory)


def _line_chart(
    series: dict[str, list[tuple[int, float]]], path: Path, ylabel: str, xlabel: str
) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            style = {"color": "black", "linewidth": 2.5} if name == "overall" else {}
            # markers: a series of one scored round is a point, which a bare line omits
            ax.plot(xs, ys, label=name, marker="o", markersize=4, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncols=2 if len(series) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _participation_chart(rounds: list[int], ids: list[int], codes, path: Path) -> None:
    from matplotlib.colors import ListedColormap

    colours = ListedColormap(["#dc2626", "#ffffff", "#f59e0b", "#16a34a"])  # -1, 0, 1, 2
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(ids) + 2), max(3, 0.3 * len(rounds) + 1)))
    ax.imshow(codes, cmap=colours, vmin=-1.5, vmax=2.5, aspect="auto")
    ax.set_xticks(range(len(ids)), [str(k) for k in ids])
    ax.set_yticks(range(len(rounds)), [str(n) for n in rounds])
    ax.set_xlabel("client")
    ax.set_ylabel("round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
