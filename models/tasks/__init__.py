"""rnnzoo.models.tasks"""
