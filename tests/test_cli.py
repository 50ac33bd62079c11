"""The jaxgen command end to end on a tiny run: train, resume, sample, eval, convert; bad input."""
import pytest

from jaxgen import cli

TINY = ["hidden_size=32", "num_layers=1", "num_heads=2", "num_kv_heads=1", "head_dim=8", "mlp_dim=64",
        "seq_len=32", "batch_size=4", "max_files=30", "log_every=2", "eval_every=2", "ckpt_every=2",
        "progress=false", "eval_batches=1"]


def test_train_sample_eval_convert(tmp_path, data_dir, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--preset", "tiny", "--objective", "block_diffusion", "--steps", "2", "--out", out,
            f"data_dir={data_dir}", "block_size=4", *TINY]
    assert cli.main(args) == 0
    assert cli.main(args[:6] + ["4"] + args[7:]) == 0  # resumes from step 2 to 4
    assert "step 4" in capsys.readouterr().out
    assert cli.main(["sample", "--run", out, "--sampler", "block_diffusion", "--prompt", "def ", "--gen-length", "8",
                     "--block-length", "4"]) == 0
    assert "nfe=" in capsys.readouterr().out
    assert cli.main(["sample", "--run", out, "--sampler", "masked_diffusion", "--gen-length", "8",
                     "--block-length", "4"]) == 0
    assert cli.main(["sample", "--run", out, "--sampler", "ar", "--gen-length", "4"]) == 0
    for sampler, extra in [("masked_diffusion", ["--threshold", "0.5", "--cache", "dual", "--eotp"]),
                           ("dream", ["--steps", "4", "--alg", "entropy"]), ("lavida", ["--steps", "4"]),
                           ("nbdiff", []), ("wedlm", []), ("tidar", [])]:
        assert cli.main(["sample", "--run", out, "--sampler", sampler, "--gen-length", "8", "--block-length", "4",
                         *extra]) == 0, sampler
        assert "nfe=" in capsys.readouterr().out
    assert cli.main(["eval", "--run", out, "--batches", "1"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert cli.main(["convert", "--run", out, "--to-hf", str(tmp_path / "hf")]) == 0
    assert cli.main(["sample", "--hf", str(tmp_path / "hf"), "--sampler", "ar", "--gen-length", "4"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "hidden=3"], "unknown config key 'hidden'"),
    (["train", "num_layers=two"], "num_layers='two' is not a int"),
    (["train", "--mesh", "data=3"], "3 devices but 1"),
    (["sample", "--hf", "/nonexistent"], "not a directory"),
    (["eval", "--run", "/nonexistent"], "run_config.json"),
])
def test_bad_input_gives_clear_errors(argv, message, capsys, tmp_path):
    argv = argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
