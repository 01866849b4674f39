"""The ``bgrl-dgl`` commands that read a run's results: embed, evaluate, report."""
from __future__ import annotations

import argparse
import json
import sys

from bgrl_dgl.errors import InputError
from bgrl_dgl.progress import add_progress_argument


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
