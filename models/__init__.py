"""rnnzoo.models"""
