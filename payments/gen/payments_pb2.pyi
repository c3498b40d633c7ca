from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PaymentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYMENT_STATUS_UNSPECIFIED: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_CREATED: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_PENDING: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_PROCESSING: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_PAID: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_FAILED: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_CANCELED: _ClassVar[PaymentStatus]
    PAYMENT_STATUS_EXPIRED: _ClassVar[PaymentStatus]

class PaymentMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYMENT_METHOD_UNSPECIFIED: _ClassVar[PaymentMethod]
    PAYMENT_METHOD_HOSTED_CARD: _ClassVar[PaymentMethod]
    PAYMENT_METHOD_PAYMENT_LINK: _ClassVar[PaymentMethod]

class PaymentType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYMENT_TYPE_UNSPECIFIED: _ClassVar[PaymentType]
    PAYMENT_TYPE_ONE_TIME: _ClassVar[PaymentType]
    PAYMENT_TYPE_RECURRING: _ClassVar[PaymentType]

class ProviderType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROVIDER_TYPE_UNSPECIFIED: _ClassVar[ProviderType]
    PROVIDER_TYPE_STRIPE: _ClassVar[ProviderType]

class RefundStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUND_STATUS_UNSPECIFIED: _ClassVar[RefundStatus]
    REFUND_STATUS_PENDING: _ClassVar[RefundStatus]
    REFUND_STATUS_SUCCEEDED: _ClassVar[RefundStatus]
    REFUND_STATUS_FAILED: _ClassVar[RefundStatus]
    REFUND_STATUS_CANCELED: _ClassVar[RefundStatus]
PAYMENT_STATUS_UNSPECIFIED: PaymentStatus
PAYMENT_STATUS_CREATED: PaymentStatus
PAYMENT_STATUS_PENDING: PaymentStatus
PAYMENT_STATUS_PROCESSING: PaymentStatus
PAYMENT_STATUS_PAID: PaymentStatus
PAYMENT_STATUS_FAILED: PaymentStatus
PAYMENT_STATUS_CANCELED: PaymentStatus
PAYMENT_STATUS_EXPIRED: PaymentStatus
PAYMENT_METHOD_UNSPECIFIED: PaymentMethod
PAYMENT_METHOD_HOSTED_CARD: PaymentMethod
PAYMENT_METHOD_PAYMENT_LINK: PaymentMethod
PAYMENT_TYPE_UNSPECIFIED: PaymentType
PAYMENT_TYPE_ONE_TIME: PaymentType
PAYMENT_TYPE_RECURRING: PaymentType
PROVIDER_TYPE_UNSPECIFIED: ProviderType
PROVIDER_TYPE_STRIPE: ProviderType
REFUND_STATUS_UNSPECIFIED: RefundStatus
REFUND_STATUS_PENDING: RefundStatus
REFUND_STATUS_SUCCEEDED: RefundStatus
REFUND_STATUS_FAILED: RefundStatus
REFUND_STATUS_CANCELED: RefundStatus

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class Payment(_message.Message):
    __slots__ = ("id", "request_id", "caller_service", "resource_type", "resource_id", "customer_ref", "amount_cents", "currency", "status", "payment_method", "payment_type", "provider", "recurring_interval", "recurring_interval_count", "provider_payment_id", "provider_subscription_id", "checkout_url", "provider_callback_hash", "provider_callback_url", "status_callback_url", "refunded_cents", "refundable_cents", "metadata", "created_at", "updated_at")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_SERVICE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_REF_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_METHOD_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    RECURRING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    RECURRING_INTERVAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKOUT_URL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_CALLBACK_HASH_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    STATUS_CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_CENTS_FIELD_NUMBER: _ClassVar[int]
    REFUNDABLE_CENTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    request_id: str
    caller_service: str
    resource_type: str
    resource_id: str
    customer_ref: str
    amount_cents: int
    currency: str
    status: PaymentStatus
    payment_method: PaymentMethod
    payment_type: PaymentType
    provider: ProviderType
    recurring_interval: str
    recurring_interval_count: int
    provider_payment_id: str
    provider_subscription_id: str
    checkout_url: str
    provider_callback_hash: str
    provider_callback_url: str
    status_callback_url: str
    refunded_cents: int
    refundable_cents: int
    metadata: _containers.ScalarMap[str, str]
    created_at: str
    updated_at: str
    def __init__(self, id: _Optional[int] = ..., request_id: _Optional[str] = ..., caller_service: _Optional[str] = ..., resource_type: _Optional[str] = ..., resource_id: _Optional[str] = ..., customer_ref: _Optional[str] = ..., amount_cents: _Optional[int] = ..., currency: _Optional[str] = ..., status: _Optional[_Union[PaymentStatus, str]] = ..., payment_method: _Optional[_Union[PaymentMethod, str]] = ..., payment_type: _Optional[_Union[PaymentType, str]] = ..., provider: _Optional[_Union[ProviderType, str]] = ..., recurring_interval: _Optional[str] = ..., recurring_interval_count: _Optional[int] = ..., provider_payment_id: _Optional[str] = ..., provider_subscription_id: _Optional[str] = ..., checkout_url: _Optional[str] = ..., provider_callback_hash: _Optional[str] = ..., provider_callback_url: _Optional[str] = ..., status_callback_url: _Optional[str] = ..., refunded_cents: _Optional[int] = ..., refundable_cents: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ...) -> None: ...

class CreatePaymentRequest(_message.Message):
    __slots__ = ("request_id", "caller_service", "resource_type", "resource_id", "customer_ref", "amount_cents", "currency", "payment_method", "payment_type", "provider", "recurring_interval", "recurring_interval_count", "status_callback_url", "success_url", "cancel_url", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_SERVICE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_REF_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_METHOD_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    RECURRING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    RECURRING_INTERVAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    STATUS_CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_URL_FIELD_NUMBER: _ClassVar[int]
    CANCEL_URL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    caller_service: str
    resource_type: str
    resource_id: str
    customer_ref: str
    amount_cents: int
    currency: str
    payment_method: PaymentMethod
    payment_type: PaymentType
    provider: ProviderType
    recurring_interval: str
    recurring_interval_count: int
    status_callback_url: str
    success_url: str
    cancel_url: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., caller_service: _Optional[str] = ..., resource_type: _Optional[str] = ..., resource_id: _Optional[str] = ..., customer_ref: _Optional[str] = ..., amount_cents: _Optional[int] = ..., currency: _Optional[str] = ..., payment_method: _Optional[_Union[PaymentMethod, str]] = ..., payment_type: _Optional[_Union[PaymentType, str]] = ..., provider: _Optional[_Union[ProviderType, str]] = ..., recurring_interval: _Optional[str] = ..., recurring_interval_count: _Optional[int] = ..., status_callback_url: _Optional[str] = ..., success_url: _Optional[str] = ..., cancel_url: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetPaymentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class ListPaymentsRequest(_message.Message):
    __slots__ = ("request_id", "caller_service", "resource_type", "resource_id", "has_status", "status", "provider", "limit", "offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_SERVICE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    caller_service: str
    resource_type: str
    resource_id: str
    has_status: bool
    status: PaymentStatus
    provider: ProviderType
    limit: int
    offset: int
    def __init__(self, request_id: _Optional[str] = ..., caller_service: _Optional[str] = ..., resource_type: _Optional[str] = ..., resource_id: _Optional[str] = ..., has_status: _Optional[bool] = ..., status: _Optional[_Union[PaymentStatus, str]] = ..., provider: _Optional[_Union[ProviderType, str]] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class CancelPaymentRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: int
    reason: str
    def __init__(self, id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class HandleProviderCallbackRequest(_message.Message):
    __slots__ = ("request_id", "provider", "callback_hash", "signature", "payload")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    provider: str
    callback_hash: str
    signature: str
    payload: str
    def __init__(self, request_id: _Optional[str] = ..., provider: _Optional[str] = ..., callback_hash: _Optional[str] = ..., signature: _Optional[str] = ..., payload: _Optional[str] = ...) -> None: ...

class PaymentEnvelopeResponse(_message.Message):
    __slots__ = ("payment",)
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    payment: Payment
    def __init__(self, payment: _Optional[_Union[Payment, _Mapping]] = ...) -> None: ...

class ListPaymentsResponse(_message.Message):
    __slots__ = ("payments",)
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    payments: _containers.RepeatedCompositeFieldContainer[Payment]
    def __init__(self, payments: _Optional[_Iterable[_Union[Payment, _Mapping]]] = ...) -> None: ...

class MessageResponse(_message.Message):
    __slots__ = ("message", "payment")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    message: str
    payment: Payment
    def __init__(self, message: _Optional[str] = ..., payment: _Optional[_Union[Payment, _Mapping]] = ...) -> None: ...

class ErrorResponse(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: str
    def __init__(self, error: _Optional[str] = ...) -> None: ...

class Refund(_message.Message):
    __slots__ = ("id", "payment_id", "request_id", "caller_service", "amount_cents", "currency", "status", "reason", "failure_reason", "provider_refund_id", "metadata", "created_at", "updated_at")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_SERVICE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    payment_id: int
    request_id: str
    caller_service: str
    amount_cents: int
    currency: str
    status: RefundStatus
    reason: str
    failure_reason: str
    provider_refund_id: str
    metadata: _containers.ScalarMap[str, str]
    created_at: str
    updated_at: str
    def __init__(self, id: _Optional[int] = ..., payment_id: _Optional[int] = ..., request_id: _Optional[str] = ..., caller_service: _Optional[str] = ..., amount_cents: _Optional[int] = ..., currency: _Optional[str] = ..., status: _Optional[_Union[RefundStatus, str]] = ..., reason: _Optional[str] = ..., failure_reason: _Optional[str] = ..., provider_refund_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ...) -> None: ...

class CreateRefundRequest(_message.Message):
    __slots__ = ("payment_id", "request_id", "amount_cents", "reason", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    payment_id: int
    request_id: str
    amount_cents: int
    reason: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, payment_id: _Optional[int] = ..., request_id: _Optional[str] = ..., amount_cents: _Optional[int] = ..., reason: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetRefundRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class ListRefundsRequest(_message.Message):
    __slots__ = ("payment_id",)
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    payment_id: int
    def __init__(self, payment_id: _Optional[int] = ...) -> None: ...

class RefundEnvelopeResponse(_message.Message):
    __slots__ = ("refund",)
    REFUND_FIELD_NUMBER: _ClassVar[int]
    refund: Refund
    def __init__(self, refund: _Optional[_Union[Refund, _Mapping]] = ...) -> None: ...

class ListRefundsResponse(_message.Message):
    __slots__ = ("refunds",)
    REFUNDS_FIELD_NUMBER: _ClassVar[int]
    refunds: _containers.RepeatedCompositeFieldContainer[Refund]
    def __init__(self, refunds: _Optional[_Iterable[_Union[Refund, _Mapping]]] = ...) -> None: ...

class CallbackAttempt(_message.Message):
    __slots__ = ("at", "status_code", "duration_ms", "error")
    AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    at: str
    status_code: int
    duration_ms: int
    error: str
    def __init__(self, at: _Optional[str] = ..., status_code: _Optional[int] = ..., duration_ms: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class CallbackDelivery(_message.Message):
    __slots__ = ("id", "webhook_id", "kind", "refund_id", "state", "attempt_count", "next_attempt_at", "created_at", "attempts")
    ID_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    webhook_id: str
    kind: str
    refund_id: int
    state: str
    attempt_count: int
    next_attempt_at: str
    created_at: str
    attempts: _containers.RepeatedCompositeFieldContainer[CallbackAttempt]
    def __init__(self, id: _Optional[int] = ..., webhook_id: _Optional[str] = ..., kind: _Optional[str] = ..., refund_id: _Optional[int] = ..., state: _Optional[str] = ..., attempt_count: _Optional[int] = ..., next_attempt_at: _Optional[str] = ..., created_at: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[CallbackAttempt, _Mapping]]] = ...) -> None: ...

class ListCallbackDeliveriesRequest(_message.Message):
    __slots__ = ("payment_id",)
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    payment_id: int
    def __init__(self, payment_id: _Optional[int] = ...) -> None: ...

class ListCallbackDeliveriesResponse(_message.Message):
    __slots__ = ("deliveries",)
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[CallbackDelivery]
    def __init__(self, deliveries: _Optional[_Iterable[_Union[CallbackDelivery, _Mapping]]] = ...) -> None: ...

class ResendCallbackRequest(_message.Message):
    __slots__ = ("payment_id",)
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    payment_id: int
    def __init__(self, payment_id: _Optional[int] = ...) -> None: ...

class CallbackDeliveryEnvelope(_message.Message):
    __slots__ = ("delivery",)
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    delivery: CallbackDelivery
    def __init__(self, delivery: _Optional[_Union[CallbackDelivery, _Mapping]] = ...) -> None: ...
