"""School mail gateway: enforces the Electronic Communications Policy on every message."""

__version__ = "0.1.0"
