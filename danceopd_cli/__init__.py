"""The `danceopd` command line (application layer: may use danceopd, services and trainer)."""
