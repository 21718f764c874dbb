"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, as Triton and KServe define it), in
the same process and over the same pipeline as the REST doors. messages: the protocol's messages to and from
service/oip's model view · errors: the core's errors as gRPC status codes · servicer: the service's RPCs ·
server: the grpc.aio server with the health and reflection services, started and drained with the app."""
