"""experiments/reference_parity.py needs the reference checkouts, which CI does not have; what it
can check without them: a wrong path is refused by name before anything runs."""
import importlib.util
import pathlib

import pytest


def load_script():
    path = pathlib.Path(__file__).parents[1] / "experiments" / "reference_parity.py"
    spec = importlib.util.spec_from_file_location("reference_parity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_checkouts_are_named(tmp_path):
    parity = load_script()
    with pytest.raises(SystemExit, match="--fast-dllm .* has no llada/generate.py"):
        parity.main(["--fast-dllm", str(tmp_path)])
    for sub in ("llada/generate.py", "llada/model/modeling_llada.py", "dream/model/generation_utils.py"):
        (tmp_path / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub).write_text("")
    with pytest.raises(SystemExit, match="--dkv-cache .* has no generation_utils/llada_dkv_cache_decode.py"):
        parity.main(["--fast-dllm", str(tmp_path), "--dkv-cache", str(tmp_path / "nothing")])
