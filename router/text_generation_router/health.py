"""grpc.health.v1 status of the router: NOT_SERVING until the shards are warm, and while draining.

Both the overall status ("") and fmaas.GenerationService are kept equal, so
Kubernetes gRPC probes (which ask for "") and clients asking for the
service by name see the same answer.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2
from text_generation_server.pb.fmaas import generation_pb2

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


class HealthState:
    """Owns the health servicer and the router's current serving status."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.serving = False

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", GENERATION_SERVICE):
            await self.servicer.set(service, status)
        self.serving = serving
