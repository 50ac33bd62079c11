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


def read_json(path, error=JaxgenError, fix: str = "fix or regenerate it"):
    """The JSON object in the file `path`; `error` naming the file and `fix` when it is not one."""
    import json
    import pathlib
    path = pathlib.Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value
