"""`anima` command line.

  anima run params/nano.yaml [--only 05_quality_gate ...] [--set section.key=value ...] [--with-code]
  anima params params/nano.yaml [--set ...]     validate and print the resolved parameters
  anima params --describe                       every parameter with its default and meaning
  anima cache build params/nano.yaml [--set ...]     build or resume the run's cache (also under torchrun)
  anima cache verify <cache folder> [--repair params/nano.yaml]
  anima distill params/nano.yaml [--method rcm|scm|lcm] [--set ...]   train or resume a student (also under torchrun:
        torchrun --nproc_per_node=K -m anima_lib.cli distill ...)
  anima lora transfer params/nano.yaml --lora <LoRA folder or .safetensors> [--set ...]   turn a LoRA made for the
        teacher into one for the few-step student (07's method) -> outputs/<run>/lora/transfer-<key>/ and a short
        report in reports/<date>/<run>[-<run.tag>]/
"""
from __future__ import annotations

import argparse
import sys

import yaml

from . import config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="anima", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks with papermill and write the dated HTML report")
    run.add_argument("preset", help="params/<name>.yaml or a preset name (nano, smoke, anima-2b)")
    run.add_argument("--only", action="append", metavar="NOTEBOOK", help="run only this notebook (repeatable)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                     help="override a parameter (repeatable), e.g. --set gate.n_prompts=4")
    run.add_argument("--with-code", action="store_true", help="HTML pages with every code cell open (default: "
                     "folded under a 'code' line that one click opens)")
    show = sub.add_parser("params", help="validate a preset and print the resolved parameters")
    show.add_argument("preset", nargs="?", default="nano")
    show.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides")
    show.add_argument("--describe", action="store_true", help="list every parameter with its default and meaning")
    cache_cmd = sub.add_parser("cache", help="build, resume, verify or repair the distillation cache")
    cache_sub = cache_cmd.add_subparsers(dest="cache_command", required=True)
    build = cache_sub.add_parser("build", help="build or resume (torchrun --nproc_per_node=K -m anima_lib.cli ...)")
    build.add_argument("preset")
    build.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides")
    verify = cache_sub.add_parser("verify", help="check every shard against the manifest's sha256")
    verify.add_argument("folder")
    verify.add_argument("--repair", metavar="PRESET", help="regenerate the bad shards with this preset's models")
    verify.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides")
    dist = sub.add_parser("distill", help="train or resume one distillation method (rcm, scm ablation, lcm baseline)")
    dist.add_argument("preset")
    dist.add_argument("--method", default="rcm", choices=["rcm", "scm", "lcm"])
    dist.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides")
    lora_cmd = sub.add_parser("lora", help="style LoRA tools")
    lora_sub = lora_cmd.add_subparsers(dest="lora_command", required=True)
    transfer = lora_sub.add_parser("transfer", help="turn a LoRA made for the teacher into one for the few-step student "
                                   "(DMD against teacher+LoRA, as 07_lora_transfer; resumable)")
    transfer.add_argument("preset")
    transfer.add_argument("--lora", required=True, metavar="FOLDER_OR_FILE",
                          help="a LoRA folder (pytorch_lora_weights.safetensors + manifest.json) or a .safetensors file "
                               "with diffusers or ComfyUI keys, made for this preset's teacher")
    transfer.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides")
    args = parser.parse_args(argv)
    try:
        if args.command == "params":
            if args.describe:
                print(config.describe())
                return 0
            print(yaml.safe_dump(config.load_config(args.preset, args.overrides).to_dict(), sort_keys=False), end="")
            return 0
        if args.command == "cache":
            return _cache(args)
        if args.command == "distill":
            return _distill(args)
        if args.command == "lora":
            return _lora_transfer(args)
        from .report import run_pipeline  # papermill and friends only once the parameters are valid
        return run_pipeline(args.preset, args.overrides, args.only, with_code=args.with_code)
    except config.ConfigError as exc:
        print(f"anima: parameter error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anima: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise  # a bug: the traceback is what is needed
        print(f"anima: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, even for multi-line messages
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to fix: shown as one line, not a traceback (imported only on error,
    so the CLI starts fast)."""
    from .cache import CacheError
    from .checkpoints import CheckpointError
    from .distill.deturbo import DeturboError
    from .distill.trainer import DivergenceError
    from .flow_training import ResumeError
    from .io import NonFiniteWeightsError, WeightsError
    from .lora import LoraError
    from .lora_survival import StyleDataError
    from .report import RunLockedError
    return (CacheError, CheckpointError, DeturboError, DivergenceError, NonFiniteWeightsError, LoraError,
            StyleDataError, WeightsError, RunLockedError, ResumeError, FileNotFoundError, NotADirectoryError,
            PermissionError)


def _cache(args) -> int:
    import json
    from . import cache
    if args.cache_command == "build":
        stats = cache.run_cache(config.load_config(args.preset, args.overrides))
        print(json.dumps({k: v for k, v in stats.items() if k != "bytes_per_prompt"}, indent=2))
        return 0
    report = cache.verify_cache(args.folder)
    for index, reason in sorted(report["bad"].items()):
        print(f"shard {index:05d}: {reason}")
    print(f"{len(report['ok'])}/{report['expected']} shards verified")
    if report["bad"] and args.repair:
        params = config.load_config(args.repair, args.overrides)
        if str(cache.cache_folder(params)) != str(cache.Path(args.folder).resolve()):
            print(f"anima: {args.folder} is not the cache of {args.repair} ({cache.cache_folder(params)})",
                  file=sys.stderr)
            return 2
        cache.run_cache(params, repair=True)
        report = cache.verify_cache(args.folder)
        print(f"after repair: {len(report['ok'])}/{report['expected']} shards verified")
    return 0 if not report["bad"] else 1


def _distill(args) -> int:
    import torch
    from . import cache, distill
    params = config.load_config(args.preset, args.overrides)
    if params.run.threads:
        torch.set_num_threads(params.run.threads)
    try:
        distiller = distill.run_distill(params, args.method)
    except (cache.CacheError, distill.DivergenceError) as exc:
        print(f"anima: {exc}", file=sys.stderr)
        return 1
    state = distiller.state
    if distiller.rank == 0:
        print(f"{args.method}: {state.iteration} iterations ({state.student_updates} student updates) in {state.wall_s:.0f} s; "
              f"checkpoints in {distill.checkpoint_dir(params, args.method)}")
    return 0



def _lora_transfer(args) -> int:
    import torch
    from . import distill, lora_transfer, models, report
    from .distill import deturbo
    params = config.load_config(args.preset, args.overrides)
    source = lora_transfer.read_source(args.lora)   # a bad or student LoRA is refused before any model loads
    if params.run.threads:
        torch.set_num_threads(params.run.threads)
    components = models.load_components(params)
    student = distill.load_student(params, components, "rcm", params.distill.checkpoint)
    adapter = deturbo.load_deturbo(params, components, student) if source.kind == "deturbo" else None
    result = lora_transfer.transfer_report(params, components, student, source, adapter)
    manifest = result["manifest"]
    if not result["finished"]:
        print(f"anima: paused at {manifest['generator_steps']}/{params.lora_transfer.generator_steps} generator steps "
              f"(lora_transfer.minutes={params.lora_transfer.minutes}); the checkpoint is kept — resume with: anima lora "
              f"transfer {args.preset} --lora {args.lora}" + "".join(f" --set {o}" for o in args.overrides),
              file=sys.stderr)
        return 3
    print(report.markdown_table(result["table"]))
    print(result["verdict"])
    print(f"L' ({manifest['generator_steps']} generator steps, {manifest['wall_s'] / 60:.1f} min): {result['folder']}")
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
