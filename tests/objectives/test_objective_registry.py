"""The objective registry: names, options dataclasses, TrainConfig options and key=value overrides."""
import dataclasses

import pytest

from helpers import tiny_train
from jaxgen import config, objectives
from jaxgen.errors import ConfigError
from jaxgen.objectives import registry, settings


def test_unknown_objective_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown objective 'nope'; use one of ar, block_diffusion, continuous_ar, "
                                          "dream"):
        objectives.get("nope")
    with pytest.raises(ConfigError, match="tidar, wedlm"):
        objectives.options_of(config.TrainConfig(objective="nope"))
    assert {"ar", "masked_diffusion", "block_diffusion", "tidar", "lavida", "nbdiff", "efficient_dlm", "learn2pd",
            "wedlm", "dream", "flow_matching", "continuous_ar"} == set(objectives.names())


@pytest.mark.parametrize("objective,options,message", [
    ("tidar", dict(alpha=-1.0), "alpha=-1.0 must be a finite number >= 0"),
    ("nbdiff", dict(aux_ar_weight=float("nan")), "aux_ar_weight=nan"),
    ("ar", dict(meap_ratio=1.0), r"meap_ratio=1.0 must be in \[0, 1\)"),
    ("block_diffusion", dict(block_size=0), "block_size=0 must be a positive integer"),
    ("wedlm", dict(curriculum_steps=-2), "curriculum_steps=-2 must be >= 0"),
    ("masked_diffusion", dict(sampling_eps=0.0), r"sampling_eps=0.0 must be in \(0, 1\]"),
    ("learn2pd", dict(filter_gen_length=60), "filter_gen_length=60 must be a positive multiple of "
                                             "filter_block_length=16"),
    ("learn2pd", dict(filter_rollouts=2), "filter_rollouts=2 must be >= 3"),
    ("block_diffusion", dict(block_size="8"), "block_size='8' must be an int"),
    ("dream", dict(antithetic=1), "antithetic=1 must be a bool"),
])
def test_options_reject_bad_values(objective, options, message):
    with pytest.raises(ConfigError, match=message):
        objectives.build_options(objective, options)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ConfigError, match="objective 'tidar' has no option 'aux_ar_weight'; its options: "
                                          "block_size, curriculum_steps, alpha"):
        tiny_train(objective="tidar", aux_ar_weight=0.5)


def test_options_are_stored_canonically_and_bound_to_the_loss():
    tcfg = tiny_train(objective="tidar", alpha=0.5, block_size=4)  # block_size 4 is the default: not stored
    assert tcfg.objective_options == (("alpha", 0.5),)
    assert tiny_train(objective="tidar", alpha=1.0) == tiny_train(objective="tidar")
    assert objectives.loss_for(tcfg).keywords == {"block_size": 4, "alpha": 0.5}
    assert objectives.loss_for(tiny_train(objective="efficient_dlm")).keywords == {
        "eps": 1e-3, "antithetic": True, "block_size": 4, "position_beta": 1.0}
    dream = objectives.loss_for(tiny_train(objective="dream"))
    assert dream.keywords == {"eps": 1e-3, "antithetic": True, "shift": True}
    # a new objective starts from its own defaults
    assert tiny_train(objective="tidar", alpha=0.5).objective_options != ()
    assert objectives.configure(tcfg, objective="nbdiff").objective_options == ()
    with pytest.raises(ConfigError, match="trains a filter"):
        objectives.loss_for(tiny_train(objective="learn2pd", init_from="runs/md", filter_gen_length=8,
                                       filter_block_length=8))


def test_train_config_normalizes_objective_options():
    tcfg = config.TrainConfig(objective="tidar", objective_options={"block_size": 8, "alpha": 2.0})
    assert tcfg.objective_options == (("alpha", 2.0), ("block_size", 8))
    assert hash(tcfg) == hash(dataclasses.replace(tcfg, objective_options=(("block_size", 8), ("alpha", 2.0))))
    with pytest.raises(ConfigError, match="must be a bool, int, float, str or None"):
        config.TrainConfig(objective_options={"block_size": [8]})
    with pytest.raises(ConfigError, match="is not a \\(name, value\\) pair"):
        config.TrainConfig(objective_options=("block_size",))


def test_readme_overrides_set_objective_options():
    model, train = config.preset("tiny")
    _, t = objectives.apply_overrides(model, train, ["block_size=4", "lr=2e-3", "objective=block_diffusion"])
    assert t.lr == 2e-3 and objectives.options_of(t).block_size == 4
    _, t = objectives.apply_overrides(model, train, ["init_from=runs/ar", "block_size=8", "curriculum_steps=150",
                                                     "objective=nbdiff"])
    opts = objectives.options_of(t)
    assert (t.init_from, opts.block_size, opts.curriculum_steps) == ("runs/ar", 8, 150)
    _, t = objectives.apply_overrides(model, train, ["init_from=runs/md", "filter_block_length=16",
                                                     "objective=learn2pd"])
    assert objectives.options_of(t).filter_block_length == 16
    _, t = objectives.apply_overrides(model, train, ["objective=tidar", "block_size=8", "tidar_alpha=0.5"])
    assert t.objective_options == (("alpha", 0.5), ("block_size", 8))  # the old key still works
    with pytest.raises(ConfigError, match="unknown config key 'alpha'; nbdiff options: sampling_eps, antithetic, "
                                          "block_size, curriculum_steps, aux_ar_weight; model keys"):
        objectives.apply_overrides(model, train, ["objective=nbdiff", "alpha=0.5"])
    with pytest.raises(ConfigError, match="alpha='high' is not a float"):
        objectives.apply_overrides(model, train, ["objective=tidar", "alpha=high"])


def test_overrides_for_several_objectives_split_by_objective():
    texts = ["hidden_size=32", "filter_rollouts=4", "block_size=8", "bogus=1"]
    assert objectives.split_overrides(texts) == (["hidden_size=32", "bogus=1"], ["filter_rollouts=4", "block_size=8"])
    assert objectives.overrides_for(texts, "nbdiff") == ["hidden_size=32", "block_size=8", "bogus=1"]
    assert objectives.overrides_for(texts, "learn2pd") == ["hidden_size=32", "filter_rollouts=4", "bogus=1"]


def test_old_run_records_migrate_their_knobs():
    old = {"objective": "masked_diffusion", "seq_len": 16, "block_size": 4, "tidar_alpha": 1.0, "sampling_eps": 0.01,
           "antithetic": True, "meap_ratio": 0.0, "curriculum_steps": 0}
    assert settings.migrate_legacy(old) == {"objective": "masked_diffusion", "seq_len": 16,
                                            "objective_options": (("sampling_eps", 0.01),)}
    tidar = settings.migrate_legacy({"objective": "tidar", "block_size": 8, "tidar_alpha": 2.0, "sampling_eps": 0.5})
    assert tidar["objective_options"] == (("alpha", 2.0), ("block_size", 8))


def test_register_a_new_objective():
    @dataclasses.dataclass(frozen=True)
    class ToyOptions(objectives.Options):
        scale: float = 1.0

        def loss_kwargs(self):
            return {"scale": self.scale}

    def toy_loss(params, cfg, batch, key, *, scale):
        return scale, {"loss": scale}

    try:
        objectives.register("toy", toy_loss, ToyOptions)
        tcfg = tiny_train(objective="toy", scale=3)
        assert tcfg.objective_options == (("scale", 3.0),) and "toy" in objectives.names()
        assert objectives.loss_for(tcfg)(None, None, None, None)[0] == 3.0
        with pytest.raises(ValueError, match="already registered"):
            objectives.register("toy", toy_loss, objectives.build_options("ar").__class__)
    finally:
        registry._REGISTRY.pop("toy", None)
    with pytest.raises(TypeError, match="frozen dataclass"):
        objectives.register("bad", toy_loss, dict)


def test_options_no_trained_objective_reads_are_refused():
    """Commands that train several objectives (demo, dlm_frontier) refuse a stray option rather
    than drop it."""
    from jaxgen import objectives
    objectives.check_options_read(["block_size=4"], ["ar", "block_diffusion"])
    with pytest.raises(ConfigError, match="hidden: no objective this command trains"):
        objectives.check_options_read(["hidden=3"], ["ar", "masked_diffusion"])
