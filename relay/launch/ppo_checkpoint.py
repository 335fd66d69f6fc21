"""PPO checkpoints: what one holds besides the learners (`PPOState`), and saving / resuming a `PPOSystem`.

SAVE_DIR/checkpoints/step-<episode>/ = actor/ and critic/ (model folder + optimizer, `LearnerGroup`
checkpoints) + trainer_state.json (this state, RNG). Written to a temporary folder, fsynced and renamed, so a
run killed mid-save keeps its last complete checkpoint; the newest `keep_checkpoints` are kept. `PPOCheckpoints` is a mixin of `relay.launch.ppo.PPOSystem`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from relay.launch import safe_points
from relay.launch.ppo_log import log
from relay.learners.checkpoint_resume import LEARNER_FILES, STATE_FILES, CheckpointError, find_resume
from relay.learners.checkpoint_store import (
    belongs_to,
    checkpoint_dir,
    clean_stale,
    publish_folder,
    save_with_retention,
    stale_line,
)


@dataclass
class PPOState:
    """What a checkpoint restores besides the learners: episode, weight version, data positions, KL coef."""

    episode: int = 0
    version: int = 0
    prompt_order: dict[str, int] = field(default_factory=dict)
    ptx_order: dict[str, int] = field(default_factory=dict)
    kl_coef: float = 0.0
    reward_moments: dict[str, float] = field(default_factory=dict)


class PPOCheckpoints:
    """save_checkpoint / _maybe_resume / save_final, and stopping at a safe point, for `PPOSystem`."""

    def save_checkpoint(self) -> Path:
        """SAVE_DIR/checkpoints/step-<episode>/: actor/, critic/ (model + optimizer), trainer_state.json; older
        checkpoints beyond `keep_checkpoints` are deleted, and what this one cost is logged."""
        from dataclasses import asdict

        from relay.learners.checkpoint import save_trainer_state

        # Async mode has already drawn the next episode's prompts: save the data position before them, so a
        # resumed run generates and trains them instead of skipping them.
        self.state.prompt_order = self.pending["order_before"] if self.pending else self.prompt_order.state_dict()
        self.state.ptx_order = self.ptx_order.state_dict() if self.ptx_order else {}
        m = self.scorers.moments
        self.state.reward_moments = {"mean": m.mean, "var": m.var, "count": m.count}

        def write(tmp: Path) -> None:
            self.actor.save_checkpoint(tmp / "actor")
            if self.critic is not None:
                self.critic.save_checkpoint(tmp / "critic")
            save_trainer_state(tmp, asdict(self.state))

        report = save_with_retention(checkpoint_dir(self.save_dir, self.state.episode), write,
                                     self.cfg.keep_checkpoints)
        self.saved_episode, self.last_checkpoint = self.state.episode, report.path
        self.schedule.saved()
        log(report.line())
        return report.path

    def _required_files(self) -> tuple[str, ...]:
        roles = ("actor", "critic") if self.cfg.algo.advantage_estimator == "gae" else ("actor",)
        return STATE_FILES + tuple(f"{role}/{f}" for role in roles for f in LEARNER_FILES)

    def _maybe_resume(self) -> bool:
        """Resume from `checkpoint_path` (a folder, or `auto`: SAVE_DIR's newest) if there is one."""
        if removed := clean_stale(self.save_dir):  # what a killed run left half-written
            log(stale_line(removed))
        path = find_resume(self.cfg.checkpoint_path, self.save_dir, self._required_files(), log)
        if path is None:
            return False
        self._restore(path)
        if self.state.version > 0:
            self.sync_weights()  # generators start from the model folder: bring them to the checkpoint's weights
        log(f"resumed from {path}: episode {self.state.episode}, weight version {self.state.version}")
        return True

    def _restore(self, path: Path) -> None:
        """Learners (built as the checkpoint's were), PPOState, data positions, KL coef, reward moments, RNG."""
        from relay.learners.checkpoint import load_trainer_state

        st = load_trainer_state(path, restore=False)
        st.pop("rng", None)
        unknown = set(st) - {f.name for f in fields(PPOState)}
        if unknown:
            raise CheckpointError(f"{path / 'trainer_state.json'}: not a PPO checkpoint (fields {sorted(unknown)})")
        self.actor.load_checkpoint(path / "actor")
        if self.critic is not None:
            self.critic.load_checkpoint(path / "critic")
        load_trainer_state(path)  # restores the RNG
        self.state = PPOState(**st)
        if belongs_to(path, self.save_dir):  # else a stop saves this run's first checkpoint in SAVE_DIR
            self.saved_episode, self.last_checkpoint = self.state.episode, path
        self.prompt_order.load_state_dict(self.state.prompt_order)
        if self.ptx_order and self.state.ptx_order:
            self.ptx_order.load_state_dict(self.state.ptx_order)
        self.kl_ctl.value = self.state.kl_coef
        if self.state.reward_moments:
            for k, v in self.state.reward_moments.items():
                setattr(self.scorers.moments, k, v)

    def _stop_here(self) -> None:
        """A signal asked the run to stop: checkpoint what was trained since the last save, then leave the loop."""
        stop = safe_points.active()
        if self.state.episode > self.saved_episode:
            self.save_checkpoint()
        self.stopped = True
        if stop is not None:  # `relay` prints the outcome with the command that resumes the run
            stop.finish(f"after episode {self.state.episode} of {self.cfg.algo.num_episodes}", self.last_checkpoint)

    def _remove_temp_files(self) -> None:
        """Unfinished checkpoint temp folders (weight transfers clean up after themselves, in the learner)."""
        clean_stale(self.save_dir)

    def save_final(self) -> None:
        """The last checkpoint, plus SAVE_DIR/actor (and critic) as HF folders for `relay chat` / evaluation."""
        ckpt = self.save_checkpoint()
        for role in ("actor", "critic"):
            src = ckpt / role / "model"
            if src.exists():
                publish_folder(src, self.save_dir / role)
