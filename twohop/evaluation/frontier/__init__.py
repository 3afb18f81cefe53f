"""Real two-hop facts asked of local and API models (backends, response cache, tasks)."""
