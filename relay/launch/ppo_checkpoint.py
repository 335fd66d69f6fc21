"""PPO checkpoints: what one holds besides the learners (`PPOState`), and saving / resuming a `PPOSystem`.

SAVE_DIR/checkpoints/step-<episode>/ = actor/ and critic/ (model folder + optimizer, `LearnerGroup`
checkpoints) + trainer_state.json (this state, RNG). Written to a temporary folder and renamed, so a run killed
mid-save keeps its last complete checkpoint. `PPOCheckpoints` is a mixin of `relay.launch.ppo.PPOSystem`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path


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
    """save_checkpoint / _maybe_resume / save_final for `PPOSystem`."""

    def save_checkpoint(self) -> Path:
        """SAVE_DIR/checkpoints/step-<episode>/: actor/, critic/ (model + optimizer), trainer_state.json."""
        from dataclasses import asdict

        from relay.launch.ppo import log
        from relay.learners.checkpoint import atomic_dir, checkpoint_dir, save_trainer_state

        # Async mode has already drawn the next episode's prompts: save the data position before them, so a
        # resumed run generates and trains them instead of skipping them.
        self.state.prompt_order = self.pending["order_before"] if self.pending else self.prompt_order.state_dict()
        self.state.ptx_order = self.ptx_order.state_dict() if self.ptx_order else {}
        m = self.scorers.moments
        self.state.reward_moments = {"mean": m.mean, "var": m.var, "count": m.count}
        final = checkpoint_dir(self.save_dir, self.state.episode)
        with atomic_dir(final) as tmp:
            self.actor.save_checkpoint(tmp / "actor")
            if self.critic is not None:
                self.critic.save_checkpoint(tmp / "critic")
            save_trainer_state(tmp, asdict(self.state))
        log(f"checkpoint {final}")
        return final

    def _maybe_resume(self) -> bool:
        from relay.launch.ppo import log
        from relay.learners.checkpoint import load_trainer_state, resolve_resume

        path = resolve_resume(self.cfg.checkpoint_path)
        if path is None:
            return False
        self.actor.load_checkpoint(path / "actor")
        if self.critic is not None:
            self.critic.load_checkpoint(path / "critic")
        st = load_trainer_state(path)
        st.pop("rng", None)
        self.state = PPOState(**st)
        self.prompt_order.load_state_dict(self.state.prompt_order)
        if self.ptx_order and self.state.ptx_order:
            self.ptx_order.load_state_dict(self.state.ptx_order)
        self.kl_ctl.value = self.state.kl_coef
        if self.state.reward_moments:
            for k, v in self.state.reward_moments.items():
                setattr(self.scorers.moments, k, v)
        if self.state.version > 0:
            self.sync_weights()  # generators start from the model folder: bring them to the checkpoint's weights
        log(f"resumed from {path}: episode {self.state.episode}, weight version {self.state.version}")
        return True

    def save_final(self) -> None:
        """The last checkpoint, plus SAVE_DIR/actor (and critic) as HF folders for `relay chat` / evaluation."""
        ckpt = self.save_checkpoint()
        for role in ("actor", "critic"):
            src = ckpt / role / "model"
            if src.exists():
                dst = self.save_dir / role
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
