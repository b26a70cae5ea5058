"""The OpenTelemetry resource of an agent process and the Prometheus target_info built from it."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh._observability.metrics import MeshCollector
from mesh._observability.resource import service_resource


@pytest.fixture(autouse=True)
def no_otel_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the standard OTEL_* resource variables."""
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)


def target_info(resource: dict[str, str]) -> dict[str, str]:
    registry = CollectorRegistry()
    registry.register(MeshCollector(resource, sources=list))
    text = generate_latest(registry).decode()
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "target_info"]
    return dict(family.samples[0].labels)


def test_service_name_is_the_agent_and_the_instance_is_named() -> None:
    """By default service.name is the agent's name, never unknown_service."""
    attrs = service_resource("researcher", "62a8f0").attributes

    assert attrs["service.name"] == "researcher"
    assert attrs["service.instance.id"] == "62a8f0"
    assert attrs["telemetry.sdk.language"] == "python"


def test_otel_service_name_overrides_the_agent_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SERVICE_NAME wins over the agent's name, as in every OpenTelemetry SDK."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing")

    attrs = service_resource("researcher", "62a8f0").attributes

    assert attrs["service.name"] == "billing"
    assert attrs["service.instance.id"] == "62a8f0"


def test_otel_resource_attributes_are_kept_and_win(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_RESOURCE_ATTRIBUTES adds attributes and may set the instance id itself."""
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.instance.id=pod-7"
    )

    attrs = service_resource("researcher", "62a8f0").attributes

    assert attrs["service.name"] == "researcher"
    assert attrs["service.instance.id"] == "pod-7"
    assert attrs["deployment.environment"] == "prod"


def test_without_an_instance_the_sdk_default_stands() -> None:
    """Before enrolment the instance is unknown: the SDK's own default (if any) stands."""
    attrs = service_resource("researcher").attributes

    assert attrs["service.name"] == "researcher"
    assert attrs.get("service.instance.id") != ""


def test_target_info_carries_the_resource_as_prometheus_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prometheus sees the resource as target_info, dots made underscores."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing")
    resource = {k: str(v) for k, v in service_resource("researcher", "i1").attributes.items()}

    labels = target_info(resource)

    assert labels["service_name"] == "billing"
    assert labels["service_instance_id"] == "i1"
