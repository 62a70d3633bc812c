"""One line per test file under pytest-xdist, as a serial run prints it (``make test`` loads this with ``-p``).

A serial pytest run prints each file's name, a letter per test and the share of the suite done. Under xdist
(``-n``) the workers' reports interleave and pytest prints only a stream of letters, which says neither which
file runs nor which failed where. In xdist's controller, at the default verbosity, this plugin keeps the
letters back and prints a file's line when its last test has reported::

    tests/test_cache.py ...............................................                [ 41%]

With ``--dist loadfile`` a file's tests run on one worker, one after another, so the lines come in the order
the files finish. ``-v`` and serial runs are left to pytest.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    distributed = config.pluginmanager.has_plugin("dsession")  # xdist's controller (registered at configure)
    if distributed and config.get_verbosity() <= 0 and config.pluginmanager.has_plugin("terminalreporter"):
        config.pluginmanager.register(FileProgress(config), "sslkit-file-progress")


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


class FileProgress:
    """Letters per file, held until the file's last test reports; then the file's line."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.reporter = config.pluginmanager.get_plugin("terminalreporter")
        self.reporter._show_progress_info = False  # our lines carry the share; pytest's own "[100%]" would repeat it
        self.expected: Counter[str] | None = None
        self.finished: Counter[str] = Counter()
        self.letters: defaultdict[str, list[str]] = defaultdict(list)
        self.total = self.done = 0
        self.holding = False

    @pytest.hookimpl
    def pytest_xdist_node_collection_finished(self, node, ids: list[str]) -> None:
        if self.expected is None:  # every worker collects the same items
            self.expected = Counter(_file_of(nodeid) for nodeid in ids)
            self.total = len(ids)

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(self, report, config):
        category, letter, word = yield
        return (category, "", word) if self.holding else (category, letter, word)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport):
        letter = self.config.hook.pytest_report_teststatus(report=report, config=self.config)[1]
        name = _file_of(report.nodeid)
        if letter:
            self.letters[name].append(letter)
        self.holding = True
        try:
            return (yield)
        finally:
            self.holding = False
            if report.when not in ("setup", "call"):  # teardown, or xdist's report for a crashed worker
                self._test_done(name)

    def _test_done(self, name: str) -> None:
        self.done += 1
        self.finished[name] += 1
        if self.expected is not None and self.finished[name] == self.expected[name]:
            line = f"{name} {''.join(self.letters.pop(name, []))}"
            share = f"[{min(100, self.done * 100 // max(self.total, 1)):3d}%]"
            width = self.reporter._tw.fullwidth
            self.reporter.write_line(line + share.rjust(max(width - len(line) - 1, len(share) + 1)))
