"""A learner rank's death, survived: the PPO driver rebuilds its learner groups and goes back to the last checkpoint.

A learner rank that dies (OOM kill, preemption, a crash) takes its group with it: the other ranks wait for it in
collectives, and the actor and critic states only make sense together. So the driver, without stopping:

1. finds which rank is gone (`LearnerGroup.dead_ranks`; an error with every rank alive is not a death and is
   raised as it is),
2. kills both groups and starts them again in the run's placement groups (where a rank's node itself is gone,
   once Ray has moved its bundles to a node with room: `Placement.refresh`),
3. restores SAVE_DIR's newest complete checkpoint (or the run's starting point when none was saved yet), as
   `--resume auto` would: weights, optimizer states, episode, weight version, data positions, KL coefficient,
   reward moments, random state,
4. loads that checkpoint's weights into the generators (`rewind`: an older version than theirs), empties the
   buffer, drops the metrics lines after the checkpoint, and runs the episodes since again: the same prompts with
   the same seeds, so every prompt's samples are trained on once in the run's final history.

At most `cluster.max_restarts` times per run; then the run stops with `LearnerLost`, which says how to go on
(`--resume auto`). `PPORecovery` is a mixin of `relay.launch.ppo.PPOSystem`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from relay.launch.ppo_log import log
from relay.learners.checkpoint_resume import AUTO, find_resume


LEARNER_GROUPS = ["actor_learner", "critic_learner"]  # the plan's learner placement groups


class LearnerLost(RuntimeError):
    """A learner rank died more often than `cluster.max_restarts` allows."""


def dead_learner(groups: dict[str, Any], err: BaseException) -> str | None:
    """'<role> rank <i>' for a learner rank whose process is gone, or None (then `err` is not a death).

    Only errors a dead rank causes are probed: Ray's actor errors, and the group's own error around them or
    around a survivor's failed collective."""
    import ray

    from relay.learners.group import LearnerGroupError

    if not isinstance(err, (LearnerGroupError, ray.exceptions.RayActorError, ray.exceptions.RayTaskError)):
        return None
    for role, group in groups.items():
        if group is not None and group.workers and (dead := group.dead_ranks()):
            return f"{role} rank {dead[0]}"
    return None


class PPORecovery:
    """`_recover_learners` for `PPOSystem`: what happens when `dead_learner` names a rank."""

    learner_restarts: int = 0

    def _recover_learners(self, what: str, err: BaseException) -> float:
        """Rebuild both learner groups and rewind the run to its newest checkpoint; returns seconds taken."""
        limit = self.cfg.cluster.max_restarts
        self.learner_restarts += 1
        if self.learner_restarts > limit:
            where = f"; `--resume auto` goes on from {self.last_checkpoint}" if self.last_checkpoint else ""
            raise LearnerLost(f"learner {what} died ({_short(err)}): restart {self.learner_restarts} is over "
                              f"cluster.max_restarts={limit}, the run stops{where}") from err
        t0 = time.monotonic()
        episode = self.state.episode
        path = self._recovery_checkpoint()
        log(f"learner {what} died in episode {episode + 1} ({_short(err)}): restarting the learner groups from "
            f"{path or 'the run start'} (restart {self.learner_restarts} of {limit})")
        for group in (self.actor, self.critic):
            if group is not None:
                group.kill()
        self.actor = self.critic = None
        if self.pending is not None:  # async: drawn after the checkpoint; generated again after the rewind
            self._wait(self.pending)
            self.pending = None
        self.buffer.clear(forget=True)  # the episodes since the checkpoint put the same sample ids again
        # a dead node's bundles must find another node before ranks start there
        if self.placement is not None and self.placement.refresh(LEARNER_GROUPS, self.cfg.cluster.placement_timeout_s):
            log(f"learner bundles moved: {self.placement.describe()}")
        self._start_learners()
        self._reset_run_state()
        if path is not None:
            self._restore(path)
        self.sync_weights(rewind=True)
        self.logger.truncate(self.state.episode + 1)
        took = time.monotonic() - t0
        log(f"learners back in {took:.1f} s: episodes {self.state.episode + 1}..{episode + 1} run again "
            f"(weight version {self.state.version})")
        return took

    def _recovery_checkpoint(self) -> Path | None:
        """SAVE_DIR's newest complete checkpoint; else the one the run started from; else None (the start)."""
        path = find_resume(AUTO, self.save_dir, self._required_files(), log) if self.last_checkpoint else None
        if path is None and self.cfg.checkpoint_path not in (None, "", AUTO):
            path = find_resume(self.cfg.checkpoint_path, self.save_dir, self._required_files(), log)
        return path


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
