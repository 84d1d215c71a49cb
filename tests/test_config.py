"""Config round trips: a run's own config.yaml loads back into the same config."""

from __future__ import annotations

import yaml

from sftctl.run.config import build_config, dump_yaml
from sftctl.run.plugin_manager import get_plugin_manager


def test_dumped_config_loads_back_with_unset_plugin_options(tmp_path):
    pm = get_plugin_manager(entry_points=False)
    options = pm.config_options()
    cfg = build_config([("t", {"plugins": ["alpaca"], "train": {"output_dir": str(tmp_path)}})],
                       options)
    assert cfg.options["alpaca.demo_train_size"] is None  # an option whose default is None
    text = dump_yaml(cfg)
    again = build_config([("config.yaml", yaml.safe_load(text))], options)
    assert again == cfg
    # null stays refused where the option has a real default
    import pytest
    from sftctl.errors import ConfigError

    with pytest.raises(ConfigError, match="alpaca.demo_seed"):
        build_config([("t", {"options": {"alpaca.demo_seed": None}})], options)
