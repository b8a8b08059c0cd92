"""Moved to runtime/atomic.py (the one module that renames outputs into place); kept for old imports."""

from runtime.atomic import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
