"""Runs that cannot silently go wrong: the model follows the run's tokenizer, a diverged run stops
before checkpointing, a resumed run keeps its config (or is extended explicitly), bad values fail
at config time."""
import dataclasses
import json
import math
import shutil
import sysconfig

import jax
import numpy as np
import pytest

from helpers import TINY_MODEL, TINY_RUN, synthetic_batches, tiny_train
from jaxgen import cli, config, data, objectives
from jaxgen.errors import CheckpointError, ConfigError, JaxgenError
from jaxgen.training import loop, runs, vocab

SPECIALS = ["<unk>", "<s>", "<|endoftext|>", "<pad>", "<|mask|>"]
CLI_RUN = TINY_RUN + ["log_every=1", "eval_every=2", "ckpt_every=2", "progress=false", "dataset=text_files"]


def bpe_tokenizer(path, files, specials):
    """A real 400-token byte-level BPE tokenizer.json trained on local text files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(f) for f in files], trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two local text files (standard-library sources) and tokenizers trained on them."""
    root = tmp_path_factory.mktemp("bpe")
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for name in ("abc.py", "json/__init__.py"):
        files.append(root / name.replace("/", "_"))
        shutil.copy(f"{stdlib}/{name}", files[-1])
    return {"files": files, "tokenizer": bpe_tokenizer(root / "tokenizer.json", files, SPECIALS),
            "no_mask": bpe_tokenizer(root / "no_mask.json", files, ["<unk>", "<s>", "</s>"])}


def test_tokenizer_run_follows_the_tokenizer(tmp_path, corpus, data_dir, capsys):
    out = tmp_path / "bpe"
    argv = ["train", "--objective", "masked_diffusion", "--steps", "2", "--out", str(out), f"data_dir={data_dir}",
            f"data_files={','.join(map(str, corpus['files']))}", f"tokenizer={corpus['tokenizer']}", *CLI_RUN]
    assert cli.main(argv) == 0, capsys.readouterr().err
    tok = data.get_tokenizer(corpus["tokenizer"])
    cfg, tcfg, params = runs.load_run(out)
    assert cfg.vocab_size == tok.vocab_size == 400 and tcfg.tokenizer == corpus["tokenizer"]
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id, cfg.mask_id) == tuple(tok.token_id(t) for t in SPECIALS[1:])
    assert params["embed"].shape[0] == 400
    assert all(math.isfinite(r["loss"]) for r in loop.read_metrics(out / "metrics.jsonl"))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    # no mask token and a masked objective: refused before anything runs, naming the fixes
    argv_no_mask = [a.replace(corpus["tokenizer"], corpus["no_mask"]) for a in argv]
    argv_no_mask[argv_no_mask.index("--out") + 1] = str(tmp_path / "no_mask")
    assert cli.main(argv_no_mask) == 2
    err = capsys.readouterr().err
    assert "has no mask token (looked for <|mask|>" in err and "objective=masked_diffusion needs one" in err
    assert "mask_token=<token>" in err and "mask_id=400 vocab_size=401" in err
    assert not (tmp_path / "no_mask").exists()


def test_model_config_that_ignores_the_tokenizer_is_refused(tmp_path, corpus):
    tok = data.get_tokenizer(corpus["no_mask"])
    tcfg = tiny_train(objective="masked_diffusion", tokenizer=corpus["no_mask"])
    with pytest.raises(ConfigError, match=r"vocab_size=260 is smaller than the vocabulary .* \(400 tokens\)"):
        loop.train(TINY_MODEL, tcfg, tmp_path / "r", tokenizer=tok)
    big = dataclasses.replace(TINY_MODEL, vocab_size=400, bos_id=1, eos_id=2, pad_id=None)
    with pytest.raises(ConfigError, match="mask_id=259 is the ordinary token"):  # the bug: 259 is a BPE merge
        loop.train(big, tcfg, tmp_path / "r", tokenizer=tok)
    # plain AR needs no mask token; an extra id or a named special token serves masked objectives
    assert vocab.model_for_tokenizer(TINY_MODEL, dataclasses.replace(tcfg, objective="ar"), tok).mask_id is None
    extra = dataclasses.replace(TINY_MODEL, vocab_size=401, mask_id=400)
    assert vocab.model_for_tokenizer(extra, tcfg, tok, {"vocab_size", "mask_id"}).mask_id == 400
    assert vocab.model_for_tokenizer(TINY_MODEL, dataclasses.replace(tcfg, mask_token="<unk>"), tok).mask_id == 0
    with pytest.raises(ConfigError, match="mask_token='<nope>' is not a token"):
        vocab.model_for_tokenizer(TINY_MODEL, dataclasses.replace(tcfg, mask_token="<nope>"), tok)
    # corpus ids outside the vocabulary, or holding the mask id, are refused
    ar = tiny_train()
    batches, _ = synthetic_batches(ar)
    small = dataclasses.replace(TINY_MODEL, vocab_size=200, bos_id=None, eos_id=None, pad_id=None, mask_id=None)
    with pytest.raises(JaxgenError, match=r"token id 25\d, outside the model's vocabulary \[0, 200\)"):
        loop.train(small, ar, tmp_path / "ids", batches=batches)
    masked = dataclasses.replace(TINY_MODEL, mask_id=7)
    with pytest.raises(JaxgenError, match="holds the mask id 7"):
        loop.train(masked, tiny_train(objective="masked_diffusion"), tmp_path / "mask", batches=batches)


def test_presets_agree_with_their_tokenizer():
    for name, (model_cfg, train_cfg) in config.PRESETS.items():
        tok = data.get_tokenizer(train_cfg.tokenizer)
        assert vocab.model_for_tokenizer(model_cfg, train_cfg, tok) == model_cfg, name


def test_diverged_run_stops_without_checkpointing_it(tmp_path):
    tcfg = tiny_train(lr=1e30, steps=4, log_every=1, ckpt_every=1)  # the update after warmup overflows
    batches, _ = synthetic_batches(tcfg)
    with pytest.raises(JaxgenError, match="training diverged: the loss or gradient norm became non-finite") as e:
        loop.train(TINY_MODEL, tcfg, tmp_path / "r", batches=batches)
    assert "Lower lr (lr=1e+30)" in str(e.value) and "--fresh" in str(e.value)
    records = loop.read_metrics(tmp_path / "r" / "metrics.jsonl")
    bad = records[-1]["step"]
    assert not all(math.isfinite(records[-1][k]) for k in ("loss", "grad_norm"))
    steps = sorted(int(p.name) for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert steps and steps[-1] == bad - 1  # every step before it was saved, the diverged one never
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(runs.load_run(tmp_path / "r")[2]))


def test_resume_with_another_config_is_refused_and_extend_is_explicit(tmp_path, capsys):
    tcfg = tiny_train(grad_accum=4)  # test_train's reference config: shares its compiled step
    batches, val = synthetic_batches(tcfg)
    out = tmp_path / "r"
    loop.train(TINY_MODEL, tcfg, out, batches=batches, val_rows=val, stop_after=2)
    record = (out / "run_config.json").read_text()
    for change, named in [(dict(lr=0.02), "lr 0.01 -> 0.02"), (dict(seed=1), "seed 0 -> 1"),
                          (dict(objective="masked_diffusion"), "objective 'ar' -> 'masked_diffusion'")]:
        with pytest.raises(CheckpointError, match="trained with another config") as e:
            loop.train(TINY_MODEL, tiny_train(grad_accum=4, **change), out, batches=batches)
        assert named in str(e.value) and "--fresh" in str(e.value)
    with pytest.raises(CheckpointError, match="steps 6 -> 8 .* pass --extend") as e:
        loop.train(TINY_MODEL, dataclasses.replace(tcfg, steps=8), out, batches=batches)
    assert "from step 2 its learning rate follows the 8-step schedule (linear warmup" in str(e.value)
    assert (out / "run_config.json").read_text() == record  # nothing rewritten
    # the same config resumes, also with other cadences (they do not change what is computed)
    loop.train(TINY_MODEL, dataclasses.replace(tcfg, log_every=3, keep_checkpoints=5), out, batches=batches,
               val_rows=val, stop_after=4)
    # --extend: the run continues to the new step count, says how, and records it
    longer = dataclasses.replace(tcfg, steps=8)
    assert int(loop.train(TINY_MODEL, longer, out, batches=batches, extend=True)["state"].step) == 8
    assert "extending" in capsys.readouterr().out  # printed; the wording is checked below
    extension = json.loads((out / "run_config.json").read_text())["extensions"]
    assert [(x["at_step"], x["from_steps"], x["to_steps"]) for x in extension] == [(4, 6, 8)]
    assert "cosine decay to 0.001 at step 8" in extension[0]["schedule"]
    assert runs.load_run(out)[1] == longer
    with pytest.raises(CheckpointError, match="already at step 8"):
        loop.train(TINY_MODEL, dataclasses.replace(tcfg, steps=7), out, batches=batches, extend=True)


@pytest.mark.parametrize("key,value,message", [
    ("lr", 0.0, "lr=0.0 must be a finite number in (0, inf)"),
    ("lr", float("nan"), "lr=nan must be a finite number"),
    ("lr", -1e-3, "lr=-0.001 must be"),
    ("warmup_steps", -1, "warmup_steps=-1 must be an integer >= 0"),
    ("eval_every", 0, "eval_every=0 must be an integer >= 1"),
    ("b2", 1.0, "b2=1.0 must be a finite number in [0, 1)"),
    ("min_lr_ratio", 2.0, "min_lr_ratio=2.0 must be"),
    ("grad_clip", 0.0, "grad_clip=0.0 must be"),
    ("steps", 2.5, "steps=2.5 must be an integer"),
    ("seed", -1, "seed=-1 must be an integer >= 0"),
    ("sampling_eps", 0.0, "sampling_eps=0.0 must be in (0, 1]"),
    ("sampling_eps", 1.5, "sampling_eps=1.5 must be in (0, 1]"),
])
def test_bad_train_values_fail_at_config_time(key, value, message):
    with pytest.raises(ConfigError) as e:
        tiny_train(objective="masked_diffusion", **{key: value})
    assert message in str(e.value)
    model_cfg, train_cfg = config.preset("tiny")
    with pytest.raises(ConfigError, match=key):  # the same from key=value (jaxgen train)
        objectives.apply_overrides(model_cfg, train_cfg, ["objective=masked_diffusion", f"{key}={value}"])
