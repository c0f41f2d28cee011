"""The benchmark: experiment matrices, one process per run, telemetry, resumable results."""
