"""What the gateway tells its operators: counters, Prometheus metrics."""
