"""The Open Inference Protocol v2 front door (KServe's predict protocol v2, spoken by Triton, KServe and
MLServer), with Triton's binary tensor extension. codec: the protocol's documents, tensors and REST body
format · model: our model in the protocol's tensors, transport-free · routes: the REST routes · errors: the
protocol's statuses and error body. The gRPC door (service/grpc/) uses the same codec checks and model.py."""
