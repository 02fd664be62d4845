"""The ``dsom`` command line (DESIGN §2).

Exit status: 0 success; 2 bad input or configuration (one line, no traceback unless ``--debug``);
1 internal error; 130 interrupted (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from dsom import distributed
from dsom.config import (
    METHOD_PRESETS,
    Config,
    FeaturesConfig,
    _default_of,
    apply_dict,
    check_values,
    describe,
    key_choices,
    key_doc,
    load_yaml,
    parse_assignment,
)
from dsom.data import registry
from dsom.data.graph import SPLITS
from dsom.data.info import dataset_info, format_info
from dsom.errors import DsomError
from dsom.evaluate import evaluate
from dsom.features.build import build_modality
from dsom.features.cache import FeatureCache
from dsom.interop import align_to, export_pykeen, from_pykeen, load_pykeen
from dsom.models.complex import ComplEx
from dsom.models.teachers import TEACHERS_FORMAT
from dsom.perf import tune_allocator
from dsom.predict import answer_lines, parse_queries, predict, predict_batch
from dsom.ranks import TIE_POLICIES
from dsom.report import write_report
from dsom.reproduce import reproduce
from dsom.runs import pipeline
from dsom.runs.setup import build_config, check_config, load_dataset
from dsom.runs.variants import ABLATIONS
from dsom.schema import Results, metric_rows
from dsom.train.checkpoint import check_vocabulary, load_checkpoint, write_checkpoint
from dsom.train.loop import resolve_device
from dsom.tune import tune
from dsom.version import environment, format_table

#: CLI shortcuts for config keys (``--batch-size`` sets ``train.batch_size``)
SHORTCUTS = (("rank", "model.rank"), ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
             ("seed", "train.seed"), ("precision", "train.precision"), ("tracker", "track.trackers"))


def _comma_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _common_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", default=None,
                   help="registered dataset name (under $DSOM_DATA) or a folder; default: synthetic")
    p.add_argument("-o", "--output", help="run directory (default: runs/<dataset>-<timestamp>)")
    p.add_argument("-c", "--config", help="YAML configuration file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any configuration key, e.g. --set train.lr=0.05 (repeatable; see 'dsom config')")
    p.add_argument("--preset", choices=list(METHOD_PRESETS),
                   help="method preset: 'dsom' (default) or 'paper' = the paper's selection exactly (Eqs. 5-12)")
    p.add_argument("--modalities", help="comma-separated teacher modalities (default: structure)")
    for name, key in SHORTCUTS:  # type, choices and help come from the config schema
        kind = type(_default_of(key))
        p.add_argument(f"--{name.replace('_', '-')}", type=_comma_list if kind is list else kind,
                       choices=key_choices(key), help=f"shortcut for {key}: {key_doc(key)}")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --output")
    p.add_argument("--force", action="store_true", help="start over in an --output that holds an earlier run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsom", description="DSoM: reinforced multimodal distillation for MKG completion")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMAND_PARSERS:
        add(sub)
    return parser


def _parser_run(sub: Any) -> None:
    p = sub.add_parser("run", help="the whole pipeline on a dataset (default: the embedded synthetic graph)")
    _common_training(p)
    p.add_argument("--ablation", choices=[*ABLATIONS, "missing"],
                   help="also train the variants of a paper table on the same teachers and report them; 'missing' "
                        "reruns the whole pipeline at missing rates 0.2-0.8 in sub-runs (Figure 4)")


def _parser_pretrain(sub: Any) -> None:
    p = sub.add_parser("pretrain", help="train the modality teachers and their ensembles (stage 1)")
    _common_training(p)


def _parser_distill(sub: Any) -> None:
    p = sub.add_parser("distill", help="train the DSoM student on the teachers of an earlier run (stage 2)")
    _common_training(p)
    p.add_argument("--teachers", required=True, help="run directory (or checkpoints/teachers/final) of the teachers")
    p.add_argument("--ablation", choices=list(ABLATIONS),
                   help="also train the variants of a paper table on the same teachers and report them")


def _parser_reproduce(sub: Any) -> None:
    p = sub.add_parser("reproduce", help="the paper's main tables on the benchmarks, beside the paper's numbers "
                                         "(resumable sub-runs per dataset and seed)")
    p.add_argument("datasets", nargs="*", help="registered names or folders (default: DB15K MKG-W MKG-Y FB15K-237 WN18)")
    p.add_argument("--budget", choices=["small", "paper"], default="small",
                   help="small: fits a 2-core CPU in hours (ranks and epochs per dataset in docs/reproduce.md); "
                        "paper: rank 2000, up to 200 epochs (a GPU)")
    p.add_argument("--seeds", type=int, help="seeds per dataset (default: the budget's, 3 or 1)")
    p.add_argument("--modalities", help="comma-separated modalities for every dataset (default: those it has here)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every sub-run")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME",
                   help="also train this ablation's students in every sub-run (table2, table4, ...; repeatable), so "
                        "the claims table tests them; finished sub-runs are extended, not retrained")
    p.add_argument("-o", "--output", default="runs/reproduce", help="output folder (default: runs/reproduce)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _parser_report(sub: Any) -> None:
    p = sub.add_parser("report", help="write report/summary.md and plots of a finished run")
    p.add_argument("run_dir")


def _parser_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="filtered ranking metrics of a saved model")
    p.add_argument("checkpoint", help="checkpoint folder or run directory")
    p.add_argument("--dataset", help="dataset name or folder (default: the one recorded in the checkpoint)")
    p.add_argument("--split", default="test", choices=list(SPLITS))
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--memory-budget-mb", type=float, default=1024.0)
    p.add_argument("-q", "--quiet", action="store_true")


def _parser_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="top-k answers to (head, relation, ?) or (?, relation, tail)")
    p.add_argument("checkpoint", help="checkpoint folder or run directory")
    p.add_argument("--head", help="head entity (label, name or #id): predict tails")
    p.add_argument("--tail", help="tail entity (label, name or #id): predict heads")
    p.add_argument("--relation", help="relation (label, name or #id)")
    p.add_argument("--queries", metavar="FILE",
                   help="many queries, one per line: 'head<TAB>relation[<TAB>?]' or '?<TAB>relation<TAB>tail'; "
                        "'-' reads standard input; the model is loaded once and the file streamed")
    p.add_argument("--format", choices=["tsv", "jsonl"], default="tsv",
                   help="with --queries: TSV rows (line, query, rank, label, name, score, known) or one JSON per query")
    p.add_argument("--output", "-o", help="with --queries: write here (atomically) instead of standard output")
    p.add_argument("--batch-size", type=int, default=256, help="with --queries: queries scored together")
    p.add_argument("-k", type=int, default=10, help="number of answers")
    p.add_argument("--dataset", help="dataset for filtering known answers (default: the checkpoint's)")
    p.add_argument("--no-filter", action="store_true", help="keep answers that are already known triples")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _parser_tune(sub: Any) -> None:
    p = sub.add_parser("tune", help="hyper-parameter search of the distillation stage (Optuna, on valid; "
                                    "resumable)")
    _common_training(p)
    p.add_argument("--trials", type=int, default=20, help="trials to finish (completed or pruned), in all")
    p.add_argument("--space", help="search space YAML (default: gamma, tau, alpha, beta, entropy, policy_lr)")
    p.add_argument("--teachers", help="run directory with trained teachers (default: train them in OUT/teachers)")


def _parser_export(sub: Any) -> None:
    p = sub.add_parser("export", help="write a trained model in another library's format (PyKEEN)")
    p.add_argument("checkpoint", help="checkpoint folder or run directory (its student, else its teachers)")
    p.add_argument("--to", choices=["pykeen"], default="pykeen", help="target library")
    p.add_argument("-o", "--output", required=True, help="folder to write (PyKEEN's save_to_directory layout)")
    p.add_argument("--teacher", metavar="MODALITY", help="export this teacher of a teachers checkpoint instead")
    p.add_argument("--dataset", help="dataset of the checkpoint (default: the one recorded in it)")


def _parser_import_pykeen(sub: Any) -> None:
    p = sub.add_parser("import-pykeen", help="a PyKEEN-trained ComplEx as a structural teacher for dsom distill")
    p.add_argument("folder", help="PyKEEN model folder (trained_model.pkl, training_triples/)")
    p.add_argument("dataset", help="the dataset it was trained on (registered name or folder)")
    p.add_argument("-o", "--output", required=True, help="run directory to write checkpoints/teachers/final into")


def _parser_data(sub: Any) -> None:
    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("info", help="statistics and validation of a dataset folder")
    q.add_argument("path", help="dataset folder or registered name")
    q.add_argument("--layout", default=_default_of("data.layout"), choices=key_choices("data.layout"))
    q.add_argument("--json", help="also write the statistics to this JSON file")


def _parser_features(sub: Any) -> None:
    p = sub.add_parser("features", help="build and cache feature tables (text, numeric, image) of a dataset")
    p.add_argument("dataset", help="registered dataset name or folder")
    p.add_argument("--text", action="store_true", help="encode 'name: description' with a text model")
    p.add_argument("--text-model", help="transformers model folder or hub id (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--text-pooling", default=_default_of("features.text_pooling"),
                   choices=key_choices("features.text_pooling"),
                   help="mean of the last layer (sentence-transformers) or of the second-to-last (MoSE/BERT)")
    p.add_argument("--text-batch-size", type=int, default=_default_of("features.text_batch_size"))
    p.add_argument("--numeric", action="store_true", help="normalised numeric literals from numeric.tsv")
    p.add_argument("--image", action="store_true", help="images of images.tsv through a vision model")
    p.add_argument("--image-model", default="google/vit-base-patch16-224",
                   help="transformers vision model folder or hub id (paper: google/vit-base-patch16-224)")
    p.add_argument("--image-agg", default=_default_of("features.image_agg"), choices=key_choices("features.image_agg"),
                   help="several images per entity")
    p.add_argument("--imputation", default=_default_of("features.imputation"),
                   choices=key_choices("features.imputation"))
    p.add_argument("--seed", type=int, default=0, help="seed of the imputation")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("-q", "--quiet", action="store_true")


def _parser_config(sub: Any) -> None:
    p = sub.add_parser("config", help="list every configuration key with its default and meaning")
    p.add_argument("dataset", nargs="?", default=None, help="show the defaults for this dataset (with its preset)")


def _parser_version(sub: Any) -> None:
    sub.add_parser("version", help="package, Python, torch, threads, CPU/GPU (paste into bug reports)")


#: one function per command, in the order ``dsom --help`` lists them
COMMAND_PARSERS = (_parser_run, _parser_pretrain, _parser_distill, _parser_reproduce, _parser_report, _parser_evaluate, _parser_predict, _parser_tune, _parser_export, _parser_import_pykeen, _parser_data, _parser_features, _parser_config, _parser_version)


def _overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, key in SHORTCUTS:
        if getattr(args, name, None) is not None:
            out.append((key, getattr(args, name)))
    if getattr(args, "modalities", None):
        out.append(("modalities", args.modalities))
    out += [parse_assignment(s) for s in args.set]
    return out


def _same_dataset(given: str, saved: str | None) -> bool:
    if saved is None:
        return given == "synthetic"
    if given == saved:
        return True
    a, b = Path(given), Path(saved)
    return a.is_dir() and b.is_dir() and a.resolve() == b.resolve()


def _check_resume_arguments(args: argparse.Namespace, cfg: Any, saved: Path) -> None:
    """A resumed run reads its own config.yaml: a dataset, config file or preset on the command line that would
    change it is refused (instead of being silently ignored)."""
    if args.dataset and not _same_dataset(args.dataset, cfg.data.dataset):
        raise DsomError(f"--resume: {saved.parent} was started on dataset '{cfg.data.dataset or 'synthetic'}', not "
                        f"'{args.dataset}'; drop the dataset argument to continue it, or start a new run with another -o")
    if args.config:
        raise DsomError(f"--resume reads {saved}; -c/--config cannot change a run being continued "
                        "(drop -c, or start a new run with another -o)")
    if args.preset and args.preset != cfg.preset:
        raise DsomError(f"--resume: {saved.parent} uses preset '{cfg.preset}', not '{args.preset}'; drop --preset to "
                        "continue it, or start a new run with another -o")


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        if not args.output:
            raise DsomError("--resume needs -o/--output pointing at the run to continue")
        saved = Path(args.output) / "config.yaml"
        if not saved.exists():
            raise DsomError(f"--resume: {saved} not found; nothing to resume")
        cfg = Config()
        apply_dict(cfg, load_yaml(saved))
        _check_resume_arguments(args, cfg, saved)
        for key, value in _overrides(args):
            apply_dict(cfg, {key: value})
        check_config(cfg)
    else:
        cfg = build_config(args.dataset, args.config, _overrides(args), preset=args.preset)
    stages = "pretrain" if args.command == "pretrain" else "all"
    progress = not args.quiet and distributed.is_main()  # under torchrun rank 0 alone reports
    if getattr(args, "ablation", None) == "missing":
        out, results = pipeline.missing_study(cfg, args.output, resume=args.resume, force=args.force,
                                              progress=progress)
        if not distributed.is_main():
            return 0
        print(format_results(results))
        print(f"run directory: {out}")
        return 0
    out, results = pipeline.run(cfg, args.output, resume=args.resume, force=args.force, progress=progress,
                                stages=stages, ablation=getattr(args, "ablation", None),
                                teachers_from=getattr(args, "teachers", None))
    if not distributed.is_main():
        return 0
    print(format_results(results))
    print(f"run directory: {out}")
    return 0


def format_results(results: Results) -> str:
    lines = [f"dataset {results['dataset']['name']}: {results['dataset']['entities']} entities, "
             f"{results['dataset']['relations']} relations"]
    header = f"{'model':<22} {'split':<6} {'policy':<12} {'MRR':>7} {'MR':>9} {'H@1':>7} {'H@3':>7} {'H@10':>7}"
    lines.append(header)
    for model, split, policy, m in metric_rows(results):
        lines.append(f"{model:<22} {split:<6} {policy:<12} {m['mrr']:7.4f} {m['mr']:9.1f} "
                     f"{m['hits@1']:7.4f} {m['hits@3']:7.4f} {m['hits@10']:7.4f}")
    t = results.get("timing", {})
    if t.get("pretrain_epoch_s") is not None:
        lines.append(f"pretrain: {t['pretrain_s']:.1f} s ({t['pretrain_epoch_s']:.2f} s/epoch)")
    if t.get("distill_epoch_s") is not None:
        lines.append(f"distill: {t['distill_s']:.1f} s ({t['distill_epoch_s']:.2f} s/epoch)")
    policy = results.get("policy")
    if policy:
        shares = ", ".join(f"{k} {v:.2f}" for k, v in sorted(policy["actions"].items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"policy arg-max actions on train: {shares}")
        if "planted_agreement" in policy:
            lines.append(f"planted-truth agreement {policy['planted_agreement']:.3f} (all teachers "
                         f"{policy['planted_agreement_all_teachers']:.3f}, random {policy['planted_agreement_random']:.3f})")
    return "\n".join(lines)


def _dataset_for_checkpoint(meta: dict[str, Any], override: str | None):
    if override:
        return registry.load(override)
    info = meta.get("dataset", {})
    cfg = meta.get("config", {}).get("data", {})
    if info.get("name") == registry.SYNTHETIC:
        return registry.load(registry.SYNTHETIC, synthetic=cfg.get("synthetic", {}))
    for candidate in (info.get("path"), info.get("name")):
        if candidate:
            try:
                return registry.load(candidate, info.get("layout") or "auto")
            except DsomError:
                continue
    raise DsomError(f"cannot find the dataset '{info.get('name')}' this checkpoint was trained on; pass --dataset")


def _check_vocab(meta: dict[str, Any], ds: Any) -> None:
    check_vocabulary(meta, ds, "the checkpoint", "pass the right --dataset")


def _check_json_destination(path: str | None, option: str = "--json") -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise DsomError(f"{option} {p}: is a directory; name a file")
    if not p.parent.is_dir():
        raise DsomError(f"{option} {p}: folder {p.parent} does not exist")


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise DsomError(f"--seeds {args.seeds}: give at least 1")
    mods = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
    out, _ = reproduce(args.datasets, args.output, budget=args.budget, seeds=args.seeds, modalities=mods,
                       overrides=[parse_assignment(s) for s in args.set], progress=not args.quiet,
                       ablations=args.ablation)
    print((out / "reproduction.md").read_text(encoding="utf-8"))
    print(f"tables: {out / 'reproduction.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _check_json_destination(args.json)
    if args.batch_size < 1 or not args.memory_budget_mb >= 1:
        raise DsomError("--batch-size must be >= 1 and --memory-budget-mb >= 1")
    device = distributed.device(resolve_device("auto"))
    ck = load_checkpoint(args.checkpoint, device=device)
    ds = _dataset_for_checkpoint(ck.meta, args.dataset)
    _check_vocab(ck.meta, ds)
    m = evaluate(ck.model, ds, args.split, batch_size=args.batch_size, memory_budget_mb=args.memory_budget_mb,
                 device=device, progress=not args.quiet and distributed.is_main())
    if not distributed.is_main():  # every process holds the same metrics; rank 0 reports them
        return 0
    print(f"{ds.name} {args.split}: {m['queries']} queries (head + tail), filtered")
    print(f"{'direction':<8} {'policy':<12} {'MRR':>7} {'MR':>9} {'H@1':>7} {'H@3':>7} {'H@10':>7}")
    for direction, block in (("both", m), ("head", m["head"]), ("tail", m["tail"])):
        for policy in TIE_POLICIES:
            x = block[policy]
            print(f"{direction:<8} {policy:<12} {x['mrr']:7.4f} {x['mr']:9.1f} {x['hits@1']:7.4f} "
                  f"{x['hits@3']:7.4f} {x['hits@10']:7.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=2), encoding="utf-8")
    return 0


def _predict_file(args: argparse.Namespace, ck: Any, filter_index: Any) -> int:
    """Stream a query file through the model in batches; with -o the output appears only when complete."""
    source = sys.stdin if args.queries == "-" else open(args.queries, encoding="utf-8-sig")  # noqa: SIM115
    tmp = None
    if args.output:
        out_path = Path(args.output)
        _check_json_destination(args.output, "--output")
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent or ".")
        sink = os.fdopen(fd, "w", encoding="utf-8")
    else:
        sink = sys.stdout
    try:
        queries = parse_queries(source, ck.entities, ck.relations, "<stdin>" if args.queries == "-" else args.queries)
        while chunk := list(itertools.islice(queries, args.batch_size)):
            for q, answers in zip(chunk, predict_batch(ck.model, ck.entities, chunk, args.k, filter_index,
                                                       not args.no_filter)):
                sink.write("\n".join(answer_lines(q, answers, args.format)) + "\n")
        if tmp is not None:
            sink.close()
            os.replace(tmp, args.output)
            tmp = None
    finally:
        if source is not sys.stdin:
            source.close()
        if tmp is not None:
            sink.close()
            os.unlink(tmp)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise DsomError(f"--trials {args.trials}: give at least 1")
    if not args.output:
        raise DsomError("dsom tune needs -o OUT (the study, trial folders and best.yaml go there)")
    cfg = build_config(args.dataset, args.config, _overrides(args), preset=args.preset)
    summary = tune(cfg, args.output, args.trials, args.space, args.teachers, seed=cfg.train.seed,
                   progress=not args.quiet)
    print(f"best trial {summary['best_trial']}: {summary['metric']} = {summary['best_value']:.4f}")
    for key, value in summary["best_params"].items():
        print(f"  {key} = {value}")
    print("trials: " + ", ".join(f"{k.lower()} {v}" for k, v in summary["trials"].items() if v))
    print(f"best configuration: {Path(args.output) / 'best.yaml'} (dsom run -c {Path(args.output) / 'best.yaml'})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if Path(args.output).exists() and any(Path(args.output).iterdir()):
        raise DsomError(f"-o {args.output}: exists and is not empty; choose a new folder")
    source = Path(args.checkpoint)
    if args.teacher and (source / "checkpoints" / "teachers" / "final").is_dir():  # a run directory's teachers
        source = source / "checkpoints" / "teachers" / "final"
    ck = load_checkpoint(source)
    model = ck.model
    what = "student" if ck.teachers is None else "teacher_avg"
    if args.teacher or ck.teachers is not None:
        if ck.teachers is None:
            raise DsomError(f"--teacher {args.teacher}: {ck.path} is not a teachers checkpoint")
        if not args.teacher:
            raise DsomError(f"{ck.path} holds teachers ({', '.join(ck.teachers.modalities)}); name one with --teacher")
        if args.teacher not in ck.teachers.modalities:
            raise DsomError(f"--teacher {args.teacher}: not one of {', '.join(ck.teachers.modalities)}")
        i = ck.teachers.modalities.index(args.teacher)
        model = ComplEx(ck.teachers.num_entities, ck.teachers.relations.shape[1], ck.teachers.rank)
        with torch.no_grad():
            model.entity.copy_(ck.teachers.tables[i])
            model.relation.copy_(ck.teachers.relations[i])
        what = f"teacher/{args.teacher}"
    ds = _dataset_for_checkpoint(ck.meta, args.dataset)
    _check_vocab(ck.meta, ds)
    out = export_pykeen(model, ck.entities, ck.relations, ds.train, args.output,
                        {"source": str(ck.path), "model": what, "dataset": ds.name})
    print(f"wrote {out} (PyKEEN ComplEx with inverse triples, {what})")
    return 0


def cmd_import_pykeen(args: argparse.Namespace) -> int:
    out = Path(args.output) / "checkpoints" / "teachers" / "final"
    if out.exists():
        raise DsomError(f"{out} exists; choose a new -o")
    ds = load_dataset(build_config(args.dataset))
    pk, tf = load_pykeen(args.folder)
    model = align_to(from_pykeen(pk), tf, ds.entities, ds.relations)
    meta = {"format": TEACHERS_FORMAT, "stage": "import",
            "model": {"type": "frozen-teachers", "modalities": ["structure"], "rank": model.rank},
            "config": {"distill": {"holdout": 0.0, "holdout_seed": 0}}, "source": {"pykeen": str(args.folder)}}
    write_checkpoint(out, {"tables": model.entity.detach()[None], "relations": model.relation.detach()[None]}, ds, meta)
    print(f"wrote {out}: a structural teacher (rank {model.rank}); use it with "
          f"dsom distill {args.dataset} --teachers {args.output}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise DsomError(f"-k {args.k}: the number of answers must be at least 1")
    if args.queries is None and args.relation is None:
        raise DsomError("give --relation with --head or --tail, or --queries FILE for many queries")
    if args.queries is not None and (args.relation or args.head or args.tail):
        raise DsomError("--queries takes every query from the file; drop --relation/--head/--tail")
    if args.batch_size < 1:
        raise DsomError(f"--batch-size {args.batch_size}: give at least 1")
    if args.queries not in (None, "-") and not Path(args.queries).is_file():
        raise DsomError(f"--queries {args.queries}: no such file")
    ck = load_checkpoint(args.checkpoint)
    filter_index = None
    if not args.no_filter:
        ds = _dataset_for_checkpoint(ck.meta, args.dataset)
        _check_vocab(ck.meta, ds)
        filter_index = ds.filter_index
    if args.queries is not None:
        return _predict_file(args, ck, filter_index)
    answers = predict(ck.model, ck.entities, ck.relations, args.relation, head=args.head, tail=args.tail, k=args.k,
                      filter_index=filter_index, filter_known=not args.no_filter)
    if args.json:
        print(json.dumps([a.__dict__ for a in answers], indent=2))
        return 0
    print(f"{'rank':>4}  {'score':>9}  {'label':<40} name")
    for a in answers:
        flag = " (known)" if a.known else ""
        print(f"{a.rank:>4}  {a.score:9.4f}  {a.label:<40} {a.name}{flag}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    _check_json_destination(args.json)
    ds = registry.load(args.path, args.layout)
    info = dataset_info(ds)
    print(format_info(info))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    names = [n for n, on in (("numeric", args.numeric), ("text", args.text), ("image", args.image)) if on]
    if not names:
        raise DsomError("choose at least one of --text, --numeric, --image")
    fc = FeaturesConfig(text_model=args.text_model or "", text_pooling=args.text_pooling,
                        text_batch_size=args.text_batch_size, image_model=args.image_model, image_agg=args.image_agg,
                        imputation=args.imputation, seed=args.seed)
    checked = Config()
    checked.features = fc
    try:  # the same ranges as the features.* keys of a run, reported with this command's option names
        check_values(checked)
    except DsomError as exc:
        text = str(exc)
        for key, option in (("text_batch_size", "--text-batch-size"), ("seed", "--seed"),
                            ("text_pooling", "--text-pooling"), ("image_agg", "--image-agg"),
                            ("imputation", "--imputation")):
            text = text.replace(f"--set features.{key}=VALUE", f"{option} VALUE").replace(
                f"config key 'features.{key}'", option)
        raise DsomError(text) from None
    ds = registry.load(args.dataset)
    cache = FeatureCache()
    for name in names:
        built = build_modality(ds, name, fc, cache, force=args.force, progress=not args.quiet)
        table = built.table
        state = "" if built.cached is None else (" (cached)" if built.cached else " (built)")
        print(f"{ds.name} {table.name}: {table.num_entities} x {table.dim}, present {int(table.present.sum())}"
              f"/{table.num_entities}, {built.seconds:.1f} s{state}; {table.source}")
    print(f"cache: {cache.root}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(describe(build_config(args.dataset)))
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(format_table(environment()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.run_dir)
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path.parent}")
    return 0


COMMANDS = {"run": cmd_train, "pretrain": cmd_train, "distill": cmd_train, "reproduce": cmd_reproduce,
            "report": cmd_report, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "export": cmd_export, "tune": cmd_tune, "import-pykeen": cmd_import_pykeen,
            "data": cmd_data, "features": cmd_features, "config": cmd_config, "version": cmd_version}


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    return f"dsom: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dsom: %(levelname)s: %(message)s")
    if not args.debug:  # one line per warning, without the Python source line that raised it
        warnings.formatwarning = _one_line_warning

    tune_allocator()
    try:
        distributed.init_from_env(args.command)
        if distributed.active() and not distributed.is_main():
            logging.getLogger("dsom").setLevel(logging.WARNING)
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe (dsom data info | head) shows up here, not at interpreter exit
        return status
    except BrokenPipeError:
        # the reader went away (| head): not an error; keep Python from complaining when it flushes at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except DsomError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dsom: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave (or the environment) is unusable: not a bug in dsom
        if args.debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"dsom: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsom: interrupted; continue a training run with --resume -o RUN_DIR", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last-resort handler for the CLI
        if args.debug:
            traceback.print_exc()
        print(f"dsom: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1
    finally:
        distributed.finish()


if __name__ == "__main__":
    sys.exit(main())
