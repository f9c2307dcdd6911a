"""Settings.from_env: BROKER_* parsing and validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.settings import Settings, SettingsError


def test_no_variables_give_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_variables_are_converted_to_the_type_of_their_field() -> None:
    settings = Settings.from_env({
        "BROKER_PORT": "9000",
        "BROKER_JOURNAL_BATCH_MAX": " 500 ",
        "BROKER_REAPER_INTERVAL_SECONDS": "0.25",
        "BROKER_REDIS_CHECK_INTERVAL_SECONDS": "2",
        "BROKER_DATA_DIR": "/var/lib/broker",
        "BROKER_REDIS_URL": "redis://localhost:6379/3",
        "BROKER_CORS_ORIGINS": "https://a.example, https://b.example,,",
        "BROKER_HOST": "0.0.0.0",
    })

    assert settings.port == 9000
    assert settings.journal_batch_max == 500
    assert settings.reaper_interval_seconds == 0.25
    assert settings.redis_check_interval_seconds == 2.0
    assert isinstance(settings.redis_check_interval_seconds, float)
    assert settings.data_dir == Path("/var/lib/broker")
    assert settings.journal_path == Path("/var/lib/broker/journal.sqlite3")
    assert settings.redis_url == "redis://localhost:6379/3"
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.host == "0.0.0.0"


def test_empty_variables_keep_the_default() -> None:
    assert Settings.from_env({"BROKER_PORT": "", "BROKER_CORS_ORIGINS": ""}) == Settings()


def test_variables_without_the_prefix_are_ignored() -> None:
    assert Settings.from_env({"PORT": "1", "REDIS_URL": "redis://elsewhere"}) == Settings()


def test_overrides_win_over_variables_unless_none() -> None:
    settings = Settings.from_env({"BROKER_PORT": "9000", "BROKER_HOST": "0.0.0.0"}, port=9100, host=None,
                                 data_dir="/tmp/x")

    assert settings.port == 9100
    assert settings.host == "0.0.0.0"
    assert settings.data_dir == Path("/tmp/x")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BROKER_PORT", "eighty"),
        ("BROKER_PORT", "80.5"),
        ("BROKER_MAX_MESSAGE_BYTES", "1MB"),
        ("BROKER_REAPER_INTERVAL_SECONDS", "fast"),
        ("BROKER_REDIS_CHECK_INTERVAL_SECONDS", "1s"),
        ("BROKER_JOURNAL_BATCH_MAX", "0"),
        ("BROKER_PORT", "-1"),
        ("BROKER_MAX_BODY_BYTES", "0"),
        ("BROKER_ACCESS_TOKEN_SECONDS", "-60"),
        ("BROKER_TLS", "on"),
        ("BROKER_WORKERS", "0"),
        ("BROKER_WORKERS", "65"),
    ],
)
def test_a_bad_value_gives_a_settings_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_a_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize(("value", "expected"), [("full", "full"), ("normal", "normal"), (" NORMAL ", "normal")])
def test_journal_sync_accepts_full_and_normal(value: str, expected: str) -> None:
    assert Settings.from_env({"BROKER_JOURNAL_SYNC": value}).journal_sync == expected


@pytest.mark.parametrize("value", ["off", "extra", "0", "fsync"])
def test_journal_sync_refuses_anything_but_full_and_normal(value: str) -> None:
    with pytest.raises(SettingsError, match="BROKER_JOURNAL_SYNC"):
        Settings.from_env({"BROKER_JOURNAL_SYNC": value})
    with pytest.raises(SettingsError, match="BROKER_JOURNAL_SYNC"):
        Settings(journal_sync=value)


def test_tls_certificate_and_key_go_together() -> None:
    with pytest.raises(SettingsError, match="BROKER_TLS_CERTFILE"):
        Settings.from_env({"BROKER_TLS_CERTFILE": "/etc/broker/cert.pem"})
    settings = Settings.from_env({"BROKER_TLS_CERTFILE": "c.pem", "BROKER_TLS_KEYFILE": "k.pem"})
    assert settings.uses_tls


def test_settings_exported_to_the_environment_read_back_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", {"BROKER_JWT_SECRET": "stale", "PATH": "/bin"})
    settings = Settings(port=9001, data_dir=Path("/srv/broker"), cors_origins=("https://a.example", "https://b"),
                        reaper_interval_seconds=0.5, journal_sync="normal", workers=3)

    settings.export()

    assert "BROKER_JWT_SECRET" not in os.environ  # None: a stale value must not leak into the workers
    assert Settings.from_env() == settings


def test_an_unknown_override_is_a_settings_error() -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({}, no_such_setting=1)


INTERVALS = (
    "BROKER_REAPER_INTERVAL_SECONDS",
    "BROKER_PROMOTER_INTERVAL_SECONDS",
    "BROKER_RETENTION_INTERVAL_SECONDS",
    "BROKER_REDIS_CHECK_INTERVAL_SECONDS",
)


def test_a_negative_or_non_finite_interval_is_refused() -> None:
    # -1 makes a background loop spin without sleeping; nan and inf put it to sleep for good after its first
    # round (leases would never expire again, a lost Redis would never be noticed).
    accepted = []
    for variable in INTERVALS:
        for value in ("-1", "nan", "inf"):
            try:
                Settings.from_env({variable: value})
            except SettingsError as exc:
                assert variable in str(exc)
            else:
                accepted.append(f"{variable}={value}")
    assert accepted == [], f"accepted: {', '.join(accepted)}"


def test_a_port_beyond_65535_is_refused() -> None:
    with pytest.raises(SettingsError, match="BROKER_PORT"):
        Settings.from_env({"BROKER_PORT": "70000"})
