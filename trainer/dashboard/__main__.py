"""python -m trainer.dashboard --root=DIR [--port=8080] [--host=127.0.0.1]

Serves the dashboard (trainer/dashboard/app.py) over the runs under DIR. On loopback (the
default) anyone on this machine may use it; on any other --host it requires the token printed at
start (open the printed address once: the page keeps it as a cookie).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys

import uvicorn
from absl import app as absl_app, flags

from trainer.dashboard.app import create_app

_ROOT = flags.DEFINE_string("root", None, "the folder whose runs the dashboard shows and where "
                            "it launches new ones")
_PORT = flags.DEFINE_integer("port", 8080, "TCP port")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to bind; any but loopback needs the "
                            "printed token")


def loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def main(argv):
  del argv
  root = _ROOT.value
  if not root or not os.path.isdir(root):
    print(f"error: --root={root}: give an existing folder (it holds the runs)", file=sys.stderr)
    sys.exit(2)
  try:  # a taken port or an address not of this machine: one line, before uvicorn's log
    family = socket.AF_INET6 if ":" in _HOST.value else socket.AF_INET
    with socket.socket(family) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      probe.bind((_HOST.value, _PORT.value))
  except OSError as e:
    print(f"error: --host={_HOST.value} --port={_PORT.value}: {e.strerror or e}", file=sys.stderr)
    sys.exit(2)
  token = None if loopback(_HOST.value) else secrets.token_urlsafe(24)
  where = f"http://{_HOST.value}:{_PORT.value}/"
  print(f"dashboard of {os.path.realpath(root)} at {where}"
        + (f"?token={token}" if token else ""), flush=True)
  uvicorn.run(create_app(root, token), host=_HOST.value, port=_PORT.value, log_level="warning")


if __name__ == "__main__":
  absl_app.run(main)
