"""ddsuite.scenarios: YAML scenario files and their typed schema."""
