"""gunicorn settings for txmon's API (used by scripts/run, the benchmarks and docker-compose).

Every value can be overridden with GUNICORN_* style env vars below.
"""
import logging
import os
import re
import shutil
import tempfile

from gunicorn.glogging import Logger

bind = f"{os.environ.get('TXMON_BIND', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
# One process per CPU: more gevent processes than CPUs only add CPU per request and serve
# fewer requests (measured with scripts/bench write).
workers = int(os.environ.get("TXMON_WEB_WORKERS") or os.cpu_count() or 2)
# gevent: one process holds thousands of idle websockets; psycopg 3 and redis-py are
# cooperative once gunicorn's gevent worker has monkey-patched the standard library.
worker_class = os.environ.get("TXMON_WORKER_CLASS", "gevent")
worker_connections = int(os.environ.get("TXMON_WORKER_CONNECTIONS", "10000"))
# Under gevent the app makes psycopg wait with shared/gevent_pg.py (a real poll(0), then one
# io watcher on gevent's loop): psycopg's own fallback on the patched poll cost ~0.3 ms of
# CPU more per purchase. Never select: gevent's refuses descriptors >= 1024, which a process
# holding thousands of websockets reaches at once (tests/test_gevent_db.py).
threads = int(os.environ.get("TXMON_WEB_THREADS", "4"))  # used by the gthread class only
timeout = 30
graceful_timeout = 10
keepalive = 30
# Each worker gets a listening socket of its own and the kernel spreads new connections over
# them. Without it a gevent worker accepts as many connections as it can while the others
# sleep, and keep-alive clients stay where they landed (measured: 48 of 64 wrk connections
# on one of 4 workers).
reuse_port = True
# Path without the query string: a ?token= must never reach a log line.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'
accesslog = os.environ.get("TXMON_ACCESS_LOG", "-")
errorlog = "-"

# gunicorn's own error path logs the whole request line or URI (a websocket's ?token=).
_SECRETS = re.compile(r"(?i)([?&](?:token|access_token|api_key|apikey|key)=)[^&\s'\"]*"
                      r"|(bearer\s+)\S+|eyJ[\w-]+\.[\w-]+\.[\w-]*")


def redact(text: str) -> str:
    """``text`` with query-string credentials, bearer tokens and JWTs replaced."""
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2) or "") + "[redacted]", text)


class _Redact(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class RedactingLogger(Logger):
    """gunicorn's logger with credentials taken out of every error and access line."""

    def setup(self, cfg):
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            if not any(isinstance(f, _Redact) for f in log.filters):
                log.addFilter(_Redact())


logger_class = RedactingLogger


def on_starting(server):
    """Give prometheus_client a clean multiprocess directory for this server's workers."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="txmon-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def child_exit(server, worker):
    from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

    GunicornInternalPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


def when_ready(server):
    """With reuse_port the master binds nothing (each worker binds its own socket), and
    gunicorn's "Listening at:" line came out empty: say where the API is."""
    if server.cfg.reuse_port:
        server.log.info("Listening at: %s (a socket per worker: reuse_port)",
                        ", ".join(f"http://{address}" for address in server.cfg.bind))


def post_fork(server, worker):
    """A gevent worker quits once, without a traceback. Ctrl-C sends SIGINT to every process
    of the terminal's group and the master then sends each worker SIGQUIT too. gunicorn's
    gevent worker handles each in a new greenlet that sleeps 0.1 s, then calls sys.exit(0);
    a second such greenlet, or the first when the worker's own loop had finished in those
    0.1 s, ran while the worker was already shutting down and printed a SystemExit
    traceback. Here only the first quit signal starts that greenlet, and worker_exit (below)
    ends it if it is still waiting when the worker exits anyway. The handler goes in as
    gunicorn installs its own (``init_signals``, before the app is loaded), so it covers the
    worker's start-up too.
    SIGTERM (a graceful stop or restart) also closes every websocket with 1001: the worker
    waits up to graceful_timeout for open connections, and a socket never ends by itself, so
    each stop took the full 10 s and then cut the sockets without a close frame. Clients
    reconnect with since_seq to a worker that is up."""
    if type(worker).__module__ != "gunicorn.workers.ggevent":
        return
    import signal

    import gevent
    from gunicorn.workers.base import Worker

    init_signals = worker.init_signals

    def quit_once(sig, frame):
        if getattr(worker, "txmon_quit", None) is None:
            worker.txmon_quit = gevent.spawn(Worker.handle_quit, worker, sig, frame)

    def exit_closing_sockets(sig, frame):
        worker.handle_exit(sig, frame)
        from api_service.hub import going_away

        gevent.spawn(going_away)  # out of the signal handler: it takes the hub's lock

    def init_signals_quitting_once():
        init_signals()
        for sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, quit_once)
        signal.signal(signal.SIGTERM, exit_closing_sockets)
        signal.siginterrupt(signal.SIGTERM, False)

    worker.init_signals = init_signals_quitting_once


def post_worker_init(worker):
    """The app is loaded: move every object alive now (modules, the app, SQLAlchemy's
    metadata) out of the garbage collector's reach (``gc.freeze``). A full collection walked
    all of them with the event loop stopped, a pause during which no socket of the process
    moved (docs/DECISIONS.md).
    Then the realtime hub subscribes, before the first socket: a socket that connected
    first was resynced (a second snapshot) when the subscription came up."""
    import gc

    gc.freeze()
    config = getattr(getattr(worker, "wsgi", None), "config", None)
    if config is not None:  # txmon's Flask app (not a bare WSGI callable)
        from api_service.hub import hub_for

        hub_for(config["REDIS_URL"]).start(wait=2.0)


def post_request(worker, req, environ, resp):
    """A request whose body the app refused unread (api_service/admission.py) closes its
    connection: gunicorn would otherwise read the rest of the body to find the next one."""
    if environ.get("txmon.close_connection"):
        req.must_close = True


def worker_exit(server, worker):
    """The worker is exiting: a quit greenlet still waiting (post_fork) ends here."""
    quit_greenlet = getattr(worker, "txmon_quit", None)
    if quit_greenlet is not None:
        quit_greenlet.kill()
