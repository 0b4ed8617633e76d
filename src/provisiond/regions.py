"""Regions and the distances between them, for geoLatency allocation. Pure.

A provisiond node has a region (``serve --region``) and each linked hub a ``location``. Both
are names: an Azure region (``westeurope``, or as the portal spells it, ``West Europe``) or any
name of the operator's own (``plant-7``). Names compare without regard to case, spaces, hyphens
and underscores. Two names are

- at distance 0 when they are the same name;
- at the great-circle distance between their coordinates when both are Azure regions (the
  coordinates Azure publishes for its regions, ``az account list-locations``; for regions opened
  since, their city's), rounded to whole kilometres so that regions on one site tie exactly;
- at no known distance otherwise (a name of the operator's own is near only to itself).

provisiond does not measure latency: distance stands in for it, as it does for DPS, which
assigns a device to the hub nearest to the DPS region that answered it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["AZURE_REGIONS", "NAME_RULE", "distance_km", "is_azure_region", "is_valid_name", "normalize"]

#: Azure regions: (latitude, longitude) in degrees.
AZURE_REGIONS: Mapping[str, tuple[float, float]] = {
    # Americas
    "eastus": (37.3719, -79.8164),
    "eastus2": (36.6681, -78.3889),
    "centralus": (41.5908, -93.6208),
    "northcentralus": (41.8819, -87.6278),
    "southcentralus": (29.4167, -98.5),
    "westcentralus": (40.89, -110.234),
    "westus": (37.783, -122.417),
    "westus2": (47.233, -119.852),
    "westus3": (33.448, -112.074),
    "canadacentral": (43.653, -79.383),
    "canadaeast": (46.817, -71.217),
    "mexicocentral": (20.588, -100.389),
    "brazilsouth": (-23.55, -46.633),
    "brazilsoutheast": (-22.907, -43.173),
    "chilecentral": (-33.449, -70.669),
    "usgovvirginia": (37.3719, -79.8164),
    "usgovarizona": (33.448, -112.074),
    "usgovtexas": (29.4167, -98.5),
    # Europe
    "northeurope": (53.3478, -6.2597),
    "westeurope": (52.3667, 4.9),
    "uksouth": (50.941, -0.799),
    "ukwest": (53.427, -3.084),
    "francecentral": (46.3772, 2.373),
    "francesouth": (43.8345, 2.1972),
    "germanywestcentral": (50.110924, 8.682127),
    "germanynorth": (53.073635, 8.806422),
    "switzerlandnorth": (47.451542, 8.564572),
    "switzerlandwest": (46.204391, 6.143158),
    "norwayeast": (59.913868, 10.752245),
    "norwaywest": (58.969975, 5.733107),
    "swedencentral": (60.675, 17.141),
    "swedensouth": (55.605, 13.004),
    "polandcentral": (52.23, 21.012),
    "italynorth": (45.464, 9.19),
    "spaincentral": (40.417, -3.704),
    "austriaeast": (48.208, 16.374),
    # Asia Pacific
    "eastasia": (22.267, 114.188),
    "southeastasia": (1.283, 103.833),
    "japaneast": (35.68, 139.77),
    "japanwest": (34.6939, 135.5022),
    "koreacentral": (37.5665, 126.978),
    "koreasouth": (35.1796, 129.0756),
    "centralindia": (18.5822, 73.9197),
    "southindia": (12.9822, 80.1636),
    "westindia": (19.088, 72.868),
    "jioindiawest": (22.47, 70.057),
    "jioindiacentral": (21.146, 79.088),
    "indonesiacentral": (-6.209, 106.846),
    "malaysiawest": (3.139, 101.687),
    "australiaeast": (-33.86, 151.2094),
    "australiasoutheast": (-37.8136, 144.9631),
    "australiacentral": (-35.3075, 149.1244),
    "australiacentral2": (-35.3075, 149.1244),
    "newzealandnorth": (-36.848, 174.763),
    "chinaeast": (31.23, 121.474),
    "chinaeast2": (31.23, 121.474),
    "chinaeast3": (32.06, 118.797),
    "chinanorth": (39.904, 116.407),
    "chinanorth2": (39.904, 116.407),
    "chinanorth3": (38.042, 114.515),
    # Middle East and Africa
    "uaenorth": (25.266666, 55.316666),
    "uaecentral": (24.466667, 54.366669),
    "qatarcentral": (25.285, 51.531),
    "israelcentral": (31.046, 34.852),
    "southafricanorth": (-25.73134, 28.21837),
    "southafricawest": (-34.075691, 18.843266),
}

_EARTH_RADIUS_KM = 6371.0
_IGNORED = str.maketrans("", "", " -_")


def normalize(name: str) -> str:
    """A region or location name as it is compared: lower case, without spaces, hyphens and
    underscores (``West Europe`` and ``west-europe`` are ``westeurope``)."""
    return name.lower().translate(_IGNORED)


#: What :func:`is_valid_name` accepts, for error messages.
NAME_RULE = "1-64 characters: letters and digits (spaces, hyphens and underscores are ignored)"


def is_valid_name(name: str) -> bool:
    """Whether ``name`` can be a region or a location (:data:`NAME_RULE`)."""
    key = normalize(name)
    return 0 < len(name) <= 64 and key.isascii() and key.isalnum()


def is_azure_region(name: str) -> bool:
    return normalize(name) in AZURE_REGIONS


def distance_km(a: str | None, b: str | None) -> int | None:
    """The distance between two named places, in whole kilometres, or ``None`` when it is not
    known (either is ``None``, or they are different names that are not both Azure regions)."""
    if a is None or b is None:
        return None
    a, b = normalize(a), normalize(b)
    if a == b:
        return 0
    if a not in AZURE_REGIONS or b not in AZURE_REGIONS:
        return None
    (lat1, lon1), (lat2, lon2) = AZURE_REGIONS[a], AZURE_REGIONS[b]
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return round(2 * _EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h))))
