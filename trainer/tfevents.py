"""TensorBoard event files, written directly: scalars only, no TensorFlow, protobuf or torch.

An event file is a sequence of records, each `length (u64) | crc(length) (u32) | data |
crc(data) (u32)`, little-endian, with crc the masked CRC-32C of TFRecord. `data` is an `Event`
protocol buffer; the few fields used here are encoded by hand:

  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
            SessionLog session_log = 7; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }
  SessionLog { SessionStatus status = 1; }  (START = 1)

A SessionLog START at step s tells TensorBoard's reader to drop the events of steps >= s written
before it: a resumed run writes one, so the steps it repeats are not shown twice.

(tensorboardX would do the same, but importing it imports torch when torch is installed: three
seconds on every start.) Each write is flushed, so a crash loses at most the record being written,
which TensorBoard's reader skips.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64s take ten bytes, as protobuf writes them
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  key = _varint(number << 3 | wire_type)
  if wire_type == 2:  # length-delimited
    return key + _varint(len(payload)) + payload
  return key + payload


def scalar_event(step: int, scalars: dict[str, float], wall_time: float) -> bytes:
  values = b"".join(
      _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
      for tag, value in scalars.items())
  return (_field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
          + _field(5, 2, values))


def record(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc(length)) + data
          + struct.pack("<I", masked_crc(data)))


class EventWriter:
  """Appends scalar events to a new `events.out.tfevents.TIME.HOST` file in `logdir` (a new one
  again if that file is deleted while the run goes on)."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._open()

  def _open(self) -> None:
    os.makedirs(self.logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(self.logdir,
                             f"events.out.tfevents.{int(now)}.{socket.gethostname()}")
    self.file = open(self.path, "ab")
    self.file.write(record(_field(1, 1, struct.pack("<d", now)) + _field(3, 2, b"brain.Event:2")))

  def _write(self, event: bytes) -> None:
    if not os.path.exists(self.path):
      self.file.close()
      self._open()
    self.file.write(record(event))
    self.file.flush()

  def restart(self, step: int) -> None:
    """SessionLog START at `step`: TensorBoard forgets the earlier events of steps >= step."""
    self._write(_field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
                + _field(7, 2, _field(1, 0, _varint(1))))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(scalar_event(step, values, time.time()))

  def close(self) -> None:
    self.file.close()
