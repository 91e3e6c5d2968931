"""What a restarted coordinator clears first: the SuperLink a killed predecessor left running
(it still holds the database), ended by the next start of the same child even on another
port; and the messages the dead run pushed that no owner has pulled yet."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from fedit.deploy.flower.processes import Child, FederationError, discard_undelivered_messages

SLEEPER = "import sys, time; time.sleep(120)"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(") ", 1)[1][0] != "Z"  # a zombie is gone, just not reaped


def program(tmp_path: Path, as_script: bool) -> list[str]:
    """The program as argv starts it: the interpreter itself, or a script with a shebang
    (as flower-superlink is; /proc then shows the interpreter first)."""
    if not as_script:
        return [sys.executable, "-c", SLEEPER]
    script = tmp_path / "sleeper"
    script.write_text(f"#!{sys.executable}\n{SLEEPER}\n")
    script.chmod(0o755)
    return [str(script)]


@pytest.mark.parametrize("as_script", [False, True], ids=["interpreter", "shebang-script"])
def test_a_restart_ends_the_child_a_killed_parent_left(tmp_path: Path, as_script: bool) -> None:
    argv = program(tmp_path, as_script)
    log = tmp_path / "superlink.log"
    left = Child("superlink", [*argv, "--port", "1111"], log, dict(os.environ))
    left.spawn()  # the parent then dies without stopping it: nothing calls left.stop()
    leftover_pid = left.pid
    assert leftover_pid is not None and left.pid_path.read_text().strip() == str(leftover_pid)

    # as after a real run: the exec finished (just after it /proc may show the parent's
    # command line still)
    while argv[0].encode() not in Path(f"/proc/{leftover_pid}/cmdline").read_bytes().split(b"\0"):
        time.sleep(0.01)
    restarted = Child("superlink", [*argv, "--port", "2222"], log, dict(os.environ))
    try:
        restarted.spawn()
        deadline = time.monotonic() + 30
        while alive(leftover_pid) and time.monotonic() < deadline:
            left.exit_code()  # reap it (this test process is its parent)
            time.sleep(0.05)
        assert not alive(leftover_pid)
        assert restarted.exit_code() is None
        assert restarted.pid_path.read_text().strip() == str(restarted.pid)
    finally:
        restarted.stop()
        left.stop()
    assert not restarted.pid_path.exists()


def test_a_pid_file_naming_another_program_is_left_alone(tmp_path: Path) -> None:
    other = Child(
        "other", [sys.executable, "-c", SLEEPER], tmp_path / "other.log", dict(os.environ)
    )
    other.spawn()
    try:
        (tmp_path / "superlink.pid").write_text(f"{other.pid}\n")  # e.g. a reused pid
        script = program(tmp_path, as_script=True)
        child = Child("superlink", script, tmp_path / "superlink.log", dict(os.environ))
        child.spawn()
        child.stop()
        assert other.exit_code() is None and alive(other.pid)
    finally:
        other.stop()
    assert other.proc is not None and other.proc.returncode == -signal.SIGTERM


def test_undelivered_messages_are_discarded_and_delivered_ones_kept(tmp_path: Path) -> None:
    database = tmp_path / "superlink.db"
    with sqlite3.connect(database) as db:  # the columns of Flower's message_ins it reads
        db.execute("CREATE TABLE message_ins (message_id TEXT, delivered_at TEXT)")
        rows = [("old-run-round-2", ""), ("round-1", "2026-12-03T05:39:06"), ("also-old", "")]
        db.executemany("INSERT INTO message_ins VALUES (?, ?)", rows)

    assert discard_undelivered_messages(database) == 2

    with sqlite3.connect(database) as db:
        assert db.execute("SELECT message_id FROM message_ins").fetchall() == [("round-1",)]
    assert discard_undelivered_messages(tmp_path / "first-start.db") == 0  # nothing to clear


def test_a_database_of_another_schema_is_a_clear_error(tmp_path: Path) -> None:
    database = tmp_path / "superlink.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE something_else (x TEXT)")
    with pytest.raises(FederationError, match=r"superlink.db: not a flwr 1.42 SuperLink database"):
        discard_undelivered_messages(database)
