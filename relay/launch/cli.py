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
    lines.append("Run `relay <command> --help` for a command's options. Every command takes --verbose: dependency")
    lines.append("output (vLLM, ColossalAI, Ray) on the terminal instead of SAVE_DIR/logs/, and full tracebacks.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from relay import logs

    argv = list(sys.argv[1:] if argv is None else argv)
    # --verbose anywhere before a `--` separator, for every command (their own parsers never see it)
    end = argv.index("--") if "--" in argv else len(argv)
    verbose = "--verbose" in argv[:end]
    argv = [a for a in argv[:end] if a != "--verbose"] + argv[end:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"relay: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logs.quiet_console(verbose or logs.is_verbose())
    module, func, _ = COMMANDS[name]
    try:
        code = getattr(importlib.import_module(module), func)(rest)
    except KeyboardInterrupt:
        if logs.is_verbose():
            raise
        print(f"relay {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line naming what went wrong; the traceback only with --verbose
        if logs.is_verbose():
            raise
        logs.report_error(f"relay {name}", err)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
