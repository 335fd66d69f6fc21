"""Weight transport: bucket helpers and the transport choice (no Ray), and pushes into a real vLLM generator (shm
and object store). The cross-node push runs on a simulated 2-node cluster (tests/test_placement_cluster.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from relay.actors.weight_sync import (
    TensorSpec,
    WeightUpdateError,
    check_update,
    model_dir_manifest,
    plan_buckets,
    read_buckets,
    read_header,
    read_manifest,
    serialize_buckets,
    transfer_dir,
    write_blobs,
    write_buckets,
)

pytestmark = pytest.mark.usefixtures("no_kept_transfer_folder")


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(16, generator=g),
        "lm_head.weight": torch.randn(64, 16, generator=g),
    }


# ------------------------------------------------------------------------------------------- pure helpers


def test_plan_buckets_keeps_order_and_bounds():
    sizes = [("a", 40), ("b", 40), ("c", 30), ("d", 200), ("e", 10)]
    assert plan_buckets(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_buckets(sizes, 10_000) == [["a", "b", "c", "d", "e"]]
    assert plan_buckets([], 100) == []
    with pytest.raises(ValueError):
        plan_buckets(sizes, 0)


def test_write_read_roundtrip_with_buckets(tmp_path):
    sd = _state_dict()
    paths = write_buckets(sd, tmp_path, bucket_bytes=4096, metadata={"relay_version": "3"})
    assert len(paths) > 1  # 4 KiB buckets split the 4 KiB embedding from the rest
    back = read_buckets(paths)
    assert set(back) == set(sd)
    # bucket order follows the state dict (safetensors may reorder names inside one file)
    order = list(sd)
    firsts = [min(order.index(n) for n in read_header(p)) for p in paths]
    assert firsts == sorted(firsts)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    manifest = read_manifest(paths)
    assert manifest["model.layers.0.input_layernorm.weight"] == TensorSpec((16,), "BF16")
    assert manifest["lm_head.weight"] == TensorSpec((64, 16), "F32")


def test_blobs_equal_files_and_tied_aliases(tmp_path):
    sd = _state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: same storage, safetensors refuses aliases
    blobs = serialize_buckets(sd, bucket_bytes=1 << 20)
    assert len(blobs) == 1
    back = read_buckets(write_blobs(blobs, tmp_path / "blobs"))
    assert all(torch.equal(back[n], t) for n, t in sd.items())
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()  # input untouched


def test_read_header_errors(tmp_path):
    with pytest.raises(WeightUpdateError, match="cannot read"):
        read_header(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not")
    with pytest.raises(WeightUpdateError):
        read_header(bad)
    dup = write_buckets({"x": torch.ones(2)}, tmp_path / "a") + write_buckets({"x": torch.ones(2)}, tmp_path / "b")
    with pytest.raises(WeightUpdateError, match="more than one bucket"):
        read_manifest(dup)


def test_check_update_rules():
    model = {"a.weight": TensorSpec((4, 4), "F32"), "b.norm.weight": TensorSpec((4,), "F32")}
    check_update({"a.weight": TensorSpec((4, 4), "BF16"), "b.norm.weight": TensorSpec((4,), "F32")}, model)
    with pytest.raises(WeightUpdateError, match="shape"):
        check_update({"a.weight": TensorSpec((4, 5), "F32"), "b.norm.weight": TensorSpec((4,), "F32")}, model)
    with pytest.raises(WeightUpdateError, match="missing"):
        check_update({"a.weight": TensorSpec((4, 4), "F32")}, model)
    check_update({"a.weight": TensorSpec((4, 4), "F32")}, model, allow_partial=True)
    with pytest.raises(WeightUpdateError, match="unknown"):
        check_update({**model, "c.weight": TensorSpec((1,), "F32")}, model)
    # HF-only buffers and tied lm_head are tolerated (vLLM skips them)
    check_update({**model, "x.rotary_emb.inv_freq": TensorSpec((2,), "F32")}, model)
    check_update({**model, "lm_head.weight": TensorSpec((4, 4), "F32")}, model, tied_embeddings=True)


def test_transfer_dir_fallback(tmp_path, monkeypatch):
    assert transfer_dir(0, preferred=str(tmp_path)) == tmp_path
    assert transfer_dir(0, preferred=str(tmp_path / "nope")) != tmp_path / "nope"
    assert transfer_dir(1 << 62, preferred=str(tmp_path)) != tmp_path  # too small


def test_model_dir_manifest(tiny_llama_dir):
    m = model_dir_manifest(tiny_llama_dir)
    assert m["model.embed_tokens.weight"].shape == (1024, 128)
    assert "model.layers.1.mlp.down_proj.weight" in m


def test_transport_is_chosen_by_node_id():
    """Shared memory exactly for generators on the sender's node, by Ray node id (never by whether a path
    exists: one machine's /dev/shm is seen by every node of a simulated cluster)."""
    from relay.actors.weight_push import WeightPush, choose_transports

    assert choose_transports("A", ["A", "B", "A", None]) == ["shm", "object_store", "shm", "object_store"]
    assert choose_transports("B", ["A", "B"]) == ["object_store", "shm"]
    assert choose_transports("A", ["A", "A"], "object_store") == ["object_store"] * 2
    assert choose_transports("A", ["A"], "shm") == ["shm"]
    with pytest.raises(ValueError, match=r"generators \[1\] are not on the sender's node"):
        choose_transports("A", ["A", "B"], "shm")
    with pytest.raises(ValueError, match="strategy must be one of"):
        choose_transports("A", ["A"], "nfs")
    with pytest.raises(ValueError, match="2 node ids for 1 generators"):
        WeightPush(["g"], 1, nodes=["A", "B"])
    with pytest.raises(ValueError, match="strategy"):
        WeightPush(["g"], 1, strategy="files")


def test_push_error_names_late_then_failed_generators():
    from relay.actors.weight_push import WeightPush, push_error
    from relay.cluster.calls import RemoteCallTimeout

    push = WeightPush(["a", "b"], 4, names=["gen-a", "gen-b"], timeout_s=9)
    assert push_error({"version": 4, "failures": {}, "late": []}, push) is None
    err = push_error({"version": 4, "failures": {1: "WeightUpdateError: shape"}, "late": []}, push)
    assert isinstance(err, WeightUpdateError) and "failed on 1 generator(s): gen-b: WeightUpdateError: shape" in str(err)
    err = push_error({"version": 4, "failures": {1: "x"}, "late": [0]}, push)
    assert isinstance(err, RemoteCallTimeout) and "['gen-a'] did not load within 9 s" in str(err)


# ------------------------------------------------------------------------------------ real Ray + vLLM

PROMPTS = [[5, 17, 200, 33], [900, 12, 1, 7, 44, 301], [64, 65, 66]]


@pytest.fixture(scope="module")
def generator(ray_session, tiny_llama_dir, tmp_path_factory):
    from relay.actors.generator import GeneratorConfig, start_generator

    cfg = GeneratorConfig(model=str(tiny_llama_dir), max_model_len=256, run_dir=str(tmp_path_factory.mktemp("vllm")))
    gen = start_generator(cfg, name="test-weight-sync-gen", timeout_s=240)
    yield gen
    gen.kill()


def _perturbed(model_dir: Path, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(model_dir / "model.safetensors"))
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in sd.items()}


def _hf_logprobs(model, results) -> float:
    """Max |vLLM logprob - transformers logprob| over all sampled tokens."""
    worst = 0.0
    for r in results:
        seq = torch.tensor([r.sequence])
        with torch.no_grad():
            logits = model(seq).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        p = len(r.prompt_token_ids)
        ref = lp[p - 1 : len(r.sequence) - 1].gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(r.logprobs)).abs().max().item())
    return worst


def _hf_model(model_dir, state_dict=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


@pytest.mark.slow
def test_shm_update_changes_outputs_and_matches_transformers(generator, tiny_llama_dir):
    from relay.actors.sampling import SamplingConfig
    from relay.actors.weight_push import push_weights

    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=7)
    before = generator.generate(PROMPTS, sampling)
    v0 = generator.version()
    new = _perturbed(tiny_llama_dir, seed=1)
    report = push_weights([generator], new, version=v0 + 1, strategy="shm", timeout_s=120)
    assert report["strategies"] == ["shm"] and report["version"] == v0 + 1
    assert generator.version() == v0 + 1
    assert not any(Path(report["shm_dir"]).glob("relay-weights-*")), "transfer files must be removed"

    after = generator.generate(PROMPTS, sampling)
    assert all(r.weight_version == v0 + 1 for r in after)
    diff = max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x.logprobs, y.logprobs))
    assert diff > 1e-2 or [r.token_ids for r in before] != [r.token_ids for r in after]

    hf_new = _hf_model(tiny_llama_dir, new)
    assert _hf_logprobs(hf_new, after) < 1e-3
    # greedy decoding equals transformers' greedy generate with the NEW weights
    greedy = generator.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=10))
    for r in greedy:
        out = hf_new.generate(torch.tensor([r.prompt_token_ids]), max_new_tokens=10, do_sample=False,
                              eos_token_id=hf_new.config.eos_token_id, pad_token_id=0)
        assert out[0, len(r.prompt_token_ids):].tolist() == r.token_ids


@pytest.mark.slow
def test_object_store_equals_shm(generator, tiny_llama_dir):
    from relay.actors.sampling import SamplingConfig
    from relay.actors.weight_push import push_weights

    new = _perturbed(tiny_llama_dir, seed=2)
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=3)
    v = generator.version()
    push_weights([generator], new, version=v + 1, strategy="shm", timeout_s=120)
    via_shm = generator.generate(PROMPTS, sampling)
    # small buckets: several objects in flight, and a different bf16 dtype on the wire for one tensor
    wire = {n: (t.to(torch.bfloat16).float() if n == "model.norm.weight" else t) for n, t in new.items()}
    report = push_weights([generator], wire, version=v + 2, strategy="object_store", bucket_bytes=1 << 20,
                          timeout_s=120)
    assert report["strategies"] == ["object_store"] and report["buckets"] > 1
    assert generator.version() == v + 2
    push_weights([generator], new, version=v + 3, strategy="object_store", timeout_s=120)
    via_store = generator.generate(PROMPTS, sampling)
    assert [r.token_ids for r in via_shm] == [r.token_ids for r in via_store]
    assert max(abs(a - b) for x, y in zip(via_shm, via_store) for a, b in zip(x.logprobs, y.logprobs)) < 1e-6
    assert {r.weight_version for r in via_store} == {v + 3}


@pytest.mark.slow
def test_bad_updates_raise_and_keep_version(generator, tiny_llama_dir, tmp_path):
    from relay.actors.sampling import SamplingConfig
    from relay.actors.weight_push import push_weights
    from relay.cluster.calls import RemoteCallTimeout

    sampling = SamplingConfig(temperature=0.0, max_tokens=8)
    v = generator.version()
    before = generator.generate(PROMPTS, sampling)
    good = _perturbed(tiny_llama_dir, seed=5)

    wrong_shape = dict(good)
    wrong_shape["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    missing = {n: t for n, t in good.items() if n != "model.layers.0.self_attn.k_proj.weight"}
    for bad, match in ((wrong_shape, "shape"), (missing, "missing")):
        for strategy in ("shm", "object_store"):
            with pytest.raises(WeightUpdateError, match=match):
                push_weights([generator], bad, version=v + 1, strategy=strategy, timeout_s=60)
            assert generator.version() == v
    with pytest.raises(Exception, match="cannot read weight file"):
        generator.update_weights([str(tmp_path / "gone.safetensors")], v + 1, timeout_s=60)
    with pytest.raises(Exception, match="not newer"):
        generator.update_weights([], v, timeout_s=60)
    assert generator.version() == v
    health = generator.health()
    assert health["ok"] and health["version"] == v
    # rejected updates never touched the engine: same outputs as before
    assert [r.token_ids for r in generator.generate(PROMPTS, sampling)] == [r.token_ids for r in before]
    # and a too-short timeout surfaces as RemoteCallTimeout, not a hang
    with pytest.raises(RemoteCallTimeout):
        push_weights([generator], good, version=v + 1, strategy="shm", timeout_s=1e-3)
    assert not list(Path(transfer_dir(0)).glob(f"relay-weights-{os.getpid()}-*"))


@pytest.mark.slow
def test_shm_push_falls_back_to_disk_when_shm_is_full(generator, tiny_llama_dir, monkeypatch, log_lines):
    """/dev/shm without room (a full tmpfs, simulated by the free-space function): the push goes through a
    private folder in the system temp dir, says so in one line, and leaves nothing behind."""
    import tempfile

    from relay import scratch
    from relay.actors.weight_push import push_weights

    lines = log_lines("relay.scratch")
    scratch._said.clear()
    monkeypatch.setattr(scratch, "free_bytes", lambda _p: 0)
    v = generator.version()
    report = push_weights([generator], _perturbed(tiny_llama_dir, seed=4), version=v + 1, strategy="shm",
                          timeout_s=120)
    assert generator.version() == v + 1 and report["shm_dir"] == tempfile.gettempdir()
    assert len(lines) == 1 and "on disk" in lines[0]
    assert not list(Path(tempfile.gettempdir()).glob(f"relay-weights-{os.getpid()}-*"))


@pytest.mark.slow
def test_reused_transfer_files_carry_each_new_version(generator, tiny_llama_dir):
    """With `reuse` (the pool's pushes) the sender keeps its transfer folder and overwrites the same files on
    the next push; the engine copied the first version out of them (it keeps no parameter in the files'
    memory), so the second push's weights, not a mix, are what it serves. A push with a late generator gives
    the folder up: that reader may still map the files."""
    import ray

    from relay import scratch
    from relay.actors.sampling import SamplingConfig
    from relay.actors.weight_push import WeightPush, push_error

    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=11)
    v = generator.version()
    first, second = _perturbed(tiny_llama_dir, seed=6), _perturbed(tiny_llama_dir, seed=7)
    reports = []
    for i, weights in enumerate((first, second), start=1):
        report = WeightPush([generator], v + i, strategy="shm", timeout_s=120, reuse=True)(weights)
        assert push_error(report) is None and report["overwritten"] == (0 if i == 1 else report["buckets"])
        assert [w["aliases_files"] for w in report["per_generator"][0]["workers"]] == [False]
        reports.append(report)
    folder = scratch._reused["weight-transfer"]
    assert folder.is_dir() and folder.name.startswith(f"relay-weights-{os.getpid()}-")
    served = generator.generate(PROMPTS, sampling)
    assert {r.weight_version for r in served} == {v + 2}
    assert _hf_logprobs(_hf_model(tiny_llama_dir, second), served) < 1e-3
    assert _hf_logprobs(_hf_model(tiny_llama_dir, first), served) > 1e-2  # the second version, not the first

    node = ray.get(generator.actor.node_id.remote())
    late = WeightPush([generator], v + 3, nodes=[node], strategy="shm", timeout_s=1e-3, reuse=True)(first)
    assert late["late"] == [0] and not folder.exists() and "weight-transfer" not in scratch._reused
    assert generator.version() == v + 2


@pytest.mark.slow
def test_failed_load_marks_generator_broken(generator, tiny_llama_dir, tmp_path):
    """A file that passes the header check but is truncated fails inside vLLM's reload, which leaves the engine
    half-loaded: the update must raise, the version stay, and the generator refuse to generate. Runs last in
    this module because it breaks the module's generator on purpose."""
    from relay.actors.sampling import SamplingConfig

    v = generator.version()
    paths = write_buckets(_perturbed(tiny_llama_dir, seed=9), tmp_path, bucket_bytes=1 << 20)
    data = paths[-1].read_bytes()
    paths[-1].write_bytes(data[: len(data) - 4096])  # header intact, data cut short
    with pytest.raises(Exception, match="failed while loading"):
        generator.update_weights([str(p) for p in paths], v + 1, timeout_s=60)
    assert generator.version() == v
    health = generator.health()
    assert not health["ok"] and "failed while loading" in health["broken"]
    with pytest.raises(Exception, match="GeneratorBroken|failed while loading"):
        generator.generate(PROMPTS, SamplingConfig(max_tokens=4))


def test_packed_buckets_are_what_safetensors_reads(tmp_path):
    """`pack_bucket` writes the format itself (one copy per tensor); safetensors' own reader is the reference."""
    from safetensors import safe_open
    from safetensors.torch import load

    from relay.actors.weight_sync import pack_bucket, write_bucket_file

    tensors = {"z.bf16": torch.randn(3, 5).to(torch.bfloat16), "a.f32": torch.randn(7),
               "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "mask": torch.tensor([True, False, True]),
               "half": torch.randn(2, 2).half(), "empty": torch.zeros(0, 4), "u8": torch.arange(5, dtype=torch.uint8)}
    blob = pack_bucket(tensors, metadata={"relay_version": "3"})
    direct = write_bucket_file(tensors, tmp_path / "direct.safetensors", metadata={"relay_version": "3"})
    assert direct.read_bytes() == blob.tobytes() and oct(direct.stat().st_mode & 0o777) == "0o600"
    back = load(blob.tobytes())
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    path = write_blobs([blob], tmp_path)[0]
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"relay_version": "3"}
    with pytest.raises(FileExistsError):  # never over (or through) what is already there
        write_bucket_file(tensors, direct)
    assert (8 + int.from_bytes(blob[:8].tobytes(), "little")) % 8 == 0  # data starts 8-byte aligned
    with pytest.raises(WeightUpdateError, match="complex64"):
        pack_bucket({"c": torch.zeros(2, dtype=torch.complex64)})


def test_bucket_file_overwritten_in_place(tmp_path):
    """A reused transfer folder's files are rewritten in place (same inode: the pages are reused) and cut to
    the new length; what is read back is the new bucket, byte for byte what `pack_bucket` makes."""
    from relay.actors.weight_sync import pack_bucket, write_bucket_file

    big = {"a": torch.randn(1000), "b": torch.randn(30, 30)}
    small = {"a": torch.randn(10)}
    path = write_bucket_file(big, tmp_path / "w.safetensors", {"relay_version": "1"})
    inode = path.stat().st_ino
    write_bucket_file(small, path, {"relay_version": "2"}, overwrite=True)
    assert path.stat().st_ino == inode and path.read_bytes() == pack_bucket(small, {"relay_version": "2"}).tobytes()
    assert torch.equal(read_buckets([path])["a"], small["a"])
    fresh = write_bucket_file(small, tmp_path / "new.safetensors", overwrite=True)  # nothing there yet: created
    assert oct(fresh.stat().st_mode & 0o777) == "0o600"
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "target")
    with pytest.raises(OSError):  # never through a link
        write_bucket_file(small, tmp_path / "link.safetensors", overwrite=True)
    assert not (tmp_path / "target").exists()
