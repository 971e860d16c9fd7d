"""Route declarations: who may call, what the body and query must be, what comes back.

``@operation(...)`` authenticates, validates path ids, the JSON body and the query string with
the pydantic models of schemas.py, and records the same models so ``openapi_document`` can
describe every route. Views receive parsed objects and never look at raw input.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from flask import Flask, request
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticError
from pydantic.json_schema import models_json_schema

from api_service import auth
from api_service.schemas import Body, ErrorOut, Id
from shared.errors import BadRequest, ValidationFailed

_ID = TypeAdapter(Id)
REF = "#/components/schemas/{model}"
ERRORS_BY_AUTH = {None: (), "service": (401, 403), "user": (401, 403, 429),
                  "admin": (401, 403, 429)}
SECURITY = {"service": [{"serviceKey": []}], "user": [{"bearer": []}],
            "admin": [{"bearer": []}], None: []}


@dataclass
class Operation:
    summary: str
    auth: str | None
    responses: dict[int, type[BaseModel] | None]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    id_params: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)
    content_type: str = "application/json"


def field_errors(exc: PydanticError) -> list[dict]:
    """Pydantic errors as the contract's ``details.fields`` list."""
    return [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"],
             "type": e["type"]} for e in exc.errors(include_url=False, include_context=False)]


def _json_body(model: type[BaseModel]) -> BaseModel:
    raw = request.get_data(cache=False)
    if not raw and not any(f.is_required() for f in model.model_fields.values()):
        return model()  # an optional-only body may be left out entirely (whitespace is not JSON)
    try:
        return model.model_validate_json(raw)
    except PydanticError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] in ("json_invalid", "json_type") for e in errors) or (
                errors and errors[0]["type"] == "model_type"):
            raise BadRequest("The request body must be a JSON object.") from None
        raise ValidationFailed("The request has invalid fields.",
                               {"fields": field_errors(exc)}) from None


def _query(model: type[BaseModel]) -> BaseModel:
    args = {}
    for key in request.args:
        values = request.args.getlist(key)
        args[key] = values[0] if len(values) == 1 else values
    try:
        return model.model_validate(args)
    except PydanticError as exc:
        raise ValidationFailed("The query string has invalid parameters.",
                               {"fields": field_errors(exc)}) from None


def _ids(names: tuple[str, ...], values: dict) -> None:
    bad = []
    for name in names:
        try:
            _ID.validate_python(values[name])
        except PydanticError as exc:
            bad.append({"field": name, "message": exc.errors()[0]["msg"], "type": "path"})
    if bad:
        raise ValidationFailed("The URL has an invalid id.", {"fields": bad})


def operation(summary: str, *, auth_as: str | None, responses: dict, body=None, query=None,
              ids: tuple[str, ...] = (), tags: tuple[str, ...] = (),
              content_type: str = "application/json"):
    """Declare a route: authenticate as ``auth_as``, validate, and document it."""
    op = Operation(summary, auth_as, responses, body, query, ids, tags, content_type)

    def decorate(view):
        @functools.wraps(view)
        def wrapper(**path):
            kwargs = dict(path)
            if auth_as is not None:
                kwargs["principal"] = auth.authenticate(auth_as)
            _ids(ids, path)
            if body is not None:
                kwargs["body"] = _json_body(body)
            if query is not None:
                kwargs["query"] = _query(query)
            return view(**kwargs)

        wrapper.txmon_operation = op
        return wrapper

    return decorate


# -- OpenAPI -----------------------------------------------------------------------------

_PATH_PARAM = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")


def _parameters(rule, op: Operation, query_schema: dict | None) -> list[dict]:
    params = []
    for converter, name in _PATH_PARAM.findall(rule.rule):
        schema = ({"type": "integer", "minimum": 1, "maximum": 2**63 - 1} if converter == "int"
                  else TypeAdapter(Id).json_schema())
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    if query_schema:
        required = set(query_schema.get("required", ()))
        for name, schema in query_schema["properties"].items():
            params.append({"name": name, "in": "query", "required": name in required,
                           "schema": schema})
    return params


def openapi_document(app: Flask) -> dict:
    """OpenAPI 3.1 of every declared route, built from the validating models."""
    ops = []
    for rule in app.url_map.iter_rules():
        op = getattr(app.view_functions.get(rule.endpoint), "txmon_operation", None)
        if op is not None:
            ops.append((rule, op))
    models = {ErrorOut}
    for _, op in ops:
        models.update(m for m in (op.body, *op.responses.values()) if m is not None)
    keyed, schemas = models_json_schema(
        [(m, "validation" if issubclass(m, Body) else "serialization")
         for m in sorted(models, key=lambda m: m.__name__)], ref_template=REF)
    components = schemas.get("$defs", {})
    paths: dict[str, dict] = {}
    for rule, op in sorted(ops, key=lambda pair: pair[0].rule):
        path = _PATH_PARAM.sub(r"{\2}", rule.rule)
        query_schema = op.query.model_json_schema() if op.query else None
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            entry = {"summary": op.summary, "operationId": rule.endpoint.replace(".", "_"),
                     "tags": list(op.tags), "parameters": _parameters(rule, op, query_schema),
                     "security": SECURITY[op.auth], "responses": {}}
            if op.body is not None:
                entry["requestBody"] = {"required": any(
                    f.is_required() for f in op.body.model_fields.values()),
                    "content": {"application/json": {"schema": {"$ref": REF.format(
                        model=op.body.__name__)}}}}
            for status, model in op.responses.items():
                content = ({"schema": {"$ref": REF.format(model=model.__name__)}}
                           if model is not None else {"schema": {"type": "string"}})
                entry["responses"][str(status)] = {"description": str(status), "content": {
                    op.content_type if status < 300 else "application/json": content}}
            error_codes = set(ERRORS_BY_AUTH[op.auth]) | {503}
            if op.body is not None:
                error_codes |= {400, 422}
            if op.query is not None or op.id_params:
                error_codes |= {422}
            for status in sorted(error_codes - set(op.responses)):
                entry["responses"][str(status)] = {"description": "error", "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="ErrorOut")}}}}
            paths.setdefault(path, {})[method.lower()] = entry
    return {"openapi": "3.1.0",
            "info": {"title": "txmon", "version": "1.0.0",
                     "description": "Transaction monitoring and notifications for prepaid "
                                    "credits. Amounts are integer cents."},
            "paths": paths,
            "components": {"schemas": components, "securitySchemes": {
                "serviceKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}}}
