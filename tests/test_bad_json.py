"""A JSON file jaxgen reads that is damaged gets a jaxgen error naming the file and the fix."""
import pytest

from jaxgen import hf
from jaxgen.errors import CheckpointError, HFFormatError, read_json
from jaxgen.samplers import learn2pd
from jaxgen.training import runs


@pytest.mark.parametrize("text, found", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list")])
def test_hf_config_json_that_is_not_an_object(tmp_path, text, found):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(HFFormatError, match=f"config.json {found}.*config.json"):
        hf.load(tmp_path)


def test_run_and_filter_json(tmp_path):
    (tmp_path / "run_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="run_config.json is not valid JSON"):
        runs.load_run(tmp_path)
    (tmp_path / "filter.json").write_text("")
    with pytest.raises(ValueError, match="filter.json is not valid JSON.*refit"):
        learn2pd.load_filter(tmp_path)


def test_read_json_returns_the_object(tmp_path):
    (tmp_path / "a.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "a.json") == {"a": 1}
