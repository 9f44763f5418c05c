"""rnnzoo.export"""
