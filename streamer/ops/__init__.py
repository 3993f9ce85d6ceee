"""Operating the daemon: metrics, logs, progress bars, task supervision."""
