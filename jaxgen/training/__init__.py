"""Training: state and optimizer (`state`), the resumable loop (`loop`), run folders (`runs`),
orbax checkpoints (`checkpoint`) and the Learn2PD filter fitting (`filter_fit`)."""
from jaxgen.training import checkpoint, filter_fit, loop, runs, state  # noqa: F401
from jaxgen.training.loop import read_metrics, train  # noqa: F401
from jaxgen.training.runs import load_run  # noqa: F401
