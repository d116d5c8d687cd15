"""Config loading, overrides and layout validation: good configs load, bad ones fail with one clear line."""

import pytest

from mdu_dist.config import ConfigError, load_config
from mdu_dist.distributed import process_env, resolve_layout


def test_shipped_configs_load():
    for name in ("llada_8b", "dream_7b", "llada_tiny", "dream_tiny"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.model.arch in ("llada", "dream")


def test_overrides_are_typed():
    cfg = load_config("configs/llada_tiny.yaml", ["model.hidden_size=256", "model.norm_eps=1e-6",
                                                  "parallel.tensor=2", "model.qkv_bias=true"])
    assert cfg.model.hidden_size == 256 and cfg.parallel.tensor == 2
    assert cfg.model.norm_eps == pytest.approx(1e-6) and cfg.model.qkv_bias is True


def test_llada_vocab_padding_at_tp8():
    cfg = load_config("configs/llada_8b.yaml")
    assert cfg.model.padded_vocab_size(1) == 126464
    assert cfg.model.padded_vocab_size(8) == 126976


@pytest.mark.parametrize("overrides,needle", [
    (["model.hiden_size=3"], "unknown key model.hiden_size"),
    (["training.lr=3"], "unknown key training"),
    (["model.hidden_size=abc"], "model.hidden_size='abc' must be an integer"),
    (["parallel.tensor=3"], "parallel.tensor=3 does not divide num_attention_heads=4"),
    (["model.num_query_groups=2", "parallel.tensor=4"], "does not divide the KV heads (num_query_groups=2)"),
    (["model.arch=gpt"], "model.arch='gpt' is not a known backbone"),
    (["hidden_size"], "not of the form key.sub=value"),
    (["model.attention=flash"], "model.attention='flash' must be one of sdpa, local, te"),
])
def test_bad_overrides_name_the_value(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/llada_tiny.yaml", overrides)
    msg = str(e.value)
    assert needle in msg and msg.startswith("configs/llada_tiny.yaml") and "\n" not in msg


def test_dream_7b_refuses_tp8():
    with pytest.raises(ConfigError, match=r"parallel.tensor=8 does not divide num_attention_heads=28"):
        load_config("configs/dream_7b.yaml", ["parallel.tensor=8"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_world_size_must_factor():
    cfg = load_config("configs/llada_tiny.yaml", ["parallel.tensor=2", "parallel.pipeline=2"])
    assert str(resolve_layout(8, cfg.parallel, cfg.model)) == "TP=2 x PP=2 x DP=2 (world size 8)"
    with pytest.raises(ConfigError, match=r"world size 6 is not a multiple of parallel.tensor=2 x parallel.pipeline=2"):
        resolve_layout(6, cfg.parallel, cfg.model)


def test_process_env_sources():
    tr = process_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.local_rank, tr.world_size, tr.master_addr, tr.master_port, tr.source) == (3, 1, 4, "h", 1234, "torchrun")
    sl = process_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"})
    assert (sl.rank, sl.local_rank, sl.world_size, sl.master_addr, sl.source) == (9, 1, 16, "gpu007", "slurm")
    assert sl.master_port == 20000 + 4242
    assert process_env({}).source == "single"


def test_te_attention_without_transformer_engine_is_a_clear_error():
    import importlib.util

    from mdu_dist.models.attention import core_attention

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(RuntimeError, match="model.attention=te needs Transformer Engine"):
        core_attention("te")


def test_first_host_of_slurm_host_lists():
    """The master is the first host ``scontrol show hostnames`` lists (values typed from Slurm's hostlist format)."""
    from mdu_dist.distributed import first_host

    cases = {"node[01-04,07],gpu3": "node01", "rack[2-3]-n[1-2]": "rack2-n1", "a,b": "a", "gpu017": "gpu017",
             "mdunode[01-02]": "mdunode01", "n[9-10]": "n9", "x[003,001]y": "x003y"}
    assert {text: first_host(text) for text in cases} == cases
    with pytest.raises(ValueError, match="not a Slurm host list"):
        first_host("node[01-02")
