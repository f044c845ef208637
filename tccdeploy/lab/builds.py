"""The lab's hardware models and TVMM builds: deterministic artifacts and the boot they measure.

The lab cannot boot real firmware, so each lab build is a set of small artifact files whose
contents depend only on the build's name, plus the real TVMM service (tccdeploy-tvmm, built
deterministically from this checkout: a change to the service is a change to every build).
The firmware is the hardware model's, not the build's: lab nodes come in two "models" whose
firmware measures differently into PCR 0, and every build runs on both, as a real fleet mixes
hardware under one TVMM build. That makes the digests stable, so the example Platform and
TVMMBuild manifests in examples/ list exactly what a lab node measures, and a test keeps the
two from drifting apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# (PCR, event type, artifact or None for a separator), in measurement order: first what the
# model's firmware measures (the platform's PCRs), then the build's boot chain.
PLATFORM_SEQUENCE: tuple[tuple[int, str, str | None], ...] = (
    (0, "EV_POST_CODE", "firmware"),
    (0, "EV_SEPARATOR", None),
)
PLATFORM_PCRS: tuple[int, ...] = (0,)
BUILD_SEQUENCE: tuple[tuple[int, str, str | None], ...] = (
    (4, "EV_EFI_BOOT_SERVICES_APPLICATION", "bootloader"),
    (4, "EV_EFI_BOOT_SERVICES_APPLICATION", "kernel"),
    (4, "EV_SEPARATOR", None),
    (8, "EV_IPL", "cmdline"),
    (9, "EV_IPL", "initrd"),
    (11, "EV_IPL", "hypervisor"),
    (11, "EV_IPL", "tvmm-service"),
)
BOOT_SEQUENCE = PLATFORM_SEQUENCE + BUILD_SEQUENCE
POLICY_PCRS: tuple[int, ...] = (0, 4, 8, 9, 11)
ARTIFACTS: tuple[str, ...] = ("bootloader", "kernel", "initrd", "hypervisor", "tvmm-service", "cmdline")
SEPARATOR_DATA = b"\x00\x00\x00\x00"


@dataclass(frozen=True)
class LabBuild:
    name: str
    version: str
    status: str
    rollout: tuple[str, ...] = ()  # a candidate's nodes


LAB_BUILDS: tuple[LabBuild, ...] = (
    LabBuild("tvmm-2026.1", "2026.1.0", "approved"),
    LabBuild("tvmm-2026.2", "2026.2.0", "approved"),
    LabBuild("tvmm-2025.4", "2025.4.0", "revoked"),
    LabBuild("tvmm-2026.3", "2026.3.0", "candidate", ("node1",)),
)


@dataclass(frozen=True)
class LabPlatform:
    """A lab hardware model: its firmware (a few KiB, fixed by the name) and its status."""

    name: str
    model: str
    version: str
    status: str


LAB_PLATFORMS: tuple[LabPlatform, ...] = (
    LabPlatform("lab-model-a", "tccdeploy lab model A (1U, vendor A firmware)", "1.4.0", "approved"),
    LabPlatform("lab-model-b", "tccdeploy lab model B (2U, vendor B firmware)", "3.2.1", "approved"),
)
DEFAULT_MODEL = LAB_PLATFORMS[0].name


def firmware_bytes(model: str) -> bytes:
    """The model's firmware image as it measures itself (EV_POST_CODE)."""
    seed = hashlib.sha256(f"tccdeploy-lab/firmware/{model}".encode()).digest()
    return f"tccdeploy lab firmware of {model}\n".encode() + (seed * 128)[:4096]


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


def _reference(sequence: tuple[tuple[int, str, str | None], ...], digest_of) -> dict[int, list[dict]]:  # type: ignore[no-untyped-def]
    pcrs: dict[int, list[dict]] = {}
    for pcr, event_type, artifact in sequence:
        if artifact is None:
            event = {"digest": hashlib.sha256(SEPARATOR_DATA).hexdigest(), "type": event_type,
                     "description": "separator"}
        else:
            event = digest_of(artifact) | {"type": event_type}
        pcrs.setdefault(pcr, []).append(event)
    return pcrs


def platform_manifest(platform: LabPlatform) -> dict:
    """The Platform manifest a lab node of this model matches."""
    firmware = hashlib.sha256(firmware_bytes(platform.name)).hexdigest()
    pcrs = _reference(PLATFORM_SEQUENCE, lambda artifact: {"digest": firmware, "description": f"firmware {platform.version}"})
    return _manifest("Platform", platform.name, f"lab hardware model ({platform.status})",
                     {"model": platform.model, "version": platform.version, "status": platform.status}, pcrs)


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
    pcrs = _reference(BUILD_SEQUENCE, lambda artifact: {"artifact": artifact})
    spec_extra = {"rollout": {"nodes": list(build.rollout)}} if build.rollout else {}
    return _manifest("TVMMBuild", build.name, f"lab TVMM build {build.version} ({build.status})",
                     {"version": build.version, "status": build.status, **spec_extra, "artifacts": artifacts}, pcrs)


def _manifest(kind: str, name: str, description: str, spec: dict, pcrs: dict[int, list[dict]]) -> dict:
    """A lab manifest of kind: spec's fields, then the sha256 reference measurements per PCR."""
    measurements = {"bank": "sha256", "pcrs": [{"pcr": pcr, "events": events} for pcr, events in sorted(pcrs.items())]}
    return {"apiVersion": "tccdeploy/v1", "kind": kind, "metadata": {"name": name, "description": description},
            "spec": {**spec, "measurements": measurements}}


def boot_events(build: str, model: str = DEFAULT_MODEL,
                contents: dict[str, bytes] | None = None) -> list[tuple[int, str, bytes, bytes]]:
    """What a lab node of `model` booting `build` measures, in order: (PCR, event type, the bytes
    measured, the event's data as firmware and GRUB log it). contents: the build's artifacts as
    the boot loader read them (default: the lab's own copy of build)."""
    from ..eventlog import image_load_event

    out = []
    for pcr, event_type, artifact in BOOT_SEQUENCE:
        if artifact is None:
            out.append((pcr, event_type, SEPARATOR_DATA, SEPARATOR_DATA))
            continue
        if artifact == "firmware":
            content = firmware_bytes(model)
        else:
            content = contents[artifact] if contents is not None else artifact_bytes(build, artifact)
        if event_type == "EV_EFI_BOOT_SERVICES_APPLICATION":
            data = image_load_event(len(content))
        elif event_type == "EV_POST_CODE":
            data = f"firmware of {model}".encode()
        elif artifact == "cmdline":
            data = content + b"\x00"  # EV_IPL strings are NUL-terminated, as GRUB logs them
        else:
            data = f"/boot/tccdeploy/{build}/{artifact}".encode() + b"\x00"  # a path, as GRUB logs files
        out.append((pcr, event_type, content, data))
    return out
