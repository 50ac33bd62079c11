import os

# The suite is compile-bound: nearly every test jits small programs once. XLA's CPU backend
# compiles them about twice as fast with LLVM at -O1 (FMA contraction kept, unlike -O0) and
# without the MLIR fusion emitters; results agree with the default flags to float rounding. Set
# before jax starts its backend; subprocesses inherit it (tests that set XLA_FLAGS extend it).
# JAXGEN_TEST_XLA_DEFAULTS=1 runs the suite under XLA's default flags; XLA_FLAGS given here win.
FAST_COMPILE = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
if not os.environ.get("JAXGEN_TEST_XLA_DEFAULTS"):
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402
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
