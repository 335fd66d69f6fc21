"""vLLM worker extension: in-place weight reload from safetensors files.

vLLM mixes this class into its worker (`LLM(worker_extension_cls="relay.actors.vllm_worker_ext.
RelayWorkerExtension")`) and we call its methods with `llm.collective_rpc(name, args=...)`, so they run in
every worker process (one per tensor-parallel rank), in-process or not. Only small, picklable values cross
that boundary: file paths in, a report dict out. Passing tensors through `collective_rpc` does not work in
multi-process mode (they arrive as nested lists), and calling `model.load_weights` directly does not work on
CPU (linear weights are repacked after loading; `reload_weights` redoes that processing), hence files +
`model_runner.reload_weights(weights_iterator=...)`.

This module must not import vLLM at module level: it is imported by name inside the worker.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

# Parameters that vLLM keeps exactly as in the checkpoint (not fused, not repacked, not sharded by tensor
# parallelism) for the Llama/Qwen2-style families: a bitwise comparison after loading proves the new file
# really reached the model.
PROBE_SUFFIXES = ("norm.weight",)


def _is_probe(name: str) -> bool:
    return name.endswith(PROBE_SUFFIXES)


def _tied_embeddings(worker) -> bool:
    """The served model ties lm_head to the input embeddings (its lm_head gets no tensor of its own)."""
    try:
        hf_config = worker.model_runner.model_config.hf_config
        return bool(getattr(hf_config, "tie_word_embeddings", False))
    except AttributeError:
        return False


def _aliases(model, ranges: list[tuple[int, int]]) -> bool:
    """Some parameter or buffer of `model` lies in the memory of a loaded file tensor (the engine kept the
    file's mapping instead of copying it): the sender must then not overwrite those files later."""
    import bisect

    ranges = sorted(r for r in ranges if r[1] > r[0])
    starts = [r[0] for r in ranges]
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        ptr = t.data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < ranges[i][1]:
            return True
    return False


class RelayWorkerExtension:
    """Methods added to vLLM's worker class (`self` is the worker; it has `model_runner`)."""

    def relay_reload_from_files(self, paths: list[str], allow_partial: bool = False) -> dict:
        """Load the tensors in `paths` (safetensors, HF names) into the running model, then verify.

        Raises if a tensor does not fit (vLLM's weight loaders assert shapes), if some model parameter got no
        new value (unless `allow_partial`), or if a probe parameter differs from the file after loading.
        """
        import torch
        from safetensors import safe_open

        from relay.logs import explain_vllm_reload_warnings

        # vLLM warns "RotaryEmbedding: Failed to load weights" on every reload (layers without weights of their
        # own in the update); harmless, so it is explained once in the generator's log and then dropped.
        explain_vllm_reload_warnings(_tied_embeddings(self))
        probes: dict[str, torch.Tensor] = {}
        counts = {"tensors": 0, "bytes": 0}
        file_ranges: list[tuple[int, int]] = []  # the memory-mapped file tensors (start, end)

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for path in paths:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        tensor = f.get_tensor(name)
                        nbytes = tensor.numel() * tensor.element_size()
                        counts["tensors"] += 1
                        counts["bytes"] += nbytes
                        file_ranges.append((tensor.data_ptr(), tensor.data_ptr() + nbytes))
                        if _is_probe(name):
                            probes[name] = tensor
                        yield name, tensor

        model = self.model_runner.get_model()
        expected = {name for name, _ in model.named_parameters()}
        # reload_weights only logs a warning for parameters it did not load and then puts the OLD kernel
        # tensors back for them; capture the set of loaded names from model.load_weights to refuse that.
        captured: dict[str, set[str] | None] = {}
        original_load = model.load_weights

        def load_weights_capturing(ws):
            loaded = original_load(ws)
            captured["loaded"] = set(loaded) if loaded is not None else None
            return loaded

        start = time.perf_counter()
        model.load_weights = load_weights_capturing  # instance attribute shadows the method for this call
        try:
            self.model_runner.reload_weights(weights_iterator=weights())
        finally:
            del model.load_weights
        load_s = time.perf_counter() - start

        loaded = captured.get("loaded")
        if loaded is None:
            raise RuntimeError("relay_reload_from_files: vLLM did not report which weights it loaded")
        missing = sorted(expected - loaded)
        if missing and not allow_partial:
            raise RuntimeError(
                f"weight reload left {len(missing)} parameter(s) with old values, e.g. {missing[:5]}; "
                "the update must contain every weight (or pass allow_partial=True)"
            )

        params = dict(model.named_parameters())
        verified, mismatched = 0, []
        for name, sent in probes.items():
            param = params.get(name)
            if param is None or tuple(param.shape) != tuple(sent.shape):
                continue  # another naming/sharding scheme: nothing to compare bitwise
            if torch.equal(param.detach().cpu(), sent.to(param.dtype)):
                verified += 1
            else:
                mismatched.append(name)
        if mismatched:
            raise RuntimeError(f"weight reload verification failed: {mismatched[:5]} differ from the update")
        return {
            "load_s": load_s,
            "tensors": counts["tensors"],
            "bytes": counts["bytes"],
            "probes_verified": verified,
            "params_not_updated": len(missing),
            "aliases_files": _aliases(model, file_ranges),
        }

    def relay_param_sums(self, names: list[str]) -> dict[str, float]:
        """float64 sums of the named parameters as the model holds them now (a cheap fingerprint)."""
        params = dict(self.model_runner.get_model().named_parameters())
        return {n: float(params[n].detach().double().sum()) for n in names if n in params}
