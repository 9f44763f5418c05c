"""rnnzoo.proto.inference: the KServe v2 / Triton ``inference`` package."""
