"""The OpenTelemetry resource of an agent process: who the spans and metrics come from."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

__all__ = ["service_resource"]


def service_resource(agent: str, instance: str | None = None) -> Resource:
    """The resource for ``agent``'s spans and metrics.

    ``service.name`` is the agent's name and ``service.instance.id`` its instance, unless the
    standard variables say otherwise: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
    win over these defaults (as every OpenTelemetry SDK lets them), and the SDK's resource
    detectors add the rest (``telemetry.sdk.*``, ``OTEL_EXPERIMENTAL_RESOURCE_DETECTORS``).

    Args:
        agent: the agent's name, the default ``service.name``.
        instance: the instance id, the default ``service.instance.id`` (when unknown, the
            SDK's own default stands).

    Returns:
        The resource, as ``Resource.create`` builds it.
    """
    from opentelemetry.sdk.resources import (
        SERVICE_INSTANCE_ID,
        SERVICE_NAME,
        OTELResourceDetector,
        Resource,
    )

    defaults = {SERVICE_NAME: agent}
    if instance:
        defaults[SERVICE_INSTANCE_ID] = instance
    # Resource.create puts its argument over the environment's attributes; the standard
    # variables are the operator's word, so give it only the defaults they do not set.
    configured = OTELResourceDetector().detect().attributes
    return Resource.create({k: v for k, v in defaults.items() if k not in configured})
