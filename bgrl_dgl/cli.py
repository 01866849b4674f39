"""The ``bgrl-dgl`` command line: prepare, info, train, plan, embed, evaluate, report."""
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
from bgrl_dgl.errors import InputError, RunError
from bgrl_dgl.progress import progress_mode

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


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: only when it is a terminal; "
                             "never with --json)")


def parse_fanouts(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def add_embed_parser(commands: argparse._SubParsersAction) -> None:
    embed = commands.add_parser(
        "embed", help="export node embeddings to Parquet",
        description="Embed the nodes of a store with a run's (or a checkpoint's) encoder and "
                    "write them as OUT/part-*.parquet (node_id, [node_type], embedding) with "
                    "OUT/_manifest.json and OUT/_SUCCESS. A rerun finishes an interrupted "
                    "export; under torchrun (RANK, WORLD_SIZE) each process writes its share.")
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (its newest checkpoint)")
    source.add_argument("--checkpoint", help="checkpoint file (step-*.pt)")
    embed.add_argument("--data",
                       help="store directory (default: the run's; required with --checkpoint)")
    embed.add_argument("--out", required=True, help="export directory to write")
    embed.add_argument("--encoder", choices=["online", "target", "random"], default="online",
                       help="which encoder embeds; random = the untrained initial weights "
                            "(default: online)")
    embed.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                       help="embedding dtype in the files (default: float32)")
    embed.add_argument("--nodes", metavar="IDS.npy",
                       help="export only these store node indices (default: every node)")
    embed.add_argument("--fanouts", type=parse_fanouts,
                       help="sampled inference with these per-layer fanouts, input layer first "
                            "(-1 = all, written --fanouts=-1,-1); default: exact layer-wise "
                            "inference")
    embed.add_argument("--seed", type=int, default=0,
                       help="sampling seed with --fanouts (default: 0)")
    embed.add_argument("--batch-size", type=int,
                       help="destination nodes per inference batch (default: sized from a "
                            "memory budget with exact inference, 4096 with --fanouts)")
    embed.add_argument("--rows-per-part", type=int,
                       help="rows per Parquet file (default: 4 row groups of about 64 MB)")
    embed.add_argument("--scratch-dir",
                       help="where the layers' memmaps go (default: inside --out); exact "
                            "ranks share them: on several machines, use shared storage")
    embed.add_argument("--scratch-dtype", choices=["float32", "float16"], default="float32",
                       help="precision of the intermediate layers kept in the scratch directory "
                            "with exact inference; float16 halves their size (default: float32)")
    embed.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where the encoder runs (default: auto)")
    embed.add_argument("--overwrite", action="store_true",
                       help="replace a complete export, or an unfinished one of other inputs")
    add_progress_argument(embed)
    embed.set_defaults(handler=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from bgrl_dgl.embeddings.export import export_embeddings
    from bgrl_dgl.embeddings.sampled import InferenceOptions
    from bgrl_dgl.training.distributed import world_from_env

    result = export_embeddings(
        args.out, run=args.run, checkpoint=args.checkpoint, data=args.data, encoder=args.encoder,
        dtype=args.dtype, nodes=args.nodes,
        options=InferenceOptions(args.batch_size, args.device, args.fanouts, args.seed,
                                 args.scratch_dtype),
        rows_per_part=args.rows_per_part, scratch_dir=args.scratch_dir,
        overwrite=args.overwrite, world=world_from_env())
    print(result.describe())
    return 0


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="linear probe of exported embeddings, of a run's encoder or of raw features",
        description="Fit the BGRL linear probe on the store's labels, reading only the "
                    "labelled nodes' rows: of embeddings exported by `embed` (--embeddings), "
                    "of a run's encoder, embedded in memory by exact layer-wise inference "
                    "(--run without --embeddings), or of the store's own node features "
                    "(--raw-features, the baseline). With --run the result is also appended "
                    "to RUN/evaluations.jsonl.")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--embeddings", help="export directory (from `embed`)")
    source.add_argument("--raw-features", action="store_true",
                        help="probe the store's own node features (the store of --data, or "
                             "of --run)")
    evaluate.add_argument("--run", help="run directory: the encoder to probe (without "
                                        "--embeddings) and where the result is recorded")
    evaluate.add_argument("--encoder", choices=["online", "target", "random"], default="online",
                          help="with --run alone: which encoder embeds; random = the untrained "
                               "initial weights (default: online)")
    evaluate.add_argument("--data", help="store directory (default: the export's or run's)")
    evaluate.add_argument("--splits", choices=["public", "random"], default="public",
                          help="the store's train/valid/test splits, or random stratified "
                               "10/10/80 ones (default: public)")
    evaluate.add_argument("--num-splits", type=int, default=20,
                          help="random splits to average (default: 20)")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="seed of the random splits (default: 0)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    add_progress_argument(evaluate)
    evaluate.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from bgrl_dgl.embeddings.evaluate import evaluate_export, evaluate_raw_features, evaluate_run
    from bgrl_dgl.runs import append_evaluation, check_run_dir

    if args.raw_features and args.data is None and args.run is None:
        raise InputError(None, "--raw-features needs --data STORE (or --run RUN)")
    if args.embeddings is None and args.run is None and not args.raw_features:
        raise InputError(None, "give --embeddings (an export), --run (a run's encoder) or "
                               "--raw-features")
    options = {"splits": args.splits, "num_splits": args.num_splits, "seed": args.seed}
    if args.run is not None:
        check_run_dir(args.run)
    if args.raw_features:
        result = evaluate_raw_features(args.data, args.run, **options)
    elif args.embeddings is not None:
        result = evaluate_export(args.embeddings, args.data, **options)
    else:
        result = evaluate_run(args.run, args.data, encoder=args.encoder, **options)
    if args.run is not None:
        append_evaluation(args.run, result)
    if args.json:
        print(json.dumps(result))
    else:
        spread = f" ± {100 * result['test_acc_std']:.2f}" if result["num_splits"] > 1 else ""
        what = ("raw features" if args.raw_features
                else f"{result['encoder']} encoder (step {result['step']})")
        print(f"{what}, {result['splits']} splits: "
              f"test {result['metric']} {100 * result['test_acc_mean']:.2f}{spread} "
              f"(valid {100 * result['val_acc_mean']:.2f}; {result['num_splits']} split(s) of "
              f"{result['num_labelled']:,} labelled nodes)")
    return 0


def add_report_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="summary and picture of a run",
        description="Print a run's summary and draw one PNG: loss, tau, learning rate and "
                    "seeds/s over the steps, the probe accuracies recorded by `evaluate --run`, "
                    "and a 2-D map (t-SNE) of the node embeddings coloured by class.")
    report.add_argument("run", help="run directory")
    report.add_argument("--out", help="PNG to write (default: RUN/report.png)")
    report.add_argument("--data", help="store to map (default: the run's)")
    report.add_argument("--map-nodes", type=int, default=10_000,
                        help="labelled nodes on the map, a seeded sample (default: 10000)")
    report.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bgrl_dgl.embedding_map import EmbeddingMap, embedding_map
    from bgrl_dgl.report import RunHistory, format_summary, plot_history

    history = RunHistory.load(args.run)
    out = Path(args.out) if args.out else history.run_dir / "report.png"
    if not out.parent.is_dir():
        raise InputError(out.parent, "no such directory for the picture")
    if args.map_nodes < 1:
        raise InputError(None, f"--map-nodes must be positive, got {args.map_nodes}")
    print(format_summary(history.summary(), history.evaluations), flush=True)
    data = args.data or history.data
    embedding: EmbeddingMap | str = "the run records no store (run.yaml)"
    if data is not None:
        try:
            embedding = embedding_map(history.run_dir, data, history.evaluations, args.map_nodes)
        except InputError as err:
            embedding = str(err)
            print(f"no embedding map: {err}", file=sys.stderr)
    print(f"picture: {plot_history(history, out, embedding)}")
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
