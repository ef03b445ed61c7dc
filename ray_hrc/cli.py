"""The ``ray-hrc`` command line. Each subcommand parses its arguments and calls one package function."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ray_hrc.manifest import DEFAULT_TEMPLATE, TEMPLATES

logger = logging.getLogger("ray_hrc")

EXIT_RUN_FAILED = 1  # the run itself failed (the model stage raised after its retries, the cluster went away, a bug)
EXIT_USAGE = 2  # bad arguments, config, inputs or checkpoint; or a refused resume / --overwrite
EXIT_SOME_FAILED = 3  # classify finished, and some inputs are in the errors table
CLASSIFY_EXIT_CODES = f"""exit codes:
  0  every chip catalogued (the errors table is empty)
  {EXIT_SOME_FAILED}  finished; some inputs are in the errors table (bad files are not retried by a rerun; unreadable
     URIs and chips lost with their worker are)
  {EXIT_RUN_FAILED}  the run failed (the model stage raised on every retry: the message names the checkpoint, the
     exception and the first chip; or the cluster failed); parts written so far stay, a rerun resumes
  {EXIT_USAGE}  bad arguments, config, input list or checkpoint; or --out holds another checkpoint's parts (use
     --overwrite or another --out), or --overwrite found files a run does not write"""


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the files are")
    g.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help=f"URI template for manifest rows without a URI column: a name ({', '.join(TEMPLATES)}), a template with "
        "{obsid}/{obsid[:4]}/{id}, or a local folder holding <obsid>_raw.fits (default: MAST's public bucket)",
    )
    _add_input_storage_args(g)
    g.add_argument("--num-cpus", type=float, default=None, help="CPUs per read task (default 1)")
    g.add_argument("--concurrency", type=int, default=None, help="at most this many read tasks at once (default: Ray Data decides)")
    g.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def _add_input_storage_args(g) -> None:
    g.add_argument(
        "--anon",
        action="store_true",
        help="anonymous S3 reads of the sources (MAST's public bucket s3://stpubdata allows them); never for --out",
    )
    g.add_argument("--s3-endpoint", default=None, help="S3-protocol endpoint URL of the sources (MinIO, a local test server, ...)")


def _add_output_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the results go")
    g.add_argument(
        "--out-s3-endpoint", default=None, help="S3-protocol endpoint URL of --out and the checkpoint (default: AWS, or the config's)"
    )


def storage_options_from_args(args: argparse.Namespace) -> dict:
    """Input-side (sources) fsspec options from --anon and --s3-endpoint."""
    from ray_hrc.storage import s3_options

    return s3_options(getattr(args, "anon", False), getattr(args, "s3_endpoint", None))


def output_config_from_args(args: argparse.Namespace, base=None):
    """The output side's config: `base` (from a config file) or the defaults, with --out-s3-endpoint on top."""
    from ray_hrc.storage import OutputConfig, merge_options, s3_options

    base = base or OutputConfig()
    return OutputConfig(storage_options=merge_options(base.storage_options, s3_options(endpoint=getattr(args, "out_s3_endpoint", None))))


def read_config_from_args(args: argparse.Namespace, base=None):
    """The read stage's config: `base` (from a config file) or the defaults, with the flags given on top."""
    from dataclasses import replace

    from ray_hrc.data import ReadConfig
    from ray_hrc.storage import merge_options

    cfg = base or ReadConfig()
    changes = {"storage_options": merge_options(cfg.storage_options, storage_options_from_args(args))}
    if args.template != DEFAULT_TEMPLATE or base is None:
        changes["template"] = TEMPLATES.get(args.template, args.template)
    if args.num_cpus is not None:
        changes["num_cpus"] = args.num_cpus
    if args.concurrency is not None:
        changes["concurrency"] = args.concurrency
    return replace(cfg, **changes)


def cmd_synth(args: argparse.Namespace) -> int:
    from ray_hrc.synth import synthesize_archive

    manifest = synthesize_archive(args.out, bodies=args.bodies, seed=args.seed, workers=args.workers)
    print(manifest)
    return 0


def cmd_crop(args: argparse.Namespace) -> int:
    from ray_hrc.crop import crop_archive
    from ray_hrc.runtime import init_ray

    init_ray(args.address)
    summary = crop_archive(args.sources, args.out, read_config_from_args(args), output_config_from_args(args))
    print(json.dumps(summary, indent=2))
    return 0 if summary["chips"] or not summary["errors"] else 1


def cmd_split(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ray_hrc.manifest import read_manifest, split_three, write_manifest

    df = read_manifest(args.manifest, template=TEMPLATES.get(args.template, args.template))
    train, val, test = split_three(df, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val), ("test", test)):
        write_manifest(part, out / f"{name}.csv")
        counts = part["Label"].value_counts().to_dict()
        print(f"{name}: {len(part)} chips, {part['ID'].nunique()} bodies, {counts} -> {out / (name + '.csv')}")
    return 0


def train_config_from_args(args: argparse.Namespace):
    """The training job's config: --config with the flags and --set overrides on top."""
    import os

    from ray_hrc.config import load_config

    overrides = list(args.set or [])
    if args.manifest:
        overrides.append(f"data.manifest={args.manifest}")
        if not args.test_manifest:
            overrides.append("data.test_manifest=null")
    if args.test_manifest:
        overrides.append(f"data.test_manifest={args.test_manifest}")
    if args.out:
        out = args.out.rstrip("/")
        parent, name = out.rsplit("/", 1) if "/" in out else (".", out)
        overrides += [f"run.storage_path={parent if '://' in out else os.path.abspath(parent)}", f"run.name={name}"]
    if args.anon:  # the sources only; the run folder keeps run.storage_options
        overrides.append("data.read.storage_options.anon=true")
    if args.s3_endpoint:
        overrides.append(f"data.read.storage_options.client_kwargs.endpoint_url={args.s3_endpoint}")
    if args.out_s3_endpoint:
        overrides.append(f"run.storage_options.client_kwargs.endpoint_url={args.out_s3_endpoint}")
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from ray_hrc.runtime import init_ray
    from ray_hrc.train import run_training

    cfg = train_config_from_args(args)
    init_ray(args.address)
    outcome = run_training(cfg, resume=args.resume)
    m, t = outcome.best_metrics, outcome.test_metrics["best"]
    print(f"run: {outcome.run_dir}")
    print(
        f"best epoch {m['epoch']} (chosen on validation): validation accuracy {m['val_accuracy']:.4f}, temperature {m['temperature']:.3f}"
    )
    print(
        f"test ({t['chips']} chips, scored once): accuracy {t['accuracy']:.4f}, F1 galaxy {t['f1_galaxy']:.4f}, F1 NSC {t['f1_nsc']:.4f}, "
        f"confusion [true x predicted; galaxy, NSC] {t['confusion']}, ECE {t['ece']:.3f} -> {t['ece_calibrated']:.3f}"
    )
    print(outcome.best_checkpoint)  # the last line: the best checkpoint's URI, for scripts to chain
    return 0


def _classify_configs(args: argparse.Namespace):
    """(ReadConfig, ClassifyConfig, OutputConfig) from --config (if any) with the flags given on top."""
    from dataclasses import replace

    from ray_hrc.classify import load_classify_config

    job = load_classify_config(args.config)
    changes = {}
    for flag, key in (("batch_size", "batch_size"), ("min_actors", "min_actors"), ("max_actors", "max_actors"), ("format", "format")):
        if getattr(args, flag, None) is not None:
            changes[key] = getattr(args, flag)
    if getattr(args, "precision", None) is not None:
        changes["precision"] = args.precision
    if args.gpu is not None:
        changes["use_gpu"] = {"auto": None, "yes": True, "no": False}[args.gpu]
    read = read_config_from_args(args, job.read if args.config else None)
    return read, replace(job.model_stage, **changes), output_config_from_args(args, job.output)


def cmd_classify(args: argparse.Namespace) -> int:
    from ray_hrc.classify import classify_archive
    from ray_hrc.runtime import init_ray

    init_ray(args.address)
    read, model_stage, output = _classify_configs(args)
    summary = classify_archive(
        args.input, args.checkpoint, args.out, read=read, config=model_stage, overwrite=args.overwrite, output=output
    )
    print(json.dumps(summary, indent=2))
    print(
        f"{summary['chips']} chips catalogued ({summary['new_chips']} new, {summary['failed']} failed) by label {summary['by_label']}; "
        f"{summary['chips_per_s']} chips/s over {summary['wall_s']} s -> {summary['catalog']}"
    )
    if summary["failed"]:
        logger.warning(
            "%d input(s) in %s (%d to retry by a rerun: unreadable or lost); exit code %d",
            summary["failed"], summary["errors_table"], summary.get("to_retry", 0), EXIT_SOME_FAILED,
        )  # fmt: skip
        return EXIT_SOME_FAILED
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ray_hrc.evaluate import compare, evaluate_checkpoint
    from ray_hrc.runtime import init_ray

    init_ray(args.address)
    read, model_stage, output = _classify_configs(args)
    kwargs = dict(read=read, config=model_stage, blurry=args.blurry, output=output)
    if args.catalog and len(args.checkpoint) > 1:
        raise SystemExit("--catalog scores one checkpoint's catalog; give a single --checkpoint")
    if len(args.checkpoint) == 1:
        metrics = evaluate_checkpoint(args.checkpoint[0], args.manifest, args.out, overwrite=args.overwrite, catalog=args.catalog, **kwargs)
        print(open(f"{args.out}/metrics.md").read())
        print(f"confusion matrix [true x predicted; galaxy, NSC]: {metrics['confusion']}; report in {args.out}")
    else:
        print(compare(args.checkpoint, args.manifest, args.out, overwrite=args.overwrite, **kwargs))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ray_hrc.runtime import init_ray
    from ray_hrc.serve import run_server

    init_ray(args.address)
    run_server(args.checkpoint, host=args.host, port=args.port, max_body_mb=args.max_body_mb)
    return 0


def _add_model_stage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model stage")
    g.add_argument("--config", default=None, help="YAML with read: and model_stage: sections (e.g. configs/classify_cluster.yaml)")
    g.add_argument("--batch-size", type=int, default=None, help="chips per model call (default 4)")
    g.add_argument("--min-actors", type=int, default=None, help="model actor pool lower bound (default 1)")
    g.add_argument("--max-actors", type=int, default=None, help="model actor pool upper bound (default: autoscale as resources allow)")
    g.add_argument(
        "--gpu", choices=["auto", "yes", "no"], default=None, help="model actors on GPUs (default auto: when the cluster has any)"
    )
    g.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default=None,
        help="model forward (default auto: bf16 on CPUs with AMX or AVX-512 BF16 and on bf16 GPUs, fp32 elsewhere)",
    )  # fmt: skip
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over instead of resuming in --out: removes only what a run writes there (_parts/, catalog.*, errors.*, "
        "summary.json) and refuses a folder holding anything else",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-hrc", description="Classify full-resolution Hubble chips as galaxy or NSC on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic survey archive of raw ACS/WFC and WFC3/UVIS files + an LCID manifest")
    p.add_argument("out", help="output folder")
    p.add_argument("--bodies", type=int, default=8, help="number of celestial bodies (both classes, about half each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("crop", help="crop raw files to 2048x4096 LCID samples (uint16 FITS) with index.csv and errors.csv")
    p.add_argument("sources", nargs="+", help="manifest CSV(s), FITS paths/URIs, folders, prefixes or globs (local or s3://)")
    p.add_argument("--out", required=True, help="output folder (local or s3://)")
    _add_source_args(p)
    _add_output_storage_args(p)
    p.set_defaults(func=cmd_crop)

    p = sub.add_parser("split", help="split a manifest by celestial body into train.csv, val.csv and test.csv")
    p.add_argument("manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of the chips for test.csv")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the remaining (training) chips for val.csv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="URI template for rows without a URI column")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser(
        "classify",
        help="classify an archive into a labelled catalog (resumable; same as jobs/classify.py)",
        epilog=CLASSIFY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    p.add_argument(
        "--input", nargs="+", required=True, help="manifest CSV(s), FITS paths/URIs, folders, prefixes or globs (local or s3://)"
    )
    p.add_argument("--out", required=True, help="output folder (local or s3://): catalog.<fmt>, errors.<fmt>, summary.json")
    p.add_argument("--format", choices=["parquet", "csv", "fits", "votable", "hats"], default=None, help="catalog format (default parquet)")
    _add_source_args(p)
    _add_output_storage_args(p)
    _add_model_stage_args(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("evaluate", help="Table-4-style report, confusion matrix and misclassified gallery on a labelled manifest")
    p.add_argument("--checkpoint", required=True, action="append", help="checkpoint directory; repeat to compare several (Table 4)")
    p.add_argument("--manifest", required=True, help="labelled LCID-format manifest")
    p.add_argument("--blurry", default=None, help="manifest of the blurry subset (the paper's LCID-Blurry), reported on its own")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--catalog", default=None, help="score this checkpoint's existing catalog (from classify) instead of classifying again")
    _add_source_args(p)
    _add_output_storage_args(p)
    _add_model_stage_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="real-time classification: POST FITS files to /classify on Ray Serve")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-mb", type=float, default=200.0, help="largest request body accepted (default 200 MiB)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train a model data-parallel with Ray Train (same as jobs/train.py)")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    return parser


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (configs/paper/*.yaml, configs/smoke.yaml, configs/demo.yaml)")
    p.add_argument(
        "--manifest",
        default=None,
        help="LCID-format manifest: split by body into train, validation and test (train and validation with --test-manifest)",
    )
    p.add_argument(
        "--test-manifest", default=None, help="held-out manifest, scored once with best/ after the last epoch (never read before)"
    )
    p.add_argument("--out", default=None, help="run folder (local or s3://); default <run.storage_path>/<run.name> from the config")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (at the next epoch)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    _add_input_storage_args(p.add_argument_group("where the files are (data.read.storage_options)"))
    _add_output_storage_args(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in logs and `ray job logs`
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ray_hrc.parts import RunFailedError

    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError, ManifestError and ResumeRefusedError are ValueErrors
        logger.error("%s", exc)
        return EXIT_USAGE
    except RunFailedError as exc:
        logger.error("%s", exc)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
