"""jaxgen's errors. All are ValueError subclasses so callers can catch one family."""


class JaxgenError(ValueError):
    """Base class: a user-caused problem, with a message naming the value and the fix."""


class ConfigError(JaxgenError):
    """A bad config key, value or preset."""


class ShardingError(JaxgenError):
    """A mesh or logical-axis rule that cannot place an array."""


class CheckpointError(JaxgenError):
    """A checkpoint that is missing, partial or corrupt."""


class HFFormatError(JaxgenError):
    """A Hugging Face directory that is missing, incomplete or unsupported."""
