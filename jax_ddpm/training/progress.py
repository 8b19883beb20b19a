"""A run's progress: steps per second and uptime as summaries, an ETA in the log, and the share of
time spent in named sections (sampling, measuring), every log interval.

CLU's ReportProgress does this where CLU imports; CLU's periodic actions load TensorFlow (through
clu.metric_writers), so without TensorFlow this module's `ReportProgress` writes the same scalars
(steps_per_sec, uptime) to the same writer and logs the same line: a run needs no TensorFlow.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from absl import logging


def reporter(num_train_steps: int, writer: Any, every_steps: int):
  """CLU's ReportProgress where CLU imports, else this module's."""
  try:
    from clu import periodic_actions  # noqa: PLC0415 (it loads TensorFlow, which may be absent)
  except ImportError:
    return ReportProgress(num_train_steps, writer, every_steps)
  return periodic_actions.ReportProgress(
    num_train_steps=num_train_steps, writer=writer, every_steps=every_steps
  )


class ReportProgress:
  """`report(step)` after each dispatch; `with report.timed("eval"): ...` around a section."""

  def __init__(self, num_train_steps: int, writer: Any, every_steps: int):
    self._total, self._writer, self._every = num_train_steps, writer, every_steps
    self._start = time.monotonic()
    self._previous = None  # (step, time) of the last report
    self._sections: dict[str, float] = {}

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._previous is None:
      self._previous = (step, now)
      return
    if step % self._every and step != self._total:
      return
    rate = (step - self._previous[0]) / max(now - self._previous[1], 1e-9)
    self._previous = (step, now)
    self._writer.write_scalars(step, {"steps_per_sec": rate})
    self._writer.write_scalars(step, {"uptime": now - self._start})
    eta = (self._total - step) / rate if rate > 0 else float("inf")
    shares = ", ".join(
      f"{100 * seconds / (now - self._start):.1f}% {name}"
      for name, seconds in self._sections.items()
    )
    logging.info(
      "%.1f steps/s, %.1f%% (%d/%d), ETA: %.0f min%s",
      rate,
      100 * step / self._total,
      step,
      self._total,
      eta / 60,
      f" ({shares})" if shares else "",
    )

  @contextlib.contextmanager
  def timed(self, name: str):
    started = time.monotonic()
    try:
      yield
    finally:
      self._sections[name] = self._sections.get(name, 0.0) + time.monotonic() - started
