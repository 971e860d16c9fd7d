"""TXMON_ENV and production secrets: the real app factory and worker refuse bad settings."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from shared.config import DEV_JWT_SECRET, ConfigError
from tests.support.common import ROOT, clean_env

STRONG = "s" * 40
PRODUCTION = {"TXMON_ENV": "production", "TXMON_JWT_SECRET": STRONG,
              "TXMON_SERVICE_KEYS": "k" * 24, "SMTP_URL": "smtp://127.0.0.1:1025"}


@pytest.mark.parametrize("overrides, message", [
    ({"TXMON_ENV": "prod"}, "TXMON_ENV must be one of"),
    ({"TXMON_ENV": "Production"}, "TXMON_ENV must be one of"),
    ({"TXMON_JWT_SECRET": "x" * 9}, "under 32 bytes"),
    ({"TXMON_JWT_SECRET": DEV_JWT_SECRET}, "committed development value"),
    ({"TXMON_SERVICE_KEYS": "dev-service-key"}, "committed development value"),
    ({"TXMON_JWT_SECRET": ""}, "TXMON_JWT_SECRET is not set"),
    ({"SMTP_URL": ""}, "SMTP_URL is not set"),
])
def test_app_factory_and_worker_refuse(monkeypatch, overrides, message):
    from api_service import create_app
    from worker_service.celery_app import create_worker_app

    for key, value in {**PRODUCTION, **overrides}.items():
        monkeypatch.setenv(key, value)
    for factory in (create_app, create_worker_app):
        with pytest.raises(ConfigError, match=message):
            factory()


def test_production_with_strong_secrets_starts(monkeypatch):
    from api_service import create_app

    for key, value in PRODUCTION.items():
        monkeypatch.setenv(key, value)
    assert create_app().config["JWT_SECRET"] == STRONG


def test_development_uses_defaults_with_a_warning(monkeypatch, caplog):
    from api_service import create_app

    for key in ("TXMON_ENV", "TXMON_JWT_SECRET", "TXMON_SERVICE_KEYS", "SMTP_URL"):
        monkeypatch.delenv(key, raising=False)
    with caplog.at_level(logging.WARNING, logger="txmon.config"):
        app = create_app()
    assert app.config["JWT_SECRET"] == DEV_JWT_SECRET
    assert "development defaults" in caplog.text


def test_celery_worker_process_refuses_an_unknown_env():
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "worker_service.celery_app",
                          "worker"], cwd=ROOT, env=clean_env(TXMON_ENV="prod"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "TXMON_ENV must be one of" in out.stdout + out.stderr


def _token_command(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "api_service", "token", "ann"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=clean_env(DATABASE_URL=f"sqlite:///{tmp_path}/t.db", **env))


def test_token_command__mints_in_development(tmp_path):
    import jwt

    out = _token_command(tmp_path, TXMON_ENV="development")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip().splitlines()[-1], DEV_JWT_SECRET, algorithms=["HS256"],
                        options={"verify_aud": False})
    assert claims["sub"] == "ann" and claims["role"] == "user"


def test_token_command__refused_in_production(tmp_path):
    out = _token_command(tmp_path, **PRODUCTION)
    assert out.returncode != 0
    assert "the token command is for development" in out.stderr
    assert out.stdout.strip() == "", "no token may be printed"
