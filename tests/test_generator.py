"""Generator actor on a real vLLM engine (tiny Llama, CPU): logprobs and greedy outputs against transformers,
sampling options, control calls while busy."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from relay.actors.sampling import GenerationResult, SamplingConfig

PROMPTS = [[5, 17, 200, 33], [900, 12, 1, 7, 44, 301], [64, 65, 66]]


def test_sampling_config_validation():
    assert SamplingConfig(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingConfig(temperature=0).greedy
    for bad in (dict(n=0), dict(temperature=-1), dict(temperature=0, n=2), dict(top_p=0), dict(top_k=0),
                dict(max_tokens=0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    r = GenerationResult(0, 0, [1, 2], [3, 4], [-0.1, -0.2], "length", 0)
    assert r.sequence == [1, 2, 3, 4] and r.num_tokens == 2


def test_generator_module_imports_without_vllm():
    import subprocess
    import sys

    code = "import sys, relay.actors.generator, relay.actors.weight_sync; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def generator_run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def generator(ray_session, tiny_llama_dir, generator_run_dir):
    from relay.actors.generator import GeneratorConfig, start_generator

    cfg = GeneratorConfig(model=str(tiny_llama_dir), max_model_len=512, run_dir=str(generator_run_dir))
    gen = start_generator(cfg, name="test-generator-gen", timeout_s=240)
    yield gen
    gen.kill()


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _max_logprob_diff(model, results) -> float:
    worst = 0.0
    for r in results:
        with torch.no_grad():
            logits = model(torch.tensor([r.sequence])).logits[0].float()
        p = len(r.prompt_token_ids)
        ref = torch.log_softmax(logits, -1)[p - 1 : len(r.sequence) - 1]
        ref = ref.gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(r.logprobs)).abs().max().item())
    return worst


def test_ready_and_control(generator):
    info = generator.info
    assert info["in_process"] is True and info["device"] == "cpu" and info["version"] == 0
    assert info["engine_pids"] == []  # in-process: the engine has no process of its own to watch
    pid = generator.pid()
    assert pid == info["pid"] and pid != os.getpid() and os.path.exists(f"/proc/{pid}")
    assert generator.version() == 0
    health = generator.health()
    assert health["ok"] and health["broken"] is None and health["engine_pids"] == []
    assert generator.generate([], SamplingConfig()) == []


def test_vllm_model_info_cache_outlives_the_engine(generator, generator_run_dir):
    """The run folder holds the engine's sockets only; vLLM's model-info cache stays in vLLM's cache root, where
    the next engine start finds it (a cold one cost each start a 17 s subprocess that imports vLLM)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"  # vLLM's default, as in vllm.envs
    root = Path(os.environ.get("VLLM_CACHE_ROOT") or Path(cache_home) / "vllm").expanduser()
    assert sorted(p.name for p in generator_run_dir.iterdir()) == ["rpc"]
    cached = json.loads((root / "modelinfos" / "vllm-model_executor-models-llama-LlamaForCausalLM.json").read_text())
    assert cached["modelinfo"]["is_text_generation_model"] is True


@pytest.mark.slow
def test_logprobs_match_transformers(generator, hf_model):
    # temperature != 1 on purpose: returned logprobs are the raw log_softmax(logits), as a learner computes them
    for temperature in (1.0, 0.7):
        results = generator.generate(PROMPTS, SamplingConfig(n=2, temperature=temperature, max_tokens=24, seed=11))
        assert len(results) == 6 and all(r.weight_version == 0 for r in results)
        assert all(len(r.logprobs) == len(r.token_ids) > 0 for r in results)
        assert _max_logprob_diff(hf_model, results) < 1e-3


@pytest.mark.slow
def test_greedy_matches_transformers_generate(generator, hf_model):
    results = generator.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=16))
    eos = hf_model.config.eos_token_id
    for r in results:
        out = hf_model.generate(torch.tensor([r.prompt_token_ids]), max_new_tokens=16, do_sample=False,
                                eos_token_id=eos, pad_token_id=0)
        assert out[0, len(r.prompt_token_ids):].tolist() == r.token_ids
        assert r.finish_reason == ("stop" if r.token_ids[-1] == eos else "length")


@pytest.mark.slow
def test_sampling_options(generator):
    # n samples per prompt, prompt-major order
    res = generator.generate(PROMPTS, SamplingConfig(n=3, max_tokens=6, seed=1))
    assert [(r.prompt_index, r.sample_index) for r in res] == [(i, j) for i in range(3) for j in range(3)]
    assert all(r.prompt_token_ids == PROMPTS[r.prompt_index] for r in res)
    assert len({tuple(r.token_ids) for r in res[:3]}) > 1  # samples of one prompt differ

    # max_tokens, exactly, when EOS is ignored
    res = generator.generate(PROMPTS, SamplingConfig(max_tokens=5, ignore_eos=True))
    assert all(len(r.token_ids) == 5 and r.finish_reason == "length" for r in res)

    # stop_token_ids: stop at (and keep) the first occurrence of a token greedy decoding would produce
    greedy = generator.generate(PROMPTS[:1], SamplingConfig(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    stop = greedy.token_ids[4]
    cut = greedy.token_ids.index(stop)
    res = generator.generate(PROMPTS[:1], SamplingConfig(temperature=0.0, max_tokens=12, stop_token_ids=[stop]))[0]
    assert res.token_ids == greedy.token_ids[: cut + 1]
    assert res.finish_reason == "stop" and res.stop_reason == stop

    # seeds: reproducible, seed-dependent, and duplicated prompts in a batch still differ
    cfg = SamplingConfig(n=2, max_tokens=10, seed=123, top_p=0.95, top_k=200)
    a = generator.generate(PROMPTS, cfg)
    b = generator.generate(PROMPTS, cfg)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    c = generator.generate(PROMPTS, SamplingConfig(n=2, max_tokens=10, seed=124, top_p=0.95, top_k=200))
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    dup = generator.generate([PROMPTS[0], PROMPTS[0]], SamplingConfig(max_tokens=10, seed=5))
    assert dup[0].token_ids != dup[1].token_ids


@pytest.mark.slow
def test_control_calls_answer_while_generating(generator):
    from relay.cluster.calls import get

    prompts = [[(7 * i + j) % 1000 + 3 for j in range(8)] for i in range(48)]
    ref = generator.generate_async(prompts, SamplingConfig(max_tokens=200, ignore_eos=True))
    # A sequential actor would run these after the generate submitted before them; they must not wait.
    pid = generator.pid(timeout_s=10)
    health = generator.health(timeout_s=10)
    answered_while_busy = not ray_ready(ref)
    results = get(ref, 300, "long generate")
    assert pid == generator.info["pid"] and health["ok"]
    assert answered_while_busy
    assert len(results) == 48 and all(len(r.token_ids) == 200 for r in results)


def ray_ready(ref) -> bool:
    import ray

    done, _ = ray.wait([ref], timeout=0)
    return bool(done)


def test_seeded_batch_larger_than_one_step_budget(generator):
    """More prompt tokens than one engine step takes (4096), sampled with a seed: vLLM's chunked prefill would
    rewind the seeded CPU generator and fail ("CPU Generator does not use offset"); the generator prefills
    whole prompts instead, and the seed still fixes the samples."""
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(120)] for i in range(48)]  # 5,760 prompt tokens
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=4, seed=11)
    first = generator.generate(prompts, sampling, timeout_s=300)
    again = generator.generate(prompts, sampling, timeout_s=300)
    assert len(first) == 96 and all(r.num_tokens >= 1 for r in first)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]


def test_engine_starts_without_max_model_len_on_a_long_context_model(ray_session, tmp_path):
    """No max_model_len: the engine takes the model's 8,192 positions, more than one CPU step's default budget
    (4,096 tokens), which vLLM refuses when prompts are not prefilled in chunks unless the budget grows too."""
    from relay.actors.generator import GeneratorConfig, start_generator
    from relay.models.tiny import TinyModelSpec, build_tiny_model

    model = build_tiny_model(TinyModelSpec(max_position_embeddings=8192))
    gen = start_generator(GeneratorConfig(model=str(model), run_dir=str(tmp_path)), name="test-generator-long",
                          timeout_s=240)
    try:
        out = gen.generate([PROMPTS[0]], SamplingConfig(temperature=0, max_tokens=3), timeout_s=120)
        assert len(out) == 1 and out[0].num_tokens >= 1
    finally:
        gen.kill()
