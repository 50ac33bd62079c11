import os

import jax
import pytest

from jaxgen import config, model


@pytest.fixture(scope="session")
def tiny_cfg():
    return config.ModelConfig(vocab_size=260, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=8, mlp_dim=64, max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    # larger init so random models have confident, varied predictions (sampler tests need margins)
    import dataclasses
    return model.init(dataclasses.replace(tiny_cfg, init_std=0.5), jax.random.key(0))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
