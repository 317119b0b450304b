"""Run logging: a progress bar on a terminal, plain lines otherwise, and metrics.jsonl.

Only the main rank logs; elsewhere every method is a no-op.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, is_main: bool = True,
                 progress: bool = True):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        if is_main and progress and sys.stdout.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def info(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl and show it."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if echo:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            self.info(f"step {step}: {text}")

    def advance(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
