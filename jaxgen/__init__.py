"""jaxgen: every generation paradigm on one JAX backbone.

Public modules: config, model, layouts, attention, cache, objectives, samplers, train, data,
parallel, hf. See README.md and DESIGN.md.
"""
from jaxgen import (attention, cache, config, data, errors, hf, layouts, model, objectives, parallel,  # noqa: F401
                    samplers, train)
from jaxgen.errors import JaxgenError  # noqa: F401

__version__ = "0.1.0"
