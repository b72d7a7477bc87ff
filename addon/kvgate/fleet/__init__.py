"""The engines around the request path: clusters, health, engine metrics, discovery."""
