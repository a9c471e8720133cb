"""The long-running client: lifecycle, jobs, schedule, run records, health, metrics, webhooks."""
