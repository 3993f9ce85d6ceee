"""Several replicas on one Redis: the shared stream set, stream ownership with failover, and
requests routed to a stream's owner (`[bus]` with `ownership = true`)."""

from streamer.cluster.ownership import NotOwner, Ownership, RegistryFull, RequestFailed

__all__ = ["NotOwner", "Ownership", "RegistryFull", "RequestFailed"]
