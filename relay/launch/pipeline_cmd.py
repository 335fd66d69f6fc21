"""`relay sft|rm|dpo|ppo --config FILE [--set field=value ...]`: load, validate, then run a pipeline.

Validation happens here, in the driver, before any Ray actor starts.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from pathlib import Path

# pipeline -> "module:function(cfg) -> int". Modules are imported only after the config validated.
RUNNERS: dict[str, str] = {
    "sft": "relay.launch.train:run_sft",
    "rm": "relay.launch.train:run_rm",
    "dpo": "relay.launch.train:run_dpo",
    "ppo": "relay.launch.ppo:run_ppo",
}


def _fields_epilog(pipeline: str) -> str:
    from relay.config import PIPELINES, field_reference

    lines = ["config fields (set in the YAML file or with --set FIELD=VALUE):"]
    for name, type_name, default, help_text in field_reference(PIPELINES[pipeline]):
        lines.append(f"  {name} ({type_name}, default {default})")
        lines += textwrap.wrap(help_text, 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser(pipeline: str) -> argparse.ArgumentParser:
    from relay.config import PIPELINES

    parser = argparse.ArgumentParser(
        prog=f"relay {pipeline}",
        description=(PIPELINES[pipeline].__doc__ or "").strip(),
        epilog=_fields_epilog(pipeline),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field, e.g. learner.plugin=zero2 (repeatable)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue a run: 'auto' = the newest complete checkpoint in save_dir (a fresh start when "
                             "there is none), or a checkpoint / run folder (sets checkpoint_path)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved, validated config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM / ColossalAI / Ray output here instead of SAVE_DIR/logs/*.log, and full tracebacks")
    return parser


def run_pipeline(pipeline: str, argv: list[str]) -> int:
    from relay import logs
    from relay.config import ConfigError, load_config, to_dict
    from relay.launch import safe_points

    args = build_parser(pipeline).parse_args(argv)
    if args.verbose:
        logs.quiet_console(verbose=True)
    try:
        sets = [*args.set, f"checkpoint_path={args.resume}"] if args.resume else args.set
        cfg = load_config(pipeline, args.config, sets)
    except ConfigError as err:
        print(f"relay {pipeline}: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    module_name, func = RUNNERS[pipeline].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"relay {pipeline}: the config is valid, but the {pipeline} pipeline is not built yet", file=sys.stderr)
        return 3
    # Actors' output (vLLM, ColossalAI, Ray) goes to SAVE_DIR/logs/<actor>.log unless verbose (relay.logs).
    # SIGTERM/SIGINT stop the run at its next safe point with a checkpoint (relay.launch.safe_points).
    with logs.run_logs(Path(cfg.save_dir) / "logs"), safe_points.stop_on_signals(cfg.stop_grace_s) as stop:
        code = int(getattr(module, func)(cfg) or 0)
    if stop.outcome is None:
        return code
    print(f"relay {pipeline}: {stop.outcome}. To continue: {safe_points.resume_command(pipeline, argv)}",
          file=sys.stderr, flush=True)
    return stop.exit_code()


def sft_main(argv: list[str]) -> int:
    return run_pipeline("sft", argv)


def rm_main(argv: list[str]) -> int:
    return run_pipeline("rm", argv)


def dpo_main(argv: list[str]) -> int:
    return run_pipeline("dpo", argv)


def ppo_main(argv: list[str]) -> int:
    return run_pipeline("ppo", argv)
