"""The ``geometry`` command: analyze, compare, plot, demo, lab. Bad input ends in one line on stderr and exit code 2;
Ctrl-C or SIGTERM in one line and 130 or 143 (the shell's codes for them); analyze then leaves no partial output."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import typing
from pathlib import PurePath

from geometry.errors import GeometryError
from geometry.offline import threads

EXIT_BAD_INPUT = 2
EXIT_SIGNAL = 128  # + the signal number, as a shell reports a process a signal ended


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every cleanup (finally) runs."""


_received: list[int] = []  # signals taken by the handlers below, in order


def _raise_terminated(signum, frame):
    _received.append(signum)
    raise _Terminated()


def _raise_interrupted(signum, frame):
    _received.append(signum)
    raise KeyboardInterrupt()


def _interrupted(sig: int) -> int:
    print(f"geometry: interrupted by {signal.Signals(sig).name}", file=sys.stderr)
    return EXIT_SIGNAL + sig


def error_line(err: GeometryError) -> str:
    """The message as one printable line: names from a hostile file may hold newlines or terminal escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(err))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage block."""

    def error(self, message: str):
        raise GeometryError(f"{message} (see: {self.prog} --help)")


def add_config_options(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of a config dataclass (geometry.options.option): ``--field-name``, its
    help and default from the field, so that no default is restated here. Unset options stay None and
    leave the dataclass default in place."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, hints[f.name]
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        text = meta.get("help", "")
        if kind is not bool and kind != tuple[str, ...] and "default" not in text:
            text += f" (default: {f.default})"
        extra = {"help": text, "dest": f.name, "default": None}
        if kind is bool:
            parser.add_argument(*flags, action="store_const", const=True, **extra)
        elif kind == tuple[str, ...]:
            parser.add_argument(*flags, action="append", metavar="REGEX", **extra)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(*flags, type=base, choices=meta.get("choices"), **extra)


def config_from_args(cls, args: argparse.Namespace):
    """The config dataclass from the options that were given (the others keep its defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    return cls(**given)


def _progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (one is drawn on stderr only when it is a terminal)")


def _analyze_args(sub) -> None:
    from geometry.offline.config import AnalysisConfig

    p = sub.add_parser("analyze", help="measure the update geometry of checkpoints against a base",
                       description="Measure every metric of SPEC.md for one or more runs. One run: "
                       "`geometry analyze BASE CKPT_OR_RUN_DIR...`; several side by side: "
                       "`geometry analyze --run sft BASE DIR --run opd SFT_BASE DIR`.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="BASE then checkpoints (files, model dirs, run dirs)")
    p.add_argument("--run", nargs="+", action="append", metavar="ARG", default=[],
                   help="LABEL BASE CKPT... : one labelled run (repeatable)")
    p.add_argument("--label", default="run", help="label of the run given by positional paths")
    p.add_argument("-o", "--out", default="geometry-out", help="output directory (default: geometry-out)")
    add_config_options(p, AnalysisConfig)
    p.add_argument("--skip-mismatch", dest="on_mismatch", action="store_const", const="skip",
                   help="the same as --on-mismatch skip")
    _progress_option(p)
    p.add_argument("--no-figures", action="store_true", help="no figures/ and report.md (tables only)")
    p.add_argument("--html", action="store_true", help="also report.html: one self-contained file, figures inlined")


def _runs(args):
    from geometry.offline.analyze import Run

    runs = []
    if args.paths:
        if len(args.paths) < 2:
            raise GeometryError("analyze needs a BASE and at least one checkpoint or run directory")
        runs.append(Run(args.label, args.paths[0], args.paths[1:]))
    for spec in args.run:
        if len(spec) < 3:
            raise GeometryError(f"--run needs LABEL BASE CKPT..., got {' '.join(spec)}")
        runs.append(Run(spec[0], spec[1], spec[2:]))
    if not runs:
        raise GeometryError("analyze needs BASE CKPT... or --run LABEL BASE CKPT...")
    return runs


def cmd_analyze(args) -> int:
    from geometry.offline.config import AnalysisConfig

    return _analyze_and_write(_runs(args), config_from_args(AnalysisConfig, args), args)


def _analyze_and_write(runs, cfg, args) -> int:
    """``analyze`` the runs and write args.out (analyze's and compare's common path)."""
    from geometry.offline.analyze import analyze
    from geometry.offline.outputs import check_output, write_analysis

    check_output(args.out)  # before the analysis, not after hours of it
    analysis = analyze(runs, config=cfg, progress=not args.no_progress, distributed=True)
    if analysis.rank != 0:  # torchrun: rank 0 gathered every rank's rows and writes the outputs
        return 0
    if len(analysis.work) > 1:
        print(f"geometry: {len(analysis.work)} ranks; groups and measuring CPU s per rank: "
              + ", ".join(f"{g} {s:.2f}" for g, s in analysis.work), file=sys.stderr)
    paths = write_analysis(analysis, args.out, figures=not args.no_figures, html=args.html)
    for note in analysis.notes:
        print(f"note: {note}", file=sys.stderr)
    for run, cov in analysis.coverage.items():  # a tool measuring the wrong tenth of a model says so
        if cov.share_non_embedding() < 0.5:
            print(f"warning: {run}: under half of the non-embedding parameters measured: {cov.line()}",
                  file=sys.stderr)
    if args.command == "compare" and not len(analysis.pairs):
        print("warning: no two runs were compared: their selected matrices differ (see the notes)", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _compare_args(sub) -> None:
    from geometry.offline.config import AnalysisConfig

    p = sub.add_parser("compare", help="compare runs of one base with each other (pairs.csv)",
                       description="Compare runs from one base with each other (docs/metrics.md item 10): shared "
                       "changed entries, update cosine, sign agreement and Sim_K of the update subspaces, per matrix "
                       "and step in pairs.csv, per pair in summary.md and a run x run figure. `geometry compare BASE "
                       "RUN_A RUN_B ...` is `geometry analyze --run A BASE RUN_A --run B BASE RUN_B ...` and writes "
                       "the same directory (metrics.csv, summary.json, summary.md, curves.npz, figures/, report.md) "
                       "plus pairs.csv: the pair metrics use each run's top-K update subspaces, which the analysis "
                       "computes. --quick measures the updates alone (sparsity, rank, locking), the fast way to the "
                       "pairs.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="BASE, then one checkpoint or run directory per run (at "
                   "least two)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="the runs' labels, in order (default: the shortest "
                   "distinct ends of their paths)")
    p.add_argument("-o", "--out", default="geometry-compare", help="output directory (default: geometry-compare)")
    add_config_options(p, AnalysisConfig)
    _progress_option(p)
    p.add_argument("--no-figures", action="store_true", help="no figures/ and report.md (tables only)")
    p.add_argument("--html", action="store_true", help="also report.html: one self-contained file, figures inlined")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # dropped from a label


def path_labels(paths: list[str]) -> list[str]:
    """The shortest distinct ends of the paths, '/'-joined ('sft/checkpoint-100', 'rlvr/checkpoint-100'), a
    weights file's suffix dropped; the paths as given where no end tells them apart."""
    parts = []
    for path in map(PurePath, paths):
        path = path.with_suffix("") if path.suffix in WEIGHT_SUFFIXES else path
        parts.append([p for p in path.parts if p != path.anchor] or [str(path)])
    for n in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(ps[-n:]) for ps in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def cmd_compare(args) -> int:
    from geometry.offline.analyze import Run
    from geometry.offline.config import AnalysisConfig

    if len(args.paths) < 3:
        raise GeometryError("compare needs a BASE and at least two runs (checkpoints or run directories)")
    base, paths = args.paths[0], args.paths[1:]
    labels = args.labels or path_labels(paths)
    if len(labels) != len(paths):
        raise GeometryError(f"--labels gives {len(labels)} labels for {len(paths)} runs")
    runs = [Run(label, base, [path]) for label, path in zip(labels, paths, strict=True)]
    return _analyze_and_write(runs, config_from_args(AnalysisConfig, args), args)


def _plot_args(sub) -> None:
    p = sub.add_parser("plot", help="re-render the figures and report of an analysis output directory",
                       description="Read OUT (written by `geometry analyze`) and write its figures/, report.md "
                       "and summary.md anew, without measuring again.")
    p.add_argument("out", metavar="OUT", help="an output directory of `geometry analyze`")
    p.add_argument("--html", action="store_true", help="also report.html: one self-contained file, figures inlined")


def cmd_plot(args) -> int:
    from geometry.offline.outputs import load, write_analysis

    paths = write_analysis(load(args.out), args.out, figures=True, html=args.html)
    print("wrote " + ", ".join(str(p) for p in paths if p.suffix in (".md", ".html")) + f" and {args.out}/figures/")
    return 0


def _demo_args(sub) -> None:
    from geometry.lab.config import StudyConfig

    p = sub.add_parser("demo", help="the miniature study: SFT vs RLVR vs OPD on a tiny LM, analysed and reported",
                       description="Train the three regimes and the paper's controls from the shipped student for "
                       "several seeds, record them with the callback, analyze, and write report.md with a verdict "
                       "per claim of the paper, and figures.")
    p.add_argument("-o", "--out", default="demo-report", help="report directory (default: demo-report)")
    add_config_options(p, StudyConfig)
    _progress_option(p)


def cmd_demo(args) -> int:
    from geometry.lab.config import StudyConfig
    from geometry.lab.report import write_report
    from geometry.lab.study import run_study

    study = run_study(args.out, config_from_args(StudyConfig, args), log=lambda msg: print(msg, flush=True),
                      progress=not args.no_progress)
    path = write_report(study)
    print(f"wrote {path} ({study.seconds / 60:.1f} min)")
    return 0


def _lab_args(sub) -> None:
    p = sub.add_parser("lab", help="tools that build the demo's shipped artifacts")
    lab = p.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    pre = lab.add_parser("pretrain", help="pretrain the demo's student and teacher (seeded) into OUT/{student,teacher}")
    pre.add_argument("--out", default="data", help="where to write student/ and teacher/ (default: data)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--quick", action="store_true", help="a few steps only, for testing the command")


def cmd_lab(args) -> int:
    from geometry.lab.pretrain import main_pretrain

    main_pretrain(args.out, seed=args.seed, quick=args.quick, threads=1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="geometry", description="Parameter-space update geometry of LLM post-training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _analyze_args(sub)
    _compare_args(sub)
    _plot_args(sub)
    _demo_args(sub)
    _lab_args(sub)
    return parser


COMMANDS = {"analyze": cmd_analyze, "compare": cmd_compare, "plot": cmd_plot, "demo": cmd_demo, "lab": cmd_lab}


def main(argv: list[str] | None = None) -> int:
    # Spinning OpenMP threads make torch hundreds of times slower on a busy small machine; set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _received.clear()
    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
                    signal.SIGINT: signal.signal(signal.SIGINT, _raise_interrupted)}
    except ValueError:  # not the main thread: the signals keep their handlers
        previous = {}
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except GeometryError as e:
        if _received:  # a signal raised inside a reader's C call surfaces as that read failing: it was the signal
            return _interrupted(_received[0])
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says it, once
            print(f"geometry: error: {error_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        code = _interrupted(_received[0] if _received else signal.SIGTERM if isinstance(e, _Terminated)
                            else signal.SIGINT)
        threads.leave_if_busy(code)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
