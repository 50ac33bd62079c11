"""Watching a decoder work: the canvas after every step of a sampler, printed and plotted.

`record_canvases` runs samplers with a recording step: after each iteration of the decode loop
the canvas is sent to the host (`jaxgen.decoding.loop.observe_steps`), so a run inside it is the
sampler's own jitted program, same key, same arithmetic, plus a copy of the
canvas per step: its final frame is the tokens the sampler returns. From the frames:
`commit_steps` (the step at which each generated position stopped being MASK), `step_table`
(one text line per step, MASK shown as MASK_GLYPH) and `plot_unmasking` (a PNG of the order).
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from jaxgen.decoding import loop

MASK_GLYPH = "░"
VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥"}  # whitespace made visible in tables and plots
UNPRINTABLE = "¿"  # a token that decodes to nothing printable alone (a control byte, part of a UTF-8 sequence)


@dataclasses.dataclass
class Frame:
    step: int  # loop iterations so far (1 = after the first step)
    nfe: int  # model forwards so far
    tokens: np.ndarray  # [B, T] the canvas after this step


@contextlib.contextmanager
def record_canvases():
    """Within the block, each decode-loop step of any sampler appends a `Frame` to the yielded
    list (`jaxgen.decoding.loop.observe_steps`)."""
    frames: list[Frame] = []

    def record(step, nfe, tokens):
        frames.append(Frame(int(step), int(nfe), np.asarray(tokens)))

    with loop.observe_steps(record):
        yield frames


def generated(frames, row: int, start: int, length: int) -> np.ndarray:
    """[steps, length]: each frame's canvas of `row`, columns [start, start + length)."""
    return np.stack([f.tokens[row, start:start + length] for f in frames])


def commit_steps(canvases, mask_id: int) -> np.ndarray:
    """[length]: for each column of `canvases` ([steps, length] of generated positions, as
    `generated`; all MASK before step 1), the 1-based step after which it first holds a token
    other than MASK (-1: still MASK after the last step)."""
    masked = np.asarray(canvases) == mask_id
    return np.where(masked[-1], -1, np.argmax(~masked, axis=0) + 1)


def token_text(tokenizer, token: int, mask_id: int) -> str:
    """One token as visible text, at least one character wide: MASK_GLYPH for MASK, whitespace
    made visible, UNPRINTABLE for characters that print as nothing (or as U+FFFD)."""
    if token == mask_id:
        return MASK_GLYPH
    text = "".join(VISIBLE.get(c, c if c.isprintable() and c != "\ufffd" else UNPRINTABLE)
                   for c in tokenizer.decode([token]))
    return text or UNPRINTABLE


def step_table(frames, canvases, tokenizer, mask_id: int) -> list[str]:
    """One line per step (after a line of the all-MASK start): step, NFE so far, tokens committed
    at it, and the canvas (`canvases`, as `generated`) as text."""
    lines = [f"{'step':>4} {'NFE':>4} {'new':>3}  canvas ({MASK_GLYPH} = MASK, · space, ↵ newline)",
             f"{0:>4} {'':>4} {'':>3}  {MASK_GLYPH * np.shape(canvases)[1]}"]
    previous = None
    for frame, canvas in zip(frames, canvases):
        new = int(np.sum(canvas != mask_id) - (0 if previous is None else np.sum(previous != mask_id)))
        text = "".join(token_text(tokenizer, int(t), mask_id) for t in canvas)
        lines.append(f"{frame.step:>4} {frame.nfe:>4} {new:>3}  {text}")
        previous = canvas
    return lines


def plot_unmasking(traces: dict, path, columns: int = 16) -> None:
    """A PNG per decoder (one row of panels each): left, the canvas over the steps (row = step,
    column = generated position, coloured by the step at which it was committed, blank while
    MASK); right, the final tokens laid out `columns` to a line, each cell coloured by its commit
    step. traces: name -> dict(commit_steps=[L], texts=[L] visible token texts, title=str)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(traces)
    fig, axes = plt.subplots(n, 2, figsize=(14, 3.4 * n), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1.6]})
    for (name, t), (left, right) in zip(traces.items(), axes):
        steps = np.asarray(t["commit_steps"])
        last = max(1, int(steps.max()))
        over_steps = np.where(steps[None, :] <= np.arange(1, last + 1)[:, None], steps[None, :], np.nan)
        im = left.imshow(over_steps, aspect="auto", cmap="viridis", vmin=1, vmax=last, interpolation="nearest",
                         extent=(-0.5, len(steps) - 0.5, last + 0.5, 0.5))
        left.set_xlabel("generated position")
        left.set_ylabel("step")
        left.set_title(f"{name}: canvas after each step (blank = MASK)", fontsize=9)
        rows = -(-len(steps) // columns)
        grid = np.full((rows, columns), np.nan)
        grid.flat[:len(steps)] = steps
        right.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=last, interpolation="nearest")
        for i, (text, step) in enumerate(zip(t["texts"], steps)):
            r, c = divmod(i, columns)
            light = (step - 1) / max(1, last - 1) > 0.6  # viridis turns yellow: dark text there
            right.text(c, r, text[:6], ha="center", va="center", fontsize=7, family="monospace",
                       color="black" if light else "white")
        right.set_xticks([])
        right.set_yticks([])
        right.set_title(t.get("title", name) + "  (colour: step committed)", fontsize=9)
        fig.colorbar(im, ax=[left, right], label="step", fraction=0.02)
    fig.savefig(path, dpi=100)
    plt.close(fig)
