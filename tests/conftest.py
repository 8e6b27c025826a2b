"""Shared test helpers: where the LLaDA conformance fixtures live (../shared beside the checkout)."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def llada_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"LLaDA fixtures not found at {FIXTURES}: the shared/ folder must sit beside the checkout")
    return FIXTURES
