"""Checkpoints with orbax: the train state and the data iterator's position, saved together,
asynchronously (training goes on while the previous step is written) and atomically (orbax writes
to a temporary folder and renames it when complete), keeping the last K steps."""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from trainer.errors import UserError


class Checkpointer:
  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any]) -> None:
    """Starts writing `step` (asynchronously). Refused, with the newest complete checkpoint
    named, when the file system has less room than the whole state (process 0 looks, and every
    process stops with it: a shared file system holds all their shards)."""
    need = sum(x.nbytes for x in jax.tree.leaves(state))
    full = shutil.disk_usage(self.directory).free < need
    if jax.process_count() > 1:
      full = bool(multihost_utils.broadcast_one_to_all(np.int32(full)))
    if full:
      self.wait()
      raise disk_full(self.directory)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore_latest(self, abstract_state: dict[str, Any], log=print):
    """(step, state, data state) of the newest checkpoint that reads back whole, or None when
    there is none. One that does not (a truncated or corrupted file) is reported by its folder,
    moved aside to `<step>.unreadable` (so that the step can be written again) and the one before
    it is tried."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = self.manager.item_metadata(step)["state"]
      except Exception:  # noqa: BLE001 -- unreadable metadata: a damaged checkpoint, below
        saved = None
      if saved is not None:  # written by another configuration: refuse, touch nothing
        difference = _difference(_shapes(saved), _shapes(abstract_state))
        if difference:
              raise UserError(f"checkpoint {os.path.join(self.directory, str(step))} holds another "
                          f"train state than this configuration makes ({difference}); use a new "
                          "workdir, or the configuration that wrote it")
      try:
        return (step, *self.restore(step, abstract_state))
      except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint: fall back to the previous
        folder = os.path.join(self.directory, str(step))
        log(f"checkpoint {folder} cannot be read ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); moved to {folder}.unreadable, trying the one "
            "before it")
        if jax.process_index() == 0 and os.path.isdir(folder):
          os.replace(folder, f"{folder}.unreadable")
        self.manager.reload()
    if self.manager.all_steps():
      raise UserError(f"no checkpoint in {self.directory} can be read; move the folder away to "
                      "start again")
    return None

  def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """`abstract_state`: ShapeDtypeStructs carrying the target shardings."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()



def read_params(directory: str, step: int, abstract_params, key: str = "params"):
  """One model's parameters (the state's `key`) from the checkpoint of `step`, placed as
  `abstract_params` (ShapeDtypeStructs with shardings) says; nothing else of the state (no
  optimizer moments) is read. For export and sampling, which need no train state."""
  manager = ocp.CheckpointManager(
      os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False),
      item_names=("state", "data"),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
  try:
    target = {key: abstract_params}
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    manager.close()
  return out.state[key]


def disk_full(directory: str) -> UserError:
  """A full file system, in one line naming the newest complete checkpoint in `directory` (a
  step folder renamed into place: orbax writes each under a temporary name first)."""
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) \
      if os.path.isdir(directory) else []
  newest = (f"the newest complete checkpoint is step {steps[-1]} ({directory}/{steps[-1]})"
            if steps else "no complete checkpoint was written")
  return UserError(f"no space left on the device of {directory}; {newest}: free some space and "
                   "rerun the same command to resume from it")


def no_space(e: BaseException | None) -> bool:
  """Whether `e` (or what it was raised from) is a full disk or quota."""
  while e is not None:
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _shapes(tree) -> dict[str, tuple]:
  """'a/b/0/mu' -> shape for every leaf; namedtuple fields and dict keys alike (orbax's metadata
  turns the optimizer's namedtuples into dicts)."""
  def name(entry):
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))
  return {"/".join(name(e) for e in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _difference(saved: dict, wanted: dict) -> str:
  """What differs between two `_shapes`, in a few words ("" when nothing)."""
  out = []
  for label, keys in (("not in the checkpoint", sorted(set(wanted) - set(saved))),
                      ("only in the checkpoint", sorted(set(saved) - set(wanted)))):
    if keys:
      out.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
  shapes = [k for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  if shapes:
    k = shapes[0]
    out.append(f"{k} is {saved[k]} there and {wanted[k]} here")
  return "; ".join(out)
