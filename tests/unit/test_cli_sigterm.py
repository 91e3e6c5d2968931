"""SIGTERM stops `fedit coordinate` / `fedit join` even when its SystemExit is swallowed."""

from __future__ import annotations

import signal
import threading

import pytest

from fedit.cli.deploy import _stop_on_sigterm


@pytest.fixture
def restore_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_swallowed_by_a_finaliser_still_stops_the_owner(restore_sigterm) -> None:
    stop = threading.Event()
    _stop_on_sigterm(stop)

    class Finalised:
        def __del__(self) -> None:
            # the handler runs here; Python prints "Exception ignored in ... SystemExit: 143"
            # and goes on, as it did inside a library's finaliser while an owner loaded its model
            signal.raise_signal(signal.SIGTERM)

    Finalised()  # collected at once: __del__ runs and swallows the SystemExit

    assert stop.is_set()


def test_a_sigterm_elsewhere_exits_with_143(restore_sigterm) -> None:
    stop = threading.Event()
    _stop_on_sigterm(stop)
    with pytest.raises(SystemExit) as exited:
        signal.raise_signal(signal.SIGTERM)
    assert exited.value.code == 143 and stop.is_set()
