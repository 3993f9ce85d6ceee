"""The pipeline between ingest and publish: ring buffer -> sampler -> planner/scheduler -> engine.

`daemon.Daemon` wires live streams through it; `offline` runs it over a file.
"""
