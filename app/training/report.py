"""What `vsearch train` prints while it runs: JSON lines that read well in a log file.

A training run takes tens of minutes; when its output goes to a file (nohup, a CI job, a
scheduler), a progress bar shows nothing until the end and block-buffered output can hold
back even the epoch results. Every line here is one JSON object, written and flushed at
once: a `start` line, a `progress` line at most every `interval_s` seconds during an
epoch, and an `epoch` line with the loss and validation figures after each epoch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TextIO


class TrainingLog:
    """Writes the JSON lines; its methods are the callbacks `train()` takes.

    Args:
        out: Where the `epoch` lines go (the results a script reads: stdout).
        progress: Where the `start` and `progress` lines go (stderr), or None to leave
            step progress to something else (a progress bar on a terminal).
        interval_s: Least time between two `progress` lines.
        clock: Monotonic seconds (a parameter so that tests need not sleep).
    """

    def __init__(
        self,
        out: TextIO,
        progress: TextIO | None,
        *,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.progress = progress
        self.interval_s = interval_s
        self.clock = clock
        self.last = clock()
        self.epoch_started = self.last

    @staticmethod
    def _write(stream: TextIO, event: str, fields: dict[str, Any]) -> None:
        stream.write(json.dumps({"event": event, **fields}) + "\n")
        stream.flush()

    def start(self, info: dict[str, Any]) -> None:
        self.last = self.epoch_started = self.clock()
        if self.progress is not None:
            self._write(self.progress, "start", info)

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        now = self.clock()
        if step == 1:
            self.epoch_started = now
        if self.progress is None or now - self.last < self.interval_s:
            return
        self.last = now
        elapsed = now - self.epoch_started
        fields: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "steps": steps,
            "loss": round(loss, 4),
            "epoch_seconds": round(elapsed, 1),
        }
        if step > 1:
            fields["epoch_eta_seconds"] = round(elapsed / (step - 1) * (steps - step), 1)
        self._write(self.progress, "progress", fields)

    def epoch(self, epoch: int, record: dict[str, Any]) -> None:
        self.last = self.clock()
        self._write(self.out, "epoch", record)

    def done(self, summary: dict[str, Any]) -> None:
        self._write(self.out, "done", summary)
