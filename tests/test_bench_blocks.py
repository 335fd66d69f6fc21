"""benchmarks.bench_grpo_trl's block names: the actor group's rank count and bf16 read back from a block's name
(the '... dpN' blocks of `--learner-ranks`). No Ray."""
from __future__ import annotations

from benchmarks.bench_grpo_trl import block_bf16, block_ranks


def test_block_names_carry_ranks_and_precision():
    assert [block_ranks(b) for b in ("sync", "async", "sync timeshare bf16", "sync dp2", "sync timeshare bf16 dp4")] \
        == [1, 1, 1, 2, 4]
    assert block_bf16("sync bf16") and block_bf16("sync timeshare bf16 dp2")
    assert not block_bf16("sync timeshare dp2") and not block_bf16("async")
