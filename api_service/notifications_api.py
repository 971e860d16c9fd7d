"""A user's notifications and delivery preferences (Bearer JWT)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from api_service import schemas as s
from api_service.contract import operation
from shared import notifications

bp = Blueprint("notifications", __name__, url_prefix="/api/notifications")
TAGS = ("notifications",)


@bp.get("")
@operation("The caller's notifications, newest first", auth_as="user",
           query=s.NotificationQuery, tags=TAGS, responses={200: s.NotificationPage})
def list_notifications(principal, query):
    unread, rows, next_id = notifications.list_for_user(
        user_id=principal.user_id, unread_only=query.unread_only, limit=query.limit,
        before_id=int(query.cursor) if query.cursor else None)
    return jsonify({"unread_count": unread,
                    "notifications": [notifications.serialize(n) for n in rows],
                    "next_cursor": str(next_id) if next_id is not None else None})


@bp.post("/<int(min=1, max=9223372036854775807):notification_id>/read")
@operation("Mark one notification read", auth_as="user", tags=TAGS,
           responses={200: s.NotificationOut, 404: s.ErrorOut})
def read_one(notification_id, principal):
    n = notifications.mark_read(user_id=principal.user_id, notification_id=notification_id)
    return jsonify(notifications.serialize(n))


@bp.post("/read-all")
@operation("Mark every notification read", auth_as="user", tags=TAGS,
           responses={200: s.UpdatedOut})
def read_all(principal):
    return jsonify({"updated": notifications.mark_all_read(user_id=principal.user_id)})


@bp.get("/preferences")
@operation("The caller's delivery preferences", auth_as="user", tags=TAGS,
           responses={200: s.PreferencesOut})
def get_preferences(principal):
    return jsonify(notifications.get_preferences(user_id=principal.user_id))


@bp.put("/preferences")
@operation("Change delivery preferences (fields left out keep their value)", auth_as="user",
           body=s.PreferencesIn, tags=TAGS, responses={200: s.PreferencesOut})
def put_preferences(principal, body):
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    return jsonify(notifications.update_preferences(user_id=principal.user_id, changes=changes))
