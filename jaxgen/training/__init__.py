"""Training: state and optimizer (`state`), the resumable loop (`loop`), what a run trains
(`families`: a language model, a flow-matching velocity net, a continuous-token AR model), run
folders (`runs`), orbax checkpoints (`checkpoint`), the model's vocabulary from the tokenizer
(`vocab`), resume and divergence guards (`guards`) and the Learn2PD filter fitting (`filter_fit`)."""
from jaxgen.training import checkpoint, families, filter_fit, guards, loop, runs, state, vocab  # noqa: F401
from jaxgen.training.loop import read_metrics, train  # noqa: F401
from jaxgen.training.runs import load_run  # noqa: F401
