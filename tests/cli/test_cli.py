"""The jaxgen command end to end on a tiny run: train, resume, sample, eval, convert; bad input."""
import re

import pytest

from helpers import TINY_RUN
from jaxgen import cli
from jaxgen.cli import sample
from jaxgen.samplers import registry as samplers

TINY = TINY_RUN + ["log_every=2", "eval_every=2", "ckpt_every=2", "progress=false"]


def test_train_sample_eval_convert(tmp_path, data_dir, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--preset", "tiny", "--objective", "block_diffusion", "--steps", "2", "--out", out,
            f"data_dir={data_dir}", "block_size=4", *TINY]
    assert cli.main(args) == 0
    assert cli.main(args[:6] + ["4"] + args[7:] + ["--extend"]) == 0  # resumes from step 2 to 4
    assert "step 4" in capsys.readouterr().out
    assert cli.main(["sample", "--run", out, "--sampler", "block_diffusion", "--prompt", "def ", "--gen-length", "8",
                     "--block-length", "4"]) == 0
    assert "nfe=" in capsys.readouterr().out
    assert cli.main(["sample", "--run", out, "--sampler", "masked_diffusion", "--gen-length", "8",
                     "--block-length", "4"]) == 0
    assert cli.main(["sample", "--run", out, "--sampler", "ar", "--gen-length", "4"]) == 0
    block = ["--block-length", "4"]  # block (masked diffusion, lavida, nbdiff), window (wedlm), draft (tidar)
    for sampler, extra in [("masked_diffusion", ["--threshold", "0.5", "--cache", "dual", "--eotp", *block]),
                           ("masked_diffusion", ["--cache", "dkv_greedy", "--remasking", "random", *block]),
                           ("dream", ["--steps", "4", "--alg", "entropy"]), ("lavida", ["--steps", "4", *block]),
                           ("nbdiff", block), ("wedlm", block), ("tidar", block)]:
        assert cli.main(["sample", "--run", out, "--sampler", sampler, "--gen-length", "8", *extra]) == 0, sampler
        assert "nfe=" in capsys.readouterr().out
    speculative = ["sample", "--run", out, "--sampler", "speculative", "--gen-length", "8", "--num-draft", "2"]
    assert cli.main(speculative + ["--drafter", "token_recycling", "--drafter-option", "max_depth=2"]) == 0
    assert "accepted/forward=" in capsys.readouterr().out
    assert cli.main(speculative + ["--draft-run", out]) == 0  # the run drafts for itself: every draft accepted
    assert "accepted/forward=2.00" in capsys.readouterr().out  # 8 tokens: the prefill, then 3 + 3 + 1
    assert cli.main(["sample", "--run", out, "--gen-length", "12", "--regex", "[0-9]{3}-[a-z]+", "--batch", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert all(re.fullmatch(r"'def [0-9]{3}-[a-z]+'", line) for line in printed[:2]), printed
    assert cli.main(["eval", "--run", out, "--batches", "1"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert cli.main(["convert", "--run", out, "--to-hf", str(tmp_path / "hf")]) == 0
    assert cli.main(["sample", "--hf", str(tmp_path / "hf"), "--sampler", "ar", "--gen-length", "4"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "hidden=3"], "unknown config key 'hidden'"),
    (["train", "num_layers=two"], "num_layers='two' is not a int"),
    (["train", "--mesh", "data=3"], "3 devices but 1"),
    (["train", "--objective", "tidar", "aux_ar_weight=1"], "tidar options: block_size, curriculum_steps, alpha"),
    (["train", "--objective", "tidar", "alpha=-1"], "alpha=-1.0 must be a finite number >= 0"),
    (["train", "--objective", "learn2pd"], "set init_from=<its jaxgen train folder>"),
    (["sample", "--hf", "/nonexistent"], "not a directory"),
    (["sample", "--sampler", "nope"], "unknown sampler 'nope'; use one of ar, masked_diffusion, block_diffusion"),
    (["sample", "--sampler", "tidar", "--threshold", "0.5"], "sampler 'tidar' takes no --threshold; its flags: "
                                                             "--gen-length, --draft-length"),
    (["sample", "--sampler", "ar", "--eotp"], "sampler 'ar' takes no --eotp"),
    (["sample", "--sampler", "ar", "--cache", "dual"], "sampler 'ar' takes no --cache; its flags: --gen-length, "
                                                       "--temperature, --top-k, --top-p, --eos-id, --stop-at-eos"),
    (["sample", "--sampler", "nbdiff", "--steps", "4"], "sampler 'nbdiff' takes no --steps; its flags: "
                                                        "--gen-length, --block-length, --num-small-blocks"),
    (["sample", "--sampler", "ar", "--batch", "0"], "--batch=0 must be >= 1"),
    (["sample", "--sampler", "ar", "--filter", "/f"], "--filter needs a sampler that takes a commit filter"),
    (["sample", "--sampler", "wedlm", "--block-length", "4", "--window-size", "8"], "two flags set 'window_size'"),
    (["sample", "--sampler", "dream", "--top-k", "x"], "--top-k='x' is not an int"),
    (["eval", "--run", "/nonexistent"], "run_config.json"),
])
def test_bad_input_gives_clear_errors(argv, message, capsys, tmp_path):
    argv = argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_objective_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--objective", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def kwargs_of(*argv):
    return sample.sampler_kwargs(cli.build_parser().parse_args(["sample", *argv]))


def test_sample_flags_follow_the_generate_signatures():
    """Flags map to each sampler's generate keywords (aliases for the names that differ), typed
    after the sampler; gen_length / block_length defaults and one token per step unless given."""
    assert kwargs_of("--sampler", "ar") == {"gen_length": 64}
    assert kwargs_of("--sampler", "ar", "--gen-length", "4", "--top-p", "0.9") == {"gen_length": 4, "top_p": 0.9}
    assert kwargs_of("--sampler", "masked_diffusion", "--gen-length", "8", "--cache", "dkv_greedy", "--eotp") == {
        "gen_length": 8, "block_length": 16, "steps": 8, "cache": "dkv_greedy", "eotp": True}
    assert kwargs_of("--sampler", "block_diffusion", "--block-length", "4") == {
        "gen_length": 64, "block_length": 4, "denoising_steps": 4}
    assert kwargs_of("--sampler", "block_diffusion", "--steps", "2", "--no-fuse-block-write") == {
        "gen_length": 64, "block_length": 16, "denoising_steps": 2, "fuse_block_write": False}
    assert kwargs_of("--sampler", "wedlm", "--block-length", "4", "--threshold", "none") == {
        "gen_length": 64, "window_size": 4, "entropy_threshold": None}
    assert kwargs_of("--sampler", "tidar") == {"gen_length": 64, "draft_length": 16}
    assert kwargs_of("--sampler", "dream", "--top-k", "5", "--alg", "entropy") == {
        "gen_length": 64, "steps": 64, "top_k": 5, "alg": "entropy"}


def test_sampler_registry_reads_scalar_keywords():
    def generate(params, cfg, prompt, key, *, gen_length: int = 8, tau: "float | None" = None, name: str = "x",
                 flag: bool = False, table=None, rows: "jax.Array | None" = None):
        return gen_length

    try:
        samplers.register("toy", generate)
        found = samplers.options("toy")
        assert list(found) == ["gen_length", "tau", "name", "flag"]
        assert found["tau"] == samplers.Option("tau", float, None, True)
        assert found["flag"].type is bool and not found["gen_length"].optional
        assert samplers.accepts("toy", "table") and not samplers.accepts("toy", "nope")
    finally:
        samplers._REGISTRY.pop("toy", None)
    assert samplers.options("ar")["gen_length"] == samplers.Option("gen_length", int, None, True)
    # ar's max_new_tokens is an alias of gen_length: accepted, but no option (no second flag) of its own
    assert "max_new_tokens" not in samplers.options("ar") and samplers.accepts("ar", "max_new_tokens")
    assert samplers.aliases("ar") == {"max_new_tokens": "gen_length"}


def test_sampler_options_classes_follow_the_generate_signatures():
    """registry.options_class(name): a frozen dataclass of the sampler's scalar options, as the
    objective registry's options classes; values are type-checked, kwargs() passes what was set."""
    import dataclasses

    for name in samplers.names():
        cls = samplers.options_class(name)
        assert cls is samplers.options_class(name) and cls.__dataclass_params__.frozen
        assert [f.name for f in dataclasses.fields(cls)] == list(samplers.options(name))
        assert {f.name: f.default for f in dataclasses.fields(cls)} == {
            n: o.default for n, o in samplers.options(name).items()}
        assert cls().kwargs() == {}
    dream = samplers.options_class("dream")(steps=8, alg="entropy", temperature=1)
    assert dream.kwargs() == {"steps": 8, "alg": "entropy", "temperature": 1.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        dream.steps = 4
    with pytest.raises(ValueError, match="steps='8' must be an int"):
        samplers.options_class("dream")(steps="8")
    with pytest.raises(ValueError, match="eotp=1 must be a bool"):
        samplers.options_class("masked_diffusion")(eotp=1)
    assert samplers.options_class("nbdiff")(threshold=None).threshold is None  # optional: None allowed
    with pytest.raises(ValueError, match="gen_length=None must be an int"):
        samplers.options_class("tidar")(gen_length=None)
