"""Traffic splits between pipeline versions, decided once per job at submit.

The latest version of a pipeline may name shares of unpinned jobs per version (`traffic: {"1": 90,
"2": 10}`). Both doors that start jobs (the Python client and `pipeline.run`, through
`routing.tasks.start_envelope`) call `routed_version`, so they split alike. The choice is a hash of
the job id: the same job always lands on the same version, so a watchdog re-dispatch or a resume
(which start the job again from its request) keeps the version it started on.
"""

import hashlib

from contracts.catalog import Catalog
from contracts.names import split_ref


def routed_version(catalog: Catalog, pipeline: str, version: str | None, job_id: str) -> str | None:
    """The version a request runs: the one it pins (in `pipeline@v` or `version`), else the traffic
    split's choice for this job id, else None (the latest)."""
    name, pinned = split_ref(pipeline)
    if pinned is not None or version is not None:
        return version
    traffic = catalog.pipeline(name).traffic
    if not traffic:
        return None
    return pick(traffic, job_id)


def pick(traffic: dict[str, int], job_id: str) -> str:
    """The version whose share the job id's hash falls in (versions in a fixed order)."""
    total = sum(traffic.values())
    point = int(hashlib.sha256(job_id.encode()).hexdigest()[:15], 16) % total
    for version in sorted(traffic):
        point -= traffic[version]
        if point < 0:
            return version
    raise AssertionError("unreachable: the shares sum to total")
