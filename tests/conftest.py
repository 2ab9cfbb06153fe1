from __future__ import annotations

from pathlib import Path

import pytest

from milter.policy.loader import Rules, load_rules

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def rules() -> Rules:
    return load_rules(REPO / "rules")
