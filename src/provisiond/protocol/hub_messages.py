"""IoT Hub's error bodies, as the built-in hubs answer them (iothub.md §1.6, §3.6). Pure.

- **REST** (the service API): the legacy shape every official service SDK reads,
  ``{"Message": "ErrorCode:{name};{text}", "ExceptionMessage": "Tracking ID:{id}-G:0-TimeStamp:{time}"}``,
  with the ``iothub-errorcode: {name}`` header. The Node.js SDK (``azure-iothub``
  ``Http.parseErrorBody``) splits ``Message`` on ``;`` and ``:`` and tells ``DeviceNotFound``
  from other 404s by the name; the text therefore never contains ``;``.
- **MQTT** (twin responses): ``{"errorCode": 404001, "trackingId", "message", "timestampUtc"}``;
  the Node.js device SDK reports a twin error only when the body has ``errorCode``.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from ..errors import IotHubCode

__all__ = ["mqtt_error_body", "rest_error_body"]

_encoder = msgspec.json.Encoder()


def _legacy_time(iso: str) -> str:
    """``2026-01-02T03:04:05.123456Z`` as IoT Hub's ExceptionMessage writes times
    (``01/02/2026 03:04:05``)."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%m/%d/%Y %H:%M:%S")
    except ValueError:
        return iso


def rest_error_body(code: IotHubCode, message: str, tracking_id: str, timestamp_utc: str) -> bytes:
    """The REST API's error body (and ``iothub-errorcode`` is ``code.iothub_name``)."""
    text = message.replace(";", ",")
    return _encoder.encode(
        {
            "Message": f"ErrorCode:{code.iothub_name};{text}",
            "ExceptionMessage": f"Tracking ID:{tracking_id}-G:0-TimeStamp:{_legacy_time(timestamp_utc)}",
        }
    )


def mqtt_error_body(code: IotHubCode, message: str, tracking_id: str, timestamp_utc: str) -> bytes:
    """The body of an MQTT twin response with an error status."""
    return _encoder.encode(
        {"errorCode": int(code), "trackingId": tracking_id, "message": message, "timestampUtc": timestamp_utc}
    )
