"""The lab's TVMM builds: deterministic artifacts and the boot they measure.

The lab cannot boot real firmware, so each lab build is a set of small artifact files whose
contents depend only on the build's name, plus the real TVMM service (tccdeploy-tvmm, built
deterministically from this checkout: a change to the service is a change to every build). That makes their digests stable, so the example
TVMMBuild manifests in examples/builds/ list exactly what a lab node measures, and a test
keeps the two from drifting apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# (PCR, event type, artifact or None for a separator), in measurement order.
BOOT_SEQUENCE: tuple[tuple[int, str, str | None], ...] = (
    (0, "EV_POST_CODE", "firmware"),
    (0, "EV_SEPARATOR", None),
    (4, "EV_EFI_BOOT_SERVICES_APPLICATION", "bootloader"),
    (4, "EV_EFI_BOOT_SERVICES_APPLICATION", "kernel"),
    (4, "EV_SEPARATOR", None),
    (8, "EV_IPL", "cmdline"),
    (9, "EV_IPL", "initrd"),
    (11, "EV_IPL", "hypervisor"),
    (11, "EV_IPL", "tvmm-service"),
)
POLICY_PCRS: tuple[int, ...] = (0, 4, 8, 9, 11)
ARTIFACTS: tuple[str, ...] = ("firmware", "bootloader", "kernel", "initrd", "hypervisor", "tvmm-service", "cmdline")
SEPARATOR_DATA = b"\x00\x00\x00\x00"


@dataclass(frozen=True)
class LabBuild:
    name: str
    version: str
    status: str


LAB_BUILDS: tuple[LabBuild, ...] = (
    LabBuild("tvmm-2026.1", "2026.1.0", "approved"),
    LabBuild("tvmm-2026.2", "2026.2.0", "approved"),
    LabBuild("tvmm-2025.4", "2025.4.0", "revoked"),
)


def lab_build(name: str) -> LabBuild:
    for build in LAB_BUILDS:
        if build.name == name:
            return build
    raise KeyError(name)


def artifact_bytes(build: str, artifact: str) -> bytes:
    """Contents of one lab artifact; a few KiB, different per build and per artifact."""
    if artifact == "cmdline":
        return f"console=ttyS0 ro tccdeploy.build={build}".encode()
    if artifact == "tvmm-service":  # the real service, the same in every lab build
        from ..bundles import service_bundle

        return service_bundle()[0]
    seed = hashlib.sha256(f"tccdeploy-lab/{build}/{artifact}".encode()).digest()
    body = (seed * 128)[:4096]
    return f"tccdeploy lab {artifact} for {build}\n".encode() + body


def artifact_digest(build: str, artifact: str) -> str:
    return hashlib.sha256(artifact_bytes(build, artifact)).hexdigest()


def build_manifest(build: LabBuild, artifact_dir: str | None = None) -> dict:
    """The TVMMBuild manifest a lab node booted into `build` matches."""
    artifacts: dict[str, dict] = {}
    for name in ARTIFACTS:
        entry: dict = {}
        if name == "cmdline":
            entry["value"] = artifact_bytes(build.name, name).decode()
        elif artifact_dir is not None:
            entry["path"] = f"{artifact_dir}/{build.name}/{name}"
        entry["sha256"] = artifact_digest(build.name, name)
        artifacts[name] = entry
    pcrs: dict[int, list[dict]] = {}
    for pcr, event_type, artifact in BOOT_SEQUENCE:
        if artifact is None:
            event = {"digest": hashlib.sha256(SEPARATOR_DATA).hexdigest(), "type": event_type,
                     "description": "separator"}
        else:
            event = {"artifact": artifact, "type": event_type}
        pcrs.setdefault(pcr, []).append(event)
    return {
        "apiVersion": "tccdeploy/v1",
        "kind": "TVMMBuild",
        "metadata": {"name": build.name, "description": f"lab TVMM build {build.version} ({build.status})"},
        "spec": {
            "version": build.version,
            "status": build.status,
            "artifacts": artifacts,
            "measurements": {
                "bank": "sha256",
                "pcrs": [{"pcr": pcr, "events": events} for pcr, events in sorted(pcrs.items())],
            },
        },
    }
