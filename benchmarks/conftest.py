"""Collect `bench_*.py` as test modules: the project's pytest settings only name `test_*.py`.

Run with `pytest benchmarks --benchmark-enable` (pyproject's addopts disable benchmarks).
"""
import pytest


def pytest_collect_file(parent, file_path):
    # A file named on the command line is collected by pytest itself; adding it again would
    # run every benchmark twice.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
