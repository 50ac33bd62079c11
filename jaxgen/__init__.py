"""jaxgen: every generation paradigm on one JAX backbone.

Public modules: config, model, layouts, attention, cache, decoding, objectives, samplers, training, data,
parallel, hf. See README.md and DESIGN.md.
"""
from jaxgen import (attention, cache, config, data, decoding, errors, hf, layouts, model, objectives,  # noqa: F401
                    parallel, samplers, training)
from jaxgen.errors import JaxgenError  # noqa: F401

__version__ = "0.1.0"
