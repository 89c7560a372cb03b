"""re2tal.training"""
