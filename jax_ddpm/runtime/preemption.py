"""Preemption notices: whether SIGTERM has arrived, agreed on by every process of a run.

A Cloud TPU or spot VM is given a SIGTERM some seconds before it is taken away. The training loop
then writes a checkpoint of the step in flight and exits with status 0; the same command resumes
from it. With several processes JAX's preemption service catches the signal and picks a step that
every process reaches, so all of them save the same one.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """Whether a preemption notice (SIGTERM) has arrived, agreed on by every process.

  With several processes JAX's preemption service catches SIGTERM and picks a step that all
  processes reach (`reached_preemption_sync_point`); a single process installs its own handler.
  """

  def __init__(self):
    self._received = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._received = True

  def pending(self) -> bool:
    """A notice this process has seen and not yet acted on: with one process, whether SIGTERM
    arrived; with several, False (they agree on a step only at the step boundaries)."""
    return jax.process_count() == 1 and self._received

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
