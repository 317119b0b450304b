"""The ``flowscale`` command: train, eval, sample."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from importlib.metadata import distributions, entry_points
from pathlib import Path

from .config import CONFIG_DIR, ConfigError, config_summary, describe_fields, list_configs, load_config
from .distributed import is_main_process


def _fields_epilog() -> str:
    lines = ["config fields (set in the YAML file or as section.field=value overrides):", ""]
    for name, default, doc in describe_fields():
        lines.append(f"  {name} = {default}")
        lines.extend(textwrap.wrap(doc, width=92, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """flowscale's argument parser: every command and sub-command takes ``--debug``, and
    positionals may follow options (``flowscale train demo --no-resume train.steps=1``).

    argparse hands a positional list its strings only up to the first option; the strings after
    it would be "unrecognized arguments". A parser without sub-commands therefore parses with
    :meth:`parse_known_intermixed_args`, argparse's own two-pass mode (options first, then the
    positionals in their order), which it refuses for parsers with sub-commands; those parse as
    usual and hand the rest to the sub-command's parser, itself a ``_Parser``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a sub-command's parser sets ``debug`` only when given, so a `--debug` before
        # the sub-command is not overwritten by its default (main reads it with getattr).
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the Python traceback of an expected error (also FLOWSCALE_DEBUG=1)")

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False) or any(
                a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._actions if not a.option_strings):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args for its two passes
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


COMMANDS = "flowscale.commands"
"""The entry-point group through which packages outside the library add sub-commands: each entry
is a function ``add(subparsers)`` that adds its parser and sets ``func``. flowscale's own
distribution declares ``submit`` (launch.submit) and ``prep`` (data_prep.cli) there, so the
library never imports launch/ or data_prep/; they import the library."""

TOOLS = {"plan": "flowscale.tools.plan:add_parser", "bench": "flowscale.tools.bench:add_command",
         **{name: "flowscale.tools.latent_cli:add_parsers" for name in ("encode", "interpolate", "manipulate", "sweep")}}
"""The library's own tool commands -> the function that adds their parsers (imported lazily)."""


def plugin_commands() -> dict:
    """name -> entry point of every command in the :data:`COMMANDS` group. importlib's
    ``entry_points()`` reads one distribution per name, the first on sys.path, so a stale
    ``flowscale.egg-info`` in the working directory (left by an old ``setup.py develop``) would
    hide the installed flowscale's commands; every flowscale found on sys.path is read too."""
    found = {ep.name: ep for ep in entry_points(group=COMMANDS)}
    for dist in distributions(name="flowscale"):
        for ep in dist.entry_points.select(group=COMMANDS):
            found.setdefault(ep.name, ep)
    return found


BUILTIN = ("train", "eval", "sample", "bound")
"""The commands defined here (no tool is imported for them)."""


def _load(where: str):
    module, _, attr = where.partition(":")
    return getattr(importlib.import_module(module), attr)


def _command_named(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names, if it is a tool or a plug-in command (None otherwise: load them all)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return None
    known = set(TOOLS) | set(plugin_commands())
    return words[0] if words[0] in known or words[0] in BUILTIN else None


CONFIG_ARG = "[CONFIG] [section.field=value ...]"
CONFIG_HELP = ("optional config: a bundled config's name (see --list-configs) or a YAML file; "
               "then dotted overrides")


class _ListConfigs(argparse.Action):
    """``--list-configs``: print the bundled configs and exit, like ``--help``."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the bundled configs (name and what it is) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        configs = list_configs()
        print(f"bundled configs ({CONFIG_DIR}); pass a name or a YAML path as CONFIG:")
        width = max(map(len, configs), default=0)
        for name, path in configs.items():
            print(f"  {name:<{width}}  {config_summary(path)}")
        parser.exit(0)


def add_config_args(parser: argparse.ArgumentParser, help_suffix: str = "") -> None:
    parser.add_argument("args", nargs="*", metavar=CONFIG_ARG, help=CONFIG_HELP + help_suffix)
    parser.add_argument("--list-configs", action=_ListConfigs)


def split_config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """The first positional is the config (a file or a bundled name) unless it is an override (contains '=')."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def cmd_train(ns) -> int:
    from .divergence import rollback_summary
    from .train import main

    path, overrides = split_config_and_overrides(ns.args)
    cfg = load_config(path, overrides)
    result = main(cfg, resume=not ns.no_resume, resume_from=ns.resume, trust_checkpoint=ns.trust_checkpoint)
    test = result.get("test_bpd")
    if is_main_process():
        print(f"done: step {result['step']}" + (f", test bits/dim {test:.4f}" if test is not None else "")
              + rollback_summary(result.get("rollbacks", [])))
    return 0


def cmd_eval(ns) -> int:
    from .data import eval_split
    from .evaluate import evaluate_bpd
    from .build import pick_device
    from .checkpoint import load_trained

    from .distributed import cleanup, dist_env, init_distributed

    # Under torchrun/Slurm with several processes, every rank scores a share of the split.
    multi = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1
    info = init_distributed() if multi else dist_env()
    try:
        device = pick_device(ns.device, field="--device")
        if multi and device.type == "cuda":
            device = __import__("torch").device("cuda", info.local_rank)
        flow, cfg = load_trained(ns.checkpoint, device)
        images = eval_split(cfg.data, ns.split)  # streamed from the split's shards
        bpd = evaluate_bpd(flow, images, cfg.data.n_bits, ns.batch_size or cfg.data.batch_size, device, seed=ns.seed,
                           rank=info.rank, world_size=info.world_size)
        if info.is_main:
            print(f"{ns.split} bits/dim: {bpd:.4f} ({len(images)} images, {cfg.data.n_bits}-bit, "
                  f"{cfg.data.image_size}px, {info.world_size} rank(s))")
    finally:
        if multi:
            cleanup()
    return 0


def cmd_sample(ns) -> int:
    from .sample import sample_grid
    from .build import pick_device
    from .checkpoint import load_trained

    device = pick_device(ns.device, field="--device")
    flow, cfg = load_trained(ns.checkpoint, device)
    shapes = flow.latent_shapes(cfg.data.channels, cfg.data.image_size)
    out = ns.out or str(Path(ns.checkpoint if Path(ns.checkpoint).is_dir() else Path(ns.checkpoint).parent.parent)
                        / "samples" / "cli_samples.png")
    path = sample_grid(flow, shapes, cfg.data.n_bits, ns.temperatures, out, n_per_row=ns.n, seed=ns.seed, device=device,
                       denoise_std=cfg.data.noise_std, num_classes=cfg.model.num_classes)
    print(f"wrote {path} (rows: temperatures {ns.temperatures}, {ns.n} samples each)")
    return 0


def cmd_bound(ns) -> int:
    from .analysis.bound import dataset_bound

    path, overrides = split_config_and_overrides(ns.args)
    cfg = load_config(path, overrides)
    try:
        out = dataset_bound(cfg.data, ns.split, ns.max_images, ns.batch_size, ns.seed)
    except ValueError as e:
        print(f"flowscale: error: {e}", file=sys.stderr)
        return 1
    d = cfg.data
    print(f"linear-flow bound: {d.dataset} {ns.split} split, {out['n_images']} images, D={out['n_dims']} "
          f"({d.channels}x{d.image_size}x{d.image_size}), {d.n_bits}-bit")
    print(f"  in-sample  {out['bpd']:.4f} bits/dim  (what a linear flow fitted to these images reaches on them)")
    print(f"  population {out['bpd_population']:.4f} bits/dim  (Wishart-corrected estimate for unseen images)")
    print(f"  covariance eigenvalues {out['min_eig']:.3g} .. {out['max_eig']:.3g}")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``flowscale`` parser for ``argv`` (default: sys.argv[1:]): the training commands always,
    and of the tools and plug-in commands only the one ``argv`` names (all of them when it names
    none, e.g. for ``--help``), so a command imports no tool it does not run."""
    wanted = _command_named(sys.argv[1:] if argv is None else argv)
    # allow_abbrev=False: this parser sees every option of the command line, the sub-command's
    # too, and with abbreviations `submit --local` would be an ambiguous prefix of --local_rank.
    p = _Parser(prog="flowscale", allow_abbrev=False,
                description="Train and use deep multi-scale normalizing flows (NICE, RealNVP, Glow, DLF, Jet, "
                            "TarFlow). Run 'flowscale COMMAND --help' for details. Options, --debug included, "
                            "may come anywhere after COMMAND, and overrides after options.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a flow (no arguments: the demo model on the bundled demo photos)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a flow. Resumes from the newest checkpoint in train.run_dir if there is one.\n\n"
                                   "CONFIG is the name of a bundled config (flowscale train --list-configs) or a "
                                   "YAML file; no CONFIG = the defaults (the demo).\n\n"
                                   "examples:\n  flowscale train\n  flowscale train demo model.levels=2 optim.lr=1e-3\n"
                                   "  flowscale train glow_celebahq256 train.run_dir=runs/celeba256\n"
                                   "  flowscale train my_config.yaml optim.lr=5e-4\n"
                                   "  flowscale train --list-configs",
                       epilog=_fields_epilog())
    add_config_args(t)
    t.add_argument("--no-resume", action="store_true",
                   help="refuse to continue an existing run (fails if train.run_dir holds checkpoints)")
    t.add_argument("--resume", metavar="PATH", default=None,
                   help="continue from this checkpoint (a checkpoints/step_XXXXXXXX directory, or a run directory "
                        "meaning its newest) instead of the newest one in train.run_dir; this run's newer "
                        "checkpoints are moved to checkpoints/superseded-<time>/, not deleted")
    t.add_argument("--trust-checkpoint", action="store_true",
                   help="allow --resume from a checkpoint outside train.run_dir: DeepSpeed checkpoints are pickles "
                        "and loading one runs code, so only for checkpoints from someone you trust")
    # The `deepspeed` launcher appends --local_rank=N; the rank is read from the environment.
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_train)

    for name, helptext in (("eval", "bits/dim of a trained model on a data split"),
                           ("sample", "write a PNG grid of samples at several temperatures")):
        s = sub.add_parser(name, help=helptext, description=helptext)
        s.add_argument("checkpoint", help="a run directory (its newest complete checkpoint is used) or one checkpoint "
                                         "directory, RUN_DIR/checkpoints/step_XXXXXXXX; only its model.safetensors "
                                         "(ema.safetensors when there) and config.yaml are read")
        s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
        s.add_argument("--seed", type=int, default=0, help="seed for dequantisation noise / latent draws (default: 0)")
        if name == "eval":
            s.add_argument("--split", default="test", choices=["test", "train"], help="which split (default: test)")
            s.add_argument("--batch-size", type=int, default=0, help="images per batch (default: data.batch_size)")
            s.set_defaults(func=cmd_eval)
        else:
            s.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8, 1.0],
                           help="one row per temperature (default: 0 0.5 0.7 0.8 1.0)")
            s.add_argument("--n", type=int, default=8, help="samples per temperature (default: 8)")
            s.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/samples/cli_samples.png)")
            s.set_defaults(func=cmd_sample)
    s = sub.add_parser("bound", help="best bits/dim any linear flow with a Gaussian base reaches on a dataset",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The linear-flow bound (Liao & He 2021): D/2 log(2 pi e) + 1/2 sum log eig(Sigma) for the "
                                   "covariance Sigma of the dequantised, scaled data, in bits/dim with the\n"
                                   "discretisation term. Every nonlinear flow should beat it.\n\n"
                                   "examples:\n  flowscale bound\n  flowscale bound dlf_cifar10 --max-images 20000")
    add_config_args(s, " (the data section is used)")
    s.add_argument("--split", default="train", choices=["train", "test"], help="which split (default: train)")
    s.add_argument("--max-images", type=int, default=None, help="use at most this many images (default: all)")
    s.add_argument("--batch-size", type=int, default=256, help="images per read (default: 256)")
    s.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise (default: 0)")
    s.set_defaults(func=cmd_bound)

    for where in dict.fromkeys(TOOLS.values()):  # the library's own tools, imported only when named (or for --help)
        if wanted is None or TOOLS.get(wanted) == where:
            _load(where)(sub)
    for name, ep in plugin_commands().items():  # commands of packages beside the library (launch, data_prep)
        if wanted is None or wanted == name:
            ep.load()(sub)
    return p


# Exit codes of `flowscale` (README, "When things go wrong"). Each expected failure prints one
# line, "flowscale: error: ..." with what to do, on the main rank only; --debug or
# FLOWSCALE_DEBUG=1 shows the traceback instead. Unexpected exceptions keep their traceback.
EXIT_CODES = {
    "ConfigError": 2,            # a config field: its name and what is allowed
    "DataError": 3,              # a shard or sample: the file, the sample and what to do
    "CheckpointWriteError": 4,   # a checkpoint could not be written (full disk, I/O)
    "RunDirLocked": 5,           # another live run holds train.run_dir
    "Preempted": 75,             # stopped by a signal after saving the step reached: rerun to resume
}
EXIT_OTHER = 1                   # missing file, existing run with --no-resume, untrusted checkpoint, NaN loss, unsupported DeepSpeed


def _one_line(e: BaseException) -> str:
    """The user-facing sentence of an expected error. An exception re-raised from a DataLoader
    worker carries the worker's traceback in its message: keep its last line, the sentence."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


def _expected(e: BaseException) -> int | None:
    from .checkpoint import CheckpointWriteError
    from .data import DataError
    from .deepspeed_universal import UnsupportedDeepSpeed
    from .lock import RunDirLocked
    from .preemption import Preempted

    for cls in (ConfigError, DataError, CheckpointWriteError, RunDirLocked, Preempted):
        if isinstance(e, cls):
            return EXIT_CODES[cls.__name__]
    if isinstance(e, (FileNotFoundError, FileExistsError, FloatingPointError, PermissionError, UnsupportedDeepSpeed)):
        return EXIT_OTHER
    return None


def main(argv: list[str] | None = None) -> int:
    ns = build_parser(argv).parse_args(argv)
    debug = getattr(ns, "debug", False) or os.environ.get("FLOWSCALE_DEBUG", "") not in ("", "0")
    try:
        return ns.func(ns)
    except Exception as e:  # noqa: BLE001 - sorted into expected (one line) and unexpected (traceback)
        code = _expected(e)
        if code is None or debug:
            raise
        if is_main_process():
            kind = "preempted" if code == EXIT_CODES["Preempted"] else "error"
            print(f"flowscale: {kind}: {_one_line(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
