"""The ``bgrl-dgl`` command line: prepare, info, train, plan (embed, evaluate and report are in
cli_results.py), and the one place errors become exit codes."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from bgrl_dgl import config as cfg
from bgrl_dgl.cli_results import (
    add_embed_parser,
    add_evaluate_parser,
    add_report_parser,
)
from bgrl_dgl.errors import InputError, RunError
from bgrl_dgl.progress import add_progress_argument, progress_mode

GLOBAL_TOPOLOGY = {"symmetrize": False, "self_loops": "keep", "dedup": True}


def add_prepare_parser(commands: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    from bgrl_dgl.sources import SOURCE_NAMES, available_sources

    prepare = commands.add_parser("prepare", help="turn a graph into an on-disk store")
    formats = prepare.add_subparsers(dest="source", required=True, metavar="SOURCE")
    chosen = _word_after(argv, "prepare")
    for source in available_sources((chosen,) if chosen in SOURCE_NAMES else SOURCE_NAMES).values():
        parser = formats.add_parser(source.name, help=source.help, description=source.help)
        parser.add_argument("--out", required=True, help="store directory to create")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing store at --out")
        parser.add_argument("--memory-budget", type=cfg.parse_size, default="4GB",
                            help="bound on the builder's working memory (default: 4GB)")
        parser.add_argument("--feature-dtype", choices=["keep", "float16", "float32"],
                            default="keep", help="stored feature dtype (default: keep)")
        parser.add_argument("--symmetrize", action=argparse.BooleanOptionalAction,
                            help="add the reverse of every edge")
        parser.add_argument("--self-loops", choices=["keep", "remove", "add"],
                            help="what to do with self-loops")
        parser.add_argument("--dedup", action=argparse.BooleanOptionalAction,
                            help="drop duplicate edges")
        parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        add_progress_argument(parser)
        source.add_arguments(parser)
        parser.set_defaults(**{**GLOBAL_TOPOLOGY, **source.topology}, handler=run_prepare,
                            build=source.build, source_name=source.name)


def run_prepare(args: argparse.Namespace) -> int:
    from bgrl_dgl.store.writer import StoreWriter

    params = {k: v for k, v in vars(args).items()
              if k not in ("handler", "build", "debug", "command", "progress")
              and not callable(v)}
    with terminate_as_interrupt(), StoreWriter(
            args.out, overwrite=args.overwrite, memory_budget=args.memory_budget,
            feature_dtype=args.feature_dtype,
            source={"name": args.source_name, "params": params}) as writer:
        args.build(args, writer)
        path = writer.commit()
    from bgrl_dgl.store.reader import GraphStore

    summary = GraphStore.open(path).summary()
    print(f"wrote {path}: {summary['num_nodes']:,} nodes, {summary['num_edges']:,} edges, "
          f"{summary['feat_dim']}-d {summary['feat_dtype']} features")
    return 0


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside, so that a terminated command, like an
    interrupted one, removes what it had half-written on its way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_info_parser(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="validate a store and describe it")
    info.add_argument("data", help="store directory")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--full", action="store_true",
                      help="full validation (reads every index; slower on huge graphs)")
    add_progress_argument(info)
    info.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from bgrl_dgl.store.reader import GraphStore

    store = GraphStore.open(args.data, check="full" if args.full else "cheap")
    summary = store.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(map(len, summary))
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    return 0


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    from bgrl_dgl.training.config import TrainConfig

    train = commands.add_parser(
        "train", help="train BGRL on a store",
        description="Train BGRL on a store. Settings come from the defaults, then --config "
                    "YAML (sections sampling/augment/model/optim/run), then these flags.")
    train.add_argument("--data", required=True, help="store directory (from `prepare`)")
    train.add_argument("--out", required=True, help="run directory to write")
    train.add_argument("--config", help="YAML file of settings")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in --out (start fresh if none)")
    cfg.add_section_arguments(train, TrainConfig)
    train.set_defaults(handler=run_train)


def load_train_config(args: argparse.Namespace):
    """Defaults <- saved run config (when resuming) <- --config YAML <- flags, every setting
    and the checks across sections validated before ``train`` writes anything."""
    from pathlib import Path

    from bgrl_dgl.runs import CONFIG_FILE
    from bgrl_dgl.training.config import TrainConfig

    data: dict = {}
    saved = Path(args.out) / CONFIG_FILE if getattr(args, "resume", False) else None
    if saved is not None and saved.is_file():
        data = cfg.load_yaml(saved)
        TrainConfig.from_plain(data, str(saved))  # errors name the file they are in
    if args.config:
        data = cfg.merge_sections(data, cfg.load_yaml(args.config), args.config)
    return cfg.from_sections(TrainConfig, data, args, source=args.config or "command line")


def run_train(args: argparse.Namespace) -> int:
    from bgrl_dgl.training.distributed import world_from_env
    from bgrl_dgl.training.trainer import train

    world = world_from_env()
    metrics = train(args.data, args.out, load_train_config(args), resume=args.resume, world=world)
    if metrics and world.is_main:
        print(f"trained to step {int(metrics['step'])}: loss {metrics['loss']:.4f}; "
              f"run in {args.out}")
    return 0


def add_plan_parser(commands: argparse._SubParsersAction) -> None:
    from bgrl_dgl.training.config import TrainConfig

    plan = commands.add_parser(
        "plan", help="memory a training run needs per machine",
        description="Print the memory that `train` with these settings needs on each machine "
                    "(page cache, feature cache and batches in /dev/shm, processes, workers, "
                    "pinned batches) against this machine's RAM and /dev/shm, or against "
                    "--ram and --shm; exit 2 with the error `train` would give when it does "
                    "not fit. The graph: a store (--data) or its sizes (--nodes, --edges, "
                    "--feat-dim, --feature-dtype).")
    plan.add_argument("--data", help="store directory (its sizes and seed nodes)")
    plan.add_argument("--nodes", type=int, help="number of nodes (without --data)")
    plan.add_argument("--edges", type=int, help="number of stored edges (without --data)")
    plan.add_argument("--feat-dim", type=int, help="feature size (without --data)")
    plan.add_argument("--feature-dtype", choices=["float16", "float32"], default="float32",
                      help="stored feature dtype (without --data; default: float32)")
    plan.add_argument("--directed", action="store_true",
                      help="the graph is not symmetrised (without --data)")
    plan.add_argument("--nproc-per-node", type=int, default=1,
                      help="training processes per machine (default: 1)")
    plan.add_argument("--ram", type=cfg.parse_size,
                      help="the machine's available RAM (default: this machine's MemAvailable)")
    plan.add_argument("--shm", type=cfg.parse_size,
                      help="the machine's free /dev/shm (default: this machine's)")
    plan.add_argument("--config", help="YAML file of settings")
    cfg.add_section_arguments(plan, TrainConfig)
    plan.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from bgrl_dgl.training.memory_check import plan_report

    lines, warning, problem = plan_report(
        load_train_config(args), data=args.data, nodes=args.nodes, edges=args.edges,
        feat_dim=args.feat_dim, feature_dtype=args.feature_dtype, directed=args.directed,
        processes=args.nproc_per_node, ram=args.ram, shm=args.shm)
    print("\n".join(lines), flush=True)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    if problem is not None:
        raise problem
    return 0


PARSER_BUILDERS: dict[str, Callable[..., None]] = {
    "prepare": add_prepare_parser,
    "info": add_info_parser,
    "train": add_train_parser,
    "plan": add_plan_parser,
    "embed": add_embed_parser,
    "evaluate": add_evaluate_parser,
    "report": add_report_parser,
}


def _word_after(argv: Sequence[str], word: str | None) -> str | None:
    """The first argument after ``word`` (from the start when None) that is not an option."""
    rest = list(argv)
    if word is not None:
        rest = rest[rest.index(word) + 1:] if word in rest else []
    return next((arg for arg in rest if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; for a known command in ``argv``, with that command's options only, so
    that a command does not import what only the others need."""
    parser = argparse.ArgumentParser(
        prog="bgrl-dgl",
        description="Scalable mini-batch BGRL on DGL-sampled blocks over an on-disk graph store.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = _word_after(argv, None)
    for name, add_parser in PARSER_BUILDERS.items():
        if command in PARSER_BUILDERS and name != command:
            continue
        if name == "prepare":
            add_prepare_parser(commands, argv)
        else:
            add_parser(commands)
    return parser


def os_error_line(err: OSError, args: argparse.Namespace) -> str:
    """``<path>: <problem>`` for an OSError: its own file name, else the command's output or
    input (an error such as ENOSPC from a write names no file)."""
    path = err.filename
    if path is None:
        path = next((value for value in (getattr(args, name, None) for name in
                                         ("out", "data", "run", "embeddings")) if value), None)
    problem = err.strerror or str(err) or type(err).__name__
    if err.filename2 is not None:
        problem = f"{problem} (with {os.fsdecode(err.filename2)})"
    return problem if path is None else f"{os.fsdecode(path)}: {problem}"


def _fail(line: str, code: int) -> int:
    # One write with its newline: the lines of processes sharing a stderr (ranks under
    # torchrun) must not interleave.
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser(argv).parse_args(argv)
    try:
        bars = False if getattr(args, "json", False) else getattr(args, "progress", None)
        with progress_mode(bars):
            return args.handler(args)
    except (InputError, RunError) as err:
        if debug:
            raise
        return _fail(str(err), 2 if isinstance(err, InputError) else 1)
    except OSError as err:
        if debug:
            raise
        return _fail(os_error_line(err, args), 2)
    except MemoryError:
        if debug:
            raise
        return _fail(f"{args.command}: out of memory (the input is too large for this "
                     "machine's free memory)", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
