"""Task modules, one per family. Outbox handlers are declared in shared/outbox.py and bound
to their batch bodies here with worker_service.runner.handles; task modules never import
the Celery app."""


def each(rows, key: str, body) -> dict:
    """``body(payload[key])`` for every row, a row's exception kept as its result (one
    poisoned row does not hold up the batch)."""
    results = {}
    for row in rows:
        try:
            results[row.id] = body(row.payload[key])
        except Exception as exc:
            results[row.id] = exc
            from shared.db import db

            db.session.rollback()  # the next row starts on a clean session
    return results


def ids_of(rows, key: str) -> tuple[dict, dict]:
    """({row id: payload[key]} for rows that carry an integer ``key``, {row id: error} for
    the others)."""
    good, bad = {}, {}
    for row in rows:
        value = row.payload.get(key) if isinstance(row.payload, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            good[row.id] = value
        else:
            bad[row.id] = ValueError(f"outbox payload without an integer {key}: {row.payload!r}")
    return good, bad
