import purerpc
from . import payments_pb2 as payments__pb2


class PaymentsServiceServicer(purerpc.Servicer):
    async def Health(self, input_message):
        raise NotImplementedError()

    async def CreatePayment(self, input_message):
        raise NotImplementedError()

    async def GetPayment(self, input_message):
        raise NotImplementedError()

    async def ListPayments(self, input_message):
        raise NotImplementedError()

    async def CancelPayment(self, input_message):
        raise NotImplementedError()

    async def HandleProviderCallback(self, input_message):
        raise NotImplementedError()

    async def CreateRefund(self, input_message):
        raise NotImplementedError()

    async def GetRefund(self, input_message):
        raise NotImplementedError()

    async def ListRefunds(self, input_message):
        raise NotImplementedError()

    async def ListCallbackDeliveries(self, input_message):
        raise NotImplementedError()

    async def ResendCallback(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "payments.PaymentsService"
        )
        service_obj.add_method(
            "Health",
            self.Health,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.HealthRequest,
                payments__pb2.HealthResponse,
            )
        )
        service_obj.add_method(
            "CreatePayment",
            self.CreatePayment,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.CreatePaymentRequest,
                payments__pb2.PaymentEnvelopeResponse,
            )
        )
        service_obj.add_method(
            "GetPayment",
            self.GetPayment,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.GetPaymentRequest,
                payments__pb2.PaymentEnvelopeResponse,
            )
        )
        service_obj.add_method(
            "ListPayments",
            self.ListPayments,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.ListPaymentsRequest,
                payments__pb2.ListPaymentsResponse,
            )
        )
        service_obj.add_method(
            "CancelPayment",
            self.CancelPayment,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.CancelPaymentRequest,
                payments__pb2.PaymentEnvelopeResponse,
            )
        )
        service_obj.add_method(
            "HandleProviderCallback",
            self.HandleProviderCallback,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.HandleProviderCallbackRequest,
                payments__pb2.MessageResponse,
            )
        )
        service_obj.add_method(
            "CreateRefund",
            self.CreateRefund,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.CreateRefundRequest,
                payments__pb2.RefundEnvelopeResponse,
            )
        )
        service_obj.add_method(
            "GetRefund",
            self.GetRefund,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.GetRefundRequest,
                payments__pb2.RefundEnvelopeResponse,
            )
        )
        service_obj.add_method(
            "ListRefunds",
            self.ListRefunds,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.ListRefundsRequest,
                payments__pb2.ListRefundsResponse,
            )
        )
        service_obj.add_method(
            "ListCallbackDeliveries",
            self.ListCallbackDeliveries,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.ListCallbackDeliveriesRequest,
                payments__pb2.ListCallbackDeliveriesResponse,
            )
        )
        service_obj.add_method(
            "ResendCallback",
            self.ResendCallback,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.ResendCallbackRequest,
                payments__pb2.CallbackDeliveryEnvelope,
            )
        )
        return service_obj


class PaymentsServiceStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "payments.PaymentsService",
            channel
        )
        self.Health = self._client.get_method_stub(
            "Health",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.HealthRequest,
                payments__pb2.HealthResponse,
            )
        )
        self.CreatePayment = self._client.get_method_stub(
            "CreatePayment",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.CreatePaymentRequest,
                payments__pb2.PaymentEnvelopeResponse,
            )
        )
        self.GetPayment = self._client.get_method_stub(
            "GetPayment",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.GetPaymentRequest,
                payments__pb2.PaymentEnvelopeResponse,
            )
        )
        self.ListPayments = self._client.get_method_stub(
            "ListPayments",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.ListPaymentsRequest,
                payments__pb2.ListPaymentsResponse,
            )
        )
        self.CancelPayment = self._client.get_method_stub(
            "CancelPayment",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.CancelPaymentRequest,
                payments__pb2.PaymentEnvelopeResponse,
            )
        )
        self.HandleProviderCallback = self._client.get_method_stub(
            "HandleProviderCallback",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.HandleProviderCallbackRequest,
                payments__pb2.MessageResponse,
            )
        )
        self.CreateRefund = self._client.get_method_stub(
            "CreateRefund",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.CreateRefundRequest,
                payments__pb2.RefundEnvelopeResponse,
            )
        )
        self.GetRefund = self._client.get_method_stub(
            "GetRefund",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.GetRefundRequest,
                payments__pb2.RefundEnvelopeResponse,
            )
        )
        self.ListRefunds = self._client.get_method_stub(
            "ListRefunds",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.ListRefundsRequest,
                payments__pb2.ListRefundsResponse,
            )
        )
        self.ListCallbackDeliveries = self._client.get_method_stub(
            "ListCallbackDeliveries",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.ListCallbackDeliveriesRequest,
                payments__pb2.ListCallbackDeliveriesResponse,
            )
        )
        self.ResendCallback = self._client.get_method_stub(
            "ResendCallback",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                payments__pb2.ResendCallbackRequest,
                payments__pb2.CallbackDeliveryEnvelope,
            )
        )