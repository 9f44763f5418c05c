"""rnnzoo.proto"""
