"""pytest plugin: fixtures that run a real trioworker server in-process (filled in below)."""
