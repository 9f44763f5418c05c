"""rnnzoo.server"""
