"""What a generator is asked for (`SamplingConfig`) and what it returns (`GenerationResult`).

Pure Python on purpose: drivers, the experience buffer and learners use these types without importing vLLM
(or torch). The generator actor translates `SamplingConfig` into vLLM's `SamplingParams`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample responses for a batch of prompts (one config for the whole batch)."""

    n: int = 1
    """Samples per prompt (GRPO/RLOO use several); each becomes its own `GenerationResult`."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (then `n` must be 1)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to at least `top_p` (1 = off)."""
    top_k: int | None = None
    """Keep only the `top_k` most likely tokens; None = off."""
    max_tokens: int = 128
    """Maximum number of generated (response) tokens per sample; the stop token, if hit, counts as one."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a sample (besides the model's EOS); the stop token is kept in the response."""
    seed: int | None = None
    """Per-request seed: the same prompts, config and weights give the same samples. None = engine RNG."""
    ignore_eos: bool = False
    """Keep generating past EOS until `max_tokens` (benchmarks only)."""

    def __post_init__(self) -> None:
        # Checked here, in the driver, so a bad config fails before any actor is involved.
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("SamplingConfig: greedy decoding (temperature=0) gives identical samples; use n=1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"SamplingConfig.top_k must be >= 1 or None, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be >= 1, got {self.max_tokens}")
        # Accept any iterable (YAML gives lists) but store a tuple so the config stays hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    """One sample for one prompt."""

    prompt_index: int
    """Position of the prompt in the batch passed to `generate`."""
    sample_index: int
    """0..n-1 among the samples of that prompt."""
    prompt_token_ids: list[int]
    """The prompt exactly as given."""
    token_ids: list[int]
    """Generated response tokens, including the EOS/stop token when one ended the sample."""
    logprobs: list[float]
    """Log-probability of each token in `token_ids` under the weights that sampled it, computed from the raw
    logits (before temperature/top-k/top-p), i.e. `log_softmax(logits)[token]` as a learner computes it."""
    finish_reason: str
    """"stop" (EOS or a stop token), "length" (hit max_tokens) or "abort"."""
    weight_version: int
    """Version of the weights that produced the sample (0 = the weights the engine started with)."""
    stop_reason: int | str | None = None
    """The stop token id that ended the sample, if any (None for EOS or length)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form extras (e.g. timing); not interpreted by Relay."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def sequence(self) -> list[int]:
        """Prompt followed by response, the layout learners score."""
        return self.prompt_token_ids + self.token_ids
