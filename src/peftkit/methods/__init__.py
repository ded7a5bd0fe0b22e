"""Method families. Importing this package registers every method with the config registry."""

from . import lora  # noqa: F401  (registers LORA)
