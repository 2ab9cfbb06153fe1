"""Fixtures for integration tests against a real Postfix: an SMTP sink and private Postfix instances.

Tests that start Postfix carry `@pytest.mark.postfix`; they are skipped, with the reason,
only when Postfix is not installed. Everything binds 127.0.0.1 and lives under tmp_path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postfix_harness import POSTFIX, MilterSettings, PostfixInstance, SmtpSink, postfix_available


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "postfix: starts a private Postfix on 127.0.0.1 (needs /usr/sbin/postfix and root)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if postfix_available():
        return
    skip = pytest.mark.skip(reason=f"{POSTFIX} is not installed (apt-get install postfix)")
    for item in items:
        if item.get_closest_marker("postfix"):
            item.add_marker(skip)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    """An SMTP server on 127.0.0.1 that keeps every message in memory."""
    with SmtpSink() as server:
        yield server


class PostfixFactory:
    """Starts private Postfix instances under tmp_path; the fixture stops them all."""

    def __init__(self, tmp_path: Path, sink: SmtpSink) -> None:
        self.tmp_path = tmp_path
        self.sink = sink
        self.instances: list[PostfixInstance] = []

    def __call__(
        self,
        milter: str | None = None,
        milter_settings: MilterSettings | None = None,
        extra_main_cf: dict[str, str] | None = None,
        next_hop: tuple[str, int] | None = None,
        reinject_port: int | None = None,
    ) -> PostfixInstance:
        instance = PostfixInstance(
            self.tmp_path / f"postfix-{len(self.instances)}",
            next_hop=next_hop or self.sink.address,
            milter=milter,
            milter_settings=milter_settings,
            extra_main_cf=extra_main_cf,
            reinject_port=reinject_port,
        )
        self.instances.append(instance)
        instance.start()
        return instance

    def stop_all(self) -> None:
        for instance in self.instances:
            instance.stop()


@pytest.fixture
def postfix_factory(tmp_path: Path, sink: SmtpSink) -> Iterator[PostfixFactory]:
    """`postfix_factory(milter="inet:127.0.0.1:PORT")` starts a private Postfix relaying to `sink`."""
    factory = PostfixFactory(tmp_path, sink)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def postfix(postfix_factory: PostfixFactory) -> PostfixInstance:
    """A private Postfix with no milter, relaying everything to `sink`."""
    return postfix_factory()
