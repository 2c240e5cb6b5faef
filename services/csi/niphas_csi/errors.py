"""What can go wrong with a volume, in the driver's own terms. The gRPC edge (server.py) turns
each into the CSI spec's status code, once; messages name the problem for the pod's events."""

from __future__ import annotations


class VolumeError(Exception):
    """Base of the errors a Node call reports to kubelet."""


class InvalidRequest(VolumeError):
    """The request itself is wrong (a bad store path, a target outside the kubelet dir...)."""


class Conflict(VolumeError):
    """The volume id is already published with another target or other store paths."""


class PathsUnavailable(VolumeError):
    """A missing path could not be fetched (the mesh reported why)."""


class FetchDeadline(VolumeError):
    """Missing paths did not arrive before the deadline."""


class MountFailed(VolumeError):
    """The kernel refused a mount or unmount."""
