"""`relay` command line. Subcommands are imported lazily so `relay --help` stays fast (no torch/Ray import)."""
from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help). Each function takes the remaining argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": ("relay.launch.pipeline_cmd", "sft_main", "supervised fine-tuning on prepared SFT data"),
    "rm": ("relay.launch.pipeline_cmd", "rm_main", "reward-model training on prepared preference data"),
    "dpo": ("relay.launch.pipeline_cmd", "dpo_main", "direct preference optimisation (DPO / IPO / SimPO)"),
    "ppo": ("relay.launch.pipeline_cmd", "ppo_main", "distributed PPO / GRPO / RLOO with vLLM generators"),
    "prepare": ("relay.launch.prepare_cmd", "main", "prepare data: sft | preference | prompt | ptx"),
    "data": ("relay.launch.prepare_cmd", "data_main", "build demo data sets (relay data demo OUT)"),
    "models": ("relay.launch.models_cmd", "main", "prepare bundled models (relay models prepare smollm2)"),
    "chat": ("relay.launch.chat", "main", "talk to a trained model through vLLM (interactive or batch)"),
    "eval": ("relay.launch.eval_cmd", "main", "score model folders on held-out data side by side (JSON + PNG)"),
    "plot": ("relay.launch.plot_cmd", "main", "draw a run's metrics.jsonl as PNG charts"),
    "scale": ("relay.launch.scale_cmd", "main", "resize a running run's generator pool (relay scale --generators N)"),
    "demo": ("relay.launch.demo", "main", "the quickstart demo on SmolLM2-135M"),
}


def _usage() -> str:
    lines = ["usage: relay <command> [options]", "", "Relay: distributed RLHF on Ray, vLLM and ColossalAI.", ""]
    lines.append("commands:")
    width = max(len(n) for n in COMMANDS)
    for name, (_, _, doc) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {doc}")
    lines.append("")
    lines.append("Run `relay <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"relay: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    code = getattr(importlib.import_module(module), func)(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
