from pathlib import Path

import pytest

from optirag.config import Config, ConfigError, load_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# runtime_env.yaml is a Ray runtime environment, not an optirag config.
JOB_CONFIGS = sorted(p for p in CONF_DIR.glob("**/*.yaml") if p.name != "runtime_env.yaml")


def test_conf_dir_has_configs():
    assert JOB_CONFIGS


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_conf_file_is_valid(path):
    assert isinstance(load_config(path), Config)


def test_extends_merges_sections_and_refuses_a_circle(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "storage: {root: /data}\nexits: {rule: agreement, threshold: 0.1}\nscoring: {run_id: a}\n"
    )
    (tmp_path / "variants").mkdir()
    variant = tmp_path / "variants" / "b.yaml"
    variant.write_text("extends: ../base.yaml\nexits: {threshold: 0.3}\n")
    cfg = load_config(variant, ["scoring.run_id=b"])
    assert cfg.storage.root == "/data"
    assert (cfg.exits.rule, cfg.exits.threshold) == ("agreement", 0.3)  # merged, not replaced
    assert cfg.scoring.run_id == "b"  # overrides apply last
    (tmp_path / "base.yaml").write_text("extends: variants/b.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        load_config(variant)
    variant.write_text("extends: ../missing.yaml\n")
    with pytest.raises(ConfigError, match="b.yaml: extends: config file not found"):
        load_config(variant)
    variant.write_text('extends: ""\n')
    with pytest.raises(ConfigError, match="extends: expected"):
        load_config(variant)


def test_ab_demo_variants_differ_only_in_the_exit_rule():
    full, early = (load_config(CONF_DIR / "ab" / f"{n}.yaml") for n in ("full-depth", "early-exit"))
    demo = load_config(CONF_DIR / "demo.yaml")
    assert full.exits.rule == "none" and early == demo
    assert full.model_copy(update={"exits": demo.exits}) == demo


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        None,
        [
            "synthetic.num_users=7",
            "data.source=parquet",
            "data.interactions_uri=a",
            "data.items_uri=b",
        ],
    )
    assert cfg.synthetic.num_users == 7 and cfg.data.source == "parquet"


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("storage:\n  rooot: /tmp/x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*\n.*storage\.rooot: unknown key"):
        load_config(path)


def test_unknown_override_key_fails():
    with pytest.raises(ConfigError, match=r"synthetic\.num_user: unknown key"):
        load_config(None, ["synthetic.num_user=3"])


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("synthetic:\n  num_users: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*synthetic\.num_users"):
        load_config(path)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="a.b=c"):
        load_config(None, ["no-equals-sign"])


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception, match="frozen"):
        cfg.storage.root = "x"  # type: ignore[misc]


def test_secrets_never_in_dump(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(
        "storage: {s3: {secret_access_key: hunter2-secret, access_key_id: AKIAREALLOOKING}}"
    )
    cfg = load_config(conf)
    dumped = str(cfg.redacted()) + repr(cfg) + str(cfg)
    assert "hunter2-secret" not in dumped and "AKIAREALLOOKING" not in dumped
    assert cfg.storage.s3.secret_access_key.get_secret_value() == "hunter2-secret"


def test_help_lists_sections(capsys):
    from optirag import cli

    with pytest.raises(SystemExit):
        cli.prepare_data(["--help"])
    out = capsys.readouterr().out
    for section in Config.model_fields:
        assert f"  {section}:" in out


def test_default_local_paths_are_absolute_too():
    cfg = Config()
    for path in (cfg.storage.root, cfg.backbone.cache_dir, cfg.data.movielens_dir):
        assert Path(path).is_absolute(), path


@pytest.mark.parametrize(
    "key",
    [
        "storage.s3.secret_access_key",
        "storage.s3.access_key_id",
        "storage.s3.session_token",
        "storage.s3.api-token",
        "storage.s3.password",
        "storage.s3.apiToken",
        "storage.s3.clientSecret",
    ],
)
def test_secret_overrides_are_refused(key):
    with pytest.raises(ConfigError, match="environment") as err:
        load_config(None, [f"{key}=hunter2-secret"])
    assert "hunter2-secret" not in str(err.value)


def test_a_key_that_only_contains_a_secret_word_is_an_override():
    assert load_config(None, ["compute.batch_tokens=4096"]).compute.batch_tokens == 4096


@pytest.mark.parametrize(
    "item",
    [
        "storage.s3={secret_access_key: hunter2-secret}",
        "storage={s3: {session_token: hunter2-secret}}",
    ],
)
def test_a_section_given_inline_with_a_secret_inside_is_refused(item):
    with pytest.raises(ConfigError, match="environment") as err:
        load_config(None, [item])
    assert "hunter2-secret" not in str(err.value)


def test_an_override_that_is_not_yaml_names_the_key_not_the_value():
    with pytest.raises(ConfigError, match="compute.batch_rows=...: the value is not valid") as err:
        load_config(None, ["compute.batch_rows=[hunter2-secret"])
    assert "hunter2-secret" not in str(err.value)


@pytest.mark.parametrize("run_id", ["../bad/rid/evil", "/abs/path", "a/b", "a..b", ".hidden", ""])
def test_bad_run_ids_are_refused(run_id):
    with pytest.raises(ConfigError, match="run id"):
        load_config(None, [f"scoring.run_id={run_id}"])


def test_string_overrides_stay_strings():
    cfg = load_config(
        None, ["scoring.run_id=2026-11-25", "prompts.instruction=1.5", "data.columns.text=null"]
    )
    assert cfg.scoring.run_id == "2026-11-25"  # not a YAML date
    assert cfg.prompts.instruction == "1.5" and cfg.data.columns.text is None
    assert load_config(None, ["compute.max_actors=3"]).compute.max_actors == 3
