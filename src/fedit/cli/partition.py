"""`fedit partition`: split a run's records over clients and write them out for inspection.

    fedit partition -c configs/dolly.toml --out runs/parts
    fedit partition --set data.path=synthetic --set partition.num_clients=4 --out runs/parts

Writes client_{i}.jsonl (Dolly fields), heldout.jsonl, partition_table.txt,
partition_heatmap.png and the resolved config.toml into --out; the split is exactly the
one a run with the same config trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedit.cli.common import ConfigOption, OverrideOption, friendly_errors, resolve_config
from fedit.data.partition import category_table, format_table, save_heatmap
from fedit.data.prepare import prepare_records
from fedit.data.readers import skipped_summary, write_records_jsonl


def rich_table(
    categories: list[str], counts: list[list[int]], title: str = "Records per client and category"
) -> Table:
    table = Table("client", "total", title=title)
    for category in categories:
        table.add_column(Text(category))  # Text: a category name is not markup
    for client, row in enumerate(counts):
        table.add_row(str(client), str(sum(row)), *map(str, row))
    return table


@friendly_errors
def partition(
    out: Annotated[Path, typer.Option("--out", help="directory to write the partition to")],
    config: ConfigOption = None,
    set_: OverrideOption = None,
) -> None:
    """Partition a run's training records over its clients and write one JSONL per client."""
    cfg = resolve_config(config, set_)
    prepared = prepare_records(cfg)
    train, heldout, parts = prepared.train, prepared.heldout, prepared.parts
    out.mkdir(parents=True, exist_ok=True)
    for client, part in enumerate(parts):
        write_records_jsonl([train[i] for i in part], out / f"client_{client}.jsonl")
    write_records_jsonl(heldout, out / "heldout.jsonl")
    categories, counts = category_table(train, parts)
    (out / "partition_table.txt").write_text(format_table(categories, counts) + "\n")
    save_heatmap(categories, counts, out / "partition_heatmap.png")
    cfg.save(out / "config.toml")  # so the files can be traced back to what produced them
    console = Console(soft_wrap=True)
    console.print(rich_table(categories, counts))
    console.print(
        f"{len(train)} training records over {len(parts)} clients "
        f"({cfg.partition.method}), {len(heldout)} held out"
    )
    if prepared.skipped:  # data.on_bad_record = "skip": never silent
        console.print(f"warning: {skipped_summary(prepared.skipped)}", markup=False)
    outputs = ["heldout.jsonl", "partition_table.txt", "partition_heatmap.png", "config.toml"]
    console.print(f"wrote {out / 'client_'}{{0..{len(parts) - 1}}}.jsonl", markup=False)
    for name in outputs:
        console.print(f"wrote {out / name}", markup=False)
