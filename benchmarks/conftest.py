"""Collect the ``bench_*.py`` suites of this folder, so that ``pytest benchmarks --benchmark-only`` runs them.

pytest's default ``python_files`` patterns take only ``test_*.py``; files named on the command line are
collected by pytest itself, and so are files its configured patterns already match.
"""
import fnmatch

import pytest


def pytest_collect_file(file_path, parent):
    if not (file_path.suffix == ".py" and file_path.name.startswith("bench_")):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)
