"""Webhooks: the outcome as a JSON POST, its body from the notification's ``body`` template.

The template is a TOML table whose strings may name variables, ``"${accession_number}"``
(:data:`dicomnode.config.TEMPLATE_VARIABLES`, their values from
:func:`dicomnode.notify.message.variables`): substitution only, no expressions, no attribute
access, so a template can say nothing the node did not put in the variables. A string that is
one variable alone (``"${findings}"``) becomes that variable's JSON value (a list, a number, a
boolean); inside a longer string a list or a table is written as JSON, and nothing as "".
Without a template the body is the whole outcome without patient names or IDs
(:func:`default_body`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from string import Template
from typing import TYPE_CHECKING, Any

from dicomnode.notify.http import post_json
from dicomnode.notify.message import summary, variables

if TYPE_CHECKING:
    from dicomnode.config import NotificationSettings

_WHOLE = re.compile(r"^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))$")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def render(template: Any, values: Mapping[str, Any]) -> Any:
    """``template`` with its variables replaced by ``values`` (KeyError for a variable that has
    none: the config refuses such a template at start)."""
    if isinstance(template, str):
        whole = _WHOLE.match(template)
        if whole:
            return values[whole.group(1) or whole.group(2)]
        return Template(template).substitute({k: _text(v) for k, v in values.items()})
    if isinstance(template, Mapping):
        return {str(render(k, values)): render(v, values) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [render(v, values) for v in template]
    return template


def default_body(context: Mapping[str, Any], delivery_id: str) -> dict[str, Any]:
    """The body without a template: the event, the job, the study (its UID, accession,
    description, date and modalities; no patient name or ID), the model, every finding and
    the outcome."""
    study = context.get("study") or {}
    result = context.get("result") or {}
    return {
        "event": context.get("event"),
        "delivery_id": delivery_id,
        "at": context.get("at"),
        "summary": summary(context),
        "job": context.get("job"),
        "study": {
            "study_instance_uid": (context.get("job") or {}).get("study_instance_uid"),
            **{
                k: study.get(k)
                for k in ("accession_number", "study_description", "study_date", "modalities")
            },
        },
        "model": {k: result.get(k) for k in ("model", "version", "demo", "envelope_inside")},
        "findings": context.get("findings") or [],
        "objects": result.get("objects") or [],
        "outcome": context.get("outcome"),
    }


def body(settings: NotificationSettings, context: Mapping[str, Any], delivery_id: str) -> Any:
    """The JSON body a webhook gets for ``context``."""
    if settings.body is None:
        return default_body(context, delivery_id)
    return render(settings.body, variables(context, delivery_id))


def deliver(settings: NotificationSettings, context: Mapping[str, Any], delivery_id: str) -> str:
    """POST the body to the webhook's URL; what it answered (NotifyError when it did not take
    it)."""
    assert settings.url is not None
    response = post_json(
        settings,
        settings.url,
        body(settings, context, delivery_id),
        delivery_id=delivery_id,
        event=str(context.get("event")),
    )
    return f"HTTP {response.status_code}"
