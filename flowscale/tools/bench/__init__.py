"""``flowscale bench NAME``: benchmark commands that print a table (and write files).

Each benchmark is a module here with ``add_parser(subparsers)`` that registers its
sub-command and sets ``func``; list it in ``BENCHMARKS``.
"""

BENCHMARKS = ["memory", "step", "loader", "converge", "gpu", "reference", "zero", "reproduce"]


def add_parsers(subparsers) -> None:
    import importlib

    for name in BENCHMARKS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)


def add_command(subparsers) -> None:
    """``flowscale bench``: one sub-command per benchmark."""
    b = subparsers.add_parser("bench", help="benchmarks that print a table (memory, ...)",
                              description="Benchmarks. Each prints a table; ratios are measured side by side in one run.")
    add_parsers(b.add_subparsers(dest="bench", required=True, metavar="BENCHMARK"))
