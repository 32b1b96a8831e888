"""cluster.yaml and conf/runtime_env.yaml, checked with Ray's own validation (offline)."""

import copy
from pathlib import Path

import pytest
import yaml

from optirag.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on a schema violation
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["min_wrkers"] = 1
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(broken))
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    import ray

    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_runtime_env_is_valid_and_offline():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "conf" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert not any("KEY" in k or "SECRET" in k for k in env["env_vars"])


def test_score_config_uses_gpu_actors_and_s3():
    cfg = load_config(ROOT / "conf" / "score.yaml")
    assert cfg.storage.root.startswith("s3://")
    assert cfg.compute.num_gpus_per_actor >= 1
    assert cfg.storage.s3.access_key_id is None and cfg.storage.s3.secret_access_key is None


def test_local_ray_dashboard_binds_loopback(tmp_path):
    import subprocess
    import sys

    code = (
        "import ray; from optirag import cli; from optirag.config import load_config; "
        "cli._init_ray(load_config(None, ['ray.num_cpus=1'])); "
        "print(ray.get_runtime_context().gcs_address); "
        "print(ray.worker.get_dashboard_url())"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    dashboard = out.stdout.strip().splitlines()[-1]
    assert dashboard.startswith("127.0.0.1:"), dashboard


def test_local_ray_start_is_retried_after_a_startup_timeout_and_its_processes_killed(
    monkeypatch,
):
    """Ray's raylet has a fixed 30 s to register; a try that misses it leaves processes that
    ray.shutdown() cannot stop. Failure injected: ray.init starts a real child process (a
    stand-in for the half-started node) and raises Ray's message, once."""
    import subprocess
    import sys

    import ray

    from optirag import cli

    tries, leftovers = [], []

    def init(**kwargs):
        tries.append(kwargs)
        if len(tries) == 1:
            leftovers.append(
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            )
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cli._init_ray(load_config(None, ["ray.num_cpus=1"]))
    assert len(tries) == 2 and tries[1]["dashboard_host"] == "127.0.0.1"
    assert leftovers[0].poll() is not None  # killed and reaped, not left running (sleeps 120 s)

    def broken(**kwargs):
        tries.append(kwargs)
        raise Exception("some other start-up error")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(Exception, match="some other"):
        cli._init_ray(load_config(None, ["ray.num_cpus=1"]))
    assert len(tries) == 3  # not retried
