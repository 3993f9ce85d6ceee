"""Publish: the caption hub (fan-out), the wire protocol, caption formats, and the sinks
that consume the hub (live subtitle files, webhooks)."""
