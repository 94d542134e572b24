"""What it cost: per-request metrics, GPU telemetry, usage history, dashboards, planner."""
