"""gRPC server reflection (``grpc.reflection.v1`` and ``v1alpha``) on purerpc.

So that grpcurl, Postman and other tools list the services and fetch their
descriptors from the running server, without a copy of the proto files. purerpc has
no reflection of its own, but the protocol is one bidirectional-streaming method over
ordinary messages, and purerpc serves streaming methods: each request in the stream
gets one response. The messages come from the standard reflection protos (proto/,
generated into payments.gen like the others); the descriptors served are the ones the
generated modules registered, limited to the files of the services served here and
their imports.

Open like ``/openapi.json``: it reveals the public wire contract, nothing else, so no
API key is asked for (tools connect before they know any).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import ModuleType
from typing import Any

import purerpc  # payments/__init__.py has applied the h2 alias by now
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from payments.gen.grpc.reflection.v1 import reflection_pb2 as v1
from payments.gen.grpc_reflection.v1alpha import reflection_pb2 as v1alpha

# grpc status codes, as ErrorResponse.error_code carries them
NOT_FOUND = purerpc.StatusCode.NOT_FOUND.value
INVALID_ARGUMENT = purerpc.StatusCode.INVALID_ARGUMENT.value


def _with_imports(files: Iterable[FileDescriptor]) -> dict[str, FileDescriptor]:
    """The files and every file they import, by name."""
    found: dict[str, FileDescriptor] = {}
    pending = list(files)
    while pending:
        file = pending.pop()
        if file.name not in found:
            found[file.name] = file
            pending.extend(file.dependencies)
    return found


class Reflection:
    """Answers reflection requests about ``service_names`` (full names) and itself."""

    def __init__(self, service_names: Iterable[str]) -> None:
        pool = descriptor_pool.Default()
        reflection = [
            module.DESCRIPTOR.services_by_name["ServerReflection"].full_name
            for module in (v1, v1alpha)
        ]
        self.service_names = sorted({*service_names, *reflection})
        self._pool = pool
        self._files = _with_imports(
            pool.FindServiceByName(name).file for name in self.service_names
        )

    def answer(self, pb: ModuleType, request: Any) -> Any:
        """The response (of ``pb``'s version) to one request."""
        kind = request.WhichOneof("message_request")
        response = pb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        if kind == "list_services":
            services = [pb.ServiceResponse(name=name) for name in self.service_names]
            response.list_services_response.service.extend(services)
        elif kind == "file_by_filename":
            self._files_response(pb, response, self._files.get(request.file_by_filename))
        elif kind == "file_containing_symbol":
            self._files_response(pb, response, self._file_of(request.file_containing_symbol))
        elif kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            if self._file_of(name) is None:
                self._error(response, NOT_FOUND, f"type {name!r} not found")
            else:  # proto3 messages have no extensions
                response.all_extension_numbers_response.base_type_name = name
        elif kind == "file_containing_extension":
            self._error(response, NOT_FOUND, "no extensions are defined")
        else:
            self._error(response, INVALID_ARGUMENT, "unknown reflection request")
        return response

    def _file_of(self, symbol: str) -> FileDescriptor | None:
        """The served file defining ``symbol``: a package-qualified type or service, or
        a method (``payments.PaymentsService.CreatePayment``)."""
        try:
            file = self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                return None
            if method not in found.methods_by_name:
                return None
            file = found.file
        return file if file.name in self._files else None

    def _files_response(self, pb: ModuleType, response: Any, file: FileDescriptor | None) -> None:
        """The file and, as grpcurl expects, the files it imports."""
        if file is None:
            self._error(response, NOT_FOUND, "not found")
            return
        files = _with_imports([file]).values()
        response.file_descriptor_response.file_descriptor_proto.extend(
            f.serialized_pb for f in files
        )

    @staticmethod
    def _error(response: Any, code: int, message: str) -> None:
        response.error_response.error_code = code
        response.error_response.error_message = message

    def services(self) -> list[purerpc.Service]:
        """The v1 and v1alpha reflection services, for :func:`serve_purerpc`."""
        return [self._service(v1), self._service(v1alpha)]

    def _service(self, pb: ModuleType) -> purerpc.Service:
        full_name = pb.DESCRIPTOR.services_by_name["ServerReflection"].full_name

        async def info(requests: AsyncIterator[Any], request: object = None) -> AsyncIterator[Any]:
            # ``request`` (the call's headers) is passed by PaymentsConnectionHandler.
            async for message in requests:
                yield self.answer(pb, message)

        service = purerpc.Service(full_name)
        service.add_method(
            "ServerReflectionInfo",
            info,
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                pb.ServerReflectionRequest,
                pb.ServerReflectionResponse,
            ),
        )
        return service
