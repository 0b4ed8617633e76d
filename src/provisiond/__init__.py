"""provisiond: a self-hostable device provisioning service, wire-compatible with Azure IoT Hub DPS."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
