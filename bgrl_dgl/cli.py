"""The ``bgrl-dgl`` command line: prepare, info, train, probe."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import numpy as np

from . import config as cfg
from .errors import InputError

GLOBAL_TOPOLOGY = {"symmetrize": False, "self_loops": "keep", "dedup": True}


def add_prepare_parser(commands: argparse._SubParsersAction) -> None:
    from .sources import available_sources

    prepare = commands.add_parser("prepare", help="turn a graph into an on-disk store")
    formats = prepare.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for source in available_sources().values():
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
        source.add_arguments(parser)
        parser.set_defaults(**{**GLOBAL_TOPOLOGY, **source.topology}, handler=run_prepare,
                            build=source.build, source_name=source.name)


def run_prepare(args: argparse.Namespace) -> int:
    from .builder import StoreWriter

    params = {k: v for k, v in vars(args).items()
              if k not in ("handler", "build", "debug", "command") and not callable(v)}
    with StoreWriter(args.out, overwrite=args.overwrite, memory_budget=args.memory_budget,
                     feature_dtype=args.feature_dtype,
                     source={"name": args.source_name, "params": params}) as writer:
        args.build(args, writer)
        path = writer.commit()
    from .store import GraphStore

    summary = GraphStore.open(path).summary()
    print(f"wrote {path}: {summary['num_nodes']:,} nodes, {summary['num_edges']:,} edges, "
          f"{summary['feat_dim']}-d {summary['feat_dtype']} features")
    return 0


def add_info_parser(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="validate a store and describe it")
    info.add_argument("data", help="store directory")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--full", action="store_true",
                      help="full validation (reads every index; slower on huge graphs)")
    info.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from .store import GraphStore

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
    from .train import TrainConfig

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
    """Defaults <- saved run config (when resuming) <- --config YAML <- flags."""
    from pathlib import Path

    from .train import TrainConfig

    data: dict = {}
    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.exists():
        data = cfg.load_yaml(saved)
    if args.config:
        for section, values in cfg.load_yaml(args.config).items():
            data[section] = {**data.get(section, {}), **(values or {})}
    return cfg.from_sections(TrainConfig, data, args, source=args.config or "config")


def run_train(args: argparse.Namespace) -> int:
    from .train import train

    metrics = train(args.data, args.out, load_train_config(args), resume=args.resume)
    if metrics:
        print(f"trained to step {int(metrics['step'])}: loss {metrics['loss']:.4f}; run in {args.out}")
    return 0


def add_probe_parser(commands: argparse._SubParsersAction) -> None:
    probe = commands.add_parser(
        "probe", help="linear probe of a run's encoder on the store's labels",
        description="Embed every node with a run's encoder (exact layer-wise inference) and "
                    "fit a linear probe on the store's splits, or on random stratified splits.")
    probe.add_argument("--run", required=True, help="run directory (from `train`)")
    probe.add_argument("--data", help="store directory (default: the run's)")
    probe.add_argument("--encoder", choices=["online", "target", "random"], default="online",
                       help="which encoder embeds; random = the untrained initial weights")
    probe.add_argument("--splits", choices=["store", "random"], default="store",
                       help="the store's train/valid/test splits, or random 10/10/80 ones")
    probe.add_argument("--num-splits", type=int, default=5, help="random splits to average")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(handler=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from .evaluate import linear_probe, random_split_probe, summarize
    from .inference import embed_store
    from .store import GraphStore
    from .train import load_encoder, load_run_config

    store = GraphStore.open(args.data or load_run_config(args.run)[1]["data"])
    if store.labels is None:
        raise InputError(store.path, "has no labels to probe with")
    embeddings = embed_store(load_encoder(args.run, args.encoder), store)
    labels = np.asarray(store.labels)
    if args.splits == "random":
        summary = random_split_probe(embeddings, labels, args.num_splits)
    else:
        summary = summarize([linear_probe(
            embeddings, labels, {name: store.split(name) for name in ("train", "valid", "test")})])
    result = {"encoder": args.encoder, "splits": args.splits, "test_acc_mean": summary.test_mean,
              "test_acc_std": summary.test_std, "val_acc_mean": summary.val_mean,
              "num_splits": len(summary.results)}
    print(json.dumps(result) if args.json else f"{args.encoder} encoder: {summary}")
    return 0


PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_prepare_parser,
    add_info_parser,
    add_train_parser,
    add_probe_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgrl-dgl",
        description="Scalable mini-batch BGRL on DGL-sampled blocks over an on-disk graph store.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in PARSER_BUILDERS:
        add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except InputError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
