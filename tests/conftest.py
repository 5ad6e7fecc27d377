"""Shared fixtures. Run the suite from the repository root: python -m pytest -q"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import ToyConfig, prepare_toy_data  # noqa: E402


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """The default toy task (seed 0), written once per test session."""
    path = str(tmp_path_factory.mktemp("toy"))
    prepare_toy_data(path, ToyConfig(), verbose=False)
    return path
