import purerpc
from . import auth_pb2 as auth__pb2


class AuthServiceServicer(purerpc.Servicer):
    async def ValidateInternalAccess(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "auth.AuthService"
        )
        service_obj.add_method(
            "ValidateInternalAccess",
            self.ValidateInternalAccess,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                auth__pb2.ValidateInternalAccessRequest,
                auth__pb2.ValidateInternalAccessResponse,
            )
        )
        return service_obj


class AuthServiceStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "auth.AuthService",
            channel
        )
        self.ValidateInternalAccess = self._client.get_method_stub(
            "ValidateInternalAccess",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                auth__pb2.ValidateInternalAccessRequest,
                auth__pb2.ValidateInternalAccessResponse,
            )
        )