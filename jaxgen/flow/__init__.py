"""Flow matching: schedulers and affine paths, losses and time samplers, ODE solvers,
likelihoods, classifier-free guidance, discrete (mixture-path) flow matching, velocity nets
(`nets`), evaluation metrics (`metrics`), continuous-token AR on the backbone (`continuous_ar`,
`continuous_ar_sampling`) and the seed variants (`variants`: source, blockwise, vecor,
transition, latent).

Time convention everywhere: noise/source x_0 at t=0, data x_1 at t=1 (flow_matching's; spec §0).
Everything is a pure function, jit- and vmap-able; semantics pinned against the reference PyPI
package flow-matching 1.0.10 (with torchdiffeq 0.2.5) in tests/flow.
"""
from jaxgen.flow import discrete, guidance, likelihood, losses, nets, paths, schedulers, solvers
from jaxgen.flow import continuous_ar, continuous_ar_sampling, metrics, variants
from jaxgen.flow.likelihood import log_likelihood
from jaxgen.flow.solvers import METHODS, solve

__all__ = ["discrete", "guidance", "likelihood", "losses", "nets", "paths", "schedulers", "solvers", "solve",
           "log_likelihood", "METHODS", "continuous_ar", "continuous_ar_sampling", "metrics", "variants"]
