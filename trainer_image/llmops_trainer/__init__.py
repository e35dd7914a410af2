"""The workload side of llmops: preprocessing, training and serving processes run in pods."""
