"""A small client of the Kubernetes CRI (runtime.v1) that containerd's CRI plugin serves.

``harness.cri``: grpcio plus our own subset of the API in cri.proto (cri_pb2.py); the methods are called by
their gRPC path, so no generated stubs are needed.

Public surface:
    CriClient(address)      RuntimeService/ImageService calls on containerd's socket
    pod_config(...)         a PodSandboxConfig of a host-network pod
    container_config(...)   a ContainerConfig running a command from an image
    pb                      the cri_pb2 module (messages and enums)
"""

from __future__ import annotations

from typing import Self

import grpc

from harness import cri_pb2 as pb

RUNTIME_SERVICE = "/runtime.v1.RuntimeService/"
IMAGE_SERVICE = "/runtime.v1.ImageService/"

# method -> (service path, response class); the request class is the argument's own.
_METHODS = {
    "Version": (RUNTIME_SERVICE, pb.VersionResponse),
    "RunPodSandbox": (RUNTIME_SERVICE, pb.RunPodSandboxResponse),
    "StopPodSandbox": (RUNTIME_SERVICE, pb.StopPodSandboxResponse),
    "RemovePodSandbox": (RUNTIME_SERVICE, pb.RemovePodSandboxResponse),
    "PodSandboxStatus": (RUNTIME_SERVICE, pb.PodSandboxStatusResponse),
    "CreateContainer": (RUNTIME_SERVICE, pb.CreateContainerResponse),
    "StartContainer": (RUNTIME_SERVICE, pb.StartContainerResponse),
    "StopContainer": (RUNTIME_SERVICE, pb.StopContainerResponse),
    "RemoveContainer": (RUNTIME_SERVICE, pb.RemoveContainerResponse),
    "ListContainers": (RUNTIME_SERVICE, pb.ListContainersResponse),
    "ContainerStatus": (RUNTIME_SERVICE, pb.ContainerStatusResponse),
    "ExecSync": (RUNTIME_SERVICE, pb.ExecSyncResponse),
    "ImageStatus": (IMAGE_SERVICE, pb.ImageStatusResponse),
}

_HOST_NETWORK = {"network": pb.NODE, "pid": pb.CONTAINER, "ipc": pb.POD}


def pod_config(name: str, uid: str, log_directory: str = "",
               namespace: str = "default") -> pb.PodSandboxConfig:
    """A pod on the host's network (no CNI needed; such a pod must not set a hostname),
    with a PID namespace per container and one IPC namespace for the pod, as kubelet
    asks for a hostNetwork pod."""
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
        log_directory=log_directory,
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(**_HOST_NETWORK))),
    )


def container_config(name: str, image: str, command: list[str],
                     log_path: str = "") -> pb.ContainerConfig:
    """A container of a host-network pod running ``command`` (absolute paths: the
    image's PATH is used, but naming the binary leaves nothing to chance)."""
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=0),
        image=pb.ImageSpec(image=image),
        command=command,
        log_path=log_path,
        linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(**_HOST_NETWORK))),
    )


class CriClient:
    """Blocking CRI calls on a unix socket; grpc.RpcError propagates (``.code()``)."""

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        self.channel = grpc.insecure_channel("unix://" + address)
        self.timeout = timeout

    def call(self, method: str, request, timeout: float | None = None):
        path, response = _METHODS[method]
        fn = self.channel.unary_unary(path + method,
                                      request_serializer=type(request).SerializeToString,
                                      response_deserializer=response.FromString)
        return fn(request, timeout=timeout or self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pods ---------------------------------------------------------------------------

    def run_pod(self, config: pb.PodSandboxConfig, handler: str = "") -> str:
        req = pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
        return self.call("RunPodSandbox", req).pod_sandbox_id

    def pod_status(self, pod_id: str) -> pb.PodSandboxStatus:
        return self.call("PodSandboxStatus", pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status

    def stop_pod(self, pod_id: str) -> None:
        self.call("StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod_id: str) -> None:
        self.call("RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    # -- containers ---------------------------------------------------------------------

    def create_container(self, pod_id: str, pod: pb.PodSandboxConfig,
                         config: pb.ContainerConfig) -> str:
        req = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        return self.call("CreateContainer", req).container_id

    def start_container(self, cid: str) -> None:
        self.call("StartContainer", pb.StartContainerRequest(container_id=cid))

    def stop_container(self, cid: str, timeout: int = 0) -> None:
        self.call("StopContainer", pb.StopContainerRequest(container_id=cid, timeout=timeout))

    def remove_container(self, cid: str) -> None:
        self.call("RemoveContainer", pb.RemoveContainerRequest(container_id=cid))

    def container_status(self, cid: str) -> pb.ContainerStatus:
        return self.call("ContainerStatus", pb.ContainerStatusRequest(container_id=cid)).status

    def list_containers(self, pod_id: str = "") -> list[pb.Container]:
        req = pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self.call("ListContainers", req).containers)

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 30) -> pb.ExecSyncResponse:
        req = pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout)
        return self.call("ExecSync", req, timeout=timeout + 30)

    # -- images -------------------------------------------------------------------------

    def image_status(self, ref: str) -> pb.Image | None:
        """The image CRI knows by ``ref``, or None (CRI answers an empty status)."""
        resp = self.call("ImageStatus", pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)))
        return resp.image if resp.HasField("image") else None
