"""The ``factory`` command line.

    factory run CONFIG [--output URI] [--stages references,sample,score,downstream,report] [--set dotted.key=value ...]
    factory eval {parquet,webdataset,imagefolder} ROOT [--real digits] [--features cnn] [--k 5] [--work DIR]
    factory plan CONFIG [--gpu h100] [--img-per-s R] [--price-per-gpu-hour P] [--mfu M] [--json] [--set ...]
    factory bench --backbone {tiny,sd15,sd35m,dit-xl-2} --size {tiny,full} --guidance {none,chamfer,ot} ...
    factory train-embedded --source {digits,fashion_mnist,imagefolder,parquet,webdataset} [--root URI] [--out DIR]
    factory prepare SRC --output URI --size N [--resize center-crop|pad|stretch] [--per-class K] [--seed S] ...
    factory status OUTPUT [--json] [--window SECONDS]
    factory verify OUTPUT [--json] [--repair] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from factory.config import load_config


def _cmd_run(args) -> int:
    from factory.run import parse_stages, run

    from factory import console

    stages = parse_stages(args.stages)  # a typo fails before anything is read
    cfg = load_config(args.config, args.set)
    output = args.output or str(Path("runs") / (Path(args.config).stem + ("-rehearsal" if args.rehearse else "")))
    if args.rehearse:  # the job at full shape with tiny models and generated data; the user's --set last
        from factory.rehearse import rehearsal_overrides

        cfg = load_config(args.config, rehearsal_overrides(cfg, output, args.rehearse_size) + (args.set or []))
    console.set_verbose(args.verbose)  # before Ray starts: what Ray prints reaches the console with --verbose
    log = console.start_log(output)
    t0 = time.perf_counter()
    try:
        metrics = run(cfg, output, progress=not args.quiet, verify=args.verify, stages=stages)
    finally:
        where = console.stop_log(log)
        if where and sys.exc_info()[0] is not None:
            print(f"factory: the run's log: {where}", file=sys.stderr)
    wall = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps({"output": output, "wall_seconds": wall, "metrics": metrics}, indent=1, sort_keys=True))
        return 0
    try:
        import fsspec

        with fsspec.open(f"{output.rstrip('/')}/run.json", "rt") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    stages = record.get("wall_seconds") or {}
    print(console.summary_table(output, metrics, {**stages, "total": stages.get("total", wall)},
                                f"{output.rstrip('/')}/report.html", where, tuning=record.get("tuning")))
    return 0


def _cmd_eval(args) -> int:
    from factory.stages.eval import evaluate_dataset

    result = evaluate_dataset(args.source, args.root, args.real, args.real_root, args.features,
                              args.features_checkpoint, args.k, work=args.work, progress=not args.quiet)
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def _cmd_plan(args) -> int:
    from factory import plan as planning

    # options first, so a typo fails before any data is read
    planning.check_estimate_args(args.gpu, args.img_per_s, args.price_per_gpu_hour, args.mfu)
    cfg = load_config(args.config, args.set)
    est = planning.estimate(cfg, args.gpu, args.img_per_s, args.price_per_gpu_hour, args.mfu)
    print(json.dumps(est, indent=1) if args.json else planning.format_estimate(est))
    return 0


def _cmd_status(args) -> int:
    from factory.status import format_status, status

    st = status(args.output, window=args.window)
    print(json.dumps(st, indent=1) if args.json else format_status(st))
    return 0


def _cmd_verify(args) -> int:
    from factory.verify import format_verify, verify

    res = verify(args.output, workers=args.workers, repair=args.repair)
    print(json.dumps(res, indent=1) if args.json else format_verify(res))
    return 0 if res["ok"] else 1


def _cmd_prepare(args) -> int:
    from factory.prepare import prepare  # no torch on this path

    summary = prepare(args.src, args.output, args.size, resize=args.resize, mode=args.mode, per_class=args.per_class,
                      seed=args.seed, test_fraction=args.test_fraction, rows_per_file=args.rows_per_file,
                      min_size=args.min_size, class_names_file=args.class_names, image_column=args.image_column,
                      label_column=args.label_column, fmt=args.format, progress=not args.quiet)
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


def _cmd_train_embedded(args) -> int:
    from factory.embedded import train_embedded

    summary = train_embedded(args.source, args.out, seed=args.seed, quick=args.quick, threads=args.threads,
                             root=args.root, flip=args.flip, max_images=args.max_images)
    print(json.dumps({k: summary[k] for k in ("dataset", "size", "mode", "wall_s")}
                     | {"classes": len(summary["class_names"]), "cnn_test_acc": summary["cnn"]["test_acc"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="factory", description="Synthetic training-data factory")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="make a run's shards, score them and write the report")
    p.add_argument("config", help="YAML config, e.g. jobs/digits.yaml")
    p.add_argument("--output", help="output folder or URI (default runs/<config stem>/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="show what Ray and Ray Train print (actors, workers, per-epoch reports) on the console; "
                        "factory's own log goes to <output>/factory.log either way")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the summary table")
    p.add_argument("--stages", help="run only these stages, in run order (default all, each skipping what is "
                                    "already made): references,sample,score,downstream,report; e.g. "
                                    "score,report after changing eval.k")
    p.add_argument("--verify", action="store_true",
                   help="first verify every committed shard (sha256, decoding) and re-make the bad ones")
    p.add_argument("--rehearse", action="store_true",
                   help="run every stage at the job's full shape with tiny random models of the same kinds, a "
                        "generated real set with its classes and this machine's CPUs (factory/rehearse.py)")
    p.add_argument("--rehearse-size", type=int, default=32, help="side of the rehearsal's generated images (px)")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("status", help="a run's progress from its output: shards, images, img/s, ETA, failures")
    p.add_argument("output", help="the run's output folder or URI")
    p.add_argument("--window", type=float, default=300.0, help="seconds of recent commits for img/s (default 300)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_status)

    p = sub.add_parser("verify", help="check every planned shard's files; exit status 1 naming each bad shard")
    p.add_argument("output", help="the run's output folder or URI")
    p.add_argument("--repair", action="store_true", help="remove bad shards' markers and files: the next run re-makes them")
    p.add_argument("--workers", type=int, default=8, help="shards checked in parallel (default 8)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_verify)

    p = sub.add_parser("eval", help="score an existing image set against a real set's test split")
    p.add_argument("source", choices=["parquet", "webdataset", "imagefolder"], help="format of the set to score")
    p.add_argument("root", help="folder or URI of the set, e.g. runs/digits/chamfer/parquet")
    p.add_argument("--real", default="digits", help="real data source (digits, fashion_mnist, imagefolder, ...)")
    p.add_argument("--real-root", help="folder or URI of the real set, where its source needs one")
    p.add_argument("--features", default="cnn", help="feature space: cnn, dinov2, clip")
    p.add_argument("--features-checkpoint", default="digits")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--work", help="folder for the real set's reference bank and the set's features "
                                  "(default a cache folder per real set and feature space)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("plan", help="a run's shards, images, estimated GPU-hours and cost")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--gpu", help="device type: h100, h100-pcie, h200, a100, l40s, a10g, l4, cpu "
                                 "(default h100, or cpu when executor.num_gpus is 0)")
    p.add_argument("--img-per-s", type=float, help="images/s per GPU, instead of the measured / FLOP-based rate")
    p.add_argument("--price-per-gpu-hour", type=float, help="USD per GPU-hour, instead of the default prices")
    p.add_argument("--mfu", type=float, help="assumed model FLOP utilisation of FLOP-based estimates (default 0.30)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("bench", help="throughput and FLOPs of one backbone / guidance configuration")
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["bench"]:  # factory.bench imports torch: only when asked, so plan/eval start fast
        from factory import bench

        bench.add_arguments(p)
        p.set_defaults(fn=lambda a: bench.run_bench(a) and 0)  # run_bench prints its one JSON line

    p = sub.add_parser("prepare", help="convert a real image set into the factory's Parquet layout (Ray Data)")
    p.add_argument("src", help="image folder (train/<class>/, val/<class>/ or <class>/), WebDataset tars or "
                               "Parquet files: a local folder or URI")
    p.add_argument("--output", required=True, help="output folder or URI; a job reads it as "
                                                   "data: {source: parquet, root: URI}")
    p.add_argument("--size", type=int, required=True, help="output images are SIZE x SIZE")
    p.add_argument("--resize", default="center-crop", choices=["center-crop", "pad", "stretch"])
    p.add_argument("--mode", default="auto", choices=["auto", "L", "RGB"], help="auto: the majority of the data")
    p.add_argument("--per-class", type=int, help="keep K seeded images per class of the train split")
    p.add_argument("--seed", type=int, default=0, help="seed of --per-class and --test-fraction")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="source without split folders: this seeded fraction of it becomes the test split")
    p.add_argument("--rows-per-file", type=int, default=1000)
    p.add_argument("--min-size", type=int, help="reject images whose short side is smaller (default SIZE // 4)")
    p.add_argument("--class-names", help="class ids in label order (.json list / object, or '<id> <name>' lines)")
    p.add_argument("--format", default="auto", choices=["auto", "imagefolder", "webdataset", "parquet"])
    p.add_argument("--image-column", default="image", help="Parquet input: the image column")
    p.add_argument("--label-column", default="label", help="Parquet input: the integer label column")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(fn=_cmd_prepare)

    p = sub.add_parser("train-embedded", help="train the tiny UNet and feature CNN on a labelled image set")
    p.add_argument("--source", required=True, choices=["digits", "fashion_mnist", "imagefolder", "parquet", "webdataset"])
    p.add_argument("--root", help="the set's folder or URI (imagefolder, parquet, webdataset; fashion_mnist's IDX files)")
    p.add_argument("--out", help="checkpoint folder to write (default factory/weights/SOURCE for digits, fashion_mnist); "
                   "a job names it as backbone.checkpoint and features.checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flip", action="store_true", help="the feature CNN may learn from mirrored images")
    p.add_argument("--max-images", type=int, help="train on a seeded subset of at most this many images")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(fn=_cmd_train_embedded)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError, RuntimeError) as e:  # config, data, checkpoints, shard failures
        print(f"factory: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
