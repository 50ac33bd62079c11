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
    with pytest.raises(SystemExit, match="pass at least one reference checkout: --fast-dllm .* --wedlm .* --nbdiff .* --lavida"):
        parity.main([])
    with pytest.raises(SystemExit, match="--fast-dllm .* has no llada/generate.py"):
        parity.main(["--fast-dllm", str(tmp_path)])
    for sub in ("llada/generate.py", "llada/model/modeling_llada.py", "dream/model/generation_utils.py"):
        (tmp_path / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub).write_text("")
    with pytest.raises(SystemExit, match="--dkv-cache .* has no generation_utils/llada_dkv_cache_decode.py"):
        parity.main(["--fast-dllm", str(tmp_path), "--dkv-cache", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="--sdar .* has no generate.py; pass the root of a JetAstra/SDAR checkout"):
        parity.main(["--sdar", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="--wedlm .* has no wedlm/engine/wedlm_decoder.py"):
        parity.main(["--wedlm", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="--nbdiff .* has no generation_utils.py"):
        parity.main(["--nbdiff", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="--lavida .* has no llava/model/language_model/llada/generate.py"):
        parity.main(["--lavida", str(tmp_path / "nothing")])


def test_greedy_sdar_sampling_is_argmax_and_its_probability():
    import torch
    parity = load_script()
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]])
    token, prob = parity.greedy_sdar_sampling(logits)
    assert token.tolist() == [[1, 0]]
    torch.testing.assert_close(prob, torch.softmax(logits, -1).amax(-1))
    with pytest.raises(AssertionError):
        parity.greedy_sdar_sampling(logits, top_p=0.9)


def test_compare_times_alternating_rounds_after_the_checking_pass():
    """Timing: after one checking call per prompt on each side, TIMED_ROUNDS rounds of one
    reference call then one jaxgen call (prompts in turn); medians of those rounds are reported."""
    import types

    import numpy as np
    import torch
    parity = load_script()
    prompts = np.arange(6).reshape(3, 2) + 4
    calls = []

    def ref_fn(p):
        calls.append(("ref", p.numpy().tolist()))
        return torch.cat([p, p], 1), 2

    def jax_fn(p):
        calls.append(("jax", np.asarray(p).tolist()))
        return types.SimpleNamespace(tokens=np.concatenate([p, p], 1), nfe=2)

    row = parity.compare("stub", ref_fn, jax_fn, prompts)
    assert row["tokens_identical"] and row["nfe_identical"] and row["batched_identical"]
    rounds = parity.TIMED_ROUNDS
    assert rounds >= 5 and row["timed_rounds"] == rounds
    timed = calls[2 * len(prompts):-1]  # after the checking pass, before the batched call
    assert [side for side, _ in timed] == ["ref", "jax"] * rounds
    assert [p for _, p in timed[::2]] == [[prompts[i % 3].tolist()] for i in range(rounds)]
    assert [p for _, p in timed[::2]] == [p for _, p in timed[1::2]]  # both sides time the same prompt
    assert calls[-1] == ("jax", prompts.tolist())
