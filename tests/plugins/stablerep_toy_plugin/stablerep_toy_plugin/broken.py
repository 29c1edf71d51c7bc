"""An entry point whose module fails to import (a missing dependency)."""
import stablerep_toy_plugin_missing_dependency  # noqa: F401

BrokenMethod = None
