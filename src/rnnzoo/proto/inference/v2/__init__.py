"""Triton's ``grpc_service.proto`` and ``model_config.proto`` (BSD-3-Clause, see UPSTREAM) and their generated code."""
