from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ValidateInternalAccessRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class ValidateInternalAccessResponse(_message.Message):
    __slots__ = ("service_name", "allowed_access")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ACCESS_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    allowed_access: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service_name: _Optional[str] = ..., allowed_access: _Optional[_Iterable[str]] = ...) -> None: ...
