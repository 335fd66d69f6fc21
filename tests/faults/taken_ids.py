"""A started PPOSystem whose buffer reads are recorded: {episode: [sample ids taken]}, for the fault tests'
"every sample trained on exactly once" checks."""
from __future__ import annotations

from typing import Any, Iterator


def system_recording_taken_ids(cfg: Any) -> Iterator[tuple[Any, dict[int, list[str]]]]:
    """Start `PPOSystem(cfg)`, yield (system, taken) and close it at the end (a generator for module fixtures)."""
    from relay.launch.ppo import PPOSystem

    system = PPOSystem(cfg).start()
    taken: dict[int, list[str]] = {}
    real_take_all = system.buffer.take_all

    def take_all(*args, **kwargs):
        batches = real_take_all(*args, **kwargs)
        taken.setdefault(system.state.episode, []).extend(str(s) for b in batches for s in b.sample_ids)
        return batches

    system.buffer.take_all = take_all
    try:
        yield system, taken
    finally:
        system.close()
