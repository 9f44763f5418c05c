"""rnnzoo.proto.v1"""
