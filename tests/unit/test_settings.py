"""Settings from the environment: defaults, conversion, clear errors for typos and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import Settings, load_settings, settings_or_exit


def test_defaults_run_on_one_machine():
    """An empty environment gives the documented defaults."""
    settings = load_settings({})
    assert settings == Settings()
    assert settings.redis_url is None
    assert settings.data_dir == Path(".eventgate")
    assert settings.sink == ""
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.workers == 1
    assert settings.max_body_bytes == 5 * 1024 * 1024
    assert settings.max_events == 1000
    assert settings.max_decompressed_bytes == 20 * 1024 * 1024
    assert settings.max_gzip_ratio == 200
    assert settings.max_future_s == 86_400
    assert settings.log_format == "auto"
    assert settings.log_level == "info"
    assert settings.queue == "eventgate"
    assert settings.job_max_events == 1000
    assert settings.key_cache_s == 2.0
    assert settings.job_heartbeat_s == 5
    assert settings.job_timeout_s == 600
    assert settings.job_retries == 25
    assert settings.redis_appendfsync == "always"
    assert settings.redis_timeout_s == 2.0


def test_values_are_converted_from_strings():
    """Environment strings become the setting's type: int, float, Path, literal."""
    settings = load_settings(
        {
            "EVENTGATE_PORT": "9000",
            "EVENTGATE_KEY_CACHE_S": "0.5",
            "EVENTGATE_DATA_DIR": "/srv/eventgate",
            "EVENTGATE_LOG_FORMAT": "json",
        }
    )
    assert settings.port == 9000
    assert isinstance(settings.port, int)
    assert settings.key_cache_s == 0.5
    assert settings.data_dir == Path("/srv/eventgate")
    assert settings.log_format == "json"


def test_variables_without_the_prefix_are_ignored():
    """Only EVENTGATE_* (and REDIS_URL) are settings; the rest of the environment is not."""
    settings = load_settings({"PORT": "1", "HOME": "/root", "eventgate_port": "1"})
    assert settings.port == 8080


def test_misspelt_setting_is_named_with_the_known_ones():
    """A typo in a variable name stops start-up, naming it and listing every known setting."""
    with pytest.raises(ConfigError) as caught:
        load_settings({"EVENTGATE_BATCH_SIZ": "100"})
    message = str(caught.value)
    assert "unknown setting EVENTGATE_BATCH_SIZ" in message
    assert "known:" in message
    for known in ("REDIS_URL", "EVENTGATE_PORT", "EVENTGATE_JOB_MAX_EVENTS", "EVENTGATE_SINK"):
        assert known in message


def test_every_misspelt_setting_is_named():
    """Several unknown variables are all reported at once."""
    with pytest.raises(ConfigError, match="EVENTGATE_PROT, EVENTGATE_WROKERS"):
        load_settings({"EVENTGATE_WROKERS": "2", "EVENTGATE_PROT": "1", "EVENTGATE_PORT": "1"})


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("EVENTGATE_PORT", "eighty", "Expected `int`"),
        ("EVENTGATE_PORT", "70000", "<= 65535"),
        ("EVENTGATE_LOG_FORMAT", "xml", "Invalid enum value 'xml'"),
        ("EVENTGATE_WORKERS", "0", ">= 1"),
        ("EVENTGATE_KEY_CACHE_S", "0", "> 0"),
        ("EVENTGATE_REDIS_APPENDFSYNC", "never", "Invalid enum value"),
    ],
)
def test_bad_value_names_the_variable_and_the_problem(variable, value, problem):
    """A value of the wrong type or out of range is refused, naming the variable, its value
    and what is wrong with it."""
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}={value!r} is invalid: ")
    assert problem in message
    assert "$." not in message  # msgspec's JSON path is replaced by the variable's name


def test_redis_url_is_read_without_prefix():
    """REDIS_URL, the hosts' convention, sets redis_url; an empty one means embedded."""
    assert load_settings({"REDIS_URL": "redis://cache:6379/1"}).redis_url == "redis://cache:6379/1"
    assert load_settings({"REDIS_URL": ""}).redis_url is None


def test_prefixed_redis_url_is_refused():
    """EVENTGATE_REDIS_URL is not a setting: it is refused rather than silently ignored."""
    with pytest.raises(ConfigError, match="unknown setting EVENTGATE_REDIS_URL"):
        load_settings({"EVENTGATE_REDIS_URL": "redis://cache:6379/1"})


def test_sink_defaults_to_an_absolute_sqlite_file_in_data_dir(tmp_path, monkeypatch):
    """Without EVENTGATE_SINK, the sink is events.db in the data dir, as an absolute path."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings({"EVENTGATE_DATA_DIR": "data"})
    expected = (tmp_path / "data" / "events.db").resolve()
    assert settings.sink_url == f"sqlite:///{expected}"
    assert settings.sink_url.startswith("sqlite:////")
    default_dir = (tmp_path / ".eventgate").resolve()
    assert load_settings({}).sink_url == f"sqlite:///{default_dir}/events.db"


def test_explicit_sink_is_kept():
    """EVENTGATE_SINK is used as given."""
    dsn = "postgresql://app@db:5432/events"
    assert load_settings({"EVENTGATE_SINK": dsn}).sink_url == dsn


def test_settings_are_read_from_the_process_environment_by_default(monkeypatch):
    """load_settings() with no mapping reads os.environ."""
    monkeypatch.setenv("EVENTGATE_PORT", "9100")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379")
    settings = load_settings()
    assert settings.port == 9100
    assert settings.redis_url == "redis://elsewhere:6379"


def test_settings_or_exit_returns_good_settings():
    """settings_or_exit passes valid settings through."""
    assert settings_or_exit({"EVENTGATE_WORKERS": "3"}).workers == 3


def test_settings_or_exit_exits_with_the_message():
    """A bad setting at an entry point exits with the message, not a traceback."""
    with pytest.raises(SystemExit) as caught:
        settings_or_exit({"EVENTGATE_PROT": "1"})
    assert isinstance(caught.value.code, str)
    assert caught.value.code.startswith("eventgate: unknown setting EVENTGATE_PROT")
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
