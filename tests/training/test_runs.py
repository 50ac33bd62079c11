"""Run folders: objective options survive run_config.json and load_run; pre-registry records load."""
import json

from helpers import TINY_MODEL, synthetic_batches, tiny_train
from jaxgen.training import loop, runs

OLD_KNOBS = dict(block_size=8, tidar_alpha=0.5, aux_ar_weight=1.0, curriculum_steps=0, position_mask_beta=1.0,
                 filter_gen_length=64, filter_block_length=16, filter_rollouts=256, antithetic=True,
                 sampling_eps=1e-3, meap_ratio=0.0)


def test_objective_options_round_trip_and_old_records_load(tmp_path):
    tcfg = tiny_train(objective="tidar", alpha=0.5, block_size=8)
    batches, _ = synthetic_batches(tcfg)
    loop.train(TINY_MODEL, tcfg, tmp_path / "r", batches=batches, stop_after=1)  # one step, one checkpoint
    path = tmp_path / "r" / "run_config.json"
    record = json.loads(path.read_text())
    assert record["train"]["objective_options"] == {"alpha": 0.5, "block_size": 8}
    cfg, loaded, _ = runs.load_run(tmp_path / "r")
    assert cfg == TINY_MODEL and loaded == tcfg and hash(loaded) == hash(tcfg)
    # a record written before the registry: every knob at the top level of "train"
    old = {k: v for k, v in record["train"].items() if k != "objective_options"}
    path.write_text(json.dumps({"model": record["model"], "train": dict(old, **OLD_KNOBS)}))
    assert runs.load_run(tmp_path / "r")[1] == tcfg
