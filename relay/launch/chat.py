"""`relay chat --model PATH`: talk to a model Relay saved (SFT, DPO, PPO, merged or LoRA) or a prepared base
model, through a vLLM generator actor, with the conversation template the model was trained with.

Interactive by default (`/reset` clears the history, `/exit` quits); `--prompt TEXT` (repeatable) or
`--input FILE --output FILE` for batch use. Input files are JSONL with `prompt` (a string) or `messages`
(role/content turns), or plain text with one prompt per line; the output is JSONL with the reply added.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from relay.launch.argtypes import finite_float

TEMPLATE_FILE = "conversation_template.json"


def merge_lora_folder(adapter_dir: Path, cache_root: Path | None = None) -> Path:
    """A peft adapter folder -> a merged full model folder (cached next to it) that vLLM can load."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_cfg = PeftConfig.from_pretrained(adapter_dir)
    base = peft_cfg.base_model_name_or_path
    if not base or not Path(base).exists():
        sibling = adapter_dir.parent / "base"
        if not sibling.exists():
            raise FileNotFoundError(f"{adapter_dir}: LoRA adapter's base model {base!r} not found")
        base = str(sibling)
    out = (cache_root or adapter_dir.parent) / f"{adapter_dir.name}-merged"
    stamp = str((adapter_dir / "adapter_model.safetensors").stat().st_mtime_ns) if (adapter_dir / "adapter_model.safetensors").exists() else ""
    if (out / "config.json").exists() and (out / ".source").exists() and (out / ".source").read_text() == stamp:
        return out
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(base)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    (out / ".source").write_text(stamp)
    return out


def resolve_chat_model(name_or_path: str) -> Path:
    """Bundled name or folder -> a folder vLLM can serve (LoRA adapters merged; reward models refused)."""
    from relay.models.smollm2 import resolve_model_path

    path = Path(resolve_model_path(name_or_path, "--model"))
    if (path / "adapter_config.json").exists() and not any(path.glob("model*.safetensors")):
        return merge_lora_folder(path)
    for sub in ("model", "merged"):  # a Relay checkpoint or run folder holding the HF model below it
        if not (path / "config.json").exists() and (path / sub / "config.json").exists():
            path = path / sub
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json: not a model folder")
    if json.loads(config_file.read_text()).get("relay_head"):
        raise ValueError(f"{path}: this is a reward/critic model (value head), not a chat model")
    return path


def is_quantized(model_dir: Path) -> bool:
    """The folder holds pre-quantized weights (int4 AWQ from `relay models quantize`, GPTQ, ...)."""
    return "quantization_config" in json.loads((model_dir / "config.json").read_text())


def default_dtype(model_dir: Path, on_gpu: bool) -> str:
    """--dtype when not given: bfloat16 on GPU, on CPUs with native bf16 (AVX512_BF16/AMX) and for quantized
    folders (vLLM's int4 kernels take 16-bit activations); float32 on other CPUs, where bf16 is emulated."""
    from relay.cpu import bf16_slow_reason

    slow = None if on_gpu else bf16_slow_reason()
    if slow is None or is_quantized(model_dir):
        return "bfloat16"  # the generator notes bf16 on a CPU that emulates it
    print(f"relay chat: using float32 ({slow}); pass --dtype bfloat16 to override", file=sys.stderr, flush=True)
    return "float32"


def int4_unsupported_reason(model_dir: Path) -> str | None:
    """Why vLLM cannot serve this quantized folder on this machine (None: it can, or it is not quantized)."""
    if not is_quantized(model_dir):
        return None
    from relay.cpu import vllm_int4_support

    ok, why = vllm_int4_support()
    return None if ok else why


def load_chat_template(model_dir: Path, tokenizer, template_config: str | None):
    """The conversation template the model was trained with: --template-config, else MODEL/conversation_template.json,
    else the tokenizer's own."""
    from relay.data.templates import ChatFormatter, load_template_config

    path = template_config or (str(model_dir / TEMPLATE_FILE) if (model_dir / TEMPLATE_FILE).exists() else None)
    cfg, _ = load_template_config(path, tokenizer)
    return ChatFormatter(tokenizer, cfg), cfg


def read_inputs(path: str) -> list[dict[str, Any]]:
    """JSONL records with `prompt` or `messages`, or plain text (one prompt per line)."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno}: malformed JSON: {err.msg}") from None
            if "messages" not in rec and "prompt" not in rec:
                raise ValueError(f"{path}: line {lineno}: field 'prompt' or 'messages' is required")
            rows.append(rec)
        else:
            rows.append({"prompt": line})
    return rows


def messages_of(rec: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in rec:
        return [{"role": {"human": "user"}.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
                 "content": m["content"]} for m in rec["messages"]]
    return [{"role": "user", "content": rec["prompt"]}]


class ChatSession:
    """A started generator plus the template: turns message lists into replies."""

    def __init__(self, args: argparse.Namespace):
        import ray
        from transformers import AutoTokenizer

        from relay.actors.generator import GeneratorConfig, start_generator
        from relay.actors.sampling import SamplingConfig
        from relay.launch.cluster import init_ray

        self.model_dir = resolve_chat_model(args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.formatter, tcfg = load_chat_template(self.model_dir, self.tokenizer, args.template_config)
        self.system = args.system
        init_ray(address=args.address, num_cpus=8, include_dashboard=False)
        run_dir = Path(args.run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"quantization": args.quantization} if args.quantization else {}
        dtype = args.dtype or default_dtype(self.model_dir, on_gpu=ray.cluster_resources().get("GPU", 0) > 0)
        self.generator = start_generator(
            GeneratorConfig(model=str(self.model_dir), dtype=dtype, max_model_len=args.max_model_len,
                            run_dir=str(run_dir), engine_kwargs=engine_kwargs),
            name=f"chat-{Path(self.model_dir).name}"[:60],
        )
        self.sampling = SamplingConfig(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_new_tokens,
            stop_token_ids=tuple(tcfg.stop_ids or []), seed=args.seed,
        )

    def reply(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        prompts = []
        for msgs in conversations:
            system = self.system if self.system is not None else self.formatter.cfg.system_message
            if system is not None and not (msgs and msgs[0]["role"] == "system"):
                msgs = [{"role": "system", "content": system}] + msgs
            text = self.formatter.render_messages(msgs, add_generation_prompt=True)
            prompts.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        results = self.generator.generate(prompts, self.sampling)
        return [self.tokenizer.decode(r.token_ids, skip_special_tokens=True).strip() for r in results]

    def close(self) -> None:
        self.generator.kill()


def _interactive(session: ChatSession) -> None:
    history: list[dict[str, str]] = []
    print(f"Chatting with {session.model_dir} (vLLM). /reset clears the history, /exit quits.", flush=True)
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), None):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        answer = session.reply([history])[0]
        history.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (Relay output, LoRA adapter, HF folder) or smollm2 / tiny-llama")
    p.add_argument("--prompt", action="append", default=[], help="answer this prompt and exit (repeatable)")
    p.add_argument("--input", help="JSONL (prompt or messages) or text file, one request per line")
    p.add_argument("--output", help="JSONL file for --input's answers (default: stdout)")
    p.add_argument("--system", default=None, help="system message for every conversation")
    p.add_argument("--template-config", default=None, help="conversation template JSON (default: the model's own)")
    p.add_argument("--temperature", type=finite_float(0), default=0.7)
    p.add_argument("--top-p", type=finite_float(0, 1), default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16", "auto"],
                   help="engine dtype (default: bfloat16 on GPU, on CPUs with AVX512_BF16/AMX and for int4 folders; "
                        "float32 on other CPUs, where bf16 is emulated and slow)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + reply token limit (default: the model's)")
    p.add_argument("--quantization", default=None,
                   help="vLLM quantization method; default: what the folder's config.json says (e.g. the int4 "
                        "AWQ folders `relay models quantize` writes, which load on CPU and GPU; see README)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    p.add_argument("--run-dir", default="outputs/chat", help="folder for engine sockets and caches")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.output and not args.input:
        print("relay chat: --output needs --input", file=sys.stderr)
        return 2
    rows = read_inputs(args.input) if args.input else None
    args.model = str(resolve_chat_model(args.model))
    why = int4_unsupported_reason(Path(args.model))
    if why:  # before any Ray/vLLM start: vLLM would fail deep inside the engine with an AttributeError
        print(f"relay chat: {args.model}: {why}; serve the unquantized model instead", file=sys.stderr)
        return 2
    from relay import logs

    # the generator's vLLM output goes to RUN_DIR/logs/chat-<model>.log (unless --verbose)
    with logs.run_logs(Path(args.run_dir) / "logs"):
        return _serve(args, rows)


def _serve(args: argparse.Namespace, rows: list[dict[str, Any]] | None) -> int:
    session = ChatSession(args)
    try:
        if rows is not None:
            answers = session.reply([messages_of(r) for r in rows])
            out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
            for rec, answer in zip(rows, answers):
                out.write(json.dumps({**rec, "response": answer}, ensure_ascii=False) + "\n")
            if args.output:
                out.close()
                print(f"{len(answers)} answers written to {args.output}")
        elif args.prompt:
            for prompt, answer in zip(args.prompt, session.reply([[{"role": "user", "content": p}] for p in args.prompt])):
                print(f"user> {prompt}\nassistant> {answer}\n", flush=True)
        else:
            _interactive(session)
    finally:
        session.close()
    return 0
