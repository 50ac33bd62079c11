"""Orbax checkpoints of the train state: atomic saves, keep-last-N, strict resume.

Orbax writes each step into a temporary folder and renames it when complete, so a crash never
leaves a half-written step that looks finished. On resume we refuse to start from scratch when
the folder holds checkpoint data we cannot restore: the user decides (fix or remove it).
"""
from __future__ import annotations

import pathlib

import orbax.checkpoint as ocp

from jaxgen.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        step = self._manager.latest_step()
        leftovers = [p.name for p in self.directory.iterdir()] if self.directory.exists() else []
        if step is None and leftovers:
            raise CheckpointError(
                f"{self.directory} holds {sorted(leftovers)[:5]} but no complete checkpoint; a save was "
                "interrupted or the folder is corrupt. Remove that folder (or pass --fresh) to start from scratch")
        return step

    def save(self, step: int, state) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises several types for missing / truncated files
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: {e}. "
                f"Delete {self.directory / str(step)} to resume from the previous one, or pass --fresh") from None

    def close(self):
        self._manager.close()
