"""The docs stay true to the code: every config key documented, the README short, every
relative link and anchor resolving, every Flower file the design names present in the
installed wheel."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from fedit.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "docs" / "configuration.md"
README_LIMIT = 15_000  # bytes: the first ten minutes of a newcomer, not a reference manual
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def config_keys(config: object, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, nested sections walked recursively."""
    keys = []
    for item in fields(config):
        value = getattr(config, item.name)
        key = f"{prefix}{item.name}"
        keys += config_keys(value, f"{key}.") if is_dataclass(value) else [key]
    return keys


def test_the_key_walk_sees_every_section() -> None:
    keys = config_keys(RunConfig())
    assert {"seed", "output_dir", "train.learning_rate", "secagg.stage_timeout"} <= set(keys)
    assert not any(is_dataclass(getattr(RunConfig(), key)) for key in keys if "." not in key)


def undocumented(page: str) -> list[str]:
    return [key for key in config_keys(RunConfig()) if f"`{key}`" not in page]


def test_every_config_key_is_documented() -> None:
    missing = undocumented(CONFIGURATION.read_text(encoding="utf-8"))
    assert not missing, f"docs/configuration.md lacks {missing}: add a line for each"


def test_a_key_missing_from_the_page_is_caught() -> None:
    page = CONFIGURATION.read_text(encoding="utf-8")
    without = "\n".join(line for line in page.splitlines() if "`train.max_steps`" not in line)
    assert undocumented(without) == ["train.max_steps"]


def test_the_readme_is_short() -> None:
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes: move detail into docs/"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = [target for target in relative_links(page) if not resolves(page, target)]
    assert not broken, f"{page.name}: links to nothing: {broken}"


def resolves(page: Path, target: str) -> bool:
    """The file exists and, for a markdown page, so does the heading the anchor names."""
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
        return False
    return not anchor or resolved.suffix != ".md" or anchor in anchors(resolved)


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [anchor](#nowhere)\n")
    assert relative_links(page) == ["#title", "missing.md", "#nowhere"]
    assert [resolves(page, t) for t in relative_links(page)] == [True, False, False]


@pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="flwr is not installed")
@pytest.mark.parametrize("name", ["flower-facts.md", "secagg.md", "deployment.md"])
def test_every_flower_file_named_exists_in_the_installed_wheel(name: str) -> None:
    """A Flower upgrade that moves a file the design relies on shows up here first."""
    flwr = Path(importlib.util.find_spec("flwr").origin).parent
    text = (REPO / "docs" / "design" / name).read_text(encoding="utf-8")
    named = {p.rstrip(".,/") for p in re.findall(r"`F/([\w/.*]+)", text)}
    assert named or name == "deployment.md"
    missing = [p for p in sorted(named) if not list(flwr.glob(p))]
    assert not missing, f"{name} names flwr files the installed wheel lacks: {missing}"
