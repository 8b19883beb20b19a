"""A real TensorBoard server on loopback, started with default flags, read over its HTTP data API.

Default flags matter: TensorBoard 2.21 then loads event files with its Rust data server, which
serves only what TensorFlow's own summary ops write (it drops float64 scalars, for one), while
the older Python loader (`--load_fast=false`) and EventAccumulator accept more. A test that reads
summaries through this server sees what a user's `tensorboard --logdir WORKDIR` shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any


class Server:
  """A running TensorBoard; `get` answers its data API as parsed JSON."""

  def __init__(self, url: str, process: subprocess.Popen, log_path: str):
    self.url, self._process, self._log_path = url, process, log_path

  def get(self, route: str, **query: Any) -> Any:
    address = f"{self.url}/data/{route}"
    if query:
      address += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(address, timeout=30) as response:
      return json.loads(response.read())

  def post(self, route: str, body: Any) -> Any:
    request = urllib.request.Request(
      f"{self.url}/data/{route}",
      data=json.dumps(body).encode(),
      headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
      return json.loads(response.read())

  def wait_for(self, route: str, ready: Callable[[Any], bool], timeout: float = 90.0) -> Any:
    """The answer of `route` once `ready(answer)` holds: the data server loads files in cycles."""
    deadline = time.monotonic() + timeout
    while True:
      answer = self.get(route)
      if ready(answer) or time.monotonic() > deadline:
        return answer
      time.sleep(1.0)

  def log(self) -> str:
    with open(self._log_path) as f:
      return f.read()


@contextlib.contextmanager
def running(logdir: str, log_path: str) -> Iterator[Server]:
  """`tensorboard --logdir LOGDIR` on a free loopback port, no other flag; stopped on exit."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  command = [
    os.path.join(os.path.dirname(sys.executable), "tensorboard"),
    "--logdir",
    logdir,
    "--host",
    "127.0.0.1",
    "--port",
    str(port),
  ]
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
  server = Server(f"http://127.0.0.1:{port}", process, log_path)
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        server.get("runs")
        break
      except OSError:
        if process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"TensorBoard did not start:\n{server.log()}") from None
        time.sleep(0.5)
    yield server
  finally:
    process.terminate()
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
