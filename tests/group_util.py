"""One learner group per test module, rebuilt per test (`configure`) and replaced when a failed test left its
ranks out of step. Used by the learner-group test modules."""
from __future__ import annotations

from typing import Any

from relay.learners.group import LearnerGroup


class GroupHolder:
    def __init__(self, path, ranks: int, role: str, base: dict[str, Any]) -> None:
        self.path, self.ranks, self.role, self.base, self.group = path, ranks, role, base, None

    def get(self) -> LearnerGroup:
        if self.group is not None and self.group.broken:
            self.group.shutdown()
            self.group = None
        if self.group is None:
            self.group = LearnerGroup.create(self.ranks, self.path, role=self.role, timeout_s=120, **self.base)
        return self.group

    def close(self) -> None:
        if self.group is not None:
            self.group.shutdown()


def group_fixtures(role: str, ranks: int, base: dict[str, Any]):
    """(`_holder`, `group`) fixtures for a test module: assign both names at module level."""
    import pytest

    @pytest.fixture(scope="module")
    def _holder(ray_session, tiny_llama_dir):
        holder = GroupHolder(tiny_llama_dir, ranks, role, base)
        yield holder
        holder.close()

    @pytest.fixture
    def group(_holder):
        return _holder.get()

    return _holder, group
