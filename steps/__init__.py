"""posttrain's step logic: plain Python, importable without Metaflow."""
