"""What keeps a run honest: resuming only the run that was started, and never saving a diverged one.

- `check_resume`: a folder holding checkpoints is resumed only with the train config it was
  started with (so that a stopped and resumed run still ends bit-for-bit where an uninterrupted
  one ends). Fields that change how, not what, a run computes (cadences, mesh, rules, gradient
  accumulation, the tfds cache folder) may change. Growing `steps` is allowed only explicitly
  (`extend=True`, `jaxgen train --extend`): the rest of the run then follows the new schedule.
- `NonFinite`: a device-side flag over every step's loss and gradient norm, checked before each
  log and checkpoint, so a run whose loss went NaN or inf stops with an error and keeps its last
  finite checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

import jax.numpy as jnp

from jaxgen.errors import CheckpointError, JaxgenError, read_json
from jaxgen.training.runs import train_config_from_record

# TrainConfig fields a resumed run may change: they steer logging, checkpoint cadence, placement and
# the data cache's location, not the math (mesh, rules and grad_accum change float rounding only)
RESUME_FREE = ("log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "progress", "data_dir",
               "mesh", "rules", "grad_accum")


def saved_steps(ckpt_dir) -> list[int]:
    """The complete checkpoint steps in a checkpoints folder (orbax names them by step)."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []


def schedule_text(tcfg) -> str:
    """The learning-rate schedule of tcfg in words (as `state.make_optimizer` builds it)."""
    warmup = min(tcfg.warmup_steps, max(tcfg.steps - 1, 0))
    return (f"linear warmup over {warmup} steps to lr={tcfg.lr:g}, then cosine decay to "
            f"{tcfg.lr * tcfg.min_lr_ratio:g} at step {max(tcfg.steps, tcfg.warmup_steps + 1)}")


def check_resume(out, tcfg, *, extend: bool = False) -> tuple[list, dict | None]:
    """Refuse to resume the run in `out` (its latest checkpoint, under the train config of its
    run_config.json) with a `tcfg` that differs beyond RESUME_FREE. Returns the run's extension
    records to keep in run_config.json and, when `extend` grows `steps`, the new one
    ({"at_step", "from_steps", "to_steps", "schedule"}; else None). Nothing to resume: ([], None)."""
    out = pathlib.Path(out)
    steps = saved_steps(out / "checkpoints")
    if not steps or not (out / "run_config.json").exists():
        return [], None
    record = read_json(out / "run_config.json", CheckpointError, "fix it or start over with --fresh")
    previous, kept = train_config_from_record(record["train"]), list(record.get("extensions", []))
    diff = {f.name: (getattr(previous, f.name), getattr(tcfg, f.name)) for f in dataclasses.fields(tcfg)
            if f.name not in RESUME_FREE and getattr(previous, f.name) != getattr(tcfg, f.name)}
    if not diff:
        return kept, None
    latest = steps[-1]
    listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
    head = f"{out} holds a run (checkpoint at step {latest}) trained with another config: {listed} (the run's -> yours)"
    if set(diff) != {"steps"}:
        raise CheckpointError(f"{head}. Resuming it so would break its bit-for-bit resume: resume with the run's "
                              "values, pass --fresh (fresh=True) to discard its checkpoints and metrics and start "
                              "over, or train into another --out")
    if not extend:
        raise CheckpointError(f"{head}. To continue this run to {tcfg.steps} steps pass --extend (extend=True): from "
                              f"step {latest} its learning rate follows the {tcfg.steps}-step schedule "
                              f"({schedule_text(tcfg)}); or pass --fresh (fresh=True) to start over")
    if tcfg.steps <= latest:
        raise CheckpointError(f"{head}: the run is already at step {latest}, so it cannot be extended to "
                              f"{tcfg.steps} steps; pass steps > {latest}, or --fresh (fresh=True) to start over")
    new = {"at_step": latest, "from_steps": previous.steps, "to_steps": tcfg.steps, "schedule": schedule_text(tcfg)}
    return kept + [new], new


def extension_note(out, extension: dict, schedule) -> str:
    """What an extension does, in words (printed when a run is extended)."""
    at = extension["at_step"]
    return (f"extending {out} from {extension['from_steps']} to {extension['to_steps']} steps at step {at}: from "
            f"here its learning rate follows {extension['schedule']} (lr at step {at + 1}: {float(schedule(at)):.3g}); "
            f"steps up to {at} followed the {extension['from_steps']}-step schedule, so the run differs from one "
            f"trained for {extension['to_steps']} steps from scratch")


class NonFinite:
    """Whether every step's loss and gradient norm so far was finite, kept on the device (no sync
    per step) and read only when the loop logs or checkpoints."""

    def __init__(self, last_good: int):
        self.flag = jnp.bool_(True)
        self.last_good = last_good  # the last step known finite (checked)

    def update(self, metrics) -> None:
        self.flag = self.flag & jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])

    def finite(self, step: int) -> bool:
        """Whether every step up to `step` was finite (syncs with the device)."""
        if bool(self.flag):
            self.last_good = step
            return True
        return False

    def error(self, step: int, tcfg, last_saved: int | None, loss: float | None = None) -> JaxgenError:
        """The error that stops a run whose loss went non-finite by `step`: the steps, the last
        checkpoint and the fixes."""
        value = "" if loss is None or math.isfinite(loss) else f" (loss {loss} at step {step})"
        saved = f"its last checkpoint is step {last_saved}" if last_saved else "no checkpoint was written"
        return JaxgenError(
            f"training diverged: the loss or gradient norm became non-finite between steps {self.last_good + 1} and "
            f"{step}{value}; stopped without checkpointing it ({saved}). Lower lr (lr={tcfg.lr:g}), lengthen "
            f"warmup_steps ({tcfg.warmup_steps}) or tighten grad_clip ({tcfg.grad_clip:g}), check that the data's "
            "token ids fit the model, then start over with --fresh (fresh=True) or another --out")
