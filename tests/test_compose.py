"""docker-compose.yml, deploy/prometheus.yml and the Dockerfile agree with the code.

Files are parsed only (no Docker engine needed): every service exists, every command points
at modules and objects that exist in this repository, every port matches the configuration
the code reads, and Prometheus scrapes the right services on the right ports.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("postgres", "redis", "api", "worker", "beat", "flower", "prometheus")
APP_SERVICES = ("api", "worker", "beat", "flower")
API_PORT, FLOWER_PORT, WORKER_METRICS_PORT = 8000, 5555, 9808


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())


def argv(service: dict) -> list[str]:
    """The service's command as words, unwrapping ``sh -c "a && exec b"``."""
    cmd = service.get("command")
    words = shlex.split(cmd) if isinstance(cmd, str) else list(cmd or [])
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2])
    return words


def commands(service: dict) -> list[list[str]]:
    """Each command of an ``a && b && exec c`` chain, without the ``exec``."""
    out, cur = [], []
    for w in argv(service) + ["&&"]:
        if w == "&&":
            if cur:
                out.append(cur[1:] if cur[0] == "exec" else cur)
            cur = []
        else:
            cur.append(w)
    return out


def main_command(service: dict) -> list[str]:
    return commands(service)[-1]


def option(words: list[str], *names: str) -> str | None:
    """The value of ``--name=value``, ``--name value`` or ``-n value``."""
    for i, w in enumerate(words):
        for name in names:
            if w == name and i + 1 < len(words):
                return words[i + 1]
            if w.startswith(name + "="):
                return w.split("=", 1)[1]
    return None


def module_file(dotted: str) -> Path:
    """The file that ``import dotted`` loads from the repository root."""
    path = ROOT.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"module {dotted} has no file in the repository ({path}[.py])")


def top_level_names(path: Path) -> set[str]:
    """Names a module binds at top level (assignments, defs, classes, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def published(service: dict) -> dict[int, int]:
    """{container port: host port} of the service's ``ports``."""
    out = {}
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            out[int(spec["target"])] = int(spec.get("published", spec["target"]))
            continue
        parts = str(spec).split("/")[0].split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """``value`` as compose would expand it, each ``${NAME...}`` standing for ``<NAME>``."""
    return re.sub(r"\$\{(\w+)(?::?[?-][^}]*)?\}", lambda m: f"<{m.group(1)}>", value)


def gunicorn_bind(env: dict[str, str]) -> str:
    """``bind`` as gunicorn.conf.py computes it under ``env`` (in a separate interpreter, so
    whatever the config imports cannot affect this process)."""
    full = {k: v for k, v in os.environ.items() if k not in ("PORT", "TXMON_BIND")}
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-c", "import runpy; print(runpy.run_path('gunicorn.conf.py')['bind'])"],
        cwd=ROOT, env=full, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


# --- services and commands -------------------------------------------------------------------

def test_every_required_service_exists(services):
    missing = [name for name in SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks {missing}"


def test_app_services_share_one_image_built_from_the_repo(services):
    for name in APP_SERVICES:
        build = services[name].get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context == ".", f"{name} must be built from the repository (build: .)"
    images = {services[name].get("image") for name in APP_SERVICES}
    assert len(images) == 1 and None not in images, f"one image for {APP_SERVICES}: {images}"


def test_depends_on_names_real_services(services):
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"
    api_deps = services["api"]["depends_on"]
    assert "postgres" in api_deps and "redis" in api_deps


def test_api_migrates_then_serves_the_wsgi_app(services):
    cmds = commands(services["api"])
    assert len(cmds) >= 2, "the api must run the migrations before gunicorn"
    assert cmds[0] == ["flask", "--app", "api_service", "db", "upgrade"], cmds[0]
    assert "create_app" in top_level_names(module_file("api_service"))
    assert (ROOT / "migrations" / "env.py").is_file()

    gunicorn = cmds[-1]
    assert gunicorn[0] == "gunicorn", gunicorn
    conf = option(gunicorn, "-c", "--config")
    assert conf and (ROOT / conf).is_file(), f"gunicorn config {conf} missing"
    target = gunicorn[-1]
    module, _, attr = target.partition(":")
    assert attr, f"gunicorn target {target} needs module:attr"
    assert attr in top_level_names(module_file(module)), f"{module} does not define {attr}"


@pytest.mark.parametrize("name, subcommand", [("worker", "worker"), ("beat", "beat"),
                                              ("flower", "flower")])
def test_celery_services_point_at_the_celery_app(services, name, subcommand):
    cmd = main_command(services[name])
    assert cmd[0] == "celery", cmd
    target = option(cmd, "-A", "--app")
    assert target, f"{name}: celery needs -A"
    module, _, attr = target.partition(":")
    defined = top_level_names(module_file(module))
    # `celery -A module` looks for an attribute named app or celery in the module.
    wanted = [attr] if attr else ["app", "celery"]
    assert any(a in defined for a in wanted), f"{module} defines none of {wanted}"
    assert subcommand in cmd, f"{name} must run `celery ... {subcommand}`"


def test_worker_sends_task_events_for_flower(services):
    cmd = main_command(services["worker"])
    assert "-E" in cmd or "--task-events" in cmd


# --- ports -----------------------------------------------------------------------------------

def test_api_port_matches_the_configuration(services):
    assert gunicorn_bind({}) == f"127.0.0.1:{API_PORT}", "gunicorn.conf.py default"

    api = services["api"]
    env = environment(api)
    assert env.get("PORT") == str(API_PORT)
    assert env.get("TXMON_BIND") == "0.0.0.0", "inside a container gunicorn must bind 0.0.0.0"
    assert gunicorn_bind(env) == f"0.0.0.0:{API_PORT}"
    assert published(api).get(API_PORT) == API_PORT


def host_ips(service: dict) -> dict[int, str]:
    """{container port: host address it is published on} ('' = every address)."""
    out = {}
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            out[int(spec["target"])] = spec.get("host_ip", "")
            continue
        parts = str(spec).split("/")[0].split(":")
        out[int(parts[-1])] = parts[0] if len(parts) == 3 else ""
    return out


def test_flower__basic_auth_from_the_environment_published_on_loopback_only(services):
    flower = services["flower"]
    cmd = main_command(flower)
    assert option(cmd, "--port") == str(FLOWER_PORT)
    assert option(cmd, "--address") == "0.0.0.0", "inside its container, for the compose network"
    assert published(flower).get(FLOWER_PORT) == FLOWER_PORT
    assert host_ips(flower)[FLOWER_PORT] == "127.0.0.1", "Flower must not face the world"
    auth = environment(flower).get("FLOWER_BASIC_AUTH", "") or (option(cmd, "--basic-auth") or "")
    assert auth.startswith("${FLOWER_BASIC_AUTH:?"), f"basic auth required, no default: {auth!r}"


def test_prometheus_is_not_published(services):
    assert not services["prometheus"].get("ports"), "Prometheus has no authentication"


def test_no_credential_is_written_into_the_file(services):
    for name, svc in services.items():
        for key, value in environment(svc).items():
            if "PASSWORD" in key or key in ("TXMON_SERVICE_KEYS", "TXMON_JWT_SECRET",
                                            "FLOWER_BASIC_AUTH"):
                assert value.startswith("${") and ":?" in value, f"{name}: {key}={value}"
            if key == "DATABASE_URL":
                assert urlsplit(interpolate(value)).password == "<POSTGRES_PASSWORD>", value
                assert "${POSTGRES_PASSWORD:?" in value, f"{name}: {value}"


def test_worker_metrics_port_matches_the_worker_code(services):
    worker = services["worker"]
    exposed = {int(str(p).split("/")[0]) for p in worker.get("expose", [])}
    exposed |= set(published(worker))
    assert WORKER_METRICS_PORT in exposed, "the worker must expose its metrics port"
    env = environment(worker)
    assert env.get("TXMON_WORKER_METRICS_ADDR") == "0.0.0.0"
    assert env.get("TXMON_WORKER_METRICS_PORT", str(WORKER_METRICS_PORT)) == str(
        WORKER_METRICS_PORT)
    assert env.get("PROMETHEUS_MULTIPROC_DIR"), "prefork children need multiprocess metrics"
    sources = "\n".join(p.read_text() for p in (ROOT / "worker_service").rglob("*.py"))
    default = re.search(r"""TXMON_WORKER_METRICS_PORT["']\s*,\s*["']?(\d+)""", sources)
    assert default, "worker_service reads TXMON_WORKER_METRICS_PORT with a default"
    assert int(default.group(1)) == WORKER_METRICS_PORT


# --- environment -----------------------------------------------------------------------------

def test_app_environment_points_at_the_compose_services(services):
    from shared.config import normalize_database_url

    for name in APP_SERVICES:
        env = environment(services[name])
        db = urlsplit(interpolate(env["DATABASE_URL"]))
        assert db.hostname == "postgres" and (db.port or 5432) == 5432, env["DATABASE_URL"]
        assert db.path == "/" + environment(services["postgres"])["POSTGRES_DB"]
        assert normalize_database_url(interpolate(env["DATABASE_URL"])).startswith(
            "postgresql+psycopg://")
        assert db.username == environment(services["postgres"])["POSTGRES_USER"]
        redis = urlsplit(env["REDIS_URL"])
        assert redis.hostname == "redis" and (redis.port or 6379) == 6379
        assert env["TXMON_ENV"] == "production"
        for secret in ("TXMON_SERVICE_KEYS", "TXMON_JWT_SECRET", "SMTP_URL"):
            assert env[secret].startswith("${" + secret), f"{name}: {secret} must come from ${{...}}"


# --- prometheus ------------------------------------------------------------------------------

def scrape_targets(prometheus: dict) -> dict[str, tuple[set[str], str]]:
    """{job: ({"host:port", ...}, metrics_path)} from static and DNS service discovery."""
    jobs = {}
    for job in prometheus["scrape_configs"]:
        targets = set()
        for sc in job.get("static_configs", []):
            targets.update(sc["targets"])
        for sd in job.get("dns_sd_configs", []):
            targets.update(f"{n}:{sd['port']}" for n in sd["names"])
        jobs[job["job_name"]] = (targets, job.get("metrics_path", "/metrics"))
    return jobs


def test_prometheus_scrapes_api_worker_and_flower(services, prometheus):
    wanted = {("api", API_PORT), ("worker", WORKER_METRICS_PORT), ("flower", FLOWER_PORT)}
    found = set()
    for targets, path in scrape_targets(prometheus).values():
        assert path == "/metrics"
        for target in targets:
            host, _, port = target.rpartition(":")
            assert host in services, f"scrape target {target} is not a compose service"
            svc = services[host]
            ports = set(published(svc)) | {int(str(p).split("/")[0])
                                            for p in svc.get("expose", [])}
            assert int(port) in ports, f"{target}: {host} does not publish/expose {port}"
            found.add((host, int(port)))
    assert wanted <= found, f"missing scrape targets: {wanted - found}"


def test_prometheus_service_mounts_the_scrape_config(services):
    volumes = services["prometheus"].get("volumes", [])
    assert any(str(v).split(":")[0] in ("./deploy/prometheus.yml", "deploy/prometheus.yml")
               and str(v).split(":")[1] == "/etc/prometheus/prometheus.yml" for v in volumes)


# --- Dockerfile ------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile_runs_in_production():
    env = " ".join(a for i, a in dockerfile() if i == "ENV")
    assert re.search(r"\bTXMON_ENV=production\b", env), env


def test_dockerfile_installs_base_requirements_and_copies_the_code(services):
    steps = dockerfile()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11")
    assert any(i == "RUN" and re.search(r"pip install --require-hashes -r requirements/base\.lock",
                                        a) for i, a in steps), \
        "the image must install the hash-pinned requirements/base.lock"
    copied = set()
    for instr, args in steps:
        if instr == "COPY":
            copied.update(p.rstrip("/") for p in args.split()[:-1])
    assert "." not in copied, "COPY . would put a local .venv/ or var/ into the image"
    # Everything the commands run must be in the image: the packages they import, the
    # migrations, gunicorn.conf.py and the requirements.
    needed = {"requirements", "migrations", "gunicorn.conf.py"}
    for pkg in ("api_service", "worker_service", "shared"):
        needed.add(pkg)
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if (ROOT / top / "__init__.py").is_file() or (ROOT / f"{top}.py").is_file():
                        needed.add(top if (ROOT / top).is_dir() else f"{top}.py")
    missing = needed - copied
    assert not missing, f"the Dockerfile does not COPY {sorted(missing)}"
