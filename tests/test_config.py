import pytest

from localai.config import ConfigError, load_settings


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    import os

    for k in list(os.environ):
        if k.startswith("LOCALAI_"):
            monkeypatch.delenv(k)
    return tmp_path


def test_defaults(clean_env):
    s = load_settings(clean_env)
    assert s.home == clean_env and s.models_dir == clean_env / "models"
    assert s.model == "qwen2.5-coder-1.5b" and s.engine == "llama"
    assert s.threads >= 1


def test_precedence_file_then_env_then_flags(clean_env, monkeypatch):
    (clean_env / "config.toml").write_text('model = "a"\ncontext_length = 1024\nthreads = 3\n')
    s = load_settings(clean_env)
    assert (s.model, s.context_length, s.threads) == ("a", 1024, 3)
    monkeypatch.setenv("LOCALAI_CONTEXT_LENGTH", "2048")
    monkeypatch.setenv("LOCALAI_MODEL", "b")
    s = load_settings(clean_env)
    assert (s.model, s.context_length) == ("b", 2048)
    s = load_settings(clean_env, model="c", threads=None)
    assert (s.model, s.threads) == ("c", 3)


def test_home_from_env(clean_env, monkeypatch):
    monkeypatch.setenv("LOCALAI_HOME", str(clean_env / "h"))
    assert load_settings().home == clean_env / "h"


@pytest.mark.parametrize(
    "text, words",
    [
        ("modle = 'x'\n", "unknown setting"),
        ("engine = 'gpu'\n", "engine must be"),
        ("type_k = 'q3'\n", "type_k must be"),
        ("threads = 'many'\n", "not a valid"),
        ("expert_prefetch = 'maybe'\n", "not a valid bool"),
        ("expert_policy = 'mru'\n", "expert_policy must be one of"),
        ("attn_budget = 'half'\n", "attn_budget is tokens"),
        ("kv_budget = 'lots'\n", "kv_budget is bytes"),
        ("model = \n", "config.toml"),
    ],
)
def test_bad_config_is_a_clear_error(clean_env, text, words):
    (clean_env / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_settings(clean_env)


def test_memory_settings_take_ollama_durations(clean_env, monkeypatch):
    s = load_settings(clean_env)
    assert s.keep_alive_s == 300 and s.daemon_idle_exit_s == 1800 and s.pressure_interval_s == 2
    (clean_env / "config.toml").write_text("keep_alive = -1\npressure_psi_avg10 = 5\n")
    s = load_settings(clean_env)
    assert s.keep_alive_s is None and s.pressure_psi_avg10 == 5.0
    monkeypatch.setenv("LOCALAI_KEEP_ALIVE", "90s")
    assert load_settings(clean_env).keep_alive_s == 90
    monkeypatch.setenv("LOCALAI_KEEP_ALIVE", "soon")
    with pytest.raises(ConfigError, match="keep_alive"):
        load_settings(clean_env)
    monkeypatch.delenv("LOCALAI_KEEP_ALIVE")
    with pytest.raises(ConfigError, match="pressure_interval"):
        load_settings(clean_env, pressure_interval="0")


def test_switches_take_the_usual_words(clean_env, monkeypatch):
    assert load_settings(clean_env).expert_prefetch is False
    (clean_env / "config.toml").write_text("expert_prefetch = true\n")
    assert load_settings(clean_env).expert_prefetch is True
    monkeypatch.setenv("LOCALAI_EXPERT_PREFETCH", "off")
    assert load_settings(clean_env).expert_prefetch is False
